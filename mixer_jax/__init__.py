"""MLP-Mixer in Flax, parameter tree identical to the official checkpoints: Linen here (mixer_jax.model),
NNX in mixer_jax.nnx."""

__all__ = ["MixerBlock", "MlpBlock", "MlpMixer", "create_model", "from_checkpoint", "from_pretrained", "init_params",
           "params_from_flat", "params_to_flat"]


def __getattr__(name: str):
    # Lazy, so that importing a submodule that needs no Flax (the mixer-train entry point, which
    # must say which extra is missing in a torch-only install) does not import flax.
    import importlib
    if name == "nnx":  # the Flax NNX model, mixer_jax.nnx (imported on first use, like the rest)
        return importlib.import_module("mixer_jax.nnx")
    if name in __all__:
        return getattr(importlib.import_module("mixer_jax.model"), name)
    raise AttributeError(f"module 'mixer_jax' has no attribute {name!r}")
