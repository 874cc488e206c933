"""Drop-in constructor for users of the original PyTorch port (lavish619, ``mlp_mixer.py``).

``MLP_Mixer(...)`` keeps that port's arguments and their meaning but builds our
:class:`~mixer_torch.model.MlpMixer`, which computes the official function, so
Google's checkpoints load into it. What differs from the original port's numerics, on
purpose: a LayerNorm before the head (official), LayerNorm eps 1e-6 (was 1e-5), tanh GELU
(was exact), non-square images allowed. ``dropout`` keeps its place (after each GELU and
after each MLP's second Linear) and its meaning.

Run ``python -m mixer_torch.mlp_mixer`` to build the default model and print logits for a
random image, as ``python mlp_mixer.py`` did.
"""
from __future__ import annotations

import torch

from mixer_convert.spec import MixerConfig
from mixer_torch.model import MlpMixer, lecun_normal_


def MLP_Mixer(image_shape: tuple[int, int, int] = (224, 224, 3), patch_size: int = 16, num_classes: int = 10,
              num_mixers: int = 8, num_features: int = 512, expansion_token: float = 4,
              expansion_channel: float = 0.5, dropout: float = 0.5) -> MlpMixer:  # noqa: N802 (original name)
    """image_shape is (H, W, C); token-MLP hidden = int(expansion_token * num_patches);
    channel-MLP hidden = int(expansion_channel * num_features); num_mixers blocks of width num_features."""
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (height, width, channels), got {image_shape!r}")
    h, w, c = image_shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image_shape {h}x{w} is not divisible by patch_size {patch_size}")
    num_patches = (h // patch_size) * (w // patch_size)
    return MlpMixer(MixerConfig(
        patch_size=patch_size, hidden_dim=num_features, num_blocks=num_mixers,
        tokens_mlp_dim=int(expansion_token * num_patches), channels_mlp_dim=int(expansion_channel * num_features),
        num_classes=num_classes, image_size=(h, w), in_chans=c, dropout_rate=dropout))


def main() -> None:
    model = MLP_Mixer().eval()
    h, w, c = 224, 224, 3
    with torch.no_grad():
        lecun_normal_(model.head.weight)  # the official zero head would print only zeros
        logits = model(torch.randn(1, c, h, w))
    print(f"MLP_Mixer: {sum(p.numel() for p in model.parameters()):,} parameters; logits {tuple(logits.shape)}")
    print(logits)


if __name__ == "__main__":
    main()
