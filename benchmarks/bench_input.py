"""Input pipeline speed, side by side in one run on one machine.

    python benchmarks/bench_input.py [--images 600] [--batch 64] [--repeat 5] [--json F]

On a folder of ImageNet-sized JPEGs that this script writes (random crops of scikit-learn's two
sample photos, resized to 500x375 or 375x500, JPEG quality 90), at 224 with inception crop + flip:

(1) input img/s of the new pipeline (mixer_jax.input_pipeline on Grain) for 1, 2 and N
    workers, threads and processes, and its start-up time;
(2) per-core img/s against the OLD single-thread loop (a verbatim copy of the pre-Grain
    ``Batches`` below, labelled BASELINE);
(3) training img/s with real JPEGs (new pipeline; and the old loop with its one prefetch
    thread, as train.py had it) against synthetic data (one batch already on the device),
    for a tiny input-bound Mixer and for S/32 (``--train-models``: any variants, e.g. B/16 on
    an accelerator, in ``--train-dtype``).
Every input configuration runs ``--repeat`` times, interleaved with the others, and the median
is reported (other load on the machine hits all configurations alike).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import cpu_name  # noqa: E402
from mixer_jax.configs import DataConfig, TrainConfig  # noqa: E402
from mixer_jax.input_pipeline import default_workers, make_source, make_train_iterator  # noqa: E402


def make_jpeg_folder(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """``root/train/class_k/*.jpg``: n ImageNet-sized JPEGs cut from scikit-learn's sample photos."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 427x640 each
    rng = np.random.default_rng(seed)
    for i in range(n):
        ph = photos[i % len(photos)]
        w, h = ph.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (500, 375) if rng.random() < 0.75 else (375, 500)
        img = ph.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        d = root / "train" / f"class_{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:05d}.jpg", quality=90)
    return root


# ==== BASELINE: the old single-thread input path, copied verbatim from mixer_jax/data.py before
# ==== the Grain pipeline (ImageFolderSource.get + train_preprocess + Batches.__call__). Not used
# ==== anywhere else; kept here only as the reference the new pipeline is measured against.


def old_normalize(img):
    return (img.astype(np.float32) - 127.5) / 127.5


def old_train_preprocess(img, image_size, rng, augment, area=(0.05, 1.0)):
    h, w = image_size
    H, W = img.shape[:2]
    box = (0.0, 0.0, float(W), float(H))
    for _ in range(10):
        target = rng.uniform(*area) * H * W
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = np.sqrt(target * aspect), np.sqrt(target / aspect)
        if cw <= W and ch <= H:
            x0, y0 = rng.uniform(0, W - cw), rng.uniform(0, H - ch)
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    out = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR, box=box))
    if augment == "inception_crop_flip" and rng.random() < 0.5:
        out = out[:, ::-1]
    return old_normalize(out)


class OldBatches:
    def __init__(self, files, labels, image_size, global_batch, seed):
        self.files, self.labels, self.image_size = files, labels, image_size
        self.global_batch, self.seed = global_batch, seed
        self.steps_per_epoch = len(files) // global_batch
        self._perm_epoch, self._perm = -1, None

    def __call__(self, step):
        epoch, start = step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.global_batch
        if epoch != self._perm_epoch:
            self._perm_epoch = epoch
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(len(self.files))
        images, labels = [], []
        for j in range(self.global_batch):
            i = int(self._perm[start + j])
            with Image.open(self.files[i]) as im:
                img = np.asarray(im.convert("RGB"))
            rng = np.random.default_rng((self.seed, epoch, start + j))
            images.append(old_train_preprocess(img, self.image_size, rng, "inception_crop_flip"))
            labels.append(int(self.labels[i]))
        return np.stack(images), np.asarray(labels, np.int32)


def old_prefetched(batches, start, steps):
    """train.py's old loop: one thread prepares batch step+1 while step runs."""
    pool = ThreadPoolExecutor(1)
    upcoming = pool.submit(batches, start)
    try:
        for step in range(start, steps):
            x = upcoming.result()
            if step + 1 < steps:
                upcoming = pool.submit(batches, step + 1)
            yield x
    finally:
        pool.shutdown(cancel_futures=True)


# ==== end of BASELINE ===========================================================================


def _train_cfg(folder: Path, batch: int, steps: int, workers: int, kind: str) -> TrainConfig:
    data = DataConfig(name="imagefolder", data_dir=str(folder), image_size=224, workers=workers, worker_type=kind)
    return TrainConfig(data=data, batch_size=batch, steps=steps, seed=0)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its live child processes (worker processes)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def _timed(batches, batch: int, steps: int) -> dict:
    """Wall img/s and img per CPU-second from the first batch to the ``steps``-th (start-up
    reported apart). CPU time does not depend on what else the machine runs: img/CPU-s is the
    per-core figure."""
    t0 = time.perf_counter()
    next(batches)
    t1, c1 = time.perf_counter(), cpu_seconds()
    for _ in range(steps - 1):
        next(batches)
    t2, c2 = time.perf_counter(), cpu_seconds()
    n = (steps - 1) * batch
    return {"img_s": n / (t2 - t1), "img_per_cpu_s": n / max(c2 - c1, 1e-9), "startup_s": t1 - t0}


def bench_new(folder: Path, batch: int, steps: int, workers: int, kind: str) -> dict:
    # batches beyond the timed ones, so that the workers are as busy when timing stops as when it starts
    cfg = _train_cfg(folder, batch, steps + 2 * workers + 2, workers, kind)
    it = make_train_iterator(cfg, make_source(cfg.data, "train"))
    try:
        return _timed(it, batch, steps)
    finally:
        it.close()


def bench_old(folder: Path, batch: int, steps: int) -> dict:
    src = make_source(DataConfig(name="imagefolder", data_dir=str(folder)), "train")
    old = OldBatches([src.path(i) for i in range(len(src))], src.labels, (224, 224), batch, 0)
    return _timed(map(old, range(steps)), batch, steps)


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"runs": [r["img_s"] for r in runs],
                                                                        "best_img_s": max(r["img_s"] for r in runs)}


def tiny_mixer():
    from mixer_convert.spec import MixerConfig
    # The cheapest Mixer at 224: 32x32 patches, 16 channels, one block. Its step still costs about
    # 1 ms of CPU per image on the 2-core machine (the 224x224x3 input itself: conversion,
    # patchify and its gradient), so on a CPU it shares the cores with decoding (RESULTS.md).
    return MixerConfig(patch_size=32, hidden_dim=16, num_blocks=1, tokens_mlp_dim=16, channels_mlp_dim=32,
                       image_size=224, num_classes=10)


def bench_training(folder: Path, model_cfg, batch: int, steps: int, workers: int, kind: str, repeat: int,
                   dtype: str = "float32") -> dict:
    """img/s of train.py's step fed (a) one synthetic batch already on the device, (b) the new
    pipeline, (c) the old single-thread loop with its one prefetch thread (float32 batches)."""
    import jax
    import jax.numpy as jnp
    from functools import partial

    from mixer_jax.optimizer import make_optimizer
    from mixer_jax.steps import create_train_state, model_fns, train_step

    fns = model_fns(model_cfg, jnp.dtype(dtype))
    tx, _ = make_optimizer(TrainConfig().optim, steps)
    step_fn = jax.jit(partial(train_step, num_classes=model_cfg.num_classes), donate_argnums=(0,))
    rng = jax.random.PRNGKey(0)

    def run(batches) -> float:
        state = create_train_state(fns, tx, rng)
        x, y = next(batches)
        state, m = step_fn(state, jnp.asarray(x)[None], jnp.asarray(y)[None], rng)  # compile
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(steps):
            x, y = next(batches)
            state, m = step_fn(state, jnp.asarray(x)[None], jnp.asarray(y)[None], rng)
        jax.block_until_ready(m)
        return steps * batch / (time.perf_counter() - t)

    def synthetic():
        x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8))
        y = jnp.zeros(batch, jnp.int32)
        while True:
            yield x, y

    cfg = _train_cfg(folder, batch, steps + 1, workers, kind)
    src = make_source(cfg.data, "train")
    runs: dict[str, list[float]] = {"synthetic": [], "real_new": [], "real_old": []}
    for _ in range(repeat):
        runs["synthetic"].append(run(synthetic()))
        it = make_train_iterator(cfg, src)
        runs["real_new"].append(run(it))
        it.close()
        old = OldBatches([src.path(i) for i in range(len(src))], src.labels, (224, 224), batch, 0)
        runs["real_old"].append(run(old_prefetched(old, 0, steps + 1)))
    return {k: statistics.median(v) for k, v in runs.items()} | {"runs": runs}


def training_models(names: list[str], tiny_steps: int, variant_steps: int) -> list[tuple]:
    """(name, 10-class config, timed steps) for 'tiny' and variant names."""
    from mixer_convert.spec import config_for

    return [(name, tiny_mixer() if name == "tiny" else config_for(name, num_classes=10),
             tiny_steps if name == "tiny" else variant_steps) for name in names]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=600, help="JPEGs to generate")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="batches per input measurement")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=6, help="timed steps per training measurement")
    p.add_argument("--s32-steps", "--variant-steps", dest="variant_steps", type=int, default=2,
                   help="timed steps for each variant of --train-models (slow on a CPU)")
    p.add_argument("--train-models", nargs="+", default=["tiny", "S/32"], metavar="MODEL",
                   help="models for the training measurement: 'tiny' (the cheapest Mixer at 224) or variants")
    p.add_argument("--train-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the trained model (parameters stay float32)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--workers", type=int, nargs="+", help="worker counts (default: 1, 2 and the cores)")
    p.add_argument("--folder", help="reuse this folder instead of generating one")
    p.add_argument("--json")
    args = p.parse_args(argv)
    try:
        models = training_models(args.train_models, args.train_steps, args.variant_steps)
    except ValueError as e:
        p.error(str(e))
    cores = default_workers()
    counts = args.workers or sorted({1, 2, cores})
    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_name()}, {cores} cores", "python": sys.version.split()[0], "batch": args.batch,
                 "train_batch": args.train_batch, "train_workers": cores,
                 "load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else make_jpeg_folder(Path(tmp), args.images)
        print(f"{args.images} JPEGs in {folder}; batch {args.batch}, 224x224, inception crop + flip; {cores} cores")

        configs = [("old", 1)] + [(kind, n) for kind in ("thread", "process") for n in counts] + [("in-process", 0)]
        runs: dict = {c: [] for c in configs}
        for _ in range(args.repeat):  # interleaved, so load from elsewhere hits every configuration alike
            for kind, n in configs:
                if kind == "old":
                    runs[(kind, n)].append(bench_old(folder, args.batch, args.steps))
                else:
                    runs[(kind, n)].append(bench_new(folder, args.batch, args.steps, n, "thread" if n == 0 else kind))
        old = _median(runs[("old", 1)])
        res["old_single_thread"] = old
        print(f"BASELINE old single-thread loop: {old['img_s']:.0f} img/s (best {old['best_img_s']:.0f}), "
              f"{old['img_per_cpu_s']:.0f} img per CPU-second")
        res["input"] = {}
        for kind, n in configs[1:]:
            r = _median(runs[(kind, n)])
            res["input"][f"{kind}x{n}"] = r
            label = "workers=0 (in the calling thread)" if n == 0 else f"{n} {kind}{'es' if kind == 'process' and n > 1 else 's' if n > 1 else ''}"
            print(f"new, {label}: {r['img_s']:.0f} img/s (best {r['best_img_s']:.0f}; {r['img_s'] / old['img_s']:.2f}x "
                  f"old), {r['img_per_cpu_s']:.0f} img per CPU-second ({r['img_per_cpu_s'] / old['img_per_cpu_s']:.2f}x "
                  f"old per core), start-up {r['startup_s']:.2f} s; runs {[round(x) for x in r['runs']]}")
        for kind in ("thread", "process"):
            if 1 in counts and 2 in counts:
                two = res["input"][f"{kind}x2"]["img_s"] / res["input"][f"{kind}x1"]["img_s"]
                print(f"{kind} workers: 2 / 1 = {two:.2f}")

        res["training"], res["train_dtype"] = {}, args.train_dtype
        for name, mcfg, steps in models:
            r = bench_training(folder, mcfg, args.train_batch, steps, cores, "thread", args.repeat, args.train_dtype)
            res["training"][name] = r
            print(f"training {name} ({args.train_dtype}, batch {args.train_batch}, {cores} thread workers): "
                  f"synthetic {r['synthetic']:.1f} img/s, real JPEGs new "
                  f"{r['real_new']:.1f} (real/synthetic {r['real_new'] / r['synthetic']:.2f}), old loop "
                  f"{r['real_old']:.1f} (new/old {r['real_new'] / r['real_old']:.2f})")
    res["load_average_at_end"] = os.getloadavg()[0]
    print(f"1-minute load average: {res['load_average_at_start']:.2f} at start, {res['load_average_at_end']:.2f} at end "
          f"(other work on the machine lowers wall-clock img/s; img per CPU-second is unaffected)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
