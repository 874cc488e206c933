"""One image, from a file, encoded bytes or a decoded array to uint8 RGB pixels: the one reader
of every command (mixer-train's input pipeline, mixer-predict, mixer-eval), the one error for an
unreadable image, and the training crops.

* :func:`read_image`: the whole picture, (H, W, 3) uint8. EXIF orientation applied by default
  (as a viewer shows it; TensorFlow's decoders ignore it: ``exif_orientation=False`` matches them).
* :func:`read_crop`: the region a ``box_fn`` picks, for training: no EXIF (as tf's decoders), and
  a JPEG decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, ``Image.draft``) when the region
  will be downscaled at least that much.
* :func:`to_rgb8` (Pillow images of any mode) and :func:`array_to_rgb` (decoded arrays): alpha
  dropped, not composited (as ``tf.io.decode_image(channels=3)``; premultiplied alpha undone
  first); grey, palette, CMYK, YCbCr, LAB, HSV become RGB; 16-bit scaled by 1/257, never clipped
  at 255 (grey here; 16-bit RGB Pillow reduces to its high byte); an animation gives its first
  frame (``decode_image(expand_animations=False)``).
* :func:`crop_resize`: training's crop + resize + flip in one OpenCV ``warpAffine`` (bilinear,
  half-pixel centres, no antialiasing, in float32 then rounded to uint8: ``tf.image.resize``
  within rounding).
  mixer-eval and mixer-predict use the exact float resizes of :mod:`mixer_convert.preprocess`.

Everything unreadable -- missing, a directory, not a regular file, empty, not an image, corrupt,
truncated, a decompression bomb (over ``PIL.Image.MAX_IMAGE_PIXELS``), a float image -- is an
:class:`ImageError` whose one-line message names the file. Pillow and OpenCV release the GIL while
they decode and resample, so these functions scale in threads.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import struct
import warnings
from typing import Callable, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A file path, the encoded bytes of an image, or a decoded (H, W[, C]) array.
Payload = Union[str, os.PathLike, bytes, np.ndarray]
Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels, pixel edges at integers
BoxFn = Callable[[int, int], Box]  # (width, height) of the original image -> the box to keep


class ImageError(ValueError):
    """An image that cannot be read: ``str(e)`` is ``"<name>: <reason>"``, one line."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason

    def __reduce__(self):  # pickled back from worker processes
        return type(self), (self.name, self.reason)


def payload_name(payload: Payload, name: str | None = None) -> str:
    """What to call ``payload`` in messages: ``name`` if given, else its path, else its type."""
    if name is not None:
        return name
    if isinstance(payload, (str, os.PathLike)):
        return os.fspath(payload)
    return f"<{type(payload).__name__}>"


# ---- opening ------------------------------------------------------------------------------------


def _unwrap(payload: Payload) -> Payload:
    if isinstance(payload, np.ndarray) and payload.dtype.kind in "SO" and payload.size == 1:
        return payload.item()  # encoded bytes wrapped in a numpy scalar array (tfds)
    return payload


def _check_path(path: str | os.PathLike, label: str) -> None:
    """Refuse before opening what Pillow would misreport or hang on (a FIFO blocks forever)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(label, "no such file") from None
    except PermissionError:
        raise ImageError(label, "permission denied") from None
    except OSError as e:
        raise ImageError(label, f"cannot be read ({e.strerror or type(e).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(label, "is a directory, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(label, "is not a regular file")
    if st.st_size == 0:
        raise ImageError(label, "empty file")


@contextlib.contextmanager
def _pillow_errors(label: str) -> Iterator[None]:
    """Pillow's exceptions (and its decompression-bomb warning, refused too) as one ImageError."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(label, "not an image, or a format Pillow cannot read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(label, f"refused as a possible decompression bomb ({e})") from None
    except PermissionError:
        raise ImageError(label, "permission denied") from None
    except MemoryError:
        raise ImageError(label, "too large to decode in memory") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:  # what decoders raise on bad data
        reason = (str(e).splitlines() or [""])[0][:200]
        raise ImageError(label, f"corrupt or truncated image ({type(e).__name__}: {reason})") from None


def open_image(payload: Payload, name: str | None = None) -> Image.Image:
    """A file or encoded bytes opened by Pillow, header only (the size is known, nothing decoded)."""
    label = payload_name(payload, name)
    if isinstance(payload, (str, os.PathLike)):
        _check_path(payload, label)
        src = payload
    elif isinstance(payload, (bytes, bytearray, memoryview)):
        if not len(payload):
            raise ImageError(label, "empty file")
        src = io.BytesIO(payload)
    else:
        raise ImageError(label, f"cannot read an image from a {type(payload).__name__}")
    with _pillow_errors(label):
        im = Image.open(src)
    w, h = im.size
    if w < 1 or h < 1:
        im.close()
        raise ImageError(label, f"has size {w}x{h}")
    return im


# ---- reading ------------------------------------------------------------------------------------


def read_image(payload: Payload, *, name: str | None = None, exif_orientation: bool = True) -> np.ndarray:
    """``payload`` (a path, encoded bytes or a decoded array) as a (H, W, 3) uint8 RGB array; see
    the module docstring for modes, alpha, 16-bit data and EXIF. Raises :class:`ImageError`."""
    payload = _unwrap(payload)
    if isinstance(payload, np.ndarray):
        return array_to_rgb(payload, name)
    label = payload_name(payload, name)
    im = open_image(payload, name)
    try:
        with _pillow_errors(label):
            im.load()  # decode now, so truncation and corruption surface here
            if exif_orientation:
                ImageOps.exif_transpose(im, in_place=True)
            return to_rgb8(im, label)
    finally:
        im.close()


def read_crop(payload: Payload, box_fn: BoxFn | None = None, out_hw: tuple[int, int] | None = None, *,
              draft: bool = True, name: str | None = None) -> tuple[np.ndarray, Box]:
    """Decode ``payload`` to (H, W, 3) uint8 RGB and return it with the box to keep, in its pixels.

    ``box_fn(width, height)`` picks the region in the original image's pixels (default: all of
    it); with ``draft`` and the ``out_hw`` the region is downscaled to, a JPEG is decoded at the
    reduced scale and the box mapped to it. The box depends only on the original size, so a
    draft decode changes pixel values slightly but never which region is taken. No EXIF rotation
    (TensorFlow's decoders apply none either).
    """
    payload = _unwrap(payload)
    if isinstance(payload, np.ndarray):  # already decoded (digits, tfds test mocks): no Pillow round trip
        rgb = array_to_rgb(payload, name)
        h, w = rgb.shape[:2]
        return rgb, box_fn(w, h) if box_fn is not None else (0.0, 0.0, float(w), float(h))
    label = payload_name(payload, name)
    im = open_image(payload, name)
    try:
        w, h = im.size
        box = box_fn(w, h) if box_fn is not None else (0.0, 0.0, float(w), float(h))
        with _pillow_errors(label):
            if draft and out_hw is not None and im.format == "JPEG":
                s = draft_scale((w, h), box, out_hw)
                got = im.draft(None, (w // s, h // s)) if s > 1 else None
                if got is not None:  # the scale libjpeg will use: decoded pixel = s x s original pixels
                    s = w / got[1][2]
                    box = tuple(v / s for v in box)
            im.load()
            return to_rgb8(im, label), box
    finally:
        im.close()


def draft_scale(size: tuple[int, int], box: Box, out_hw: tuple[int, int]) -> int:
    """The largest libjpeg scale (1, 2, 4 or 8) that keeps the box at least the output size."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    for s in (8, 4, 2):
        if bw / s >= out_hw[1] and bh / s >= out_hw[0] and min(size) // s >= 1:
            return s
    return 1


# ---- mode conversion ----------------------------------------------------------------------------


def to_rgb8(im: Image.Image, name: str) -> np.ndarray:
    """A decoded Pillow image of any mode as (H, W, 3) uint8 RGB (``name`` for errors)."""
    mode = im.mode
    if mode == "RGB":  # the common case: no convert(), which would copy
        return np.asarray(im)
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (PNG/TIFF; older Pillow opens it as "I"). Pillow's convert("L") clips at 255
        # instead of scaling, so scale here: 0..65535 -> 0..255.
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(name, "32-bit integer image with values outside 0..65535 is not supported")
        grey = np.rint(a / 257.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "F":
        raise ImageError(name, "floating-point images (mode F) have no standard value range; convert to 8 bits")
    if mode in ("RGBa", "La"):  # premultiplied alpha: undo it before dropping alpha
        im = im.convert(mode.upper())
    # convert("RGB") drops alpha (also a palette's transparency) and maps 1/L/P/CMYK/YCbCr/LAB/HSV.
    return np.asarray(im.convert("RGB"))


def array_to_rgb(arr: np.ndarray, name: str | None = None) -> np.ndarray:
    """A decoded (H, W[, 1|3|4]) uint8 array as (H, W, 3): grey repeated, alpha dropped."""
    a = arr[..., None] if arr.ndim == 2 else arr
    if a.ndim != 3 or a.dtype != np.uint8 or a.shape[-1] not in (1, 3, 4) or 0 in a.shape:
        raise ImageError(payload_name(arr, name), f"array of {arr.dtype} {arr.shape}, expected uint8 HxW[x1|3|4]")
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    return a[..., :3]


# ---- training crops -----------------------------------------------------------------------------


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


WORKER_TYPES = ("thread", "process")  # how image readers run, in training's pipeline and in mixer-eval


def default_workers() -> int:
    """How many image readers to run: one per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_cv2_module = None
# OpenCV 4.x's warpAffine puts every source position on a 1/32-pixel grid (its fixed-point
# INTER_BITS), floats included: measured up to 6 levels off tf.image.resize on noise. 5.0 computes
# the positions in float.
OPENCV_MIN = (5, 0)


def opencv():
    """OpenCV (the ``train`` extra), checked and single-threaded: the input workers are the
    parallelism; its own thread pool on top of them only costs CPU (measured: 7% more CPU per
    image, no faster). An OpenCV older than :data:`OPENCV_MIN` is a ValueError saying why."""
    global _cv2_module
    if _cv2_module is None:
        import cv2

        found = tuple(int(p) for p in cv2.__version__.split(".")[:2])
        if found < OPENCV_MIN:
            raise ValueError(f"training's crop needs OpenCV >= {'.'.join(map(str, OPENCV_MIN))}, found "
                             f"{cv2.__version__}, whose warpAffine rounds pixel positions to 1/32 (up to 6 "
                             f"levels off tf.image.resize): pip install -U 'opencv-python-headless>=5'")
        cv2.setNumThreads(1)
        _cv2_module = cv2
    return _cv2_module


def crop_resize(im: np.ndarray, box: Box, out_hw: tuple[int, int], flip: bool = False) -> np.ndarray:
    """``box`` of ``im`` resized to ``out_hw`` with bilinear interpolation, no antialiasing, as
    (H, W, 3) uint8; ``flip`` mirrors it horizontally at no cost.

    Output pixel u (centre u + 0.5) samples the input at x0 + (u + 0.5) * box_width / out_width
    (half-pixel centres, neighbours clamped at the image edge): ``tf.image.resize``'s bilinear
    applied to the box, in float32, then rounded to the nearest level (ties to even, so unbiased).
    The rounding is ours, not OpenCV's: its uint8 path rounds differently from release to release
    (5.1 rounds ties up, a +0.08 level bias on a 2x upscale). OpenCV's ``warpAffine``, not Pillow:
    Pillow's ``resize`` antialiases when downscaling, and its affine ``transform`` truncates (a
    -0.5 level bias) at 6x the cost.
    """
    cv2 = opencv()
    oh, ow = out_hw
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / ow, (y1 - y0) / oh
    # Only what the output reads becomes float32: the box and one pixel around it. Positions span
    # [x0 - 0.5, x1 - 0.5], so their neighbours lie in [floor(x0) - 1, ceil(x1)].
    h, w = im.shape[:2]
    c0, r0 = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
    window = im[r0:min(math.ceil(y1) + 1, h), c0:min(math.ceil(x1) + 1, w)].astype(np.float32)
    # destination pixel (u, v) -> source (a u + c, e v + f) in OpenCV's pixel-centre coordinates
    a, c = (-sx, x1 - 0.5 * sx - 0.5) if flip else (sx, x0 + 0.5 * sx - 0.5)
    m = np.array([[a, 0.0, c - c0], [0.0, sy, y0 + 0.5 * sy - 0.5 - r0]])
    # Replicating the window's border is the image's: the window stops short of an edge only where
    # no position reads past it.
    out = cv2.warpAffine(window, m, (ow, oh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)
    return np.rint(out, out=out).astype(np.uint8)
