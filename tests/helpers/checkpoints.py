"""The tiny Mixer most checkpoint tests convert, and small comparisons of what they write."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mixer_convert import config_for, random_params

# A 48x48 S/16 narrowed to 24 channels, 3 blocks and 5 classes: every tensor kind, a few KB.
TINY = config_for("S/16", image_size=48, hidden_dim=24, num_blocks=3, tokens_mlp_dim=8, channels_mlp_dim=40,
                  num_classes=5)


def write_official(folder: Path, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """An official-layout .npz of random TINY weights, as vit_jax writes it (np.savez of '/'-joined names)."""
    flat = random_params(TINY, seed)
    path = folder / "Mixer-T_16.npz"
    np.savez(path, **flat)
    return path, flat


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_np(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def assert_same(a: dict, b: dict) -> None:
    """The same names, dtypes and values."""
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
