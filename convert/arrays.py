"""Mixer weights as numpy arrays: the dtypes they may have (float16, bfloat16, float32, float64),
casts, the NaN/Inf count, and fast C-ordered copies of the transposed views the layouts make.

bfloat16 is numpy's ``ml_dtypes.bfloat16``; it is recognised by name so that float32 paths never
import ml_dtypes (an interpreter without it, such as timm's oracle, still converts float32 files).
"""
from __future__ import annotations

from typing import Any

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


def contiguous(arr: np.ndarray) -> np.ndarray:
    """``arr`` in C order, copied only if it is not: a transposed 2-D view (what the kernel maps
    below return, so that two maps in a row cancel without a copy) tile by tile, anything else by numpy."""
    if arr.flags.c_contiguous:
        return arr
    if arr.ndim == 2 and arr.T.flags.c_contiguous:
        return transpose2d(arr.T)
    return np.ascontiguousarray(arr)


def transpose2d(arr: np.ndarray) -> np.ndarray:
    """``arr.T`` as a new C-ordered array, copied tile by tile: numpy's copy of a transposed view
    walks one side with a large stride and misses the cache on every element."""
    n, m = arr.shape
    out = np.empty((m, n), arr.dtype)
    ti, tj = _TILE
    for i in range(0, n, ti):
        rows = arr[i:i + ti]
        for j in range(0, m, tj):
            out[j:j + tj, i:i + ti] = rows[:, j:j + tj].T
    return out
