import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def images(batch: int, h: int, w: int, seed: int = 1, c: int = 3) -> np.ndarray:
    """Images already preprocessed to [-1, 1], NHWC."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, h, w, c)).astype(np.float32)


def has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


requires_jax = pytest.mark.skipif(not has_module("flax"), reason="needs the jax extra (jax, flax)")
requires_torch = pytest.mark.skipif(not has_module("torch"), reason="needs the torch extra")
