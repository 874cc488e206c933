"""What fits on a TPU slice, found by XLA's TPU compiler on this machine (no TPU): for each variant
and slice, the largest per-chip batch (a power of two) whose train step fits in HBM with data
parallelism, FSDP, and FSDP + remat + scan, and the compile time with and without scan.

    python benchmarks/bench_compile.py [--variants S/32 ... H/14] [--topologies v3:2x2 ...]
        [--cache benchmarks/results/compile_tpu.jsonl] [--json benchmarks/results/compile_tpu.json]
        [--jobs 2]

Each compile is `mixer-train --config pretrain_i1k --compile-only TOPOLOGY --json -` in a fresh
process (the project's own train step: Adam, bf16 compute, 224x224, 1000 classes). Per-chip memory
is close to linear in the batch, so two compiles give the line, its crossing with the HBM the
compiler reports gives the candidate, and compiles around the candidate decide it: the table's
batch fits and twice it does not (every cell's compiles are in the cache file, one JSON per line,
and a rerun compiles only what is missing). Needs the tpu extra (libtpu).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
VARIANTS = ["S/32", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14", "S/8"]
# The slices of the table, by their Cloud names: v3-8 (8 cores), v4-8 (4 chips), v5e-16, v5p-8 (4 chips), v6e-8.
TOPOLOGIES = {"v3-8": "v3:2x2", "v4-8": "v4:2x2x1", "v5e-16": "v5e:4x4", "v5p-8": "v5p:2x2x1", "v6e-8": "v6e:2x4"}
MODES = {"data": [], "fsdp": ["mesh.fsdp=-1"], "fsdp+remat+scan": ["mesh.fsdp=-1", "model.remat=block", "model.scan=true"]}
COMPILE_BATCH = 32  # per chip, for the compile-time columns (FSDP + remat, with and without scan)
MAX_EXP = 9  # 512 images per chip: where a slice holds more, the table says ">= 512"


def compile_command(variant: str, topology: str, per_chip: int, chips: int, settings: list[str],
                    json_to: str = "-") -> list[str]:
    """The `mixer-train --compile-only` command of one compile (also compile_scan_pair.py's)."""
    cmd = [sys.executable, "-m", "mixer_jax.cli", "--config", "pretrain_i1k", "--compile-only", topology, "--quiet",
           "--json", json_to, "--set", f"model.variant={variant}", "--set", "model.compute_dtype=bfloat16",
           "--set", "data.num_classes=1000", "--set", f"batch_size={per_chip * chips}"]
    for s in settings:
        cmd += ["--set", s]
    return cmd


def compile_once(variant: str, topology: str, per_chip: int, chips: int, settings: list[str]) -> dict:
    cmd = compile_command(variant, topology, per_chip, chips, settings)
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    out = json.loads(r.stdout)
    out["process_seconds"] = time.perf_counter() - start
    return out


class NotCompiled(Exception):
    """--cached-only: a compile the cache does not hold."""


class Cache:
    """Every compile's report, keyed by what was compiled; appended as it comes. ``cached_only``:
    never compile, a missing report is :class:`NotCompiled`."""

    def __init__(self, path: Path, cached_only: bool = False) -> None:
        self.path, self.rows, self.cached_only = path, {}, cached_only
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                self.rows[row["key"]] = row["report"]

    def get(self, key: str, make) -> dict:
        if key not in self.rows:
            if self.cached_only:
                raise NotCompiled(key)
            report = make()
            self.rows[key] = report
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "report": report}) + "\n")
        return self.rows[key]


def used_bytes(report: dict) -> float:
    b = report["bytes_per_chip"]
    return b["total"] if b["total"] is not None else b["arguments"] + b["temporaries"]


def largest_batch(run_exp: Callable[[int], dict], max_exp: int, start_exp: int = 5) -> dict:
    """The largest power-of-two per-chip batch that fits, with the compiles that decided it.
    ``run_exp(e)``: the compile report (``fits``, ``bytes_per_chip``, ``hbm_bytes_per_chip``) of
    a per-chip batch of 2**e; the search starts at 2**start_exp and never goes past 2**max_exp
    (where nobody states the memory, everything fits and the cap ends it). Shared with
    bench_scale.py (a local GPU)."""
    seen: dict[int, dict] = {}
    exp = min(start_exp, max_exp)
    while True:
        seen[exp] = run_exp(exp)
        fit = [e for e in seen if seen[e]["fits"]]
        over = [e for e in seen if not seen[e]["fits"]]
        lo, hi = max(fit, default=None), min(over, default=None)
        if (lo is not None and hi == lo + 1) or (lo is None and hi == 0) or (hi is None and lo == max_exp):
            break
        exp = _next_exp(seen, lo, hi, max_exp)
    best = seen[lo] if lo is not None else None
    return {"batch": 2 ** lo if lo is not None else 0, "compiles": len(seen),
            "bytes_per_chip": best["bytes_per_chip"]["total"] if best else None,
            "hbm_bytes_per_chip": next(iter(seen.values()))["hbm_bytes_per_chip"],
            "flops_per_image_vs_smallest": _recompute(seen, lo)}


def _recompute(seen: dict[int, dict], lo: int | None) -> float | None:
    """XLA's FLOPs per image at the batch found over those at the smallest batch that fitted: above
    1, the compiler made it fit by recomputing (its own rematerialisation), and the step is slower
    per image by about that much."""
    fitted = sorted(e for e in seen if seen[e]["fits"] and seen[e].get("compiler_flops_per_chip"))
    if lo is None or lo not in fitted:
        return None
    per_image = {e: seen[e]["compiler_flops_per_chip"] / 2 ** e for e in fitted}
    return per_image[lo] / per_image[fitted[0]]


def _next_exp(seen: dict[int, dict], lo: int | None, hi: int | None, max_exp: int) -> int:
    """The linear model's guess, kept strictly between what fits and what does not."""
    floor, ceil = (lo + 1 if lo is not None else 0), (hi - 1 if hi is not None else max_exp)
    points = sorted((2 ** e, used_bytes(r)) for e, r in seen.items())
    guess = None
    if len(points) >= 2:
        (b1, m1), (b2, m2) = points[-2], points[-1]
        hbm = next(iter(seen.values()))["hbm_bytes_per_chip"]
        slope = (m2 - m1) / (b2 - b1)
        if slope > 0 and hbm:
            best = b1 + (hbm - m1) / slope
            guess = int(math.floor(math.log2(best))) if best >= 1 else 0
    if guess is None:
        guess = (lo + 1) if lo is not None else (hi - 1)
    return min(max(guess, floor), ceil)


def mode_batch(variant: str, topology: str, chips: int, mode: str, cache: Cache) -> dict:
    """The largest per-chip batch of one cell and mode, every compile through the cache."""
    def run(exp: int) -> dict:
        key = f"{variant}|{topology}|{mode}|{2 ** exp}"
        return cache.get(key, lambda: compile_once(variant, topology, 2 ** exp, chips, MODES[mode]))

    return largest_batch(run, MAX_EXP)


def compile_times(variant: str, topology: str, chips: int, cache: Cache) -> dict:
    out = {}
    for scan in (False, True):
        settings = ["mesh.fsdp=-1", "model.remat=block", f"model.scan={str(scan).lower()}"]
        key = f"{variant}|{topology}|fsdp+remat|scan={scan}|{COMPILE_BATCH}"
        r = cache.get(key, lambda: compile_once(variant, topology, COMPILE_BATCH, chips, settings))
        out["scan" if scan else "no_scan"] = r["compile_seconds"]
    return out


def chips_of(topology: str) -> int:
    r = subprocess.run([sys.executable, "-c", "import sys; from mixer_jax.compile_only import deviceless_env, "
                        "topology_devices; deviceless_env(); print(len(topology_devices(sys.argv[1])))", topology],
                       capture_output=True, text=True, check=True)
    return int(r.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES))
    p.add_argument("--cache", type=Path, default=HERE / "results" / "compile_tpu.jsonl")
    p.add_argument("--json", type=Path, default=HERE / "results" / "compile_tpu.json")
    p.add_argument("--jobs", type=int, default=1, help="cells compiled at once (each compile is one process)")
    p.add_argument("--cached-only", action="store_true",
                   help="compile nothing: the table of what the cache holds, a cell's missing parts 'not measured'")
    args = p.parse_args(argv)
    os.environ.update({"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                       "TPU_ACCELERATOR_TYPE": "v5litepod-4", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    cache = Cache(args.cache, args.cached_only)
    names = {t: TOPOLOGIES.get(t, t) for t in args.topologies}
    chips = {t: chips_of(topo) for t, topo in names.items()}
    cells = [(v, t) for v in args.variants for t in args.topologies]

    def cell(vt):
        v, t = vt
        row = {"variant": v, "slice": t, "topology": names[t], "chips": chips[t]}
        for mode in MODES:
            row[mode] = _or_none(lambda: mode_batch(v, names[t], chips[t], mode, cache))
        row["compile_seconds"] = _or_none(lambda: compile_times(v, names[t], chips[t], cache))
        if not args.cached_only:
            c = row["compile_seconds"]
            print(f"{v} {t}: " + ", ".join(f"{m} {row[m]['batch']}" for m in MODES)
                  + f"; compile {c['no_scan']:.0f} s -> {c['scan']:.0f} s with scan", flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(cell, cells))
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")
    print(table(rows))
    return 0


def _or_none(measure: Callable[[], dict]) -> dict | None:
    try:
        return measure()
    except NotCompiled:
        return None


def _batch(found: dict | None) -> str:
    if found is None:
        return "not measured"
    b = found["batch"]
    text = "none" if not b else f">= {b}" if b == 2 ** MAX_EXP else str(b)
    ratio = found.get("flops_per_image_vs_smallest")
    return text + (f" (+{100 * (ratio - 1):.0f}% FLOPs)" if ratio and ratio > 1.02 else "")


def table(rows: list[dict]) -> str:
    """The README / RESULTS table: largest per-chip batch per mode (and the FLOPs per image XLA's own
    rematerialisation added to fit it), compile seconds without / with scan."""
    lines = ["| variant | slice | data parallel | FSDP | FSDP + remat + scan | compile, s (no scan / scan) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        c = r["compile_seconds"]
        seconds = "not measured" if c is None else f"{c['no_scan']:.0f} / {c['scan']:.0f}"
        lines.append(f"| {r['variant']} | {r['slice']} ({r['chips']}) | " + " | ".join(
            _batch(r[m]) for m in MODES) + f" | {seconds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
