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


# 32x48 with 4x4 patches: 96 tokens, which no square grid gives.
NON_SQUARE = config_for("S/16", patch_size=4, image_size=(32, 48), hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                        channels_mlp_dim=24, num_classes=3)


def bf16_npz(path, cfg, seed: int = 4) -> dict[str, np.ndarray]:
    """``np.savez`` of bfloat16 arrays, as big_vision saves them (numpy writes each as the void
    type 'V2'); returns the values the file holds, as float32."""
    import ml_dtypes

    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_params(cfg, seed).items()}
    np.savez(path, **bf16)
    with np.load(path) as z:
        assert {z[k].dtype for k in z.files} == {np.dtype("V2")}
    return {k: v.astype(np.float32) for k, v in bf16.items()}
