"""Image reading and the two official evaluation pipelines, in numpy + Pillow only (no TensorFlow,
JAX or PyTorch), so a torch-only and a Flax-only install preprocess identically.

Pipelines (``preprocess(image, pipeline, image_size)``; both end in ``(x - 127.5) / 127.5``, [-1, 1]):

* ``vit_jax`` -- google-research/vision_transformer's eval input pipeline, used for the Mixer
  fine-tuning configs: ``tf.image.resize(im, [H, W])`` straight to the model size, i.e. bilinear
  with half-pixel centres, **no antialiasing**, float output (not rounded back to uint8).
  :func:`resize_bilinear` reproduces it (Pillow's BILINEAR antialiases when shrinking, so it is a
  different function).
* ``big_vision`` -- big_vision's ImageNet eval (configs/mlp_mixer_i1k.py, the paper's tables):
  ``resize_small(256)|central_crop(224)|value_range(-1, 1)``. big_vision's ``resize_small``
  (pp/ops_image.py) calls ``tf.image.resize`` with ``method="area"`` (its default in every
  version of that file; area resizing always averages, whatever the antialias flag says) to
  ``round(side * 256 / shorter side)``, then casts back to uint8 by truncation.
  :func:`resize_small` reproduces that, with :func:`resize_area` = ``tf.image.resize(method="area")``.
  For a model size other than 224 the shorter side goes to ``round(max(H, W) * 256 / 224)``.

Image reading (:func:`read_image`): any file Pillow opens, as uint8 RGB. EXIF orientation is
applied (the picture as a viewer shows it; TensorFlow's decoders ignore it, pass
``exif_orientation=False`` to match them); alpha is dropped, as ``tf.io.decode_image(channels=3)``
does; grayscale, palette and CMYK become RGB; 16-bit images are scaled to 8 bits, never clipped
(grey x / 257 here; 16-bit RGB Pillow itself reduces to the high byte); an animation gives its
first frame, as ``decode_image(expand_animations=False)``. JPEG decoding may still differ from
TensorFlow's by a grey level here and there: TF's default DCT method is not PIL's (big_vision's
``decode(precise=True)`` exists to match PIL).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

PIPELINES = ("vit_jax", "big_vision")

# big_vision's ImageNet eval resizes the shorter side to 256 for a 224 crop; other crop sizes keep the ratio.
_BIG_VISION_RESIZE_RATIO = 256 / 224


class ImageError(ValueError):
    """A file that cannot be read as an image; the message starts with the file's name."""


# ---- reading ------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike, *, exif_orientation: bool = True) -> np.ndarray:
    """The image at ``path`` as a (H, W, 3) uint8 array (see the module docstring for how modes,
    alpha, 16-bit data and EXIF orientation are handled). Raises :class:`ImageError` naming the
    file for anything unreadable: missing, a directory, empty, unreadable, not an image, corrupt,
    truncated, or larger than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if p.is_dir():
        raise ImageError(f"{p}: is a directory, not an image")
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise ImageError(f"{p}: empty file")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                im.load()  # decode now, so truncation and corruption surface here
                if exif_orientation:
                    im = ImageOps.exif_transpose(im)
                return to_rgb8(im, p)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not an image, or a format Pillow cannot read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{p}: refused as a possible decompression bomb ({e})") from None
    except PermissionError:
        raise ImageError(f"{p}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what Pillow's decoders raise on bad data
        raise ImageError(f"{p}: corrupt or truncated image ({type(e).__name__}: {e})") from None


def to_rgb8(im, path: str | os.PathLike) -> np.ndarray:
    """A decoded Pillow image of any mode as (H, W, 3) uint8 RGB: 16-bit scaled by 1/257 (Pillow's
    own conversion clips at 255), alpha dropped (premultiplied alpha undone first); ``path`` names
    the image in errors."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (PNG/TIFF; older Pillow opens it as "I"). Pillow's convert("L") clips at 255
        # instead of scaling, so scale here: 0..65535 -> 0..255.
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(f"{path}: 32-bit integer image with values outside 0..65535 is not supported")
        grey = np.rint(a / 257.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "F":
        raise ImageError(f"{path}: floating-point images (mode F) have no standard value range; convert to 8 bits")
    if mode in ("RGBa", "La"):  # premultiplied alpha: undo it before dropping alpha
        im = im.convert(mode.upper())
    # convert("RGB") drops alpha (also a palette's transparency) and maps 1/L/P/CMYK/YCbCr/LAB/HSV.
    rgb = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(rgb, dtype=np.uint8)


# ---- resizing (TensorFlow semantics, in numpy) --------------------------------------------------


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(h), int(w)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    return image


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorFlow's half-pixel bilinear taps, in float32 as TF computes them:
    x_in = (x + 0.5) * in/out - 0.5; lower = max(floor, 0), upper = min(ceil, in - 1), lerp = x_in - floor."""
    scale = np.float32(in_size) / np.float32(out_size)
    pos = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    fl = np.floor(pos)
    lower = np.maximum(fl, 0).astype(np.intp)
    upper = np.minimum(np.ceil(pos), in_size - 1).astype(np.intp)
    return lower, upper, (pos - fl).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """``tf.image.resize(image, size)`` (method bilinear, antialias False): half-pixel centres,
    a 2-tap gather and lerp per axis, float32 output (no rounding). Equals
    ``jax.image.resize(..., 'bilinear', antialias=False)`` up to float rounding."""
    image = _check_image(image)
    (oh, ow), (ih, iw) = _size2(size), image.shape[:2]
    y0, y1, ly = _bilinear_taps(ih, oh)
    x0, x1, lx = _bilinear_taps(iw, ow)
    # Gather the needed rows before converting to float32: a large photo is never converted whole.
    top, bottom = image[y0].astype(np.float32), image[y1].astype(np.float32)  # (oh, iw, C)
    lx = lx[None, :, None]
    # The order of TF's compute_lerp: each row along x first, then the two rows along y.
    top = top[:, x0] + (top[:, x1] - top[:, x0]) * lx
    bottom = bottom[:, x0] + (bottom[:, x1] - bottom[:, x0]) * lx
    return top + (bottom - top) * ly[:, None, None]


def _area_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """TensorFlow's resize_area weights for one axis, (out, K) indices and float32 weights: output
    cell x covers input [x*s, (x+1)*s), s = in/out; each input pixel weighs its overlap with it."""
    scale = np.float32(in_size) / np.float32(out_size)
    x = np.arange(out_size, dtype=np.float32)
    lo, hi = x * scale, (x + np.float32(1)) * scale
    start = np.floor(lo).astype(np.intp)
    end = np.ceil(hi).astype(np.intp)
    k = int((end - start).max())
    idx = start[:, None] + np.arange(k)[None, :]
    i, lo, hi = idx.astype(np.float32), lo[:, None], hi[:, None]
    # The overlap, with TF's branches (a cell inside one pixel weighs exactly `scale`, not hi - lo).
    w = np.where(i < lo, np.where(i + 1 > hi, scale, i + 1 - lo), np.where(i + 1 > hi, hi - i, np.float32(1)))
    w = np.where(idx < end[:, None], w, np.float32(0)).astype(np.float32)
    return np.minimum(idx, in_size - 1), w  # TF bounds indices that rounding pushes past the edge


def _weighted_taps(img: np.ndarray, idx: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    # Sums taps in order (first, middle..., last), as TF's ComputeXSum does, in float32.
    out = None
    for k in range(idx.shape[1]):
        shape = [1] * img.ndim
        shape[axis] = -1
        term = np.take(img, idx[:, k], axis=axis) * w[:, k].reshape(shape)  # uint8 * float32 -> float32
        out = term if out is None else out + term
    return out


def resize_area(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """``tf.image.resize(image, size, method='area')``: every output pixel is the mean of the input
    area it covers (fractional pixels weighted by overlap); float32 output."""
    image = _check_image(image)
    (oh, ow), (ih, iw) = _size2(size), image.shape[:2]
    xi, xw = _area_taps(iw, ow)
    yi, yw = _area_taps(ih, oh)
    rows = _weighted_taps(image, xi, xw, axis=1)  # TF sums along x first, then over rows
    out = _weighted_taps(rows, yi, yw, axis=0)
    # TF multiplies by 1 / (scale_y * scale_x), the reciprocal taken in double of a float32 product.
    inv = np.float32(1.0 / float(np.float32(ih) / np.float32(oh) * (np.float32(iw) / np.float32(ow))))
    return out * inv


def resize_small(image: np.ndarray, smaller_size: int) -> np.ndarray:
    """big_vision's ``resize_small``: scale so the shorter side is ``smaller_size`` (sides rounded
    half-to-even in float32, as ``tf.round``), area resampling, then back to the input dtype
    by truncation (``tf.cast``), as big_vision does."""
    image = _check_image(image)
    h, w = image.shape[:2]
    factor = np.float32(smaller_size) / np.float32(min(h, w))
    nh, nw = (int(np.round(np.float32(s) * factor)) for s in (h, w))
    out = resize_area(image, (nh, nw))
    if image.dtype == np.uint8:
        return np.clip(out, 0, 255).astype(np.uint8)  # astype truncates toward zero, as tf.cast
    return out


def central_crop(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """big_vision's ``central_crop``: offsets ``(H - h) // 2`` and ``(W - w) // 2``."""
    image = _check_image(image)
    (ch, cw), (h, w) = _size2(size), image.shape[:2]
    if ch > h or cw > w:
        raise ValueError(f"cannot crop {ch}x{cw} from a {h}x{w} image")
    dy, dx = (h - ch) // 2, (w - cw) // 2
    return image[dy:dy + ch, dx:dx + cw]


def value_range(image: np.ndarray) -> np.ndarray:
    """[0, 255] -> [-1, 1] as vit_jax writes it, ``(x - 127.5) / 127.5``, float32 (big_vision's
    ``value_range(-1, 1)`` computes ``x / 255 * 2 - 1``, the same map to within 1 float32 ulp)."""
    return (np.asarray(image, dtype=np.float32) - np.float32(127.5)) / np.float32(127.5)


def preprocess(image: np.ndarray, pipeline: str = "vit_jax", image_size: int | Sequence[int] = 224) -> np.ndarray:
    """A uint8 (H, W, 3) image -> the model's (h, w, 3) float32 input in [-1, 1] by an official
    eval pipeline (see the module docstring)."""
    size = _size2(image_size)
    if pipeline == "vit_jax":
        return value_range(resize_bilinear(image, size))
    if pipeline == "big_vision":
        small = int(round(max(size) * _BIG_VISION_RESIZE_RATIO))
        return value_range(central_crop(resize_small(image, small), size))
    raise ValueError(f"unknown preprocessing {pipeline!r}; expected one of {', '.join(PIPELINES)}")


def load_image(path: str | os.PathLike, pipeline: str = "vit_jax", image_size: int | Sequence[int] = 224,
               exif_orientation: bool = True) -> np.ndarray:
    """:func:`read_image` then :func:`preprocess`."""
    return preprocess(read_image(path, exif_orientation=exif_orientation), pipeline, image_size)
