"""The one loading path every consumer shares (both ``from_checkpoint``s, ``init_from``, the
converter, the parity report):

    resolve the source (a path, or a published name/URL fetched into the cache: mixer_convert.hub)
    -> read (any format) -> canonical names (one strict map) -> infer config from shapes and check
    every key, shape and dtype, and the total size (before any data is read) -> materialise float
    tensors -> transform (resize, new head)

Framework-free: numpy in, numpy out; each model turns the result into its own parameters.
"""
from __future__ import annotations

import os
from typing import Literal

import numpy as np

from mixer_convert.errors import CheckpointError
from mixer_convert.hub import resolve
from mixer_convert.io import MAX_BYTES, LazyParams, cast, open_params
from mixer_convert.resize import new_head, resize_token_mixing
from mixer_convert.spec import MixerConfig

Keep = Literal["keep"]


def open_checkpoint(path: str | os.PathLike, variant: str | None = None, image_size=None,
                    prefix: str | None = None, progress: bool | None = None,
                    max_bytes: int | None = MAX_BYTES) -> tuple[LazyParams, MixerConfig]:
    """Lazy canonical params and their config; every name, shape and dtype is checked, no data
    read (:func:`mixer_convert.io.open_params`; more than ``max_bytes`` declared is refused, None:
    no limit). ``path`` may also be a published name or URL (:func:`mixer_convert.hub.resolve`;
    ``progress`` is its download bar). The caller closes the params (``.close()``)."""
    return open_params(resolve(path, progress), variant, image_size, prefix, max_bytes)


def load_checkpoint(path: str | os.PathLike, num_classes: int | None | Keep = "keep", scale: int = 1,
                    variant: str | None = None, image_size=None, prefix: str | None = None,
                    max_bytes: int | None = MAX_BYTES, allow_nonfinite: bool = False,
                    nonfinite_hint: str = "pass allow_nonfinite=True to load them anyway"
                    ) -> tuple[dict[str, np.ndarray], MixerConfig]:
    """Canonical numpy params and config from any supported checkpoint, optionally resized
    ``scale`` x (paper appendix C) and with a fresh head for ``num_classes`` ('keep' keeps the
    checkpoint's head, None removes it). Non-float tensors are refused, and so are NaN/Inf values
    unless ``allow_nonfinite`` (a :class:`CheckpointError` ending in the caller's ``nonfinite_hint``:
    how its user allows them)."""
    params, cfg = open_checkpoint(path, variant, image_size, prefix, max_bytes=max_bytes)
    try:
        flat = {k: cast(k, np.asarray(params[k]), "keep") for k in params}
    finally:
        params.close()
    if not allow_nonfinite:
        check_finite(flat, path, nonfinite_hint)
    if scale != 1:
        flat, cfg = resize_token_mixing(flat, cfg, scale)
    if num_classes != "keep":
        flat, cfg = new_head(flat, cfg, num_classes)
    return flat, cfg


def check_finite(flat: dict[str, np.ndarray], path, hint: str) -> None:
    """The first tensor holding NaN or Inf, as one line naming the file and the key."""
    for key, arr in flat.items():
        ok = np.count_nonzero(np.isfinite(arr.astype(np.float32, copy=False)))
        if ok != arr.size:
            raise CheckpointError(f"{path}: {key}: {arr.size - ok} of {arr.size} values are NaN or Inf; {hint}")


# Fields a loaded checkpoint leaves free; every other field is fixed by its shapes.
FREE_FIELDS = ("stoch_depth", "dropout_rate")


def with_overrides(cfg: MixerConfig, overrides: dict) -> MixerConfig:
    """``cfg`` with regularisation overrides; a shape field is refused with what to use instead."""
    fixed = sorted(set(overrides) - set(FREE_FIELDS))
    if fixed:
        raise ValueError(f"{', '.join(fixed)} cannot be overridden: the checkpoint's shapes fix it "
                         "(use num_classes=... for a new head, scale=K for K x larger images)")
    return cfg.replace(**overrides)
