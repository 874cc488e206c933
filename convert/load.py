"""The one loading order every consumer shares (both models' ``from_checkpoint``, ``init_from``,
the converter, mixer-parity/predict/eval), each step run once per call:

    resolve the source (a path, or a published name fetched into the cache: mixer_convert.hub)
    -> check the source once (mixer_convert.source.Source) and read its entries, headers only
       (mixer_convert.formats; every tensor declared to the source, which caps the total)
    -> canonical names (mixer_convert.layouts.canonicalize: one strict map for every naming)
    -> infer and check the config (mixer_convert.params.check_config: names, shapes, dtypes)
    -> materialise lazily (mixer_convert.params.LazyParams: float tensors, cast on request,
       NaN/Inf refused unless allowed)
    -> transform (mixer_convert.resize: appendix-C resolution, a new head)

Up to the config nothing but headers is read. Framework-free: numpy in, numpy out; each model
turns the result into its own parameters.
"""
from __future__ import annotations

import os
from typing import Callable, Literal

import numpy as np

from mixer_convert import formats
from mixer_convert.hub import resolve
from mixer_convert.layouts import canonicalize
from mixer_convert.params import NONFINITE_HINT, LazyParams, check_config
from mixer_convert.resize import new_head, resize_token_mixing
from mixer_convert.source import MAX_BYTES, Source
from mixer_convert.spec import MixerConfig

Keep = Literal["keep"]
# Fields a loaded checkpoint leaves free; every other field is fixed by its shapes.
FREE_FIELDS = ("stoch_depth", "dropout_rate")


def read_params(path: str | os.PathLike, fmt: str | None = None, prefix: str | None = None,
                max_bytes: int | None = MAX_BYTES) -> LazyParams:
    """A local checkpoint's tensors under canonical names, as stored (NaN/Inf included), nothing
    read yet. Unknown and duplicated names are errors; so is declaring more than ``max_bytes``
    (None: no limit)."""
    src = Source.open(path, max_bytes)
    fmt, entries, close = formats.read(src, fmt)
    try:
        layout, entries = canonicalize(entries, prefix=prefix)
    except BaseException:
        if close:
            close()
        raise
    return LazyParams(entries, src.where, fmt, layout, close)


def open_checkpoint(source: str | os.PathLike, variant: str | None = None, image_size=None,
                    prefix: str | None = None, progress: bool | None = None, max_bytes: int | None = MAX_BYTES,
                    *, dtype: str = "keep", allow_nonfinite: bool = False, nonfinite_hint: str = NONFINITE_HINT,
                    warn: Callable[[str], None] | None = None) -> tuple[LazyParams, MixerConfig]:
    """The loading order up to the config: lazy canonical params, in the official order, and
    their config, every name, shape and dtype checked and no data read. ``source`` is a path or
    a published name/URL (:func:`mixer_convert.hub.resolve`; ``progress``: its download bar).
    Tensors are materialised as they are read (see :class:`LazyParams` for ``dtype``,
    ``allow_nonfinite``, ``nonfinite_hint`` and ``warn``). The caller closes the params (or uses
    them in ``with``)."""
    src = Source.open(resolve(source, progress), max_bytes)
    fmt, entries, close = formats.read(src)
    try:
        layout, entries = canonicalize(entries, prefix=prefix)
        cfg = check_config({k: e[0] for k, e in entries.items()}, {k: e[1] for k, e in entries.items()},
                           variant, image_size, what=src.where)
    except BaseException:
        if close:
            close()
        raise
    return LazyParams(entries, src.where, fmt, layout, close, order=cfg, dtype=dtype,
                      allow_nonfinite=allow_nonfinite, hint=nonfinite_hint, warn=warn), cfg


def load_checkpoint(source: str | os.PathLike, num_classes: int | None | Keep = "keep", scale: int = 1,
                    variant: str | None = None, image_size=None, prefix: str | None = None,
                    max_bytes: int | None = MAX_BYTES, *, dtype: str = "keep", allow_nonfinite: bool = False,
                    nonfinite_hint: str = NONFINITE_HINT) -> tuple[dict[str, np.ndarray], MixerConfig]:
    """Canonical numpy params and config from any supported checkpoint: :func:`open_checkpoint`,
    every tensor read (NaN/Inf refused unless ``allow_nonfinite``), token-mixing resized ``scale`` x
    (paper, appendix C) and a fresh head for ``num_classes`` ('keep' keeps the checkpoint's, None
    removes it)."""
    params, cfg = open_checkpoint(source, variant, image_size, prefix, max_bytes=max_bytes, dtype=dtype,
                                  allow_nonfinite=allow_nonfinite, nonfinite_hint=nonfinite_hint)
    with params:
        flat = {k: params[k] for k in params}
    if scale != 1:
        flat, cfg = resize_token_mixing(flat, cfg, scale)
    if num_classes != "keep":
        flat, cfg = new_head(flat, cfg, num_classes)
    return flat, cfg


def with_overrides(cfg: MixerConfig, overrides: dict) -> MixerConfig:
    """``cfg`` with regularisation overrides; a shape field is refused with what to use instead."""
    fixed = sorted(set(overrides) - set(FREE_FIELDS))
    if fixed:
        raise ValueError(f"{', '.join(fixed)} cannot be overridden: the checkpoint's shapes fix it "
                         "(use num_classes=... for a new head, scale=K for K x larger images, image_size=(H, W) "
                         "for a non-square patch grid)")
    return cfg.replace(**overrides)
