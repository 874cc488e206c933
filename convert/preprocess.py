"""The two official evaluation pipelines, equal to TensorFlow's ops bit for bit, in numpy.

``preprocess(image, pipeline, image_size)`` turns a uint8 (H, W, 3) image into the model's input
in [-1, 1]; ``load_image(path, ...)`` reads the file first (:func:`mixer_convert.images.read_image`).

* ``vit_jax`` -- google-research/vision_transformer's eval input pipeline, used for the Mixer
  fine-tuning configs: ``tf.image.resize(im, [H, W])`` straight to the model size, i.e. bilinear
  with half-pixel centres, **no antialiasing**, float output (not rounded back to uint8), then
  ``(x - 127.5) / 127.5``. :func:`resize_bilinear` is that resize (Pillow's BILINEAR
  antialiases when shrinking, so it is a different function).
* ``big_vision`` -- big_vision's ImageNet eval (configs/mlp_mixer_i1k.py, the paper's tables):
  ``resize_small(256)|central_crop(224)|value_range(-1, 1)``. big_vision's ``resize_small``
  calls ``tf.image.resize`` with ``method="area"`` (its default in every version of
  pp/ops_image.py; area resizing always averages, whatever the antialias flag says) to
  ``round(side * 256 / shorter side)``, then casts back to uint8 by truncation; ``value_range``
  computes ``-1 + x / 255 * 2``. :func:`resize_area` is ``tf.image.resize(method="area")``. For
  a model size other than 224 the shorter side goes to ``round(max(H, W) * 256 / 224)``.

Both resizes repeat TensorFlow's float32 arithmetic in its order (tf's ResizeBilinear: along x
``left + (right - left) * x_lerp``, then along y the same; ResizeArea: each row's taps summed in
order, then the rows weighted and summed, times ``1 / (scale_y * scale_x)``), so the outputs are
bit-identical to ``tf.image.resize`` (tested against TensorFlow). Both are separable and only
compute what is kept: the rows of the input that some output row needs, and for big_vision only
the central crop of the resized image, never the whole of it.

Speed: output rows are computed in blocks small enough to stay in a core's cache; every
intermediate lives in a per-thread scratch buffer reused from call to call, and ``out=`` lets the
caller's batch be written in place -- fresh multi-MB arrays per image cost more in page faults than
the arithmetic (measured on the 2-core development machine: 1.0 ms vs 2.2-4 ms per 500x375 image).
benchmarks/bench_preprocess.py times it against Pillow's decoding of the same JPEG. With the ``fast``
extra, uint8 images go through the same arithmetic compiled by numba (:mod:`mixer_convert.kernels`,
loaded in the background on the first image; the numpy code below runs until then and without it).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import numpy as np

from mixer_convert import kernels
from mixer_convert.images import ImageError, read_image
from mixer_convert.taps import AreaPlan, area_plan, bilinear_taps, frozen, pixel_columns, scratch, value_range

PIPELINES = ("vit_jax", "big_vision")
# read_image and ImageError live in mixer_convert.images, value_range in mixer_convert.taps (kernels use it
# too); all importable from here.
__all__ = ["PIPELINES", "ImageError", "central_crop", "load_image", "preprocess", "read_image", "resize_area",
           "resize_bilinear", "resize_small", "value_range"]

# big_vision's ImageNet eval resizes the shorter side to 256 for a 224 crop; other crop sizes keep the ratio.
_BIG_VISION_RESIZE_RATIO = 256 / 224
_BLOCK_ELEMENTS = 40_000  # output elements (rows x W x C) computed together


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(h), int(w)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    if image.dtype not in (np.uint8, np.int8, np.uint16, np.int16, np.float32):
        image = image.astype(np.float32)  # tf converts every input pixel to float32 first, as this does
    return np.ascontiguousarray(image)


def _output(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}, got {out.dtype} {out.shape}")
    return out


def _rows(a: np.ndarray, index: np.ndarray | slice, key: str) -> np.ndarray:
    if isinstance(index, slice):
        return a[index]
    return a.take(index, 0, scratch(key, (len(index), a.shape[1]), a.dtype), "clip")


def _columns(a: np.ndarray, index: np.ndarray, key: str) -> np.ndarray:
    return a.take(index, 1, scratch(key, (a.shape[0], len(index)), a.dtype), "clip")


def _as_slice(index: np.ndarray) -> np.ndarray | slice:
    """A run of consecutive indices as a slice (a view, no copy)."""
    if len(index) and np.array_equal(index, np.arange(index[0], index[0] + len(index))):
        return slice(int(index[0]), int(index[0]) + len(index))
    return index


# ---- bilinear (vit_jax) ---------------------------------------------------------------------------


class _BilinearPlan(NamedTuple):
    rows: np.ndarray | slice  # the input rows the block's output rows need
    top: np.ndarray | slice  # per output row: its upper and lower input row, as indices into `rows`
    bottom: np.ndarray
    y_lerp: np.ndarray  # (block rows, 1)
    left: np.ndarray  # per output element column: the input element columns and the x lerp
    right: np.ndarray
    x_lerp: np.ndarray  # (out_w * C,)


@functools.lru_cache(maxsize=1024)
def _bilinear_plan(ih: int, iw: int, oh: int, ow: int, c: int, r0: int, r1: int) -> _BilinearPlan:
    """The taps of output rows r0..r1-1."""
    y0, y1, ly = (a[r0:r1] for a in bilinear_taps(ih, oh))
    x0, x1, lx = bilinear_taps(iw, ow)
    rows, inv = np.unique(np.concatenate([y0, y1]), return_inverse=True)
    n = r1 - r0
    return _BilinearPlan(_as_slice(rows), _as_slice(inv[:n]), frozen(inv[n:]), frozen(ly[:, None]),
                         pixel_columns(x0, c), pixel_columns(x1, c), frozen(np.repeat(lx, c)))


def resize_bilinear(image: np.ndarray, size: int | Sequence[int], *, out: np.ndarray | None = None) -> np.ndarray:
    """``tf.image.resize(image, size)`` (method bilinear, antialias False): half-pixel centres,
    2 taps per axis, float32 output (no rounding), bit-identical. ``out``: where to write it."""
    image = _check_image(image)
    (oh, ow), (ih, iw, c) = _size2(size), image.shape
    out = _output(out, (oh, ow, c))
    image2, out2 = image.reshape(ih, iw * c), out.reshape(oh, ow * c)
    for r0, r1 in _blocks(oh, ow * c):
        _bilinear_block(image2, _bilinear_plan(ih, iw, oh, ow, c, r0, r1), out2[r0:r1])
    return out


def _bilinear_block(image: np.ndarray, p: _BilinearPlan, o: np.ndarray) -> None:
    rows = _rows(image, p.rows, "bl_rows")
    left, right = _columns(rows, p.left, "bl_left"), _columns(rows, p.right, "bl_right")
    # TF's compute_lerp: every needed row along x first, left + (right - left) * x_lerp ...
    along_x, left_f = scratch("bl_x", left.shape, np.float32), scratch("bl_left_f", left.shape, np.float32)
    np.copyto(along_x, right)  # exact; two plain casts are cheaper than one mixed-type subtract
    np.copyto(left_f, left)
    np.subtract(along_x, left_f, out=along_x)
    np.multiply(along_x, p.x_lerp, out=along_x)
    np.add(along_x, left_f, out=along_x)
    # ... then the two rows of each output row along y, top + (bottom - top) * y_lerp.
    top = _rows(along_x, p.top, "bl_top")
    along_x.take(p.bottom, 0, o, "clip")
    np.subtract(o, top, out=o)
    np.multiply(o, p.y_lerp, out=o)
    np.add(o, top, out=o)


def _blocks(rows: int, row_size: int) -> list[tuple[int, int]]:
    """Output rows in blocks whose intermediates stay in a core's cache (~10% faster than one
    block for a 224x224 output, measured)."""
    n = max(1, min(rows, _BLOCK_ELEMENTS // max(row_size, 1)))
    return [(r0, min(r0 + n, rows)) for r0 in range(0, rows, n)]


# ---- area (big_vision) ----------------------------------------------------------------------------


def resize_area(image: np.ndarray, size: int | Sequence[int], *, window: Sequence[int] | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """``tf.image.resize(image, size, method='area')``: every output pixel is the mean of the input
    area it covers (fractional pixels weighted by overlap); float32, bit-identical. ``window``
    ``(top, left, height, width)``: compute only that part of the output (exactly as the whole)."""
    image = _check_image(image)
    (oh, ow), (ih, iw, c) = _size2(size), image.shape
    top, left, h, w = (0, 0, oh, ow) if window is None else (int(v) for v in window)
    if top < 0 or left < 0 or h < 1 or w < 1 or top + h > oh or left + w > ow:
        raise ValueError(f"window {tuple(window)} is not inside the {oh}x{ow} output")
    out = _output(out, (h, w, c))
    image2, out2 = image.reshape(ih, iw * c), out.reshape(h, w * c)
    for r0, r1 in _blocks(h, w * c):
        _area_block(image2, area_plan(ih, iw, oh, ow, c, (top + r0, left, r1 - r0, w)), out2[r0:r1])
    return out


def _area_block(image: np.ndarray, p: AreaPlan, o: np.ndarray) -> None:
    rows = image[p.rows]
    # TF's ComputeXSum: along x each row's taps in order (first, middle..., last), in float32 ...
    along_x = scratch("area_x", (rows.shape[0], o.shape[1]), np.float32)
    term = scratch("area_term", along_x.shape, np.float32)
    for k, (cols, weights) in enumerate(zip(p.columns, p.x_weights)):
        dst = along_x if k == 0 else term
        np.copyto(dst, _columns(rows, cols, "area_taps"))
        np.multiply(dst, weights, out=dst)
        if k:
            np.add(along_x, term, out=along_x)
    # ... then the rows' sums weighted and added in order (TF starts from 0; 0 + x is x) ...
    row_term = scratch("area_rows", o.shape, np.float32)
    for k, (taps, weights) in enumerate(zip(p.row_taps, p.y_weights)):
        dst = o if k == 0 else row_term
        along_x.take(taps, 0, dst, "clip")
        np.multiply(dst, weights, out=dst)
        if k:
            np.add(o, row_term, out=o)
    np.multiply(o, p.inv_area, out=o)  # ... times 1 / area


def _small_size(h: int, w: int, smaller_size: int) -> tuple[int, int]:
    """big_vision's resize_small target: sides scaled in float32, rounded half-to-even (tf.round)."""
    factor = np.float32(smaller_size) / np.float32(min(h, w))
    return int(np.round(np.float32(h) * factor)), int(np.round(np.float32(w) * factor))


def resize_small(image: np.ndarray, smaller_size: int) -> np.ndarray:
    """big_vision's ``resize_small``: scale so the shorter side is ``smaller_size``, area resampling,
    then back to the input dtype by truncation (``tf.cast``) for uint8 input, as big_vision does."""
    image = _check_image(image)
    out = resize_area(image, _small_size(*image.shape[:2], smaller_size))
    if image.dtype != np.uint8:
        return out
    # An area mean of uint8 pixels lies in [0, 255 + rounding]; tf.cast truncates toward zero.
    return np.minimum(out, np.float32(255), out=out).astype(np.uint8)


def central_crop(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """big_vision's ``central_crop``: offsets ``(H - h) // 2`` and ``(W - w) // 2``."""
    image = np.asarray(image)
    (ch, cw), (h, w) = _size2(size), image.shape[:2]
    if ch > h or cw > w:
        raise ValueError(f"cannot crop {ch}x{cw} from a {h}x{w} image")
    dy, dx = (h - ch) // 2, (w - cw) // 2
    return image[dy:dy + ch, dx:dx + cw]


# ---- the pipelines ----------------------------------------------------------------------------


def preprocess(image: np.ndarray, pipeline: str = "vit_jax", image_size: int | Sequence[int] = 224, *,
               out: np.ndarray | None = None) -> np.ndarray:
    """A uint8 (H, W, 3) image -> the model's (h, w, 3) float32 input in [-1, 1] by an official
    eval pipeline (see the module docstring). ``out``: a float32 (h, w, 3) array to write it to."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown preprocessing {pipeline!r}; expected one of {', '.join(PIPELINES)}")
    size, image = _size2(image_size), _check_image(image)
    out = _output(out, (*size, image.shape[2]))
    if pipeline == "vit_jax":
        if image.dtype == np.uint8 and kernels.vit_jax(image, size, out):
            return out
        resize_bilinear(image, size, out=out)
        np.subtract(out, np.float32(127.5), out=out)  # value_range(x, "vit_jax"), in place
        np.divide(out, np.float32(127.5), out=out)
        return out
    small = _small_size(*image.shape[:2], int(round(max(size) * _BIG_VISION_RESIZE_RATIO)))
    if size[0] > small[0] or size[1] > small[1]:
        raise ValueError(f"cannot crop {size[0]}x{size[1]} from a {small[0]}x{small[1]} image")
    window = ((small[0] - size[0]) // 2, (small[1] - size[1]) // 2, *size)  # central_crop's offsets
    if image.dtype == np.uint8 and kernels.big_vision(image, small, window, out):
        return out
    crop = resize_area(image, small, window=window, out=out)
    if image.dtype != np.uint8:  # no truncation: value_range of the float resize
        out[...] = value_range(crop, "big_vision")
        return out
    # tf.cast truncates toward zero; an area mean of uint8 pixels lies in [0, 255 + rounding] < 256.
    pixels = scratch("bv_uint8", out.shape, np.uint8)
    np.copyto(pixels, crop, casting="unsafe")
    np.divide(pixels, np.float32(255), out=out, dtype=np.float32)  # value_range(pixels, "big_vision") in place
    np.multiply(out, np.float32(2), out=out)
    return np.add(out, np.float32(-1), out=out)


def load_image(path, pipeline: str = "vit_jax", image_size: int | Sequence[int] = 224,
               exif_orientation: bool = True, *, name: str | None = None, out: np.ndarray | None = None
               ) -> np.ndarray:
    """:func:`mixer_convert.images.read_image` then :func:`preprocess`. ``path``: a file, encoded
    bytes or a decoded array; ``name``: what to call it in an :class:`~mixer_convert.images.ImageError`."""
    return preprocess(read_image(path, name=name, exif_orientation=exif_orientation), pipeline, image_size, out=out)
