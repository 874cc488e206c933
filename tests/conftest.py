import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# fp32: the bound on logits, and a relative bound on every intermediate.
FP32_LOGITS_MAX_ABS = 1e-4
FP32_REL = 1e-5
# bf16 has an 8-bit mantissa (one rounding = 3.9e-3 relative); errors compound over blocks, so
# both sides must stay within 5e-2 of each other and of the fp32 reference, measured relative
# to each intermediate's largest magnitude. Observed: about 2e-2 at worst (B/16 last block).
BF16_REL = 5e-2


def images(batch: int, h: int, w: int, seed: int = 1, c: int = 3) -> np.ndarray:
    """Images already preprocessed to [-1, 1], NHWC."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, h, w, c)).astype(np.float32)


def has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


requires_jax = pytest.mark.skipif(not has_module("flax"), reason="needs the jax extra (jax, flax)")
requires_torch = pytest.mark.skipif(not has_module("torch"), reason="needs the torch extra")
