"""One image, from file/bytes/array to a (H, W, 3) uint8 crop: decoding, mode conversion, crops.

Pure functions, no framework imports (the input pipeline runs them in worker threads or
processes). Pillow and OpenCV release the GIL while they decode and resample, so threads scale.

* ``read_image``: decode with Pillow; a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
  DCT scaling, ``Image.draft``) when the region we keep will be downscaled at least that much.
* mode conversion: ``mixer_convert.preprocess.to_rgb8`` (the core's, shared with mixer-predict
  and mixer-eval): 16-bit images scaled (v / 257), not clipped at 255; alpha dropped.
* ``crop_resize``: the box to the output size with bilinear interpolation **without
  antialiasing** (half-pixel centres, edge-clamped), the resize of the official pipelines
  (``tf.image.resize``), in one OpenCV ``warpAffine``; a horizontal flip is free.
* ``inception_box``: the random crop of the official train preprocessing (area, aspect 3/4-4/3).

Every failure to read an image is a ``BadImageError`` naming the file.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image

from mixer_convert.preprocess import to_rgb8

# A file path, the encoded bytes of an image, or a decoded (H, W[, C]) array.
Payload = Union[str, os.PathLike, bytes, np.ndarray]
Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels, pixel edges at integers



class BadImageError(ValueError):
    """An example that cannot be read as an image (the message names it)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"bad image {name}: {reason}")
        self.name, self.reason = name, reason

    def __reduce__(self):  # pickled back from worker processes
        return type(self), (self.name, self.reason)


def describe(payload: Payload, name: str | None = None) -> str:
    if name is not None:
        return name
    if isinstance(payload, (str, os.PathLike)):
        return repr(os.fspath(payload))
    return f"<{type(payload).__name__}>"


def open_image(payload: Payload, name: str | None = None) -> Image.Image:
    """Header only (nothing decoded yet), so the size is known before deciding how to decode."""
    label = describe(payload, name)
    src = io.BytesIO(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else payload
    try:
        with warnings.catch_warnings():  # Pillow warns, then errors, past its pixel limit: one error for both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(src)
    except IsADirectoryError:
        raise BadImageError(label, "is a directory, not an image file") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImageError(label, f"decompression bomb refused ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        reason = "empty file" if _is_empty(src) else str(e).split(" '")[0] or type(e).__name__
        raise BadImageError(label, reason) from None
    w, h = im.size
    if w < 1 or h < 1:
        raise BadImageError(label, f"has size {w}x{h}")
    return im


def _is_empty(src) -> bool:
    try:
        return os.path.getsize(src) == 0 if not isinstance(src, io.BytesIO) else not src.getbuffer().nbytes
    except OSError:
        return False


def draft_scale(size: tuple[int, int], box: Box, out_hw: tuple[int, int]) -> int:
    """The largest libjpeg scale (1, 2, 4 or 8) that keeps the box at least the output size."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    for s in (8, 4, 2):
        if bw / s >= out_hw[1] and bh / s >= out_hw[0] and min(size) // s >= 1:
            return s
    return 1


def read_image(payload: Payload, box_fn=None, out_hw: tuple[int, int] | None = None, *, draft: bool = True,
               name: str | None = None) -> tuple[np.ndarray, Box]:
    """Decode ``payload`` to (H, W, 3) uint8 RGB and return it with the box to keep, in its pixels.

    ``box_fn(width, height) -> box`` picks the region in the original image's pixels (default:
    all of it); with ``draft`` and an ``out_hw`` the region is downscaled to, a JPEG is decoded
    at the reduced scale and the box is mapped to it. The box depends only on the original
    size, so a draft decode changes pixel values slightly but never which region is taken.
    """
    if isinstance(payload, np.ndarray) and payload.dtype.kind in "SO" and payload.size == 1:
        payload = payload.item()  # encoded bytes wrapped in a numpy scalar array
    if isinstance(payload, np.ndarray):  # already decoded (digits, tfds test mocks): no Pillow round trip
        rgb = array_to_rgb(payload, name)
        h, w = rgb.shape[:2]
        return rgb, box_fn(w, h) if box_fn is not None else (0.0, 0.0, float(w), float(h))
    im = open_image(payload, name)
    label = describe(payload, name)
    w, h = im.size
    box = box_fn(w, h) if box_fn is not None else (0.0, 0.0, float(w), float(h))
    try:
        if draft and out_hw is not None and im.format == "JPEG":
            s = draft_scale((w, h), box, out_hw)
            if s > 1:
                got = im.draft(None, (w // s, h // s))
                if got is not None:  # the scale libjpeg will use: decoded pixel = s x s original pixels
                    s = w / got[1][2]
                    box = tuple(v / s for v in box)
        im.load()
        rgb = to_rgb8(im, label)  # the core's mode conversion, shared with mixer-predict/mixer-eval
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError, MemoryError) as e:  # truncated, corrupt data
        raise BadImageError(label, str(e) or type(e).__name__) from None
    finally:
        im.close()
    return rgb, box


def array_to_rgb(arr: np.ndarray, name: str | None = None) -> np.ndarray:
    """A decoded (H, W[, 1|3|4]) uint8 array as (H, W, 3): grey repeated, alpha dropped."""
    a = arr[..., None] if arr.ndim == 2 else arr
    if a.ndim != 3 or a.dtype != np.uint8 or a.shape[-1] not in (1, 3, 4) or 0 in a.shape:
        raise BadImageError(describe(arr, name), f"array of {arr.dtype} {arr.shape}, expected uint8 HxW[x1|3|4]")
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    return a[..., :3]


_cv2_module = None


def _cv2():
    """OpenCV, single-threaded: the input workers are the parallelism; OpenCV's own thread pool
    on top of them only costs CPU (measured: 7% more CPU per image, no faster with 2 workers)."""
    global _cv2_module
    if _cv2_module is None:
        import cv2

        cv2.setNumThreads(1)
        _cv2_module = cv2
    return _cv2_module


def crop_resize(im: np.ndarray | Image.Image, box: Box, out_hw: tuple[int, int], flip: bool = False) -> np.ndarray:
    """``box`` of ``im`` resized to ``out_hw`` with bilinear interpolation, no antialiasing, as
    (H, W, 3) uint8; ``flip`` mirrors it horizontally at no cost.

    Output pixel u (centre u + 0.5) samples the input at x0 + (u + 0.5) * box_width / out_width
    (half-pixel centres, neighbours clamped at the image edge): ``tf.image.resize``'s bilinear
    applied to the box, within rounding (OpenCV's fixed-point weights; measured <= 0.51 of a
    level, unbiased). OpenCV's ``warpAffine``, not Pillow: Pillow's ``resize`` antialiases when
    downscaling, and its affine ``transform`` truncates (a -0.5 level bias) at 6x the cost.
    """
    cv2 = _cv2()
    oh, ow = out_hw
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / ow, (y1 - y0) / oh
    # destination pixel (u, v) -> source (a u + c, e v + f) in OpenCV's pixel-centre coordinates
    a, c = (-sx, x1 - 0.5 * sx - 0.5) if flip else (sx, x0 + 0.5 * sx - 0.5)
    m = np.array([[a, 0.0, c], [0.0, sy, y0 + 0.5 * sy - 0.5]])
    return cv2.warpAffine(np.ascontiguousarray(im), m, (ow, oh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def inception_box(width: int, height: int, rng: np.random.Generator,
                  area: tuple[float, float] = (0.05, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                  attempts: int = 10) -> Box:
    """Random crop as ``tf.image.sample_distorted_bounding_box(area_range=area,
    min_object_covered=0)``: area fraction uniform, aspect log-uniform; the whole image when
    no sample fits in ``attempts`` tries. A float box (sub-pixel position), resampled once."""
    total = float(width * height)
    for _ in range(attempts):
        target = rng.uniform(*area) * total
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if cw <= width and ch <= height:
            x0, y0 = rng.uniform(0, width - cw), rng.uniform(0, height - ch)
            return (x0, y0, x0 + cw, y0 + ch)
    return (0.0, 0.0, float(width), float(height))
