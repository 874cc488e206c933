"""The one loading path every consumer shares (both ``from_checkpoint``s, ``init_from``, the
converter, the parity report):

    read (any format) -> canonical names (one strict map) -> infer config from shapes and check
    every key, shape and dtype, and the total size (before any data is read) -> materialise float
    tensors -> transform (resize, new head)

Framework-free: numpy in, numpy out; each model turns the result into its own parameters.
"""
from __future__ import annotations

import os
from typing import Literal

import numpy as np

from mixer_convert.io import MAX_BYTES, CheckpointError, LazyParams, cast, check_float, read_params, shape_view
from mixer_convert.params import check_params, check_variant, infer_config
from mixer_convert.resize import new_head, resize_token_mixing
from mixer_convert.spec import MixerConfig

Keep = Literal["keep"]


def open_checkpoint(path: str | os.PathLike, variant: str | None = None, image_size=None,
                    prefix: str | None = None, max_bytes: int | None = MAX_BYTES) -> tuple[LazyParams, MixerConfig]:
    """Lazy canonical params and their config; every name, shape and dtype is checked, no data
    read. Checkpoints declaring more than ``max_bytes`` (None: no limit) are refused. The caller
    closes the params (``.close()``)."""
    params = read_params(path, prefix=prefix, max_bytes=max_bytes)
    try:
        shapes = shape_view(params)
        cfg = infer_config(shapes, image_size=image_size)
        if variant:
            check_variant(cfg, variant)
        check_params(shapes, cfg, what=str(path))
        for key, dtype in params.dtypes.items():
            try:
                check_float(key, dtype)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
    except BaseException:
        params.close()
        raise
    return params, cfg


def load_checkpoint(path: str | os.PathLike, num_classes: int | None | Keep = "keep", scale: int = 1,
                    variant: str | None = None, image_size=None, prefix: str | None = None,
                    max_bytes: int | None = MAX_BYTES) -> tuple[dict[str, np.ndarray], MixerConfig]:
    """Canonical numpy params and config from any supported checkpoint, optionally resized
    ``scale`` x (paper appendix C) and with a fresh head for ``num_classes`` ('keep' keeps the
    checkpoint's head, None removes it). Non-float tensors are refused."""
    params, cfg = open_checkpoint(path, variant, image_size, prefix, max_bytes)
    try:
        flat = {k: cast(k, np.asarray(params[k]), "keep") for k in params}
    finally:
        params.close()
    if scale != 1:
        flat, cfg = resize_token_mixing(flat, cfg, scale)
    if num_classes != "keep":
        flat, cfg = new_head(flat, cfg, num_classes)
    return flat, cfg
