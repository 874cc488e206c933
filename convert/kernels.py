"""The exact eval preprocessing of :mod:`mixer_convert.preprocess`, compiled by numba (the ``fast`` extra).

numpy makes a dozen passes over full-size intermediates per image (gathers, casts, products, sums);
these kernels make one pass over the input rows needed (along x, each row converted to float32 once)
and one over the output (along y, then the [-1, 1] map), every value computed once, in registers:
decode + preprocess of a JPEG is 1.2-1.4x faster (benchmarks/RESULTS.md, "Eval preprocessing").
They do TensorFlow's float32 operations in its order, exactly as the numpy code does, and numba
compiles without fast-math, so nothing is contracted into an FMA or reassociated: the outputs are
bit-identical (tests run both paths against TensorFlow).
Without numba, or with ``MIXER_KERNELS=numpy``, preprocess runs its numpy code; it also does while
the kernels load in the background (:func:`start`, below).

:func:`vit_jax` and :func:`big_vision` are what preprocess calls for uint8 images; they return
False (nothing written) where no compiled kernel is ready.
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
from typing import Callable

import numpy as np

from mixer_convert.errors import importable
from mixer_convert.taps import area_plan, bilinear_taps, frozen, scratch, value_range


def _bilinear(image, channels, rows, top, bottom, y_lerp, left, right, x_lerp, scale, row, along, out):
    """tf.image.resize bilinear: each needed input row (``rows``) along x, ``left + (right - left) *
    x_lerp``, into ``along``; then per output row its ``top`` and ``bottom`` rows of ``along`` along y
    the same way. ``left``, ``right``, ``x_lerp`` are per output pixel; ``scale``: then vit_jax's
    ``(x - 127.5) / 127.5``."""
    for rr in range(rows.shape[0]):
        src, dst = image[rows[rr]], along[rr]
        for i in range(src.shape[0]):  # the row in float32 first: the gathers below are then faster
            row[i] = np.float32(src[i])
        for x in range(left.shape[0]):
            a, b, xl = left[x] * channels, right[x] * channels, x_lerp[x]
            if channels == 3:  # the eval pipelines' RGB, unrolled
                dst[x * 3] = row[a] + (row[b] - row[a]) * xl
                dst[x * 3 + 1] = row[a + 1] + (row[b + 1] - row[a + 1]) * xl
                dst[x * 3 + 2] = row[a + 2] + (row[b + 2] - row[a + 2]) * xl
            else:
                for c in range(channels):
                    dst[x * channels + c] = row[a + c] + (row[b + c] - row[a + c]) * xl
    for r in range(out.shape[0]):
        t, btm, yl, o = along[top[r]], along[bottom[r]], y_lerp[r], out[r]
        for j in range(o.shape[0]):
            v = t[j] + (btm[j] - t[j]) * yl
            o[j] = (v - np.float32(127.5)) / np.float32(127.5) if scale else v


def _area(image, channels, lo, row_taps, y_weights, pixels, x_weights, inv_area, to_minus_one_one, row, along, out):
    """tf.image.resize area: each input row lo.. summed along x, taps in order, into ``along``; then
    per output row the taps' rows weighted and added in order, times ``inv_area``. ``pixels``,
    ``x_weights``: (taps, output width), the same for every channel. ``to_minus_one_one``: a table
    of 256 float32 values; the result is truncated to uint8 (tf.cast) and looked up (big_vision's
    value_range, computed once per value by the caller as numpy does it)."""
    for rr in range(along.shape[0]):
        src, dst = image[lo + rr], along[rr]
        for i in range(src.shape[0]):  # the row in float32 first: the gathers below are then 2x faster
            row[i] = np.float32(src[i])
        if channels == 3:  # the eval pipelines' RGB, with its channel loop known to the compiler
            for x in range(pixels.shape[1]):
                v0 = row[pixels[0, x] * 3] * x_weights[0, x]
                v1 = row[pixels[0, x] * 3 + 1] * x_weights[0, x]
                v2 = row[pixels[0, x] * 3 + 2] * x_weights[0, x]
                for k in range(1, pixels.shape[0]):
                    b, w = pixels[k, x] * 3, x_weights[k, x]
                    v0, v1, v2 = v0 + row[b] * w, v1 + row[b + 1] * w, v2 + row[b + 2] * w
                dst[x * 3], dst[x * 3 + 1], dst[x * 3 + 2] = v0, v1, v2
        else:
            for x in range(pixels.shape[1]):
                for c in range(channels):
                    v = row[pixels[0, x] * channels + c] * x_weights[0, x]
                    for k in range(1, pixels.shape[0]):
                        v = v + row[pixels[k, x] * channels + c] * x_weights[k, x]
                    dst[x * channels + c] = v
    for r in range(out.shape[0]):
        o, first, w0 = out[r], along[row_taps[r, 0]], y_weights[r, 0]
        if row_taps.shape[1] == 3:  # a shrink by 1-2x (the eval pipelines' 256 from ImageNet sizes), fused
            second, third, w1, w2 = along[row_taps[r, 1]], along[row_taps[r, 2]], y_weights[r, 1], y_weights[r, 2]
            for j in range(o.shape[0]):
                o[j] = ((first[j] * w0 + second[j] * w1) + third[j] * w2) * inv_area
        else:
            for j in range(o.shape[0]):
                o[j] = first[j] * w0
            for k in range(1, row_taps.shape[1]):
                rows, wk = along[row_taps[r, k]], y_weights[r, k]
                for j in range(o.shape[0]):
                    o[j] = o[j] + rows[j] * wk
            for j in range(o.shape[0]):
                o[j] = o[j] * inv_area
        if to_minus_one_one.shape[0]:
            for j in range(o.shape[0]):
                o[j] = to_minus_one_one[np.uint8(o[j])]


# ---- loading: in the background, once per process ----------------------------------------------
# Importing numba and loading the compiled kernels from its cache takes ~0.6 s, compiling them the
# first time ~3 s: more than a few hundred images save. So they load in a thread while the caller
# goes on with numpy (same output), and take over once ready; a one-image mixer-predict never waits.

_kernels: tuple[Callable, Callable] | None = None  # (bilinear, area), compiled and warmed up
_loader: threading.Thread | None = None
_lock = threading.Lock()
failure: str | None = None  # why the kernels are off, once they failed


def enabled() -> bool:
    """Whether the kernels are wanted here: numba installed, MIXER_KERNELS not 'numpy', no failure."""
    return failure is None and os.environ.get("MIXER_KERNELS", "numba") != "numpy" and _numba_installed()


@functools.lru_cache(maxsize=1)
def _numba_installed() -> bool:  # asked on every image until the kernels are loaded: looked up once
    return importable("numba")


def start() -> None:
    """Load (and the first time compile) the kernels in a background thread, once per process."""
    global _loader
    with _lock:
        if _loader is None and enabled():
            _loader = threading.Thread(target=_load, name="mixer-kernels", daemon=True)
            _loader.start()


def wait(timeout: float | None = None) -> bool:
    """Start loading if need be and wait for it; whether the kernels are in use (tests, benchmarks)."""
    start()
    if _loader is not None:
        _loader.join(timeout)
    return _kernels is not None


def _load() -> None:
    global _kernels
    try:
        import numba

        jit = numba.njit(nogil=True, cache=True)  # nogil: mixer-eval's reader threads run them side by side
        bilinear, area = jit(_bilinear), jit(_area)
        tiny = np.zeros((2, 2, 3), np.uint8)  # compile (or load from numba's cache) now, not on an image
        _run_bilinear(bilinear, tiny, (1, 1), np.empty((1, 1, 3), np.float32))
        _run_area(area, tiny, (1, 1), (0, 0, 1, 1), np.empty((1, 1, 3), np.float32))
        _kernels = bilinear, area
    except Exception as e:  # noqa: BLE001 (numba or LLVM failing in any way: numpy gives the same output)
        _fail(e)


def _fail(e: Exception) -> None:
    global _kernels, failure
    _kernels, failure = None, f"{type(e).__name__}: {e}"
    warnings.warn(f"numba kernels off, numpy used instead ({failure})", RuntimeWarning, stacklevel=2)


def _call(which: int, runner: Callable, *args) -> bool:
    """Run a loaded kernel; False (the caller uses numpy) until the kernels are ready, or after a failure."""
    kernels = _kernels
    if kernels is None:
        start()
        return False
    try:
        runner(kernels[which], *args)
        return True
    except Exception as e:  # noqa: BLE001 (as in _load)
        _fail(e)
        return False


# ---- the two pipelines --------------------------------------------------------------------------


def vit_jax(image: np.ndarray, size: tuple[int, int], out: np.ndarray) -> bool:
    """uint8 (H, W, C) image -> ``out`` (h, w, C) float32: vit_jax's resize and [-1, 1] scaling.
    False, with nothing written, where the kernels are not (yet) loaded."""
    return _call(0, _run_bilinear, image, size, out)


def big_vision(image: np.ndarray, small: tuple[int, int], window: tuple[int, int, int, int], out: np.ndarray) -> bool:
    """uint8 (H, W, C) image -> ``out``: big_vision's area resize to ``small``, only the central-crop
    ``window`` (top, left, h, w) of it, truncated to uint8 and mapped to [-1, 1]. False, with
    nothing written, where the kernels are not (yet) loaded."""
    return _call(1, _run_area, image, small, window, out)


def _run_bilinear(kernel: Callable, image: np.ndarray, size: tuple[int, int], out: np.ndarray) -> None:
    (ih, iw, c), (oh, ow) = image.shape, size
    rows, *taps = _bilinear_taps(ih, iw, oh, ow)
    kernel(image.reshape(ih, iw * c), c, rows, *taps, True, scratch("kernel_row", (iw * c,), np.float32),
           scratch("kernel_along", (len(rows), ow * c), np.float32), out.reshape(oh, ow * c))


def _run_area(kernel: Callable, image: np.ndarray, small: tuple[int, int], window: tuple[int, int, int, int],
              out: np.ndarray) -> None:
    (ih, iw, c), (h, w) = image.shape, window[2:]
    lo, n, *taps = _area_taps(ih, iw, *small, window)
    kernel(image.reshape(ih, iw * c), c, lo, *taps, _VALUE_RANGE, scratch("kernel_row", (iw * c,), np.float32),
           scratch("kernel_along", (n, w * c), np.float32), out.reshape(h, w * c))


# big_vision's value_range of each uint8 value, looked up by the area kernel
_VALUE_RANGE = frozen(value_range(np.arange(256, dtype=np.uint8), "big_vision"))


@functools.lru_cache(maxsize=256)
def _bilinear_taps(ih: int, iw: int, oh: int, ow: int) -> tuple[np.ndarray, ...]:
    """The input rows some output row needs, each output row's two as indices into them, the y
    lerps; the x taps and lerps per output pixel."""
    y0, y1, y_lerp = bilinear_taps(ih, oh)
    x0, x1, x_lerp = bilinear_taps(iw, ow)
    rows, index = np.unique(np.concatenate([y0, y1]), return_inverse=True)
    return tuple(frozen(a) for a in (rows, index[:oh], index[oh:], y_lerp, x0, x1, x_lerp))


@functools.lru_cache(maxsize=256)
def _area_taps(ih: int, iw: int, oh: int, ow: int, window: tuple[int, int, int, int]) -> tuple:
    """The numpy path's plan of the whole window, stacked: its rows, row taps, x taps per pixel, 1 / area."""
    p = area_plan(ih, iw, oh, ow, 1, window)  # one channel: its element columns are the pixels
    return (p.rows.start, p.rows.stop - p.rows.start, frozen(np.stack(p.row_taps, 1)),
            frozen(np.concatenate(p.y_weights, 1)), frozen(np.stack(p.columns)), frozen(np.stack(p.x_weights)),
            p.inv_area)
