"""Preprocessing's numpy path on demand: with numba installed, mixer_convert.preprocess runs uint8
images through the compiled kernels; inside :func:`numpy_path_only` it runs its numpy code."""
import contextlib

from mixer_convert import kernels


@contextlib.contextmanager
def numpy_path_only():
    saved = kernels.vit_jax, kernels.big_vision
    kernels.vit_jax = kernels.big_vision = lambda *args: False
    try:
        yield
    finally:
        kernels.vit_jax, kernels.big_vision = saved
