"""Mixer weights as numpy arrays: the dtypes they may have (float16, bfloat16, float32, float64),
casts, the NaN/Inf count, fast C-ordered copies of the transposed views the layouts make, and the
raw bytes the writers write.

bfloat16 is numpy's ``ml_dtypes.bfloat16``; it is recognised by name so that float32 paths never
import ml_dtypes (an interpreter without it, such as timm's oracle, still converts float32 files).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import numpy as np

from mixer_convert.errors import CheckpointError

DTYPES = ("keep", "float32", "bfloat16", "float16")  # the --dtype choices


def bf16() -> np.dtype:
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def is_bf16(dtype: Any) -> bool:
    return np.dtype(dtype).name == "bfloat16"


def np_dtype(name: str) -> np.dtype:
    """A dtype by name, bfloat16 included."""
    return bf16() if name == "bfloat16" else np.dtype(name)


def check_float(key: str, dtype: Any) -> None:
    """Mixer weights are floating point; int, bool, complex and anything else are refused."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f" and not is_bf16(dtype):
        raise CheckpointError(f"tensor {key!r} has unsupported dtype {dtype}; Mixer weights are float")


def cast(key: str, arr: np.ndarray, dtype: str) -> np.ndarray:
    """A float tensor in ``dtype`` (``keep``: as it is), without a copy where none is needed."""
    check_float(key, arr.dtype)
    if dtype == "keep":
        return arr
    return arr.astype(np_dtype(dtype), copy=False)


def count_nonfinite(arr: np.ndarray) -> int:
    """How many values are NaN or +-Inf. The common answer, none, comes from the minimum and the
    maximum (NaN propagates through both, +Inf reaches the max, -Inf the min): SIMD reductions
    that allocate nothing, several times faster than counting ``isfinite`` over every value."""
    if arr.size == 0:
        return 0
    if arr.dtype.kind == "f" and np.isfinite(arr.min()) and np.isfinite(arr.max()):
        return 0
    return int(arr.size - np.count_nonzero(np.isfinite(arr.astype(np.float32, copy=False))))


_TILE = (64, 256)  # a block of a 2-D transpose that stays in cache (measured: 2-5x numpy's own)
_SPLIT_BYTES = 1 << 22  # below this a transpose is too short to share out among threads
_HELPERS = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 4) - 1
_helpers: ThreadPoolExecutor | None = None
_helpers_pid = 0


def _helper_pool() -> ThreadPoolExecutor | None:
    """Threads that take a share of each large transpose, one per further core up to 3: the converter's
    reading and writing threads leave a core idle much of the time (measured on 2 cores: npz -> pt
    1.3-1.5 s with one transposing thread, 0.83-0.95 s with two)."""
    global _helpers, _helpers_pid
    if _HELPERS > 0 and (_helpers is None or _helpers_pid != os.getpid()):  # a forked child has no threads
        _helpers, _helpers_pid = ThreadPoolExecutor(_HELPERS, thread_name_prefix="mixer-transpose"), os.getpid()
    return _helpers


def contiguous(arr: np.ndarray) -> np.ndarray:
    """``arr`` in C order, copied only if it is not: a transposed 2-D view (what the kernel maps
    below return, so that two maps in a row cancel without a copy) tile by tile, anything else by numpy."""
    if arr.flags.c_contiguous:
        return arr
    if arr.ndim == 2 and arr.T.flags.c_contiguous:
        return transpose2d(arr.T)
    return np.ascontiguousarray(arr)


def raw(arr: np.ndarray) -> memoryview:
    """``arr``'s bytes in C order, as a writer writes them: no copy where it is C-ordered already
    (viewed as bytes: bfloat16 has no buffer format of its own)."""
    return contiguous(arr).reshape(-1).view(np.uint8).data


def raw_as_declared(items: Iterable[tuple[str, np.ndarray]], specs: Iterable[tuple[str, tuple, Any]],
                    writer: str, declared_in: str) -> Iterator[memoryview]:
    """:func:`raw` of each array of ``items``, once it is checked to be the one ``specs`` declares in
    its place: for the writers that write the specs first (``declared_in``: 'the header')."""
    for (key, shape, dtype), (k, v) in zip(specs, items, strict=True):
        if k != key or tuple(v.shape) != tuple(shape) or v.dtype != dtype:
            raise ValueError(f"{writer}: {k} {v.shape} {v.dtype} where {declared_in} has {key} {shape} {dtype}")
        yield raw(v)


def transpose2d(arr: np.ndarray) -> np.ndarray:
    """``arr.T`` as a new C-ordered array, copied tile by tile: numpy's copy of a transposed view
    walks one side with a large stride and misses the cache on every element."""
    n, m = arr.shape
    out = np.empty((m, n), arr.dtype)
    pool = _helper_pool() if arr.nbytes >= _SPLIT_BYTES else None
    if pool is None:
        _transpose_columns(arr, out, 0, m)
        return out
    tj = _TILE[1]
    share = -(-m // (_HELPERS + 1) // tj) * tj  # whole tiles, each thread its own rows of out
    starts = range(0, m, share)
    helped = [pool.submit(_transpose_columns, arr, out, j, min(j + share, m)) for j in starts[1:]]
    _transpose_columns(arr, out, 0, min(share, m))
    for f in helped:
        f.result()
    return out


def _transpose_columns(arr: np.ndarray, out: np.ndarray, j0: int, j1: int) -> None:
    """``out[j0:j1] = arr[:, j0:j1].T`` tile by tile; numpy releases the GIL inside each tile's copy."""
    ti, tj = _TILE
    for i in range(0, arr.shape[0], ti):
        rows = arr[i:i + ti]
        for j in range(j0, j1, tj):
            out[j:j + tj, i:i + ti] = rows[:, j:min(j + tj, j1)].T
