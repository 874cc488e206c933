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


def _mlp(x, p, name):
    h = _gelu_tanh(x @ p[f"{name}/Dense_0/kernel"] + p[f"{name}/Dense_0/bias"])
    return h @ p[f"{name}/Dense_1/kernel"] + p[f"{name}/Dense_1/bias"]


def forward(flat: Mapping[str, np.ndarray], cfg: MixerConfig, images_nhwc: np.ndarray) -> np.ndarray:
    """Logits (or pre-logits without a head) for NHWC images, computed in float64."""
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
        x = x + _mlp(_ln(x, p, f"{blk}/LayerNorm_0").swapaxes(1, 2), p, f"{blk}/token_mixing").swapaxes(1, 2)
        x = x + _mlp(_ln(x, p, f"{blk}/LayerNorm_1"), p, f"{blk}/channel_mixing")
    x = _ln(x, p, "pre_head_layer_norm").mean(1)
    if cfg.num_classes is not None:
        x = x @ p["head/kernel"] + p["head/bias"]
    return x
