"""Speed, side by side in one run on one machine: Flax vs our PyTorch vs timm.

    python benchmarks/bench_speed.py [--variants S/32 B/16] [--batches 1 16] [--train-batch 16] [--json F]

(1) inference img/s, Flax (jit) vs our PyTorch vs timm, per variant and batch size;
(2) training-step img/s (forward + backward + SGD update), Flax vs PyTorch;
(3) achieved FLOP/s as a fraction of this machine's matmul peak, measured in the same run
    (the best of large fp32 matmuls in JAX and in PyTorch);
(4) the converter: see bench_convert.py.
timm runs in its own interpreter (MIXER_TIMM_PYTHON; see README) with our model beside it
under the same torch, so that ratio compares models, not torch builds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import timeit  # noqa: E402
from mixer_convert.spec import forward_flops  # noqa: E402
from mixer_convert import config_for, random_params  # noqa: E402


DTYPE = "float32"  # compute dtype, set by --dtype; parameters stay float32
MIN_TIME = 2.0  # seconds of timed calls per model measurement (at least 3 calls), set by --min-time


def _dev():
    from mixer_convert.tools.parity import torch_device
    return torch_device()


def _sync_torch(r):
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return r


PEAK_SHAPES = [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (3136, 768, 3072)]


def parse_shape(text: str) -> tuple[int, int, int]:
    """'MxKxN' -> (M, K, N)."""
    try:
        m, k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxKxN, e.g. 4096x4096x4096, got {text!r}") from None
    return m, k, n


def matmul_peak(shapes=PEAK_SHAPES) -> dict:
    """The best sustained matmul FLOP/s in either framework, by default over square sizes and the
    Mixer B/16 channel-MLP GEMM (3136 x 768 x 3072), in the benchmark's dtype."""
    import jax
    import jax.numpy as jnp
    import torch

    best = {"jax_flops": 0.0, "torch_flops": 0.0}
    rng = np.random.default_rng(0)
    f = jax.jit(lambda a, b: a @ b)
    for m, k, n in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        ja, jb = jnp.asarray(a, jnp.dtype(DTYPE)), jnp.asarray(b, jnp.dtype(DTYPE))
        ta, tb = (torch.from_numpy(v).to(_dev(), getattr(torch, DTYPE)) for v in (a, b))
        flops = 2 * m * k * n
        best["jax_flops"] = max(best["jax_flops"], flops / timeit(lambda: f(ja, jb), sync=lambda r: r.block_until_ready(),
                                                                   min_time=MIN_TIME / 2))
        best["torch_flops"] = max(best["torch_flops"], flops / timeit(lambda: ta @ tb, sync=_sync_torch,
                                                                     min_time=MIN_TIME / 2))
    return {"shapes": shapes, **best, "peak_flops": max(best.values())}


def flax_inference(cfg, flat, batch) -> float:
    import jax
    import jax.numpy as jnp

    from mixer_jax.model import MlpMixer, params_from_flat

    model, params = MlpMixer(cfg, dtype=jnp.dtype(DTYPE)), params_from_flat(flat, cfg)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, *cfg.image_size, 3)).astype(np.float32))
    f = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return timeit(lambda: f(params, x), sync=lambda r: r.block_until_ready(), min_time=MIN_TIME)


def torch_inference(cfg, flat, batch) -> float:
    import torch

    from mixer_torch import model_from_flat

    dt = getattr(torch, DTYPE)
    model = model_from_flat(flat, cfg).eval().to(_dev(), dt)
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch, 3, *cfg.image_size)).astype(np.float32))
    x = x.to(_dev(), dt)
    with torch.inference_mode():
        return timeit(lambda: model(x), sync=_sync_torch, min_time=MIN_TIME)


def flax_train_step(cfg, flat, batch) -> float:
    import jax
    import jax.numpy as jnp
    import optax

    from mixer_jax.model import params_from_flat
    from mixer_jax.steps import create_train_state, model_fns, train_step

    fns = model_fns(cfg, DTYPE)
    state = create_train_state(fns, optax.sgd(0.01, 0.9), jax.random.PRNGKey(0), params_from_flat(flat, cfg))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, batch, *cfg.image_size, 3)).astype(np.float32))
    y = jnp.asarray(np.arange(batch)[None] % cfg.num_classes)
    step = jax.jit(lambda s, x, y: train_step(s, x, y, jax.random.PRNGKey(0),
                                              num_classes=cfg.num_classes), donate_argnums=(0,))
    holder = [state]

    def run():
        holder[0], m = step(holder[0], x, y)
        return m["loss"]
    return timeit(run, sync=lambda r: r.block_until_ready(), min_time=MIN_TIME)


def torch_train_step(cfg, flat, batch) -> float:
    import torch

    from mixer_torch import model_from_flat

    dev = _dev()
    # a copy: on the CPU the model's parameters would share memory with flat, and SGD updates them
    model = model_from_flat({k: v.copy() for k, v in flat.items()}, cfg).train().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch, 3, *cfg.image_size)).astype(np.float32))
    x, y = x.to(dev), (torch.arange(batch) % cfg.num_classes).to(dev)

    def run():
        opt.zero_grad(set_to_none=True)
        # bf16: autocast, the usual PyTorch mixed precision (fp32 master weights, like the Flax side)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=DTYPE == "bfloat16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss
    return timeit(run, sync=_sync_torch, min_time=MIN_TIME)


def timm_side(variant: str, batches: list[int]) -> dict:
    from mixer_convert.tools.parity import timm_python

    exe = timm_python()
    if not exe:
        return {"skipped": "timm not installed (or set MIXER_TIMM_PYTHON)"}
    r = subprocess.run([exe, str(HERE / "torch_vs_timm.py"), variant, *map(str, batches)], capture_output=True,
                       text=True, timeout=1800)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["S/32", "B/16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--peak-flops", type=float, help="use this peak (FLOP/s) instead of measuring fp32 matmuls, "
                                                     "e.g. a GPU's bf16 peak")
    ap.add_argument("--peak-shapes", nargs="+", type=parse_shape, default=PEAK_SHAPES, metavar="MxKxN",
                    help="GEMM shapes for the measured peak (default: 1024^3, 2048^3, 4096^3 and B/16's "
                         "3136x768x3072; an accelerator needs larger ones, e.g. 8192x8192x8192)")
    ap.add_argument("--no-timm", action="store_true", help="skip the timm comparison (it runs on the CPU)")
    ap.add_argument("--image-size", type=int, default=224, help="input resolution (a quick run uses a small one)")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per measurement")
    ap.add_argument("--json")
    args = ap.parse_args()
    global DTYPE, MIN_TIME
    DTYPE, MIN_TIME = args.dtype, args.min_time
    import jax
    import torch

    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "dtype": DTYPE,
            "torch_device": _dev(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "jax": jax.__version__, "jax_backend": jax.default_backend(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    print(json.dumps(info))
    peak = matmul_peak(args.peak_shapes)
    if args.peak_flops:
        peak["peak_flops"] = args.peak_flops
    print(f"matmul peak ({DTYPE}, best of {len(peak['shapes'])} GEMM shapes): JAX {peak['jax_flops'] / 1e9:.1f} GFLOP/s, "
          f"PyTorch {peak['torch_flops'] / 1e9:.1f} GFLOP/s -> peak {peak['peak_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    results = {"info": info, "peak": peak, "inference": [], "train": [], "timm": []}
    print(f"{'variant':<6}{'batch':>6}{'Flax img/s':>12}{'PyTorch img/s':>15}{'PT/Flax':>9}"
          f"{'Flax %peak':>12}{'PT %peak':>10}")
    for v in args.variants:
        cfg = config_for(v, image_size=args.image_size)
        flat = random_params(cfg, 0)
        fl = forward_flops(cfg)
        for b in args.batches:
            tj, tt = flax_inference(cfg, flat, b), torch_inference(cfg, flat, b)
            row = {"variant": v, "batch": b, "flax_img_s": b / tj, "torch_img_s": b / tt, "torch_over_flax": tj / tt,
                   "flax_peak_frac": fl * b / tj / peak["peak_flops"], "torch_peak_frac": fl * b / tt / peak["peak_flops"]}
            results["inference"].append(row)
            print(f"{v:<6}{b:>6}{row['flax_img_s']:>12.1f}{row['torch_img_s']:>15.1f}{row['torch_over_flax']:>9.2f}"
                  f"{row['flax_peak_frac']:>12.1%}{row['torch_peak_frac']:>10.1%}", flush=True)
        tj, tt = flax_train_step(cfg, flat, args.train_batch), torch_train_step(cfg, flat, args.train_batch)
        row = {"variant": v, "batch": args.train_batch, "flax_img_s": args.train_batch / tj,
               "torch_img_s": args.train_batch / tt, "flax_over_torch": tt / tj,
               "flax_peak_frac": 3 * fl * args.train_batch / tj / peak["peak_flops"]}
        results["train"].append(row)
        print(f"train {v} batch {args.train_batch}: Flax {row['flax_img_s']:.1f} img/s, PyTorch "
              f"{row['torch_img_s']:.1f} img/s (Flax/PyTorch {row['flax_over_torch']:.2f}); Flax at "
              f"{row['flax_peak_frac']:.1%} of peak (3x forward FLOPs)", flush=True)
        t = {"skipped": "--no-timm"} if args.no_timm else timm_side(v, args.batches)
        results["timm"].append(t)
        for r in t.get("rows", []):
            print(f"timm {t['timm']} (torch {t['torch']}) {v} batch {r['batch']}: ours {r['ours_img_s']:.1f} img/s; "
                  f"timm {r['timm_img_s']:.1f} img/s (exact GELU, ours/timm {r['ratio']:.2f}), "
                  f"{r['timm_tanh_img_s']:.1f} img/s (tanh GELU = our function, ours/timm "
                  f"{r['ratio_same_function']:.2f}); outputs max-abs vs timm(tanh) {r['max_abs_vs_timm_tanh']:.1e}",
                  flush=True)
        if "rows" not in t:
            print(f"timm {v}: {t}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
