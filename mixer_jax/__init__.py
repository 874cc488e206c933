"""MLP-Mixer in Flax, parameter tree identical to the official checkpoints."""

__all__ = ["MixerBlock", "MlpBlock", "MlpMixer", "create_model", "from_checkpoint", "from_pretrained", "init_params",
           "params_from_flat", "params_to_flat"]


def __getattr__(name: str):
    # Lazy, so that importing a submodule that needs no Flax (the mixer-train entry point, which
    # must say which extra is missing in a torch-only install) does not import flax.
    if name in __all__:
        import importlib
        return getattr(importlib.import_module("mixer_jax.model"), name)
    raise AttributeError(f"module 'mixer_jax' has no attribute {name!r}")
