"""Which input pixels each output pixel of TensorFlow's two resizes reads, and with what weight.

``tf.image.resize`` bilinear (half-pixel centres, no antialiasing) and area, the resizes of the two
official eval pipelines, computed in float32 exactly as TensorFlow computes them. Shared by the
numpy path (:mod:`mixer_convert.preprocess`) and the compiled one (:mod:`mixer_convert.kernels`),
so that both read the same pixels with the same weights; every array returned is read-only, as
cached plans are shared by every thread. Also shared by both: the per-thread scratch buffers their
intermediates live in (:func:`scratch`) and the [-1, 1] map they end with (:func:`value_range`).
"""
from __future__ import annotations

import functools
import math
import threading
from typing import NamedTuple

import numpy as np


def pixel_columns(x: np.ndarray, channels: int) -> np.ndarray:
    """Pixel columns -> element columns of the (H, W * C) view of an image."""
    return frozen((x[:, None] * channels + np.arange(channels)).ravel())


def frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)  # cached plans are shared by every thread
    return a


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorFlow's half-pixel bilinear taps, in float32 as TF computes them:
    x_in = (x + 0.5) * in/out - 0.5; lower = max(floor, 0), upper = min(ceil, in - 1), lerp = x_in - floor."""
    scale = np.float32(in_size) / np.float32(out_size)
    pos = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    fl = np.floor(pos)
    lower = np.maximum(fl, 0).astype(np.intp)
    upper = np.minimum(np.ceil(pos), in_size - 1).astype(np.intp)
    return lower, upper, (pos - fl).astype(np.float32)


def area_taps(in_size: int, out_size: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """TensorFlow's resize_area weights of output cells start..stop-1 along one axis: (n, K)
    input indices and float32 weights. Cell x covers input [x*s, (x+1)*s), s = in/out; each input
    pixel weighs its overlap with it; unused taps (K is the most any cell needs) weigh 0."""
    scale = np.float32(in_size) / np.float32(out_size)
    x = np.arange(start, stop, dtype=np.float32)
    lo, hi = x * scale, (x + np.float32(1)) * scale
    first = np.floor(lo).astype(np.intp)
    end = np.ceil(hi).astype(np.intp)
    idx = first[:, None] + np.arange(int((end - first).max()))[None, :]
    i, lo, hi = idx.astype(np.float32), lo[:, None], hi[:, None]
    # The overlap, with TF's branches (a cell inside one pixel weighs exactly `scale`, not hi - lo).
    w = np.where(i < lo, np.where(i + 1 > hi, scale, i + 1 - lo), np.where(i + 1 > hi, hi - i, np.float32(1)))
    w = np.where(idx < end[:, None], w, np.float32(0)).astype(np.float32)
    idx = np.minimum(idx, in_size - 1)  # TF bounds indices that rounding pushes past the edge
    return np.where(w != 0, idx, idx[:, :1]), w  # an unused tap adds pixel * 0: any pixel of the cell will do


class AreaPlan(NamedTuple):
    rows: slice  # the input rows the window needs
    columns: tuple[np.ndarray, ...]  # per tap k: the element columns of every output element column
    x_weights: tuple[np.ndarray, ...]
    row_taps: tuple[np.ndarray, ...]  # per tap k: each output row's input row (relative to `rows`)
    y_weights: tuple[np.ndarray, ...]
    inv_area: np.float32


@functools.lru_cache(maxsize=1024)
def area_plan(ih: int, iw: int, oh: int, ow: int, c: int, window: tuple[int, int, int, int]) -> AreaPlan:
    top, left, h, w = window
    xi, xw = area_taps(iw, ow, left, left + w)
    yi, yw = area_taps(ih, oh, top, top + h)
    lo = int(yi.min())
    # TF multiplies by 1 / (scale_y * scale_x), the reciprocal taken in double of a float32 product.
    inv = np.float32(1.0 / float(np.float32(ih) / np.float32(oh) * (np.float32(iw) / np.float32(ow))))
    return AreaPlan(slice(lo, int(yi.max()) + 1), tuple(pixel_columns(xi[:, k], c) for k in range(xi.shape[1])),
                     tuple(frozen(np.repeat(xw[:, k], c)) for k in range(xw.shape[1])),
                     tuple(frozen(yi[:, k] - lo) for k in range(yi.shape[1])),
                     tuple(frozen(yw[:, k:k + 1]) for k in range(yw.shape[1])), inv)


# ---- per-thread scratch, the [-1, 1] map ----------------------------------------------------------

_SCRATCH_MAX_BYTES = 64 << 20  # larger intermediates (huge images) are allocated per call, not kept
_local = threading.local()


def scratch(key: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A buffer of ``shape`` that this thread reuses on its next call (contents undefined): fresh
    pages per image cost more than the arithmetic. One over 64 MB (a huge image) is the call's own."""
    views = _local.__dict__.setdefault("views", {})
    view = views.get((key, shape, dtype))
    if view is not None:
        return view
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes > _SCRATCH_MAX_BYTES:
        return np.empty(shape, dtype)
    bufs = _local.__dict__.setdefault("buffers", {})
    if key not in bufs or bufs[key].size < nbytes:
        bufs[key] = np.empty(nbytes, np.uint8)
        for k in [k for k in views if k[0] == key]:  # views of the old buffer
            del views[k]
    if len(views) > 256:  # many image sizes: start over rather than keep every view
        views.clear()
    view = views[(key, shape, dtype)] = bufs[key][:nbytes].view(dtype).reshape(shape)
    return view


def value_range(image, pipeline: str = "vit_jax"):
    """[0, 255] -> [-1, 1], float32, as the official pipeline writes it: vit_jax
    ``(x - 127.5) / 127.5``; big_vision ``value_range(-1, 1)``, ``-1 + x / 255 * 2`` (the same map
    to within 1 float32 ulp). Works on numpy arrays and on jax arrays (inside jit: training's
    ``normalize``)."""
    x = image.astype(np.float32) if hasattr(image, "astype") else np.asarray(image, np.float32)
    if pipeline == "big_vision":
        return x / np.float32(255) * np.float32(2) + np.float32(-1)  # tf: -1 + (x / 255) * 2, same value
    return (x - np.float32(127.5)) / np.float32(127.5)
