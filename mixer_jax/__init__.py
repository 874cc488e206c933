"""MLP-Mixer in Flax, parameter tree identical to the official checkpoints."""
from mixer_jax.model import (MixerBlock, MlpBlock, MlpMixer, create_model, from_checkpoint, from_pretrained,
                             init_params, params_from_flat, params_to_flat)

__all__ = ["MixerBlock", "MlpBlock", "MlpMixer", "create_model", "from_checkpoint", "from_pretrained", "init_params",
           "params_from_flat", "params_to_flat"]
