"""What scale buys on this machine's accelerators: the largest batch per device with data
parallelism vs FSDP + remat, and training img/s with and without scan, in one run.

    python benchmarks/bench_scale.py [--variants B/16 L/16] [--max-batch 4096] [--image-size 224]
        [--step-variant B/16] [--step-batch 256] [--steps 10] [--warmup 2] [--repeat 3] [--json F]

Every figure is the project's own ImageNet-1k pre-training step (``--config pretrain_i1k``: Adam,
mixup, stochastic depth; bf16 compute, 1000 classes), on every local device:

(1) step img/s: ``--step-variant`` at ``--step-batch`` images per device with ``model.remat=block``
    and ``mesh.fsdp=-1`` (FSDP over the local devices), ``model.scan`` false and true: the state
    built by ``mixer_jax.state.build_state``, the step jitted by ``mixer_jax.train.compile_steps``
    and compiled once (its compile seconds reported), fed one synthetic uint8 batch already on the
    devices; ``--warmup`` steps, then ``--repeat`` timings of ``--steps`` steps, the two settings
    interleaved; the median is reported.
(2) for each of ``--variants`` and each mode -- data parallel (the defaults) and FSDP + remat
    (``mesh.fsdp=-1 model.remat=block``) -- the largest power-of-two batch per device whose step
    fits: ``mixer_jax.compile_only.compile_train_step(cfg, "local", 1000)`` compiles the step for
    these devices and compares its bytes per device with the memory the device says JAX may use
    (``memory_stats()["bytes_limit"]``), searched as bench_compile.py searches a TPU slice (its
    ``largest_batch``) up to ``--max-batch``. A CPU states no limit: everything fits and the cap
    ends the search (the small form's check of the code path, not a figure).

'tiny' in ``--variants`` / ``--step-variant`` is the digits config's model (4x4 patches, 128
channels, 4 blocks) for a quick run on a CPU (with e.g. ``--image-size 32``). The JSON is
rewritten after each measurement ("complete": false until the end), so a run stopped by a time
limit still leaves what it measured. Progress on stderr; an error is one line and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import _checkout  # noqa: E402,F401  (this checkout's mixer_convert where the toolkit is not installed)
from bench_compile import largest_batch  # noqa: E402

NUM_CLASSES = 1000
CONFIG = "pretrain_i1k"
COMMON = ["model.compute_dtype=bfloat16", f"data.num_classes={NUM_CLASSES}"]
MODES = {"data": [], "fsdp+remat": ["mesh.fsdp=-1", "model.remat=block"]}
STEP_SETTINGS = ["mesh.fsdp=-1", "model.remat=block"]  # + model.scan=false / true
START = time.perf_counter()


def say(msg: str) -> None:
    print(f"[bench_scale {time.perf_counter() - START:.0f}s] {msg}", file=sys.stderr, flush=True)


def variant_settings(variant: str) -> list[str]:
    """``--set`` assignments choosing the model: a variant name, or 'tiny' (the digits model)."""
    if variant != "tiny":
        return [f"model.variant={variant}"]
    from mixer_jax.configs import DIMENSIONS, digits

    m = digits().model
    text = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
    return [f"model.{d}={text(getattr(m, d))}" for d in DIMENSIONS]


def train_config(variant: str, image_size: int, per_device: int, devices: int, settings: list[str]):
    """(the TrainConfig, its ``--set`` list): ``mixer-train --config pretrain_i1k --set ...``."""
    from mixer_jax.configs import get_config
    from mixer_jax.overrides import override

    sets = [*variant_settings(variant), f"data.image_size={image_size}", *COMMON,
            f"batch_size={per_device * devices}", *settings]
    return override(get_config(CONFIG), sets), sets


def device_info() -> dict:
    import jax

    devices = jax.devices()
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    return {"count": len(devices), "platform": devices[0].platform, "kind": devices[0].device_kind,
            "bytes_limit": (stats or {}).get("bytes_limit"), "ids": [d.id for d in devices],
            "jax": jax.__version__}


# ---- (1) step img/s with and without scan ------------------------------------------------------


def prepare_step(variant: str, image_size: int, per_device: int, scan: bool) -> dict:
    """The state, the compiled step and one synthetic batch on the devices, as a run has them."""
    import jax
    import numpy as np

    from mixer_jax.configs import validate
    from mixer_jax.sharding import make_mesh
    from mixer_jax.state import build_state
    from mixer_jax.train import architecture_of, compile_steps

    n = jax.device_count()
    cfg, sets = train_config(variant, image_size, per_device, n, [*STEP_SETTINGS, f"model.scan={str(scan).lower()}"])
    validate(cfg, n)
    model_cfg = architecture_of(cfg, NUM_CLASSES)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    state, layout, schedule = build_state(cfg, model_cfg, None, mesh)
    steps = compile_steps(cfg, NUM_CLASSES, schedule, mesh, layout)
    gen = np.random.default_rng(0)
    shape = (cfg.accum_steps, cfg.batch_size // cfg.accum_steps)
    images = jax.device_put(gen.integers(0, 256, (*shape, *model_cfg.image_size, model_cfg.in_chans), np.uint8),
                            steps.batch_sharding)
    labels = jax.device_put(gen.integers(0, NUM_CLASSES, shape).astype(np.int32), steps.batch_sharding)
    rng = jax.random.PRNGKey(0)
    t = time.perf_counter()
    compiled = steps.train_step.lower(state, images, labels, rng).compile()
    return {"settings": sets, "mesh": dict(mesh.shape), "devices": [str(d) for d in mesh.devices.flat],
            "global_batch": cfg.batch_size, "compile_s": time.perf_counter() - t,
            "run": [compiled, state, images, labels, rng], "img_s_runs": []}


def timed_steps(p: dict, steps: int) -> float:
    """img/s of ``steps`` steps (the state carried on, as in training)."""
    import jax

    compiled, state, images, labels, rng = p["run"]
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, images, labels, rng)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - t
    p["run"][1], p["loss"] = state, float(metrics["loss"])
    return steps * p["global_batch"] / seconds


def step_rates(args, out: dict, write) -> None:
    names = {False: "no_scan", True: "scan"}
    prepared = {}
    for scan in (False, True):
        say(f"steps: compiling {args.step_variant} at {args.step_batch} per device, remat block, fsdp, "
            f"scan={scan} ...")
        p = prepared[scan] = prepare_step(args.step_variant, args.image_size, args.step_batch, scan)
        if args.warmup:
            timed_steps(p, args.warmup)
        say(f"steps: scan={scan} compiled in {p['compile_s']:.1f} s (mesh {p['mesh']})")
    for r in range(args.repeat):  # interleaved: other load on the machine hits both alike
        for scan in (False, True):
            rate = timed_steps(prepared[scan], args.steps)
            prepared[scan]["img_s_runs"].append(rate)
            say(f"steps: repeat {r + 1}/{args.repeat}, scan={scan}: {rate:,.1f} img/s")
    rows = {}
    for scan, p in prepared.items():
        rows[names[scan]] = {"img_s": statistics.median(p["img_s_runs"]), "img_s_runs": p["img_s_runs"],
                             "compile_s": p["compile_s"], "final_loss": p["loss"], "settings": p["settings"]}
    first = prepared[False]
    out["steps"] = {"variant": args.step_variant, "batch_per_device": args.step_batch,
                    "global_batch": first["global_batch"], "mesh": first["mesh"], "devices": first["devices"],
                    "steps": args.steps, "warmup": args.warmup, "repeat": args.repeat, **rows,
                    "scan_over_no_scan": rows["scan"]["img_s"] / rows["no_scan"]["img_s"]}
    prepared.clear()  # the states' device memory back before the compiles below
    write()


# ---- (2) the largest batch per device -----------------------------------------------------------


def search(variant: str, mode: str, args, devices: int) -> dict:
    """The largest power-of-two batch per device (at most --max-batch) whose step fits."""
    from mixer_jax.compile_only import compile_train_step

    compiles: dict[int, dict] = {}
    sets: list[str] = []

    def run_exp(exp: int) -> dict:
        nonlocal sets
        cfg, sets = train_config(variant, args.image_size, 2 ** exp, devices, MODES[mode])
        r = compile_train_step(cfg, "local", NUM_CLASSES).json()
        compiles[2 ** exp] = r
        b = r["bytes_per_chip"]
        say(f"batch: {variant} {mode}, {2 ** exp} per device: {'fits' if r['fits'] else 'does not fit'} "
            f"({_gib(b['total'] if b['total'] is not None else b['temporaries'])} of "
            f"{_gib(r['hbm_bytes_per_chip'])}; compiled in {r['compile_seconds']:.1f} s)")
        return r

    max_exp = int(math.log2(args.max_batch))  # from 32 (bench_compile's start), or half the cap if lower
    found = largest_batch(run_exp, max_exp, start_exp=min(5, max(max_exp - 1, 0)))
    first = next(iter(compiles.values()))
    hbm = found["hbm_bytes_per_chip"]
    return {"variant": variant, "mode": mode, "settings": MODES[mode], "mesh": first["mesh"],
            "batch_per_device": found["batch"], "capped": found["batch"] == args.max_batch,
            "bytes_per_device": found["bytes_per_chip"], "hbm_bytes_per_device": hbm,
            "fraction_of_memory": (found["bytes_per_chip"] / hbm if hbm and found["bytes_per_chip"] else None),
            "compiles": [{"batch_per_device": b, "fits": r["fits"], "bytes": r["bytes_per_chip"]["total"],
                          "temporaries": r["bytes_per_chip"]["temporaries"], "compile_s": r["compile_seconds"]}
                         for b, r in sorted(compiles.items())],
            "set": [s for s in sets if not s.startswith("batch_size=")]}


def _gib(n: float | None) -> str:
    if n is None:
        return "no limit stated"
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


# ---- the run -------------------------------------------------------------------------------------


def table(out: dict) -> str:
    lines = ["| variant | mode | largest batch per device | bytes at it | device memory |", "|---|---|---|---|---|"]
    for r in out["largest_batch"]:
        batch = f">= {r['batch_per_device']}" if r["capped"] else str(r["batch_per_device"])
        lines.append(f"| {r['variant']} | {r['mode']} | {batch} | {_gib(r['bytes_per_device'])} "
                     f"| {_gib(r['hbm_bytes_per_device'])} |")
    s = out.get("steps")
    if s:
        lines += ["", f"{s['variant']} steps, {s['batch_per_device']} per device, mesh {s['mesh']}: "
                      f"{s['no_scan']['img_s']:,.1f} img/s without scan, {s['scan']['img_s']:,.1f} with "
                      f"(scan / no scan {s['scan_over_no_scan']:.2f}); compile {s['no_scan']['compile_s']:.1f} s "
                      f"-> {s['scan']['compile_s']:.1f} s"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["B/16", "L/16"], help="variants, or 'tiny' (the digits model)")
    p.add_argument("--max-batch", type=int, default=4096, help="the search's cap, per device (a power of two)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--step-variant", default="B/16", help="the model of the step img/s (a variant or 'tiny')")
    p.add_argument("--step-batch", type=int, default=256, help="images per device of the step img/s")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=2, help="steps after compiling, not timed")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.max_batch & (args.max_batch - 1):
        p.error(f"--max-batch must be a power of two, not {args.max_batch}")
    if min(args.step_batch, args.steps, args.repeat, args.image_size) < 1 or args.warmup < 0:
        p.error("--step-batch, --steps, --repeat and --image-size must be positive, --warmup at least 0")
    try:  # a bad name fails here, not after minutes of compiling
        for v in {*args.variants, args.step_variant}:
            train_config(v, args.image_size, 1, 1, [])
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: dict = {"date": time.strftime("%Y-%m-%d"), "config": CONFIG, "common": COMMON, "num_classes": NUM_CLASSES,
                 "image_size": args.image_size, "max_batch": args.max_batch, "complete": False}

    def write() -> None:
        out["seconds"] = round(time.perf_counter() - START, 1)
        if args.json:
            tmp = args.json.with_name(f".{args.json.name}.tmp")
            tmp.write_text(json.dumps(out, indent=1) + "\n")
            tmp.replace(args.json)

    try:
        out["devices"] = device_info()
        d = out["devices"]
        say(f"{d['count']} x {d['kind']} ({d['platform']}), memory JAX may use per device: {_gib(d['bytes_limit'])}")
        write()
        step_rates(args, out, write)
        out["largest_batch"] = []
        for variant in args.variants:
            for mode in MODES:
                out["largest_batch"].append(search(variant, mode, args, d["count"]))
                write()
        out["complete"] = True
        write()
    except Exception as e:  # one line: what failed; the JSON keeps what was measured
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"bench_scale: {type(e).__name__}: {first}", file=sys.stderr)
        return 1
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
