"""The training crop's cost: mixer_convert.images.crop_resize (float32 warpAffine over the box's
window, rounded by us) against OpenCV's own uint8 warpAffine of the whole image (what it replaced),
and both against Pillow decoding the same JPEG, one thread, side by side in one run.

    python benchmarks/bench_crop.py [--images 40] [--repeats 5] [--size 224] [--json OUT]

Boxes are the inception crops training draws (area 5-100%, aspect 3/4-4/3) on scikit-learn's two
sample photos (427x640) and their 375x500 resizes, saved as JPEGs (quality 90).
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _checkout  # noqa: E402,F401  (this checkout's mixer_convert)

from common import cpu_name  # noqa: E402
from mixer_convert.images import crop_resize, inception_box, opencv  # noqa: E402


def uint8_warp(im: np.ndarray, box, out_hw, flip: bool) -> np.ndarray:
    """The replaced path: OpenCV's uint8 warpAffine of the whole image, OpenCV's rounding."""
    cv2 = opencv()
    oh, ow = out_hw
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / ow, (y1 - y0) / oh
    a, c = (-sx, x1 - 0.5 * sx - 0.5) if flip else (sx, x0 + 0.5 * sx - 0.5)
    m = np.array([[a, 0.0, c], [0.0, sy, y0 + 0.5 * sy - 0.5]])
    return cv2.warpAffine(np.ascontiguousarray(im), m, (ow, oh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def jpegs() -> list[bytes]:
    from sklearn.datasets import load_sample_images

    out = []
    for img in load_sample_images().images:
        for size in (None, (500, 375)):
            pil = Image.fromarray(img) if size is None else Image.fromarray(img).resize(size, Image.BICUBIC)
            buf = io.BytesIO()
            pil.save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def per_call(fn, items, repeats: int) -> float:
    """Median over repeats of the mean seconds per item."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for item in items:
            fn(*item)
        times.append((time.perf_counter() - t) / len(items))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=40, help="crops per JPEG")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    files = jpegs()
    decoded = [np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in files]
    out_hw = (args.size, args.size)
    crops = [(im, inception_box(im.shape[1], im.shape[0], rng, (0.05, 1.0)), out_hw, bool(rng.random() < 0.5))
             for im in decoded for _ in range(args.images)]
    decode = per_call(lambda f: np.asarray(Image.open(io.BytesIO(f)).convert("RGB")), [(f,) for f in files],
                      args.repeats * 5)
    old = per_call(uint8_warp, crops, args.repeats)
    new = per_call(crop_resize, crops, args.repeats)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": cpu_name(), "crops": len(crops),
           "decode_ms": decode * 1e3, "uint8_warp_ms": old * 1e3, "crop_resize_ms": new * 1e3,
           "crop_resize_over_uint8": new / old, "added_per_image_over_decode": (new - old) / decode}
    print(f"{len(crops)} crops to {args.size}x{args.size}: crop_resize {new * 1e3:.3f} ms, OpenCV's uint8 warp "
          f"{old * 1e3:.3f} ms ({new / old:.2f}x); Pillow decode of the JPEG {decode * 1e3:.2f} ms: the float path "
          f"{'adds' if new > old else 'saves'} {100 * abs(new - old) / decode:.1f}% of a decode per image")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
