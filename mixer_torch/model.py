"""MLP-Mixer in PyTorch, computing the same function as the official Flax model.

Sections: blocks, model, variant factory, load helpers (same order as mixer_jax/model.py).

State-dict naming, the one rule (``mixer_convert.layouts.torch_key``): take the official
'/'-joined Flax path, replace '/' by '.', and rename the leaf ``kernel`` or ``scale`` to
``weight``. Module attributes are named after the Flax modules (``MixerBlock_3``,
``token_mixing``, ``Dense_0``) so the rule holds by construction. Values: Dense kernels
(in, out) are transposed to Linear weights (out, in); the stem kernel HWIO becomes OIHW.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixer_convert.spec import LAYERNORM_EPS, MixerConfig, block_drop_rates, check_image_shape, config_for

# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------


class MlpBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.Dense_0 = nn.Linear(dim, mlp_dim)
        self.Dense_1 = nn.Linear(mlp_dim, dim)
        self.dropout_rate = dropout_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.Dense_0(x), approximate="tanh")  # official uses tanh GELU (timm: exact)
        y = F.dropout(y, self.dropout_rate, self.training)
        return F.dropout(self.Dense_1(y), self.dropout_rate, self.training)


class MixerBlock(nn.Module):
    def __init__(self, num_tokens: int, dim: int, tokens_mlp_dim: int, channels_mlp_dim: int,
                 drop_p: float = 0.0, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.LayerNorm_0 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.token_mixing = MlpBlock(num_tokens, tokens_mlp_dim, dropout_rate)
        self.LayerNorm_1 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.channel_mixing = MlpBlock(dim, channels_mlp_dim, dropout_rate)
        self.drop_p = drop_p

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # big_vision stochastic depth: a per-sample mask on each residual branch, no 1/(1-p) rescale.
        # Without it, no multiply at all: a pass over (B, S, C) per branch costs ~10% at inference.
        if not self.training or not self.drop_p:
            return x + y
        keep = torch.empty((x.shape[0], 1, 1), dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.drop_p)
        return x + y * keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._add(x, self.token_mixing(self.LayerNorm_0(x).transpose(1, 2)).transpose(1, 2))
        return self._add(x, self.channel_mixing(self.LayerNorm_1(x)))


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class MlpMixer(nn.Module):
    """Input NCHW images of ``config.image_size`` (the PyTorch convention; the Flax model
    takes NHWC); output logits, or pre-logits when ``num_classes`` is None."""

    def __init__(self, config: MixerConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.stem = nn.Conv2d(cfg.in_chans, cfg.hidden_dim, cfg.patch_size, stride=cfg.patch_size)
        for i, drop_p in enumerate(block_drop_rates(cfg)):
            self.add_module(f"MixerBlock_{i}", MixerBlock(cfg.num_tokens, cfg.hidden_dim, cfg.tokens_mlp_dim,
                                                          cfg.channels_mlp_dim, drop_p, cfg.dropout_rate))
        self.pre_head_layer_norm = nn.LayerNorm(cfg.hidden_dim, eps=LAYERNORM_EPS)
        self.head = nn.Linear(cfg.hidden_dim, cfg.num_classes) if cfg.num_classes is not None else None
        if not self.stem.weight.is_meta:  # built on the meta device only to have weights assigned
            self.reset_parameters()

    @property
    def blocks(self) -> list[MixerBlock]:
        return [getattr(self, f"MixerBlock_{i}") for i in range(self.config.num_blocks)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisers: lecun_normal (truncated) kernels, zero biases, zero head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                lecun_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.head is not None:
            nn.init.zeros_(self.head.weight)

    def forward_features(self, x: torch.Tensor, return_intermediates: bool = False):
        """Images -> normalised tokens (B, S, C) before pooling."""
        check_image_shape(tuple(x.shape), self.config, "NCHW")
        inter = {}
        x = self.stem(x).flatten(2).transpose(1, 2)  # raster (h, w) token order, as official
        inter["stem"] = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            inter[f"MixerBlock_{i}"] = x
        x = self.pre_head_layer_norm(x)
        return (x, inter) if return_intermediates else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=1)
        return x if pre_logits or self.head is None else self.head(x)

    def forward(self, x: torch.Tensor, return_intermediates: bool = False):
        """With ``return_intermediates=True`` returns ``(out, {name: tensor})`` with the names
        of ``mixer_convert.spec.intermediate_names`` (the same as the Flax model returns)."""
        x, inter = self.forward_features(x, return_intermediates=True)
        inter["pre_logits"] = x = self.forward_head(x, pre_logits=True)
        if self.head is not None:
            inter["logits"] = x = self.head(x)
        return (x, inter) if return_intermediates else x

    def reset_classifier(self, num_classes: int | None, global_pool: str | None = None) -> None:
        """Replace the head with a fresh zero-initialised one (None or 0 removes it). timm's
        signature; the pooling is always the mean over tokens ('avg')."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"MLP-Mixer pools by the mean over tokens only (global_pool='avg'), got {global_pool!r}")
        num_classes = num_classes or None
        self.config = self.config.replace(num_classes=num_classes)
        ref = self.pre_head_layer_norm.weight
        self.head = None if num_classes is None else nn.Linear(self.config.hidden_dim, num_classes).to(ref)
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # What timm users reach for (timm's attribute names and meanings: 0 classes = no head).
    @property
    def num_classes(self) -> int:
        return self.config.num_classes or 0

    @property
    def num_features(self) -> int:
        return self.config.hidden_dim

    def get_classifier(self) -> nn.Module:
        return self.head if self.head is not None else nn.Identity()

    def __prepare_scriptable__(self) -> nn.Sequential:
        """What ``torch.jit.script(model)`` compiles: the inference forward as an ``nn.Sequential``
        of this model's own modules under their own names (so the same parameters and the same
        state-dict keys), without the Python-only parts (the shape check's messages,
        ``return_intermediates``)."""
        layers = [("stem", self.stem), ("to_tokens", _ToTokens())]
        layers += [(f"MixerBlock_{i}", b) for i, b in enumerate(self.blocks)]
        layers += [("pre_head_layer_norm", self.pre_head_layer_norm), ("pool", _MeanTokens())]
        if self.head is not None:
            layers.append(("head", self.head))
        return nn.Sequential(OrderedDict(layers)).train(self.training)


class _ToTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class _MeanTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def lecun_normal_(w: torch.Tensor) -> None:
    # flax lecun_normal: truncated normal (+-2 sd) with variance 1/fan_in after truncation.
    fan_in = w[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


# --------------------------------------------------------------------------------------
# Variant factory
# --------------------------------------------------------------------------------------


def create_model(variant: str | MixerConfig = "B/16", pretrained: bool | str = False, **overrides) -> MlpMixer:
    """``create_model('B/16', num_classes=10)``; overrides are MixerConfig fields. ``variant`` may
    also be timm's name (``mixer_b16_224``). With ``pretrained`` (True, a tag such as
    ``'imagenet21k'``, or a checkpoint source) the weights are loaded: see :func:`from_pretrained`."""
    if pretrained:
        if isinstance(variant, MixerConfig):
            raise ValueError("pretrained=... needs a variant name such as 'B/16', not a MixerConfig")
        return from_pretrained(variant, pretrained, **overrides)
    cfg = variant.replace(**overrides) if isinstance(variant, MixerConfig) else config_for(variant, **overrides)
    return MlpMixer(cfg)


# --------------------------------------------------------------------------------------
# Load helpers
# --------------------------------------------------------------------------------------


def load_flat(model: MlpMixer, flat: Mapping[str, np.ndarray]) -> MlpMixer:
    """Load canonical (official-layout) numpy weights; strict: any missing, unexpected or
    mis-shaped key raises ``ParamMismatchError`` listing all of them, and nothing is loaded."""
    model.load_state_dict(_state_dict(flat, model.config), strict=True)
    return model


def _state_dict(flat: Mapping[str, np.ndarray], cfg: MixerConfig) -> dict[str, torch.Tensor]:
    from mixer_convert.formats.torch import numpy_to_torch
    from mixer_convert.layouts import canonical_to_torch

    return {k: numpy_to_torch(v) for k, v in canonical_to_torch(flat, cfg).items()}


def model_from_flat(flat: Mapping[str, np.ndarray], cfg: MixerConfig) -> MlpMixer:
    """A float32 model holding ``flat`` (strictly checked), built without the random
    initialisation that loading would overwrite: the modules are made on the meta device and
    the checkpoint's tensors become the parameters (``assign=True``, no second copy)."""
    sd = {k: v if v.dtype == torch.float32 else v.float() for k, v in _state_dict(flat, cfg).items()}
    with torch.device("meta"):
        model = MlpMixer(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def from_checkpoint(path, num_classes: int | None | str = "keep", scale: int = 1, variant: str | None = None,
                    prefix: str | None = None, image_size=None, **overrides) -> MlpMixer:
    """A model from any checkpoint the bridge reads (official .npz, Flax, PyTorch, timm,
    safetensors), a path or a published name/URL (``B/16-i21k``, ``gs://mixer_models/...``,
    ``hf-hub:timm/...``; downloaded into the cache): optionally a fresh head for ``num_classes``
    and token-mixing resized for ``scale`` x larger images. ``image_size`` (H, W) is the file's,
    needed only for a non-square patch grid. ``overrides`` (stoch_depth, dropout_rate) change
    non-shape fields; ``prefix`` picks the parameter tree of a file that holds several
    (e.g. 'params/')."""
    from mixer_convert.load import load_checkpoint, with_overrides

    flat, cfg = load_checkpoint(path, num_classes, scale, variant, image_size=image_size, prefix=prefix)
    return model_from_flat(flat, with_overrides(cfg, overrides))


def from_pretrained(model: str, pretrained: bool | str = True, num_classes: int | None | str = "keep",
                    scale: int = 1, **overrides) -> MlpMixer:
    """Published weights by name: ``from_pretrained('B/16-i21k')``, ``from_pretrained('B/16',
    'imagenet21k')``, ``from_pretrained('mixer_b16_224')`` (the variant's default file),
    ``from_pretrained('hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k')``, or any path or URL.
    Tags and defaults: :func:`mixer_convert.catalogue.pretrained_source`."""
    from mixer_convert.catalogue import pretrained_source

    source, variant = pretrained_source(model, pretrained)
    return from_checkpoint(source, num_classes, scale, variant, **overrides)


def to_flat(model: MlpMixer) -> dict[str, np.ndarray]:
    """State dict -> canonical numpy dict (official names and layouts; bfloat16 stays bfloat16)."""
    from mixer_convert.formats.torch import torch_to_numpy
    from mixer_convert.layouts import torch_to_canonical

    sd = {k: torch_to_numpy(v) for k, v in model.state_dict().items()}
    return torch_to_canonical(sd, model.config)
