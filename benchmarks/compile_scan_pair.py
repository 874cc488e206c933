"""Does ``model.scan=true`` cut the compile? The same train step compiled with and without scan, both at
once (so both see the same load on a shared machine), each timed in CPU seconds of its own process as
well as wall seconds.

    python benchmarks/compile_scan_pair.py [--variant H/14] [--topology v5e:4x4] [--per-chip 32]
        [--json benchmarks/results/compile_scan_h14.json]

Each side is `mixer-train --config pretrain_i1k --compile-only TOPOLOGY` with FSDP over every chip and
remat per block, bf16, 1000 classes. Needs the tpu extra (libtpu).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compile import chips_of, compile_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="H/14")
    p.add_argument("--topology", default="v5e:4x4")
    p.add_argument("--per-chip", type=int, default=32)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    chips = chips_of(args.topology)
    tmp = Path(tempfile.mkdtemp())
    running = {}
    for scan in (False, True):
        out = tmp / f"scan_{scan}.json"
        settings = ["mesh.fsdp=-1", "model.remat=block", f"model.scan={str(scan).lower()}"]
        proc = subprocess.Popen(compile_command(args.variant, args.topology, args.per_chip, chips, settings, str(out)),
                                stdout=subprocess.DEVNULL)
        running[proc.pid] = (scan, time.monotonic(), out)
    sides = {}
    while running:
        pid, status, usage = os.wait4(-1, 0)
        scan, start, out = running.pop(pid)
        report = json.loads(out.read_text())
        sides["scan" if scan else "no_scan"] = {
            "wall_s": time.monotonic() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
            "compile_seconds": report["compile_seconds"], "bytes_per_chip": report["bytes_per_chip"],
            "exit": os.waitstatus_to_exitcode(status)}
    result = {"variant": args.variant, "topology": args.topology, "per_chip_batch": args.per_chip, **sides,
              "cpu_scan_over_no_scan": sides["scan"]["cpu_s"] / sides["no_scan"]["cpu_s"],
              "wall_scan_over_no_scan": sides["scan"]["wall_s"] / sides["no_scan"]["wall_s"]}
    print(f"{args.variant} on {args.topology}: compile with scan / without, CPU seconds "
          f"{sides['scan']['cpu_s']:.0f} / {sides['no_scan']['cpu_s']:.0f} = {result['cpu_scan_over_no_scan']:.2f}, "
          f"wall {sides['scan']['wall_s']:.0f} / {sides['no_scan']['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
