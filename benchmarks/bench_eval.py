"""mixer-eval speed on real JPEGs: end-to-end img/s and model img/s, per framework, in one run.

    python benchmarks/bench_eval.py [--variant B/16] [--images 1024] [--batch 256] [--json F]

Writes an image folder of ImageNet-sized JPEGs (bench_input's: crops of scikit-learn's two
sample photos, 10 class folders) and random weights as the official .npz, then runs mixer-eval's
``evaluate`` (vit_jax preprocessing) per framework: once on one batch to warm up (imports,
library and device start-up), then timed on one batch and on all images. End-to-end img/s is
(images - one batch) / (difference of the two wall times), so what every call pays once
(reading the checkpoint, building the model, compiling for the batch shape) cancels and what is
left is decoding + preprocessing + the model, as they overlap in mixer-eval. Model img/s is
mixer-eval's classifier (``make_classifier``: host->device copy, model, logits back) timed on one
batch after warm-up, as bench_speed times models. The weights are random, so no accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def model_config(variant: str, num_classes: int, image_size: int):
    """A variant's config, or 'tiny': the cheapest Mixer (bench_input's), for a quick run."""
    from bench_input import tiny_mixer
    from mixer_convert import config_for

    if variant == "tiny":
        return tiny_mixer().replace(num_classes=num_classes, image_size=(image_size, image_size))
    return config_for(variant, num_classes=num_classes, image_size=image_size)


def write_weights(path: Path, cfg) -> Path:
    from mixer_convert import random_params
    from mixer_convert.save import write_params

    return write_params(random_params(cfg, 0), path)


def timed_eval(weights: Path, folder: Path, framework: str, images: int, batch: int, device: str) -> dict:
    """Wall seconds of one ``evaluate`` call on the first ``images`` images, and its report."""
    from mixer_convert.tools.evaluate import evaluate

    t = time.perf_counter()
    out = evaluate(str(weights), f"imagefolder:{folder}", framework, "vit_jax", batch, images, device=device,
                   progress=False)
    return {"wall_s": time.perf_counter() - t, "images": out["images"], "report": out["results"][framework]}


def rate(images: int, seconds: float) -> float | None:
    """img/s, or None when the time difference is not positive (too few images to tell apart
    from the start-up's noise)."""
    return images / seconds if seconds > 0 else None


def model_img_s(weights: Path, framework: str, batch: int, device: str, min_time: float) -> float:
    """img/s of mixer-eval's classifier on one batch, after warm-up (median call)."""
    import numpy as np

    from common import timeit
    from mixer_convert.tools.infer import load_weights, make_classifier

    flat, cfg = load_weights(str(weights))
    run = make_classifier(framework, flat, cfg, None if device == "auto" else device)
    x = np.random.default_rng(0).uniform(-1, 1, (batch, *cfg.image_size, 3)).astype(np.float32)
    return batch / timeit(lambda: run(x), min_time=min_time)


def bench_framework(weights: Path, folder: Path, framework: str, images: int, batch: int, device: str,
                    min_time: float) -> dict:
    timed_eval(weights, folder, framework, batch, batch, device)  # warm-up
    one = timed_eval(weights, folder, framework, batch, batch, device)
    full = timed_eval(weights, folder, framework, images, batch, device)
    return {"framework": framework, "images": full["images"], "batch": batch,
            "end_to_end_img_s": rate(full["images"] - one["images"], full["wall_s"] - one["wall_s"]),
            "model_img_s": model_img_s(weights, framework, batch, device, min_time),
            "wall_s": full["wall_s"], "one_batch_wall_s": one["wall_s"],
            "reported_model_img_s": full["report"]["images_per_second"],  # mixer-eval's: compiling included
            "whole_call_img_s": full["images"] / full["wall_s"]}


def format_row(variant: str, row: dict) -> str:
    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"
    ratio = (f"{row['end_to_end_img_s'] / row['model_img_s']:.2f}" if row["end_to_end_img_s"] and row["model_img_s"]
             else "n/a")
    return (f"mixer-eval {variant} {row['framework']}: end-to-end {f(row['end_to_end_img_s'])} img/s, model "
            f"{f(row['model_img_s'])} img/s (end-to-end / model {ratio}); one call on {row['images']} images "
            f"incl. start-up {row['whole_call_img_s']:.1f} img/s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="B/16", help="a variant, or 'tiny' (the cheapest Mixer, for a quick run)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=224, help="the model's resolution (a quick run uses a small one)")
    p.add_argument("--images", type=int, default=1024, help="JPEGs to write and evaluate (a multiple of --batch)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--frameworks", nargs="+", default=["torch", "flax"], choices=["torch", "flax"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"], help="as mixer-eval's --device")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls for model img/s")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.batch < 1 or args.images < 2 * args.batch or args.images % args.batch:
        p.error("--images must be a multiple of --batch, at least two batches (every batch the same shape)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench_input import make_jpeg_folder

    res: dict = {"date": time.strftime("%Y-%m-%d"), "variant": args.variant, "num_classes": args.num_classes,
                 "image_size": args.image_size,
                 "preprocess": "vit_jax", "cores": os.cpu_count(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpeg_folder(Path(tmp), args.images) / "train"
        weights = write_weights(Path(tmp) / "weights.npz", model_config(args.variant, args.num_classes,
                                                                        args.image_size))
        print(f"{args.images} JPEGs (500x375 / 375x500) in {folder}; random {args.variant} weights at "
              f"{args.image_size}, "
              f"{args.num_classes} classes; batch {args.batch}", flush=True)
        for fw in args.frameworks:
            row = bench_framework(weights, folder, fw, args.images, args.batch, args.device, args.min_time)
            res["rows"].append(row)
            print(format_row(args.variant, row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
