"""Fine-tuning helpers on canonical numpy params: a new head, and higher resolution.

Higher resolution (paper, appendix C): scaling the image by an integer K with the patch
size fixed gives K^2 S tokens. Each token-mixing MLP becomes block-diagonal with K^2 copies
of the original, one per K x K sub-image, so the scaled model starts out computing exactly
what the base model computes on each sub-image. The paper groups tokens by sub-image; we fold
that grouping into the weights instead (a permutation of the token axis), so the model keeps
its raster token order and the result loads into any implementation, timm included.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from mixer_convert.params import check_params
from mixer_convert.spec import MixerConfig


def new_head(flat: Mapping[str, np.ndarray], cfg: MixerConfig, num_classes: int | None
             ) -> tuple[dict[str, np.ndarray], MixerConfig]:
    """Replace the head by the official fresh one (zeros) for ``num_classes`` (None: no head).
    Keeps the checkpoint's head when it already has that many classes."""
    out = {k: v for k, v in flat.items() if not k.startswith("head/")}
    if num_classes is not None:
        if cfg.num_classes == num_classes:
            out["head/kernel"], out["head/bias"] = flat["head/kernel"], flat["head/bias"]
        else:
            dtype = flat["pre_head_layer_norm/scale"].dtype
            out["head/kernel"] = np.zeros((cfg.hidden_dim, num_classes), dtype)
            out["head/bias"] = np.zeros((num_classes,), dtype)
    return out, cfg.replace(num_classes=num_classes)


def subimage_order(grid: tuple[int, int], scale: int) -> np.ndarray:
    """For the K-times grid, the raster token index of each sub-image-grouped position:
    grouped index (a*K + b)*S + i*gw + j  <-  raster index (a*gh + i)*(K*gw) + b*gw + j."""
    gh, gw = grid
    a, b, i, j = np.meshgrid(np.arange(scale), np.arange(scale), np.arange(gh), np.arange(gw), indexing="ij")
    return ((a * gh + i) * (scale * gw) + b * gw + j).reshape(-1)


def _block_diag(kernel: np.ndarray, n: int) -> np.ndarray:
    rows, cols = kernel.shape
    out = np.zeros((n * rows, n * cols), kernel.dtype)
    for t in range(n):
        out[t * rows:(t + 1) * rows, t * cols:(t + 1) * cols] = kernel
    return out


def resize_token_mixing(flat: Mapping[str, np.ndarray], cfg: MixerConfig, scale: int
                        ) -> tuple[dict[str, np.ndarray], MixerConfig]:
    """Params and config for images ``scale`` times larger per side (patch size unchanged)."""
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"resolution scale must be a positive integer, got {scale!r}")
    check_params(flat, cfg)
    if scale == 1:
        return dict(flat), cfg
    n = scale * scale
    grouped = subimage_order(cfg.grid, scale)
    raster_to_grouped = np.argsort(grouped)  # row r of the raster weights = row raster_to_grouped[r] grouped
    out = dict(flat)
    for b in range(cfg.num_blocks):
        p = f"MixerBlock_{b}/token_mixing"
        out[f"{p}/Dense_0/kernel"] = _block_diag(flat[f"{p}/Dense_0/kernel"], n)[raster_to_grouped]
        out[f"{p}/Dense_0/bias"] = np.tile(flat[f"{p}/Dense_0/bias"], n)
        out[f"{p}/Dense_1/kernel"] = _block_diag(flat[f"{p}/Dense_1/kernel"], n)[:, raster_to_grouped]
        out[f"{p}/Dense_1/bias"] = np.tile(flat[f"{p}/Dense_1/bias"], n)[raster_to_grouped]
    new_cfg = resized_config(cfg, scale)
    check_params(out, new_cfg, what="resized params")
    return out, new_cfg


def resized_config(cfg: MixerConfig, scale: int) -> MixerConfig:
    """The architecture :func:`resize_token_mixing` makes of ``cfg``: images ``scale`` x larger
    each way, token-mixing ``scale``² x wider (one copy of the MLP per sub-image)."""
    h, w = cfg.image_size
    return cfg.replace(image_size=(h * scale, w * scale), tokens_mlp_dim=cfg.tokens_mlp_dim * scale * scale)


def tile_images(images: np.ndarray, scale: int) -> np.ndarray:
    """(scale^2 * B, H, W, C) -> (B, scale*H, scale*W, C): image a*scale+b of each group goes
    to sub-image (a, b). The inverse view of what ``resize_token_mixing`` computes on."""
    n = scale * scale
    if images.shape[0] % n:
        raise ValueError(f"need a multiple of {n} images to tile, got {images.shape[0]}")
    bsz, h, w, c = images.shape[0] // n, *images.shape[1:]
    x = images.reshape(bsz, scale, scale, h, w, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(bsz, scale * h, scale * w, c)
