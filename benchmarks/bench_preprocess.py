"""Eval preprocessing (decode included) against Pillow's decode of the same JPEG, one thread,
side by side in one run; and mixer-eval end to end with its readers in threads or processes.

    python benchmarks/bench_preprocess.py [--repeat 200] [--json benchmarks/results/preprocess_cpu.json]
    python benchmarks/bench_preprocess.py --eval [--images 256]     # also mixer-eval end to end

JPEGs: scikit-learn's two sample photos as shipped (china.jpg, flower.jpg: 427x640), and both
resized to 500x375 (ImageNet's typical size) and re-encoded by Pillow at quality 90.

Per JPEG, in this one thread, interleaved call by call (other load on the shared machine hits
every method alike), median over ``--repeat`` calls:
* ``decode``: Pillow decodes it (``Image.open`` + ``load``): the baseline;
* ``decode_to_array``: the same plus ``np.asarray``;
* ``vit_jax``, ``big_vision``: ``mixer_convert.preprocess.load_image(path, pipeline, 224,
  out=batch_row)`` as mixer-eval calls it: read (EXIF applied) + the exact pipeline, compiled by
  numba (mixer_convert.kernels) where the ``fast`` extra is installed;
* ``vit_jax_numpy``, ``big_vision_numpy``: the same with the compiled kernels off (the numpy path);
* ``vit_jax_old``, ``big_vision_old``: the code before this change (the BASELINE copy below).
Times are the thread's CPU time (what a reader thread costs; preemption by other jobs on the
machine excluded) and wall time. The ratio is img/s(method) / img/s(decode); the target is >= 0.5.

``--eval``: ``mixer-eval`` (PyTorch, batch 32, vit_jax) on a folder of 500x375 JPEGs, with 1 and 2
reader threads and 2 reader processes; end-to-end img/s for a tiny Mixer (the readers are the
bottleneck) and for S/32 (the model is).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
# This checkout's convert/ is the package mixer_convert, whatever copy the interpreter has installed,
# here and in the reader processes mixer-eval spawns (they copy sys.path).
_LINKS = Path(tempfile.mkdtemp(prefix="mixer-bench-"))
(_LINKS / "mixer_convert").symlink_to(ROOT / "convert", target_is_directory=True)
sys.path[:0] = [str(_LINKS), str(ROOT)]

from mixer_convert import kernels  # noqa: E402
from mixer_convert.preprocess import load_image  # noqa: E402
from mixer_convert.taps import bilinear_taps as _bilinear_taps  # noqa: E402  (the taps are unchanged)

METHODS = ("decode", "decode_to_array", "vit_jax", "big_vision", "vit_jax_numpy", "big_vision_numpy", "vit_jax_old",
           "big_vision_old")


# ==== BASELINE: mixer_convert.preprocess before this change (read_image + the two pipelines), copied
# ==== from it with the docstrings cut; used only here, as the reference the new code is measured against.


def old_read_image(path):
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        return np.ascontiguousarray(np.asarray(im.convert("RGB")), dtype=np.uint8)


def old_resize_bilinear(image, size):
    (oh, ow), (ih, iw) = size, image.shape[:2]
    y0, y1, ly = _bilinear_taps(ih, oh)
    x0, x1, lx = _bilinear_taps(iw, ow)
    top, bottom = image[y0].astype(np.float32), image[y1].astype(np.float32)
    lx = lx[None, :, None]
    top = top[:, x0] + (top[:, x1] - top[:, x0]) * lx
    bottom = bottom[:, x0] + (bottom[:, x1] - bottom[:, x0]) * lx
    return top + (bottom - top) * ly[:, None, None]


def _old_area_taps(in_size, out_size):
    scale = np.float32(in_size) / np.float32(out_size)
    x = np.arange(out_size, dtype=np.float32)
    lo, hi = x * scale, (x + np.float32(1)) * scale
    start = np.floor(lo).astype(np.intp)
    end = np.ceil(hi).astype(np.intp)
    k = int((end - start).max())
    idx = start[:, None] + np.arange(k)[None, :]
    i, lo, hi = idx.astype(np.float32), lo[:, None], hi[:, None]
    w = np.where(i < lo, np.where(i + 1 > hi, scale, i + 1 - lo), np.where(i + 1 > hi, hi - i, np.float32(1)))
    w = np.where(idx < end[:, None], w, np.float32(0)).astype(np.float32)
    return np.minimum(idx, in_size - 1), w


def _old_weighted_taps(img, idx, w, axis):
    out = None
    for k in range(idx.shape[1]):
        shape = [1] * img.ndim
        shape[axis] = -1
        term = np.take(img, idx[:, k], axis=axis) * w[:, k].reshape(shape)
        out = term if out is None else out + term
    return out


def old_resize_area(image, size):
    (oh, ow), (ih, iw) = size, image.shape[:2]
    xi, xw = _old_area_taps(iw, ow)
    yi, yw = _old_area_taps(ih, oh)
    out = _old_weighted_taps(_old_weighted_taps(image, xi, xw, axis=1), yi, yw, axis=0)
    return out * np.float32(1.0 / float(np.float32(ih) / np.float32(oh) * (np.float32(iw) / np.float32(ow))))


def old_preprocess(image, pipeline, size=224):
    if pipeline == "vit_jax":
        out = old_resize_bilinear(image, (size, size))
    else:
        h, w = image.shape[:2]
        factor = np.float32(256) / np.float32(min(h, w))
        nh, nw = (int(np.round(np.float32(s) * factor)) for s in (h, w))
        small = np.clip(old_resize_area(image, (nh, nw)), 0, 255).astype(np.uint8)
        dy, dx = (nh - size) // 2, (nw - size) // 2
        out = small[dy:dy + size, dx:dx + size]
    return (np.asarray(out, dtype=np.float32) - np.float32(127.5)) / np.float32(127.5)


# ==== end of BASELINE ===========================================================================


def sample_jpegs(folder: Path) -> dict[str, Path]:
    """scikit-learn's two photos as shipped, and re-encoded at 500x375, quality 90."""
    import sklearn.datasets

    shipped = Path(sklearn.datasets.__file__).parent / "images"
    out = {}
    for name in ("china", "flower"):
        src = shipped / f"{name}.jpg"
        out[f"{name}.jpg 640x427"] = src
        with Image.open(src) as im:
            small = folder / f"{name}_500x375.jpg"
            im.convert("RGB").resize((500, 375), Image.BICUBIC).save(small, quality=90)
        out[f"{name}_500x375.jpg (q90)"] = small
    return out


def method_calls(path: Path, out: np.ndarray) -> dict:
    def decode():
        with Image.open(path) as im:
            im.load()

    def decode_to_array():
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    return {"decode": decode, "decode_to_array": decode_to_array,
            "vit_jax": lambda: load_image(path, "vit_jax", 224, out=out),
            "big_vision": lambda: load_image(path, "big_vision", 224, out=out),
            "vit_jax_numpy": numpy_path(lambda: load_image(path, "vit_jax", 224, out=out)),
            "big_vision_numpy": numpy_path(lambda: load_image(path, "big_vision", 224, out=out)),
            "vit_jax_old": lambda: old_preprocess(old_read_image(path), "vit_jax"),
            "big_vision_old": lambda: old_preprocess(old_read_image(path), "big_vision")}


def numpy_path(fn):
    """``fn`` run with the compiled kernels off: preprocess's numpy code."""
    def run():
        saved = kernels.vit_jax, kernels.big_vision
        kernels.vit_jax = kernels.big_vision = lambda *args: False
        try:
            return fn()
        finally:
            kernels.vit_jax, kernels.big_vision = saved
    return run


def check_outputs(path: Path) -> dict:
    """New vs old outputs: vit_jax bit-identical; big_vision differs only by big_vision's own
    value_range formula (old: (x - 127.5) / 127.5), never in the uint8 crop."""
    img = old_read_image(path)
    vit_new, vit_old = load_image(path, "vit_jax"), old_preprocess(img, "vit_jax")
    bv_new, bv_old = load_image(path, "big_vision"), old_preprocess(img, "big_vision")
    level = lambda x: np.rint((x + 1) * 127.5)  # noqa: E731  (the uint8 value a model input came from)
    compiled_equals_numpy = all(np.array_equal(load_image(path, p), numpy_path(lambda p=p: load_image(path, p))())
                                for p in ("vit_jax", "big_vision"))
    return {"vit_jax_identical": bool(np.array_equal(vit_new, vit_old)), "compiled_equals_numpy": compiled_equals_numpy,
            "big_vision_uint8_levels_differing": int((level(bv_new) != level(bv_old)).sum()),
            "big_vision_max_abs_difference": float(np.abs(bv_new - bv_old).max())}


def bench_one(path: Path, repeat: int) -> dict:
    out = np.empty((224, 224, 3), np.float32)
    calls = method_calls(path, out)
    for fn in calls.values():
        fn()  # warm-up: plans cached, scratch allocated
    cpu = {m: [] for m in calls}
    wall = {m: [] for m in calls}
    for _ in range(repeat):
        for m, fn in calls.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu[m].append(time.thread_time() - c0)
            wall[m].append(time.perf_counter() - t0)
    res = {}
    for m in calls:
        c, w = statistics.median(cpu[m]), statistics.median(wall[m])
        res[m] = {"cpu_ms": c * 1e3, "wall_ms": w * 1e3, "img_s_cpu": 1 / c, "img_s_wall": 1 / w,
                  "ratio_cpu": statistics.median(cpu["decode"]) / c, "ratio_wall": statistics.median(wall["decode"]) / w}
    with Image.open(path) as im:
        return {"size": list(im.size), "methods": res, "check": check_outputs(path)}


# ---- mixer-eval end to end ----------------------------------------------------------------------


def eval_folder(root: Path, n: int) -> Path:
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    for i in range(n):
        ph = photos[i % 2]
        w, h = ph.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        d = root / f"class_{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        ph.crop((x0, y0, x0 + cw, y0 + ch)).resize((500, 375), Image.BICUBIC).save(d / f"{i:05d}.jpg", quality=90)
    return root


def bench_eval(images: int, repeat: int) -> dict:
    from mixer_convert import config_for, random_params
    from mixer_convert.spec import MixerConfig
    from mixer_convert.tools.evaluate import evaluate

    tiny = MixerConfig(patch_size=32, hidden_dim=16, num_blocks=1, tokens_mlp_dim=16, channels_mlp_dim=32,
                       image_size=224, num_classes=10)
    models = {"tiny": tiny, "S/32": config_for("S/32", num_classes=10)}
    configs = [(1, "thread"), (2, "thread"), (2, "process")]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = eval_folder(Path(tmp) / "data", images)
        for name, cfg in models.items():
            weights = Path(tmp) / f"{name.replace('/', '_')}.npz"
            np.savez(weights, **random_params(cfg, 0))
            runs = {f"{w} {kind}": [] for w, kind in configs}
            for _ in range(repeat):  # interleaved, medians
                for w, kind in configs:
                    r = evaluate(str(weights), f"imagefolder:{folder}", "torch", "vit_jax", batch=32, progress=False,
                                 workers=w, worker_type=kind)
                    runs[f"{w} {kind}"].append(r)
            out[name] = {k: {"end_to_end_img_s": statistics.median(r["end_to_end_images_per_second"] for r in v),
                             "model_img_s": statistics.median(r["results"]["torch"]["images_per_second"] for r in v),
                             "seconds_waiting_for_input": statistics.median(r["input"]["seconds_waiting"] for r in v)}
                         for k, v in runs.items()}
    return {"images": images, "framework": "torch", "batch": 32, "preprocess": "vit_jax", "models": out}


# ---- report -------------------------------------------------------------------------------------


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def print_report(doc: dict) -> None:
    print(f"{doc['date']} {doc['machine']}; Pillow {doc['pillow']}, numpy {doc['numpy']}; one thread, "
          f"median of {doc['repeat']} interleaved calls (thread CPU time; wall in brackets)")
    print(f"{'JPEG':<26}{'method':<17}{'ms':>8}{'img/s':>8}{'x decode':>10}")
    for name, r in doc["jpegs"].items():
        for m, v in r["methods"].items():
            print(f"{name:<26}{m:<17}{v['cpu_ms']:>8.2f}{v['img_s_cpu']:>8.0f}{v['ratio_cpu']:>7.2f} "
                  f"[{v['ratio_wall']:.2f}]")
        c = r["check"]
        print(f"{'':<26}vit_jax new == old: {c['vit_jax_identical']}; big_vision uint8 levels differing: "
              f"{c['big_vision_uint8_levels_differing']}; compiled == numpy: {c['compiled_equals_numpy']}")
    s = doc["summary_500x375"]
    print(f"500x375 JPEGs, preprocessing (decode included) / decode speed, {doc['kernels']}: vit_jax "
          f"{s['vit_jax']:.2f}, big_vision {s['big_vision']:.2f} (target >= 0.5); numpy path {s['vit_jax_numpy']:.2f} "
          f"and {s['big_vision_numpy']:.2f}; was {s['vit_jax_old']:.2f} and {s['big_vision_old']:.2f}")
    for model, runs in doc.get("eval", {}).get("models", {}).items():
        for k, v in runs.items():
            print(f"mixer-eval {model:<5} {k:<10} end-to-end {v['end_to_end_img_s']:6.1f} img/s, model "
                  f"{v['model_img_s']:7.1f} img/s, waited {v['seconds_waiting_for_input']:.2f} s for input")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "preprocess_cpu.json"))
    p.add_argument("--eval", action="store_true", help="also time mixer-eval end to end (threads vs processes)")
    p.add_argument("--images", type=int, default=256, help="--eval: JPEGs in the folder")
    p.add_argument("--eval-repeat", type=int, default=3)
    args = p.parse_args()
    compiled = kernels.wait()  # loaded before timing (mixer-eval loads them while its model loads)
    doc = {"date": datetime.date.today().isoformat(), "machine": machine(), "python": platform.python_version(),
           "numpy": np.__version__, "pillow": Image.__version__, "repeat": args.repeat, "jpegs": {},
           "kernels": f"numba {importlib.metadata.version('numba')}" if compiled else "numpy only (no numba)"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in sample_jpegs(Path(tmp)).items():
            doc["jpegs"][name] = bench_one(path, args.repeat)
    small = [r["methods"] for name, r in doc["jpegs"].items() if "500x375" in name]
    doc["summary_500x375"] = {m: min(r[m]["ratio_cpu"] for r in small) for m in METHODS if m.startswith(("vit", "big"))}
    if args.eval:
        doc["eval"] = bench_eval(args.images, args.eval_repeat)
    print_report(doc)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
