"""Checkpoint -> ready model: our from_checkpoint vs timm's create_model + load, same machine, same run.

    MIXER_TIMM_PYTHON=... python benchmarks/bench_load.py [--variant B/16] [--repeats 5] [--json out.json]

Writes a random 1000-class checkpoint of the variant twice, as the official .npz and as a timm
.safetensors of the same size, then times (median of --repeats after one warm-up, files in the
page cache, imports excluded):
  - ours, PyTorch: ``mixer_torch.from_checkpoint`` of the .npz and of the .safetensors;
  - ours, PyTorch, the old way for comparison: ``MlpMixer(cfg)`` (random init) + ``load_flat``;
  - ours, Flax: ``mixer_jax.from_checkpoint`` of the .npz (params on the device);
  - timm, in the timm interpreter (``MIXER_TIMM_PYTHON``), before and after ours (drift):
    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...safetensors))``.
Prints each time and its ratio to timm's (< 1: faster than timm).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import timeit  # noqa: E402
from mixer_convert import config_for, random_params  # noqa: E402
from mixer_convert.save import write_params  # noqa: E402
from mixer_convert.spec import TIMM_NAMES  # noqa: E402

_TIMM = """
import json, statistics, sys, time, torch, timm
name, path, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
def load():
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))
load()
times = []
for _ in range(repeats):
    t = time.perf_counter(); load(); times.append(time.perf_counter() - t)
print(json.dumps({"seconds": statistics.median(times), "torch": torch.__version__, "timm": timm.__version__,
                  "threads": torch.get_num_threads()}))
"""


def timm_load(exe: str, variant: str, path: Path, repeats: int) -> dict:
    r = subprocess.run([exe, "-c", _TIMM, TIMM_NAMES[variant], str(path), str(repeats)], capture_output=True,
                       text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"timm run failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="B/16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", help="where to write the two checkpoints (default: a temporary directory)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    exe = os.environ.get("MIXER_TIMM_PYTHON")
    if not exe:
        p.error("set MIXER_TIMM_PYTHON to an interpreter with timm (see README, 'timm as a test oracle')")

    import torch

    from mixer_torch import MlpMixer, from_checkpoint, load_flat
    from mixer_convert.load import load_checkpoint

    cfg = config_for(args.variant, num_classes=1000)
    work = Path(args.dir or tempfile.mkdtemp(prefix="mixer-bench-load-"))
    npz, st = work / "model.npz", work / "model_timm.safetensors"
    flat = random_params(cfg, 0)
    write_params(flat, npz, fmt="npz", force=True)
    write_params(flat, st, fmt="safetensors", layout="timm", force=True)
    del flat
    sizes = {"npz_MiB": npz.stat().st_size / 2**20, "safetensors_MiB": st.stat().st_size / 2**20}
    print(f"{args.variant}: .npz {sizes['npz_MiB']:.1f} MiB, .safetensors {sizes['safetensors_MiB']:.1f} MiB; "
          f"median of {args.repeats}")

    timm_before = timm_load(exe, args.variant, st, args.repeats)
    t = {"ours torch from_checkpoint(.npz)": lambda: from_checkpoint(npz),
         "ours torch from_checkpoint(timm .safetensors)": lambda: from_checkpoint(st),
         "ours torch, old way: MlpMixer(cfg) + load_flat(.npz)": lambda: load_flat(MlpMixer(cfg), load_checkpoint(npz)[0])}
    try:
        import jax

        from mixer_jax import from_checkpoint as flax_from_checkpoint
        t["ours Flax from_checkpoint(.npz)"] = lambda: jax.block_until_ready(flax_from_checkpoint(npz)[1])
    except ImportError:
        pass
    ours = {name: timeit(fn, warmup=1, min_time=0, max_iters=args.repeats) for name, fn in t.items()}
    timm_after = timm_load(exe, args.variant, st, args.repeats)
    timm_s = statistics.mean([timm_before["seconds"], timm_after["seconds"]])

    print(f"timm create_model + load (.safetensors), torch {timm_before['torch']}, timm {timm_before['timm']}: "
          f"{timm_s:.3f} s (before ours {timm_before['seconds']:.3f}, after {timm_after['seconds']:.3f})")
    rows = []
    for name, s in ours.items():
        rows.append({"job": name, "seconds": s, "ratio_to_timm": s / timm_s})
        print(f"{name:55s} {s:7.3f} s   x timm {s / timm_s:5.2f}")
    out = {"variant": args.variant, "repeats": args.repeats, **sizes, "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "timm_torch": timm_before["torch"],
           "timm": timm_before["timm"], "timm_seconds": timm_s, "timm_before": timm_before["seconds"],
           "timm_after": timm_after["seconds"], "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
