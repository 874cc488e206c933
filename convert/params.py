"""Flat canonical parameter dicts ('/'-joined official names): the lazy one a checkpoint is read
into (:class:`LazyParams`), the strict check every loader runs, and the config the shapes imply.

The checks work on anything with a ``.shape`` (numpy arrays, lazily read tensors,
``jax.ShapeDtypeStruct``) or on shapes, so both models' loaders and every converter share one
strict check and one shape-based config inference.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Callable, Mapping

import numpy as np

from mixer_convert.arrays import cast, check_float, count_nonfinite, np_dtype
from mixer_convert.errors import CheckpointError, why
from mixer_convert.source import Entry
from mixer_convert.spec import MixerConfig, config_for, param_shapes, variant_name


class ParamMismatchError(ValueError):
    """Parameters do not fit the model; lists every missing, unexpected, mis-shaped and duplicated
    key (``duplicated``: canonical name -> the source keys that all claim it)."""

    def __init__(self, missing: list[str], unexpected: list[str],
                 misshaped: list[tuple[str, tuple, tuple]], what: str = "checkpoint",
                 duplicated: list[tuple[str, list[str]]] | None = None) -> None:
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
        self.duplicated = duplicated or []
        lines = [f"{what} does not match the model:"]
        for key, names in self.duplicated:
            lines.append(f"  duplicated: {key} is given {len(names)} times, as " + ", ".join(map(repr, names)))
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
        for key, got, want in misshaped:
            lines.append(f"  mis-shaped: {key} has {got}, model needs {want}")
        super().__init__("\n".join(lines))


def shape_of(value: Any) -> tuple[int, ...]:
    """A shape given as a tuple/list, or the ``.shape`` of an array-like."""
    return tuple(value) if isinstance(value, (tuple, list)) else tuple(value.shape)


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
                 close: Callable[[], None] | None = None, *, order: MixerConfig | None = None, dtype: str = "keep",
                 allow_nonfinite: bool = True, hint: str = NONFINITE_HINT,
                 warn: Callable[[str], None] | None = None) -> None:
        if order is not None:  # the official order of a checked config's tensors: every output is written in it
            entries = {k: entries[k] for k in param_shapes(order)}
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


def check_params(flat: Mapping[str, Any], cfg: MixerConfig, what: str = "checkpoint") -> None:
    """Raise :class:`ParamMismatchError` unless ``flat`` has exactly the names and shapes of ``cfg``
    (values: arrays, anything with a ``.shape``, or shapes)."""
    want = param_shapes(cfg)
    missing = [k for k in want if k not in flat]
    unexpected = sorted(k for k in flat if k not in want)
    misshaped = [(k, shape_of(flat[k]), want[k]) for k in want
                 if k in flat and shape_of(flat[k]) != want[k]]
    if missing or unexpected or misshaped:
        raise ParamMismatchError(missing, unexpected, misshaped, what)


def infer_config(shapes: Mapping[str, Any], image_size: int | tuple[int, int] | None = None,
                 **overrides) -> MixerConfig:
    """Architecture from parameter shapes alone (values may be shapes or arrays).

    The token count S fixes the image size only up to its aspect ratio: a square grid is
    assumed unless ``image_size`` is given, which must give S patches. Raises ValueError naming
    what is missing, or both sizes when ``image_size`` contradicts the weights.
    """
    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"not an MLP-Mixer checkpoint: no {key!r} "
                             f"(found {len(shapes)} tensors, e.g. {sorted(shapes)[:5]})")
        got = shape_of(shapes[key])
        if len(got) != ndim:
            raise ValueError(f"not an MLP-Mixer checkpoint: {key!r} has shape {got}, a Mixer's has {ndim} dims")
        return got

    ph, pw, in_chans, hidden = shape("stem/kernel", 4)
    blocks = 0
    while f"MixerBlock_{blocks}/LayerNorm_0/scale" in shapes:
        blocks += 1
    if blocks == 0:
        raise ValueError("not an MLP-Mixer checkpoint: no MixerBlock_0 parameters")
    tokens, d_s = shape("MixerBlock_0/token_mixing/Dense_0/kernel", 2)
    _, d_c = shape("MixerBlock_0/channel_mixing/Dense_0/kernel", 2)
    num_classes = shape("head/kernel", 2)[1] if "head/kernel" in shapes else None
    side = math.isqrt(tokens)
    square = side * side == tokens
    if image_size is None:
        if not square:
            raise ValueError(f"checkpoint has {tokens} tokens, not a square grid; pass image_size=(H, W)")
        image_size = (side * ph, side * pw)
    kw = dict(patch_size=(ph, pw), hidden_dim=hidden, num_blocks=blocks, tokens_mlp_dim=d_s,
              channels_mlp_dim=d_c, num_classes=num_classes, image_size=image_size, in_chans=in_chans)
    kw.update(overrides)
    cfg = MixerConfig(**kw)
    if cfg.num_tokens != tokens:
        (h, w), (gh, gw) = cfg.image_size, cfg.grid
        found = f" ({side}x{side} patches: {side * ph}x{side * pw} images)" if square else ""
        k = gh // side if square and gh == gw and gh % side == 0 else 0
        hint = f"; for {h}x{w} images load it with scale={k} (image_size is the checkpoint's own)" if k > 1 else ""
        raise ValueError(f"image_size {h}x{w} does not fit the checkpoint: it gives {gh}x{gw} = {cfg.num_tokens} "
                         f"patches of {ph}x{pw}, the checkpoint has {tokens} tokens{found}{hint}")
    return cfg


def check_variant(inferred: MixerConfig, variant: str) -> None:
    """A user-named variant must agree with what the weights say; otherwise say how they differ."""
    want = config_for(variant)
    diffs = [f"{f}: weights have {getattr(inferred, f)}, {variant} has {getattr(want, f)}"
             for f in ("patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim")
             if getattr(inferred, f) != getattr(want, f)]
    if diffs:
        found = variant_name(inferred) or "a non-standard Mixer"
        raise ValueError(f"checkpoint is {found}, not {variant}: " + "; ".join(diffs))


def check_config(shapes: Mapping[str, Any], dtypes: Mapping[str, Any], variant: str | None = None,
                 image_size: int | tuple[int, int] | None = None, what: str = "checkpoint") -> MixerConfig:
    """The architecture the tensors describe, after every check that needs no data: the config
    inferred from the shapes (``image_size`` only for non-square grids), the variant the caller
    expects, every name and shape, and float dtypes only."""
    cfg = infer_config(shapes, image_size=image_size)
    if variant:
        check_variant(cfg, variant)
    check_params(shapes, cfg, what=what)
    for key, dtype in dtypes.items():
        try:
            check_float(key, dtype)
        except CheckpointError as e:
            raise CheckpointError(f"{what}: {e}") from None
    return cfg


def random_params(cfg: MixerConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights with O(1) activations everywhere, head included (the official head
    is zero-initialised, which would make any logit comparison vacuous)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shp in param_shapes(cfg).items():
        leaf = key.rsplit("/", 1)[1]
        if leaf == "kernel":
            fan_in = int(np.prod(shp[:-1]))
            arr = rng.standard_normal(shp, dtype=np.float32) * np.float32(1.0 / math.sqrt(fan_in))
        elif leaf == "scale":
            arr = 1.0 + 0.1 * rng.standard_normal(shp, dtype=np.float32)
        else:
            arr = 0.05 * rng.standard_normal(shp, dtype=np.float32)
        out[key] = arr.astype(dtype)
    return out
