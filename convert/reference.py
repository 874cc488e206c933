"""A third implementation of the Mixer forward pass, in numpy float64: the gold reference
that checks a conversion when only one framework (or none) is installed."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from mixer_convert.spec import LAYERNORM_EPS, MixerConfig, check_image_shape


def _ln(x, p, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LAYERNORM_EPS) * p[f"{name}/scale"] + p[f"{name}/bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def erfc(x):
    """The complementary error function to a relative error below 1.2e-7 everywhere (Numerical
    Recipes' Chebyshev fit ``erfcc``): numpy has no erf, and math.erf element by element costs
    seconds per model."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    r = t * np.exp(poly)
    return np.where(x >= 0, r, 2.0 - r)


def gelu_erf(x):
    """The exact GELU x * Phi(x), which timm's nn.GELU computes (the official model uses tanh)."""
    return 0.5 * x * erfc(-x / np.sqrt(2.0))


GELUS = {"tanh": _gelu_tanh, "erf": gelu_erf}


def _mlp(x, p, name, gelu=_gelu_tanh):
    h = gelu(x @ p[f"{name}/Dense_0/kernel"] + p[f"{name}/Dense_0/bias"])
    return h @ p[f"{name}/Dense_1/kernel"] + p[f"{name}/Dense_1/bias"]


def forward(flat: Mapping[str, np.ndarray], cfg: MixerConfig, images_nhwc: np.ndarray,
            gelu: str = "tanh") -> np.ndarray:
    """Logits (or pre-logits without a head) for NHWC images, computed in float64. ``gelu='erf'``
    computes what timm's Mixers compute (exact GELU) instead of the official function."""
    act = GELUS[gelu]
    check_image_shape(images_nhwc.shape, cfg, "NHWC")

    class _F64(dict):  # each weight in float64 only while it is used, not the whole model at once
        def __missing__(self, key):
            return np.asarray(flat[key], dtype=np.float64)
    p = _F64()
    x = np.asarray(images_nhwc, np.float64)
    (ph, pw), (gh, gw) = cfg.patch_size, cfg.grid
    b = x.shape[0]
    patches = x.reshape(b, gh, ph, gw, pw, cfg.in_chans).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
    x = patches @ p["stem/kernel"].reshape(-1, cfg.hidden_dim) + p["stem/bias"]
    for i in range(cfg.num_blocks):
        blk = f"MixerBlock_{i}"
        x = x + _mlp(_ln(x, p, f"{blk}/LayerNorm_0").swapaxes(1, 2), p, f"{blk}/token_mixing", act).swapaxes(1, 2)
        x = x + _mlp(_ln(x, p, f"{blk}/LayerNorm_1"), p, f"{blk}/channel_mixing", act)
    x = _ln(x, p, "pre_head_layer_norm").mean(1)
    if cfg.num_classes is not None:
        x = x @ p["head/kernel"] + p["head/bias"]
    return x
