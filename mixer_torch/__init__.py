"""MLP-Mixer in PyTorch, same function and (by one rule) same parameter names as the official Flax model."""
from mixer_torch.model import (MixerBlock, MlpBlock, MlpMixer, create_model, from_checkpoint, from_pretrained, load_flat,
                               model_from_flat, to_flat)

__all__ = ["MLP_Mixer", "MixerBlock", "MlpBlock", "MlpMixer", "create_model", "from_checkpoint", "from_pretrained",
           "load_flat", "model_from_flat", "to_flat"]


def __getattr__(name: str):
    # Lazy so that `python -m mixer_torch.mlp_mixer` does not import its own module twice.
    if name == "MLP_Mixer":
        from mixer_torch.mlp_mixer import MLP_Mixer
        return MLP_Mixer
    raise AttributeError(name)
