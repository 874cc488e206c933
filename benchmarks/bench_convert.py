"""Converter cost vs the floor: time against a plain file copy, peak memory against file size.

    python benchmarks/bench_convert.py [--variant H/14] [--dir /tmp/mixer-bench] [--keep]

Writes a random official-layout .npz of the variant (H/14: 431M params, ~1.7 GB float32),
then times `shutil.copyfile` and each conversion, every one in a fresh subprocess whose peak
RSS is read from the kernel (wait4 ru_maxrss). The baseline is the same subprocess importing
the same modules without converting, so 'extra' is what the conversion itself held.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JOBS = [  # (name, destination suffix, --to, modules the child imports for its baseline)
    ("npz -> torch .pt", ".pt", "torch", "torch"),
    ("npz -> timm .safetensors", ".safetensors", "timm", "numpy"),
    ("npz -> npz", ".rt.npz", "npz", "numpy"),
    ("torch .pt -> npz", ".back.npz", "npz", "torch"),
]


def make_npz(variant: str, path: Path) -> None:
    import numpy as np

    from mixer_convert.save import write_params
    from mixer_convert.spec import config_for, param_shapes

    cfg = config_for(variant)
    shapes = param_shapes(cfg)

    class Lazy(dict):  # one random tensor at a time, so writing the input needs no 2 GB either
        def __getitem__(self, k):
            rng = np.random.default_rng(abs(hash(k)) % 2**32)
            return rng.standard_normal(shapes[k], dtype=np.float32) * np.float32(0.02)

    write_params(Lazy.fromkeys(shapes), path, fmt="npz", force=True)


def child(code: str) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `python -c code` in a fresh process."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"])
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child failed: {code}")
    return time.perf_counter() - t, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="H/14")
    ap.add_argument("--dir", default="/tmp/mixer-bench")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    src = d / f"Mixer-{args.variant.replace('/', '_')}.npz"
    if not src.exists():
        print(f"writing {src} ...", flush=True)
        make_npz(args.variant, src)
    size = src.stat().st_size
    print(f"source: {src} {size / 2**30:.2f} GiB")

    t0 = time.perf_counter()
    shutil.copyfile(src, d / "copy.npz")
    copy_s = time.perf_counter() - t0
    os.remove(d / "copy.npz")
    rows = []
    for name, suffix, to, mods in JOBS:
        s = d / "out.pt" if name.startswith("torch") else src
        dst = d / f"out{suffix}"
        base_s, base_rss = child(f"import {mods}, mixer_convert.tools.bridge")
        code = (f"from mixer_convert.tools.bridge import convert_checkpoint; "
                f"convert_checkpoint({str(s)!r}, {str(dst)!r}, {to!r}, force=True, progress=False)")
        secs, rss = child(code)
        rows.append({"job": name, "seconds": secs - base_s, "vs_copy": (secs - base_s) / copy_s,
                     "peak_rss_gib": rss / 2**30, "peak_rss_vs_file": rss / size,
                     "extra_rss_vs_file": (rss - base_rss) / size})
        print(f"{name:<26} {rows[-1]['seconds']:7.1f} s ({rows[-1]['vs_copy']:5.1f}x copy)  peak RSS "
              f"{rows[-1]['peak_rss_gib']:5.2f} GiB = {rows[-1]['peak_rss_vs_file']:4.2f}x file "
              f"({rows[-1]['extra_rss_vs_file']:4.2f}x above the import baseline)", flush=True)
    print(f"plain copy: {copy_s:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"variant": args.variant, "file_bytes": size, "copy_seconds": copy_s,
                                               "rows": rows}, indent=1))
    if not args.keep:
        for p in d.glob("out*"):
            p.unlink()


if __name__ == "__main__":
    main()
