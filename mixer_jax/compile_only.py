"""``mixer-train --compile-only TOPOLOGY``: the run's real train step compiled for a TPU slice, for
NVIDIA H100s, or for this machine's devices, without the devices, without data: per-chip memory
against the chip's HBM, whether it fits, FLOPs per step and the step time they need at least --
before anyone rents a pod.

XLA's TPU compiler lives in libtpu (the ``tpu`` extra) and runs on any machine:
``jax.experimental.topologies`` describes a slice, its devices make the mesh, and
``jit(train_step).lower(abstract state and batch carrying the run's shardings).compile()`` is the
compile the slice itself would do. ``memory_analysis()`` gives the bytes per device; the HBM the
compiler may use is asked of the compiler itself (an allocation it must refuse names it), so no
table of memory sizes can go stale. The peak FLOP/s is the one published figure used.

XLA's GPU compiler (the ``gpu-compile`` extra: JAX's CUDA plugin without the CUDA libraries)
compiles the same way for GPUs described by a target config (``data/h100_sxm.txtpb``, XLA's own
description of an H100): ``h100`` is one, ``h100:8`` eight. Without a GPU there is no
autotuning, so kernels (and their scratch memory) may differ a little from a compile on the
GPU; the memory a JAX process may use is its default share of the device
(``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

if TYPE_CHECKING:  # JAX is imported late: deviceless_env() must run before it loads
    import jax
    from jax.sharding import Mesh

    from mixer_jax.configs import TrainConfig

# bf16 dense peak per chip, FLOP/s (Google Cloud TPU documentation, "TPU versions"), by the
# device_kind JAX reports; a v3 chip is two JAX devices (a v4 chip too without megacore).
PEAK_BF16_PER_CHIP = {"TPU v3": 123e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12,
                      "TPU v6 lite": 918e12}
# How JAX runs each generation on real hardware: a v4 chip's two cores as one device (megacore).
CHIP_CONFIG = {"v4": "megacore"}
# GPUs described by XLA's target configs (mixer_jax/data/): bf16 dense peak FLOP/s per GPU (NVIDIA
# H100 SXM datasheet: 989 TFLOP/s without sparsity).
GPUS = {"h100": ("h100_sxm.txtpb", 989e12)}
GPU_MEM_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION's default: what a JAX process preallocates
# libtpu words a step that does not fit in two ways: the temporaries alone, or everything in all.
_OOM = {"temporaries": re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available "
                                  r"HBM \(([\d.]+)([KMGT]?)\)"),
        "total": re.compile(r"Ran out of memory in memory space hbm\. Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")}
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def deviceless_env() -> None:
    """The environment for compiling without the devices, set before JAX loads (a user's own
    settings win): JAX itself on the CPU (JAX's CUDA plugin then skips its CUDA checks); libtpu
    neither looks for TPU hosts (and prints what it did not find) nor lets only one process at a
    time load it (a lock file); XLA logs no INFO lines (the CUDA plugin's "no CUDA driver").
    JAX's persistent compilation cache is off, whatever the user set: an entry compiled for
    described devices cannot be loaded back (there is no client to load it into, so JAX warns on
    every later run), and nothing compiled here ever runs, so there is nothing worth keeping."""
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    for key, value in (("JAX_PLATFORMS", "cpu"), ("TF_CPP_MIN_LOG_LEVEL", "1"), ("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(key, value)


def is_gpu(name: str) -> bool:
    return name.partition(":")[0] in GPUS


# What JAX's CUDA plugin prints at every JAX start without a CUDA driver (absl, below Python).
_CUDA_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
                         r"STDERR|I\d{4} .*cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine.*)$")


@contextlib.contextmanager
def without_cuda_noise() -> Iterator[None]:
    """Drop the CUDA plugin's "no CUDA driver" lines from this process's stderr (they come from
    C++, below ``sys.stderr``, so the file descriptor itself goes through a filter) while the
    block runs; every other line passes, in order."""
    sys.stderr.flush()
    saved, (read_end, write_end) = os.dup(2), os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe, os.fdopen(os.dup(saved), "wb", buffering=0) as out:
            for line in pipe:
                if not _CUDA_NOISE.match(line.decode(errors="replace").rstrip("\n")):
                    out.write(line)
    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the thread reads to the end and stops
        os.close(saved)
        thread.join(10)


def topology_devices(name: str) -> list:
    """The devices of a TPU slice such as ``v5e:4x4`` (JAX's names), of GPUs (``h100``,
    ``h100:8``), or ``local``: this machine's."""
    import jax

    if name == "local":
        return jax.devices()
    if is_gpu(name):
        return gpu_devices(name)
    gen, _, shape = name.partition(":")
    dims = [int(d) for d in shape.split("x")] if re.fullmatch(r"\d+(x\d+){1,2}", shape) else None
    if not gen or dims is None:
        raise ValueError(f"--compile-only {name!r}: a TPU slice is GENERATION:SHAPE, e.g. v5e:4x4, v4:2x2x1, "
                         "v5p:2x2x1, v6e:2x2, v3:2x2; or 'local'")
    from jax.experimental import topologies
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                            chip_config_name=CHIP_CONFIG.get(gen, "default"),
                                            chips_per_host_bounds=(min(dims[0], 2), min(dims[1], 2), 1), num_slices=1)
    except Exception as e:  # libtpu's own types
        raise ValueError(f"--compile-only {name!r}: libtpu cannot describe it ({str(e).splitlines()[0][:200]})") from None
    return list(topo.devices)


def _target_config(kind: str) -> str:
    """XLA's description of a GPU (mixer_jax/data/), a GpuTargetConfigProto in text form."""
    from importlib import resources

    return resources.files("mixer_jax").joinpath("data", GPUS[kind][0]).read_text()


def gpu_devices(name: str) -> list:
    """``h100`` or ``h100:N``: N GPUs on one host, from XLA's description of the GPU."""
    from jax.experimental import topologies

    kind, _, count = name.partition(":")
    if (count and not count.isdigit()) or count == "0":
        raise ValueError(f"--compile-only {name!r}: GPUs are {kind} or {kind}:N (N GPUs on one host)")
    try:
        topo = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{int(count or 1)}",
                                            target_config=_target_config(kind))
    except Exception as e:  # the plugin's own types
        raise ValueError(f"--compile-only {name!r}: JAX's CUDA plugin cannot describe it "
                         f"({str(e).splitlines()[0][:200]})") from None
    return list(topo.devices)


def _gpu_memory(kind: str) -> int:
    found = re.search(r"device_memory_size:\s*(\d+)", _target_config(kind))
    return int(int(found.group(1)) * GPU_MEM_FRACTION)


def available_hbm(devices: list) -> int | None:
    """Bytes per device the compiler may use: a device of this machine says its own limit; a
    TPU compiler is asked (an allocation it must refuse names the limit); a described GPU's memory
    is in its target config; None where nobody says (a CPU)."""
    limit = _local_limit(devices[0])
    if limit is not None:
        return limit
    kind = _gpu_kind(devices)
    if kind is not None:
        return _gpu_memory(kind)
    if devices[0].platform != "tpu":
        return None
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(devices[:1], ("x",))
    huge = jax.jit(lambda a: jnp.broadcast_to(a, (2 ** 40 // 4,)) * 2, out_shardings=NamedSharding(mesh, P()))
    try:
        huge.lower(jax.ShapeDtypeStruct((1,), jnp.float32, sharding=NamedSharding(mesh, P()))).compile()
    except Exception as e:
        found = parse_oom(str(e))
        if found:
            return found.hbm
    return None


def _local_limit(device) -> int | None:
    """A real device's allocator limit (JAX's share of a local GPU); None for a described one."""
    try:
        return (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # a topology's devices have no allocator to ask
        return None


class OutOfMemory(NamedTuple):
    """What XLA's out-of-memory error says: ``needed`` bytes of ``what`` ('temporaries', or
    'total': everything the step holds) against ``hbm`` bytes available."""

    needed: int
    hbm: int
    what: str


def parse_oom(message: str) -> OutOfMemory | None:
    """XLA's out-of-memory error, in either of libtpu's wordings, or None for any other error."""
    for what, pattern in _OOM.items():
        m = pattern.search(message)
        if m is not None:
            return OutOfMemory(int(float(m.group(1)) * _UNITS[m.group(2)]), int(float(m.group(3)) * _UNITS[m.group(4)]),
                               what)
    return None


def _gpu_kind(devices: list) -> str | None:
    """The GPUS key of described GPUs (their device_kind names them, e.g. 'NVIDIA H100 80GB HBM3')."""
    if devices[0].platform not in ("cuda", "gpu"):
        return None
    return next((k for k in GPUS if k in devices[0].device_kind.lower()), None)


def peak_flops(devices: list) -> float | None:
    """bf16 peak FLOP/s of one device (a chip's figure over its devices), None if unknown."""
    kind = _gpu_kind(devices)
    if kind is not None:
        return GPUS[kind][1]
    chip = PEAK_BF16_PER_CHIP.get(devices[0].device_kind)
    if chip is None:
        return None
    per_chip = len({getattr(d, "core_on_chip", 0) for d in devices})
    return chip / per_chip


@dataclasses.dataclass
class Report:
    topology: str
    chips: int  # JAX devices (a v3 chip is two)
    per_chip_batch: int
    bytes_per_chip: dict[str, int | None]
    hbm_bytes_per_chip: int | None
    fits: bool
    flops_per_step: float  # the model's matmuls, forward and backward (3x forward), all chips together
    compile_seconds: float
    mesh: dict[str, int]
    step_seconds_lower_bound: float | None = None  # flops_per_step over all chips' bf16 peak
    compiler_flops_per_chip: float | None = None  # XLA's count: a scanned loop's body counted once
    error: str | None = None

    def json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
           "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes}
    out["total"] = out["arguments"] + out["temporaries"] + out["outputs"] - out["aliased"]
    return out


def flops(compiled: jax.stages.Compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    value = (cost or {}).get("flops")
    return float(value) if value is not None and value >= 0 else None


def argument_bytes(args: tuple) -> int:
    """Bytes of one device's shards of the abstract arguments (what a refused compile cannot say)."""
    import jax
    import numpy as np

    total = 0
    for a in jax.tree_util.tree_leaves(args):
        shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += math.prod(shard) * np.dtype(a.dtype).itemsize
    return total


def compile_step(jitted: jax.stages.Wrapped, args: tuple, topology: str, devices: list, mesh: Mesh,
                 per_chip_batch: int, model_flops: float) -> Report:
    """Compile ``jitted`` for ``args`` and report; a step the chips cannot hold is a report with
    ``fits`` False and the compiler's numbers, not an exception. ``model_flops``: what the step
    computes at least (XLA's own count misses all but one trip of a scanned loop)."""
    hbm = available_hbm(devices)
    peak = peak_flops(devices)
    start = time.perf_counter()
    common = dict(topology=topology, chips=len(devices), per_chip_batch=per_chip_batch, mesh=dict(mesh.shape),
                  flops_per_step=model_flops,
                  step_seconds_lower_bound=None if peak is None else model_flops / len(devices) / peak)
    try:
        compiled = jitted.lower(*args).compile()
    except Exception as e:
        oom = parse_oom(str(e))
        if oom is None:
            raise
        used = {"arguments": argument_bytes(args), "temporaries": None, "outputs": None, "aliased": None,
                "total": None, oom.what: oom.needed}
        return Report(**common, hbm_bytes_per_chip=hbm or oom.hbm, bytes_per_chip=used, fits=False,
                      compile_seconds=time.perf_counter() - start, error=str(e).splitlines()[0][:300])
    seconds = time.perf_counter() - start
    used = memory(compiled)
    return Report(**common, hbm_bytes_per_chip=hbm, bytes_per_chip=used, fits=hbm is None or used["total"] <= hbm,
                  compile_seconds=seconds, compiler_flops_per_chip=flops(compiled))


def compile_train_step(cfg: TrainConfig, topology: str, num_classes: int, progress: Callable[[str], None] = lambda _: None
                       ) -> Report:
    """The run ``cfg`` describes, its train step compiled for ``topology``: the state made
    abstract (nothing initialised), the batch a ``jax.ShapeDtypeStruct`` of ``cfg.batch_size``
    images, both carrying the run's shardings. ``progress`` hears when the compile starts."""
    import jax
    import jax.numpy as jnp

    from mixer_convert.spec import forward_flops
    from mixer_jax.configs import validate
    from mixer_jax.sharding import make_mesh
    from mixer_jax.state import state_plan
    from mixer_jax.train import compile_steps, architecture_of

    devices = topology_devices(topology)
    validate(cfg, len(devices))
    model_cfg = architecture_of(cfg, num_classes)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices)
    progress(f"compiling the train step for {topology} ({len(devices)} chips) ...")
    _, layout, schedule = state_plan(cfg, model_cfg, mesh)
    steps = compile_steps(cfg, num_classes, schedule, mesh, layout)
    micro = (cfg.accum_steps, cfg.batch_size // cfg.accum_steps)
    images = jax.ShapeDtypeStruct((*micro, *model_cfg.image_size, model_cfg.in_chans), jnp.uint8,
                                  sharding=steps.batch_sharding)
    labels = jax.ShapeDtypeStruct(micro, jnp.int32, sharding=steps.batch_sharding)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return compile_step(steps.train_step, (layout.abstract, images, labels, rng), topology, devices, mesh,
                        cfg.batch_size // len(devices), 3.0 * forward_flops(model_cfg) * cfg.batch_size)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2 ** 30:.2f} GiB"


def summary(out: dict) -> str:
    """The report as a user reads it (the JSON has the same numbers)."""
    mesh = " x ".join(f"{k}={v}" for k, v in out["mesh"].items())
    b = out["bytes_per_chip"]
    head = (f"{out['topology']}: {out['chips']} chips (mesh {mesh}), {out['per_chip_batch']} images per chip, "
            f"compiled in {out['compile_seconds']:.1f} s")
    hbm = _gib(out["hbm_bytes_per_chip"])
    if not out["fits"]:
        needs = (f"{_gib(b['total'])} in all" if b["temporaries"] is None else
                 f"{_gib(b['temporaries'])} of temporaries and {_gib(b['arguments'])} of arguments")
        return f"{head}\n  does NOT fit: {needs} per chip, {hbm} of HBM ({out.get('error') or 'over the HBM'})"
    lines = [head, f"  per chip: arguments {_gib(b['arguments'])} + temporaries {_gib(b['temporaries'])} + outputs "
                   f"{_gib(b['outputs'])} - aliased {_gib(b['aliased'])} = {_gib(b['total'])} of {hbm} HBM: fits"]
    bound = out.get("step_seconds_lower_bound")
    lines.append(f"  {out['flops_per_step']:.3g} FLOPs per step ({out['flops_per_step'] / out['chips']:.3g} per chip, "
                 "the model's matmuls forward and backward)"
                 + (f": at least {bound * 1e3:.3g} ms per step at the chip's bf16 peak" if bound else ""))
    return "\n".join(lines)
