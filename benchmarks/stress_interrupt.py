"""Ctrl-C during a large conversion, many times, at random moments, on a busy machine.

    python benchmarks/stress_interrupt.py [--trials 50] [--formats orbax msgpack] [--max-delay SECONDS]
                                          [--variant L/16] [--dir /tmp/mixer-stress] [--json OUT]

Each trial converts random official-layout weights of the variant (L/16: 833 MB) from .npz to
each output format in a fresh `mixer-convert` process, sends SIGINT at a random delay after the
temporary output appears (uniform over the time an uninterrupted conversion spends writing,
measured first under the same load, or [0, --max-delay]), and checks what the user sees: exit
code 130, stderr exactly "mixer-convert: error: interrupted by SIGINT; nothing was written",
nothing on stdout, and nothing left in the output folder. Meanwhile another conversion of the
same file runs in a loop, so both cores are busy, as when the noise was seen. Exit code 1 if any
trial failed; its stderr is printed. The suite keeps three fixed delays per format
(tests/test_atomic.py); this is the many-trial run the change is checked with, outside the suite.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _checkout  # noqa: E402,F401  (this checkout's mixer_convert, also in the child processes below)

EXPECTED = "mixer-convert: error: interrupted by SIGINT; nothing was written"
CONVERT = [sys.executable, "-c", "import sys; sys.path.insert(0, {bench!r}); import _checkout; "
           "from mixer_convert.tools.cli import main; sys.exit(main())".format(bench=str(Path(__file__).parent))]


def make_source(variant: str, folder: Path) -> Path:
    from mixer_convert import config_for, param_shapes
    from mixer_convert.save import write_params

    path = folder / f"{variant.replace('/', '')}.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        flat = {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in param_shapes(config_for(variant)).items()}
        write_params(flat, path)
    return path


def start(src: Path, out_dir: Path, fmt: str) -> tuple[subprocess.Popen, Path]:
    """A conversion to ``fmt`` in an empty ``out_dir``, returned once its temporary output exists
    (writing has begun)."""
    shutil.rmtree(out_dir, ignore_errors=True)  # nothing of an earlier run, which would count as left behind
    out_dir.mkdir(parents=True)
    dst = out_dir / ("out" if fmt == "orbax" else f"out.{fmt}")
    proc = subprocess.Popen(CONVERT + [str(src), str(dst), "--to", fmt, "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=out_dir)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(f".{dst.name}.") for p in out_dir.iterdir()):
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate()
            raise RuntimeError(f"ended (exit {proc.returncode}) before writing began: {err.strip()[-500:]}")
        time.sleep(0.01)
    return proc, dst


def writing_time(src: Path, out_dir: Path, fmt: str) -> float:
    """Seconds from the temporary's appearance to the end of an uninterrupted conversion."""
    proc, _ = start(src, out_dir, fmt)
    t = time.monotonic()
    proc.communicate(timeout=600)
    if proc.returncode:
        raise RuntimeError(f"an uninterrupted conversion to {fmt} failed (exit {proc.returncode})")
    shutil.rmtree(out_dir)
    return time.monotonic() - t


def trial(src: Path, out_dir: Path, fmt: str, delay: float) -> str | None:
    """One interrupted conversion; None if the user saw exactly the one line, else what went wrong."""
    proc, dst = start(src, out_dir, fmt)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    left = sorted(p.name for p in out_dir.iterdir())
    # Committed before the signal arrived (the process had ended, or Python's default SIGINT ended it
    # after the writing): not a trial. An exit 130 beside a committed output would be a failure.
    if left == [dst.name] and proc.returncode in (0, -signal.SIGINT) and "Traceback" not in err:
        return "finished"
    problems = []
    if proc.returncode != 128 + signal.SIGINT:
        problems.append(f"exit {proc.returncode}")
    if err.splitlines() != [EXPECTED] or out:
        problems.append(f"output:\n{out}{err}")
    if left:
        problems.append(f"left behind: {left}")
    return "; ".join(problems) or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50, help="per format")
    parser.add_argument("--formats", nargs="+", default=["orbax", "msgpack"])
    parser.add_argument("--max-delay", type=float, help="default: the measured writing time")
    parser.add_argument("--variant", default="L/16")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mixer-stress")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    src = make_source(args.variant, args.dir)
    rng = random.Random(args.seed)
    load = subprocess.Popen(["bash", "-c", f"while :; do {' '.join(map(repr, CONVERT))} {src} "
                             f"{args.dir / 'load.safetensors'} --force --quiet || exit; done"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results: dict[str, dict] = {}
    try:
        for fmt in args.formats:
            longest = args.max_delay or writing_time(src, args.dir / f"{fmt}-calibrate", fmt)
            r = results[fmt] = {"max_delay": round(longest, 2), "passed": 0, "finished_first": 0, "failed": []}
            print(f"{fmt}: SIGINT at 0-{longest:.1f} s after writing begins", file=sys.stderr)
            for i in range(args.trials):
                delay = rng.uniform(0, longest)
                problem = trial(src, args.dir / f"{fmt}-{i}", fmt, delay)
                if problem is None:
                    r["passed"] += 1
                    shutil.rmtree(args.dir / f"{fmt}-{i}")  # a failed trial's folder stays, to look at
                elif problem == "finished":
                    r["finished_first"] += 1
                else:
                    r["failed"].append({"delay": round(delay, 3), "problem": problem})
                    print(f"{fmt} trial {i} (SIGINT at {delay:.2f} s): {problem}", file=sys.stderr)
                print(f"{fmt}: {i + 1}/{args.trials}, {r['passed']} one line, {len(r['failed'])} failed",
                      end="\r", file=sys.stderr)
            print(file=sys.stderr)
    finally:
        os.killpg(load.pid, signal.SIGTERM)  # the loop and the conversion it is running
        load.wait()
    for fmt, r in results.items():
        print(f"{fmt}: {r['passed']} of {args.trials} interrupted with one line, {len(r['failed'])} failed, "
              f"{r['finished_first']} finished before the signal")
    if args.json:
        args.json.write_text(json.dumps({"variant": args.variant, "results": results},
                                        indent=1) + "\n")
    return 1 if any(r["failed"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
