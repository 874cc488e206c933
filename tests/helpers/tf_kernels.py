"""TensorFlow's CPU resize kernels transcribed loop by loop in float32 numpy (resize_bilinear_op.cc
with half-pixel centres, resize_area_op.cc): slow, plainly TF's order of operations, the fast-tier
oracle for mixer_convert.preprocess's vectorised, blocked, windowed version of the same arithmetic.
(The slow tier checks both against TensorFlow itself.)"""
from __future__ import annotations

import math

import numpy as np

F = np.float32


def bilinear(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """tf.image.resize(img, (oh, ow)): per output pixel, compute_lerp(top_left, top_right,
    bottom_left, bottom_right, x_lerp, y_lerp) in float32."""
    ih, iw = img.shape[:2]
    src = img.astype(F)
    ys, xs = _bilinear_weights(ih, oh), _bilinear_weights(iw, ow)
    out = np.empty((oh, ow, img.shape[2]), F)
    for y, (y0, y1, ly) in enumerate(ys):
        for x, (x0, x1, lx) in enumerate(xs):
            top = src[y0, x0] + (src[y0, x1] - src[y0, x0]) * lx
            bottom = src[y1, x0] + (src[y1, x1] - src[y1, x0]) * lx
            out[y, x] = top + (bottom - top) * ly
    return out


def _bilinear_weights(in_size: int, out_size: int) -> list[tuple[int, int, np.float32]]:
    scale = F(in_size) / F(out_size)
    rows = []
    for i in range(out_size):
        pos = (F(i) + F(0.5)) * scale - F(0.5)  # HalfPixelScaler
        lower = math.floor(pos)
        rows.append((max(lower, 0), min(math.ceil(pos), in_size - 1), F(pos - F(lower))))
    return rows


def area(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """tf.image.resize(img, (oh, ow), method='area'): per output pixel, the x-sum of each covered
    row (first pixel * its overlap, middle pixels added, last * its overlap), weighted by the
    row's overlap and summed from 0, times 1 / (height_scale * width_scale)."""
    ih, iw = img.shape[:2]
    src = img.astype(F)
    hs, ws = F(ih) / F(oh), F(iw) / F(ow)
    scale = F(1.0 / float(hs * ws))
    xcells = [_area_cell(x, ws, iw) for x in range(ow)]
    out = np.empty((oh, ow, img.shape[2]), F)
    for y in range(oh):
        ycell = _area_cell(y, hs, ih)
        for x, xcell in enumerate(xcells):
            total = np.zeros(img.shape[2], F)
            for row, wy in ycell:
                total = total + _x_sum(src[row], xcell) * wy
            out[y, x] = total * scale
    return out


def _x_sum(row: np.ndarray, cell: list[tuple[int, np.float32]]) -> np.ndarray:
    (first, w_first), rest = cell[0], cell[1:]
    s = row[first] * w_first
    for x, w in rest[:-1]:
        s = s + row[x]
    if rest:
        last, w_last = rest[-1]
        s = s + row[last] * w_last
    return s


def _area_cell(i: int, scale: np.float32, in_size: int) -> list[tuple[int, np.float32]]:
    """(input index bounded to the image, weight) of every input pixel output cell i overlaps."""
    lo, hi = F(i) * scale, F(i + 1) * scale
    taps = []
    for j in range(math.floor(lo), math.ceil(hi)):
        if j < lo:
            w = scale if F(j + 1) > hi else F(j + 1) - lo
        else:
            w = hi - F(j) if F(j + 1) > hi else F(1)
        taps.append((min(j, in_size - 1), F(w)))
    return taps
