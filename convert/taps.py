"""Which input pixels each output pixel of TensorFlow's two resizes reads, and with what weight.

``tf.image.resize`` bilinear (half-pixel centres, no antialiasing) and area, the resizes of the two
official eval pipelines, computed in float32 exactly as TensorFlow computes them. Shared by the
numpy path (:mod:`mixer_convert.preprocess`) and the compiled one (:mod:`mixer_convert.kernels`),
so that both read the same pixels with the same weights; every array returned is read-only, as
cached plans are shared by every thread.
"""
from __future__ import annotations

import functools
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
