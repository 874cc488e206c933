"""Converter cost against the floor: time against a plain file copy, peak memory against file size.

    python benchmarks/bench_convert.py [--variant L/16] [--dir /tmp/mixer-bench] [--repeats 3]
                                       [--json benchmarks/results/convert_l16_cpu.json]

Writes random official-layout weights of the variant (L/16: 208M parameters, 833 MB float32) as
.npz, PyTorch .pt and .safetensors (our naming), then times every conversion among the three, and
to and from Flax msgpack and orbax, each in a fresh process whose peak RSS comes from the kernel
(wait4's ru_maxrss). The floor is a copy of the same .npz from the page cache (shutil.copyfile,
what cp does), timed in the same run; each job's time is its process minus a process that only
imports what the job imports. Medians of --repeats runs; ratios printed as "x copy".
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _checkout  # noqa: E402,F401  (this checkout's mixer_convert, also in the child processes below)

from common import cpu_name  # noqa: E402

FILES = {"npz": ".npz", "pt": ".pt", "safetensors": ".safetensors", "msgpack": ".msgpack", "orbax": ""}
# (source, destination): the six directions, then the Flax formats (reported, no target)
JOBS = [("npz", "pt"), ("pt", "npz"), ("npz", "safetensors"), ("safetensors", "npz"), ("pt", "safetensors"),
        ("safetensors", "pt"), ("npz", "npz"), ("npz", "msgpack"), ("msgpack", "npz"), ("npz", "orbax"),
        ("orbax", "npz")]
TARGET = 3.0  # x copy, for the six directions among npz, pt and safetensors
CHILD = "import sys; sys.path.insert(0, {bench!r}); import _checkout; {code}"


def make_sources(variant: str, d: Path, fmts: set[str]) -> dict[str, Path]:
    import numpy as np

    from mixer_convert.save import write_params
    from mixer_convert.spec import config_for, param_shapes
    from mixer_convert.tools.bridge import convert_checkpoint

    shapes = param_shapes(config_for(variant))

    class Lazy(dict):  # one random tensor at a time, so writing the input needs no 833 MB either
        def __getitem__(self, k):
            rng = np.random.default_rng(abs(hash(k)) % 2**32)
            return rng.standard_normal(shapes[k], dtype=np.float32) * np.float32(0.02)

    srcs = {f: d / f"src-{variant.replace('/', '_')}{FILES[f]}" for f in fmts}
    if not srcs["npz"].exists():
        print(f"writing {srcs['npz']} ...", flush=True)
        write_params(Lazy.fromkeys(shapes), srcs["npz"], fmt="npz", force=True)
    for f, p in srcs.items():
        if not p.exists():
            convert_checkpoint(srcs["npz"], p, "orbax" if f == "orbax" else None, progress=False)
    return srcs


def child(code: str) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `python -c code` in a fresh process."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CHILD.format(bench=str(Path(__file__).parent), code=code)])
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child failed: {code}")
    return time.perf_counter() - t, usage.ru_maxrss * 1024


def remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def copy_seconds(src: Path, d: Path) -> float:
    os.sync()  # as before each job: no earlier run's dirty pages are flushed (or throttle writes) during this one
    t = time.perf_counter()
    shutil.copyfile(src, d / "copy")
    seconds = time.perf_counter() - t
    os.remove(d / "copy")
    return seconds


def time_job(src: Path, dst: Path, fmt: str, size: int) -> dict:
    flax = fmt in ("msgpack", "orbax") or src.suffix in (".msgpack", "")
    base_s, base_rss = child("import numpy, mixer_convert.tools.bridge" + (", flax, orbax.checkpoint" if flax else ""))
    code = (f"from mixer_convert.tools.bridge import convert_checkpoint; "
            f"convert_checkpoint({str(src)!r}, {str(dst)!r}, {('orbax' if fmt == 'orbax' else None)!r}, "
            f"force=True, progress=False)")
    os.sync()
    secs, rss = child(code)
    remove(dst)
    return {"seconds": secs - base_s, "peak_rss_vs_file": rss / size, "extra_rss_vs_file": (rss - base_rss) / size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="L/16")
    ap.add_argument("--dir", default="/tmp/mixer-bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true", help="keep the source files for the next run")
    ap.add_argument("--only", help="only the jobs among these formats, e.g. npz,pt,safetensors")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    # In a child: the kernel counts a parent's peak RSS at fork into every child's ru_maxrss.
    fmts = sorted({s for s, _ in JOBS} | {t for _, t in JOBS})
    child(f"import bench_convert; bench_convert.make_sources({args.variant!r}, __import__('pathlib').Path({str(d)!r}), "
          f"set({fmts!r}))")
    srcs = {f: d / f"src-{args.variant.replace('/', '_')}{FILES[f]}" for f in fmts}
    size = srcs["npz"].stat().st_size
    print(f"{args.variant}: {size / 1e6:.0f} MB; {cpu_name()}, {os.cpu_count()} cores", flush=True)
    rows = []
    only = set(args.only.split(",")) if args.only else set(FILES)
    for src_fmt, dst_fmt in [j for j in JOBS if set(j) <= only]:
        dst = d / f"out{FILES[dst_fmt] or '-orbax'}"
        runs = []
        for _ in range(args.repeats):  # the copy beside every run: the ratio is taken pair by pair
            copy = copy_seconds(srcs["npz"], d)
            job = time_job(srcs[src_fmt], dst, dst_fmt, size)
            runs.append({**job, "copy_seconds": copy, "vs_copy": job["seconds"] / copy})
        row = {"job": f"{src_fmt} -> {dst_fmt}", "target": TARGET if {src_fmt, dst_fmt} <= {"npz", "pt", "safetensors"}
               and src_fmt != dst_fmt else None,
               **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}
        rows.append(row)
        verdict = "" if row["target"] is None else ("  ok" if row["vs_copy"] <= TARGET else "  OVER")
        print(f"{row['job']:<24}{row['seconds']:7.2f} s {row['vs_copy']:5.1f}x copy ({row['copy_seconds']:.2f} s)"
              f"  peak RSS {row['peak_rss_vs_file']:4.2f}x file ({row['extra_rss_vs_file']:+.2f}x above imports)"
              f"{verdict}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
            "variant": args.variant, "file_bytes": size, "repeats": args.repeats, "rows": rows}, indent=1))
    if not args.keep:
        for p in list(d.glob("src-*")) + list(d.glob("out*")):
            remove(p)


if __name__ == "__main__":
    main()
