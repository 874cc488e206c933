"""The machine and the Python environment that benchmarks/accelerator.sh runs on.

    python benchmarks/accel_env.py --missing            # pip names of what the stages cannot import
    python benchmarks/accel_env.py --json F [--need-gpu] # date, machine, versions, devices -> F

``--need-gpu`` exits 1 unless both PyTorch and JAX see a GPU (a JAX without its CUDA plugin
silently runs on the CPU, which would turn every GPU figure into a CPU one).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time

from common import cpu_name
from pathlib import Path

# module -> pip name, for the third-party modules the stages import
THIRD_PARTY = {"numpy": "numpy", "PIL": "pillow", "ml_dtypes": "ml_dtypes", "tqdm": "tqdm", "jax": "jax",
               "flax": "flax", "optax": "optax", "torch": "torch", "sklearn": "scikit-learn",
               "cv2": "opencv-python-headless", "psutil": "psutil", "grain": "grain"}
# the project's modules the stages run (they may need more than the list above)
PROJECT = ["mixer_convert.tools.parity_report", "mixer_convert.tools.evaluate", "mixer_torch", "mixer_jax.train",
           "mixer_jax.input_pipeline"]
VERSIONS = ["numpy", "jax", "jaxlib", "flax", "optax", "torch", "grain", "pillow", "opencv-python-headless",
            "scikit-learn", "ml_dtypes"]


def missing_modules() -> list[str]:
    """pip names of the modules that do not import, in the order first met."""
    missing: list[str] = []
    for name in [*THIRD_PARTY, *PROJECT]:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            top = (e.name or name).split(".")[0]
            pip_name = THIRD_PARTY.get(top, top)
            if not top.startswith("mixer_") and pip_name not in missing:
                missing.append(pip_name)
    return missing


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        return round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        return None


def nvidia_smi() -> list[dict] | None:
    """One dict per GPU from nvidia-smi, or None where there is none."""
    fields = ["name", "memory.total", "driver_version", "clocks.max.sm"]
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0 or not r.stdout.strip():
        return None
    return [dict(zip(fields, (v.strip() for v in line.split(",")))) for line in r.stdout.strip().splitlines()]


def framework_devices() -> dict:
    out: dict = {}
    try:
        import torch
        cuda = torch.cuda.is_available()
        out.update(torch_device="cuda" if cuda else "cpu", torch_cuda=torch.version.cuda,
                   torch_gpu=torch.cuda.get_device_name() if cuda else None, torch_threads=torch.get_num_threads())
    except ImportError as e:
        out["torch_error"] = str(e)
    try:
        import jax
        out.update(jax_backend=jax.default_backend(), jax_devices=[str(d) for d in jax.devices()])
    except ImportError as e:
        out["jax_error"] = str(e)
    return out


def versions() -> dict:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def describe() -> dict:
    return {"missing": missing_modules(), "date": time.strftime("%Y-%m-%d"), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpu": cpu_name(), "cores": os.cpu_count(), "memory_gib": memory_gib(), "gpus": nvidia_smi(),
            "python": sys.version.split()[0], "executable": sys.executable, **framework_devices(),
            "versions": versions()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--missing", action="store_true", help="print the pip names of missing modules, one line")
    p.add_argument("--json", help="write the machine and environment here")
    p.add_argument("--need-gpu", action="store_true", help="exit 1 unless PyTorch and JAX both see a GPU")
    args = p.parse_args(argv)
    if args.missing:
        print(" ".join(missing_modules()))
        return 0
    info = describe()
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    gpu = (info["gpus"] or [{}])[0].get("name", "no GPU")
    print(f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; {gpu}; Python {info['python']}; "
          f"torch {info['versions'].get('torch')} on {info.get('torch_device')}, jax {info['versions'].get('jax')} "
          f"on {info.get('jax_backend')}" + (f"; missing: {' '.join(info['missing'])}" if info["missing"] else ""))
    if args.need_gpu and not (info.get("torch_device") == "cuda" and info.get("jax_backend") in ("gpu", "cuda")):
        print(f"accel_env: the GPU is not visible to both frameworks (torch: {info.get('torch_device')}, "
              f"jax: {info.get('jax_backend')})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
