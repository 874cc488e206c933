"""The one loading order every consumer shares (both models' ``from_checkpoint``, ``init_from``,
the converter, mixer-parity/predict/eval), each step run once per call:

    resolve the source (a path, or a published name fetched into the cache: mixer_convert.hub)
    -> read entries (mixer_convert.formats; the source checked and its declared size capped)
    -> canonical names (mixer_convert.layouts.canonicalize: one strict map for every naming)
    -> infer and check the config (mixer_convert.params.check_config: names, shapes, dtypes)
    -> materialise (float tensors, cast on request; NaN/Inf refused unless allowed)
    -> transform (mixer_convert.resize: appendix-C resolution, a new head)

Up to the config nothing but headers is read. Framework-free: numpy in, numpy out; each model
turns the result into its own parameters.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Literal

import numpy as np

from mixer_convert import formats
from mixer_convert.dtypes import cast, count_nonfinite, np_dtype
from mixer_convert.errors import CheckpointError, why
from mixer_convert.hub import resolve
from mixer_convert.layouts import Entry, canonicalize
from mixer_convert.params import check_config
from mixer_convert.resize import new_head, resize_token_mixing
from mixer_convert.source import MAX_BYTES, Source
from mixer_convert.spec import MixerConfig, param_shapes

Keep = Literal["keep"]
# Fields a loaded checkpoint leaves free; every other field is fixed by its shapes.
FREE_FIELDS = ("stoch_depth", "dropout_rate")
NONFINITE_HINT = "pass allow_nonfinite=True to load them anyway"


class NonFiniteWeightsError(CheckpointError):
    """Weights hold NaN or Inf and the caller did not allow it."""


class LazyParams(Mapping):
    """Canonical name -> array, read from the source only when asked for, then cast to ``dtype``
    ('keep': as stored) and refused if it holds NaN/Inf unless ``allow_nonfinite`` (then passed
    to ``warn``; ``hint`` tells the caller's user how to allow them).

    ``shapes`` and ``dtypes`` are known without reading any data. Every tensor read is checked
    against its declared shape; a failure to read is a :class:`CheckpointError` naming it.
    """

    def __init__(self, entries: dict[str, Entry], source: str, fmt: str, layout: str,
                 close: Callable[[], None] | None = None, *, dtype: str = "keep", allow_nonfinite: bool = True,
                 hint: str = NONFINITE_HINT, warn: Callable[[str], None] | None = None) -> None:
        self._entries, self.source, self.format, self.layout, self._close = entries, source, fmt, layout, close
        self.dtype, self.allow_nonfinite, self.hint, self.warn = dtype, allow_nonfinite, hint, warn

    def __getitem__(self, key: str) -> np.ndarray:
        arr = cast(key, self._read(key), self.dtype)
        bad = count_nonfinite(arr)
        if bad:
            msg = f"{key}: {bad} of {arr.size} values are NaN or Inf"
            if not self.allow_nonfinite:
                raise NonFiniteWeightsError(f"{self.source}: {msg} ({self.hint})")
            if self.warn is not None:
                self.warn(msg)
        return arr

    def _read(self, key: str) -> np.ndarray:
        shape, _, load = self._entries[key]
        try:
            arr = np.asarray(load())
        except CheckpointError:
            raise
        except MemoryError:
            raise CheckpointError(f"{self.source}: out of memory reading {key!r}") from None
        except Exception as e:  # a third-party reader meeting damaged data
            raise CheckpointError(f"{self.source}: cannot read {key!r} ({why(e)}); truncated or corrupt?") from None
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"{self.source}: {key!r} holds shape {tuple(arr.shape)}, its header said {shape}")
        return arr

    def __contains__(self, key: object) -> bool:  # without reading the tensor (Mapping's default would)
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[0] for k, v in self._entries.items()}

    @property
    def dtypes(self) -> dict[str, Any]:
        return {k: v[1] if self.dtype == "keep" else np_dtype(self.dtype) for k, v in self._entries.items()}

    def close(self) -> None:
        if self._close:
            self._close()
            self._close = None

    def __enter__(self) -> "LazyParams":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    ordered = {k: entries[k] for k in param_shapes(cfg)}  # every output in the official order
    return LazyParams(ordered, src.where, fmt, layout, close, dtype=dtype, allow_nonfinite=allow_nonfinite,
                      hint=nonfinite_hint, warn=warn), cfg


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
