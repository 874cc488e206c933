"""Test images: scikit-learn's real photos, image folders cut from them, hand-written PNGs
(16-bit RGB, decompression bombs) and broken files, for the image, dataset and pipeline tests."""
from __future__ import annotations

import struct
import zlib

import numpy as np


def photos() -> list[np.ndarray]:
    """scikit-learn's two sample photos (china.jpg, flower.jpg; 427x640 RGB); random pixels without scikit-learn."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (427, 640, 3), dtype=np.uint8) for _ in range(2)]
    return list(load_sample_images().images)


def digit_images() -> np.ndarray:
    """scikit-learn's handwritten digits as (1797, 8, 8, 3) uint8."""
    from sklearn.datasets import load_digits

    grey = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def make_folder(root, n=24, classes=3, size=(64, 48), split="train"):
    """root/<split>/class_k/NNN.jpg: n small JPEGs cut from the sample photos."""
    from PIL import Image

    pics = photos()
    rng = np.random.default_rng(0)
    for i in range(n):
        ph = pics[i % 2]
        y, x = int(rng.integers(0, 300)), int(rng.integers(0, 500))
        d = root / split / f"class_{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ph[y:y + 120, x:x + 140]).resize(size).save(d / f"{i:03d}.jpg", quality=90)
    return root


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path, arr: np.ndarray) -> None:
    """A PNG written by hand (Pillow cannot write 16-bit RGB): uint16 (H, W, 3) or uint8 (H, W)."""
    h, w = arr.shape[:2]
    depth, color = (16, 2) if arr.dtype == np.uint16 else (8, 0)
    rows = b"".join(b"\x00" + arr[y].astype(">u2" if depth == 16 else "u1").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
                     + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


def write_bomb_png(path, side: int) -> None:
    """A ~100 kB grayscale PNG that claims side x side pixels (a decompression bomb)."""
    co = zlib.compressobj(9)
    body = b"".join(co.compress(b"\x00" + bytes(side)) for _ in range(8)) + co.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b""))


BAD_KINDS = ["corrupt", "truncated", "empty", "not_an_image", "directory", "bomb"]


def make_bad(path, kind):
    """Replace the image at ``path`` (a .jpg) with a bad one of ``kind``."""
    good = path.read_bytes()
    path.unlink()
    if kind == "corrupt":
        path.write_bytes(good[:2] + np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes()
                         + good[402:])
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_an_image":
        path.write_text("this is a text file with an image's name\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "bomb":
        write_bomb_png(path, 14000)  # 196 M pixels: past Pillow's hard limit; a .jpg name on a PNG


def tf_resize_reference(img: np.ndarray, oh: int, ow: int, box=None) -> np.ndarray:
    """tf.image.resize(method='bilinear', antialias=False) in float64 numpy: half-pixel centres,
    source index clamped to the image; with ``box`` (x0, y0, x1, y1, fractional allowed), the same
    sampling applied to that region of the image, as training's crop does."""
    x0, y0, x1, y1 = box if box is not None else (0, 0, img.shape[1], img.shape[0])

    def axis(out, lo, hi, n):
        c = lo + (np.arange(out) + 0.5) * ((hi - lo) / out) - 0.5
        f = np.floor(c)
        return np.clip(f, 0, n - 1).astype(int), np.clip(np.ceil(c), 0, n - 1).astype(int), c - f
    ylo, yhi, dy = axis(oh, y0, y1, img.shape[0])
    xlo, xhi, dx = axis(ow, x0, x1, img.shape[1])
    a = img.astype(np.float64)
    top = a[ylo][:, xlo] * (1 - dx)[None, :, None] + a[ylo][:, xhi] * dx[None, :, None]
    bot = a[yhi][:, xlo] * (1 - dx)[None, :, None] + a[yhi][:, xhi] * dx[None, :, None]
    return top * (1 - dy)[:, None, None] + bot * dy[:, None, None]


def crop_resize_errors() -> dict[str, float]:
    """How far training's crop_resize is from ``tf.image.resize`` (float64, above): the largest
    error in levels over crops that up- and downscale, flipped or not, and the mean error over a
    large 2x upscale, where a tie (a value exactly between two levels) is common. A bias is a mean,
    so it is measured on 49k values: on a few hundred with 15% ties, ties-to-even alone moves the
    mean by ~0.02 either way."""
    from mixer_convert.images import crop_resize

    rng = np.random.default_rng(0)
    worst = 0.0
    for h, w, oh, ow in [(8, 8, 16, 16), (375, 500, 224, 224), (100, 37, 224, 224), (500, 375, 50, 70)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = tf_resize_reference(img, oh, ow)
        for flip in (False, True):
            ours = crop_resize(img, (0, 0, w, h), (oh, ow), flip=flip).astype(np.float64)
            worst = max(worst, float(np.abs(ours - (ref[:, ::-1] if flip else ref)).max()))
    biases = []
    for h, w, oh, ow in [(64, 64, 128, 128), (375, 500, 224, 224)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        biases.append(float((crop_resize(img, (0, 0, w, h), (oh, ow)).astype(np.float64)
                             - tf_resize_reference(img, oh, ow)).mean()))
    return {"max_error": worst, "mean_error": max(biases, key=abs)}
