"""mixer-train --config digits --workdir runs/digits [--set optim.lr=0.01 ...]
mixer-train --config pretrain_i1k --compile-only v5e:4x4 [--set ...] [--json OUT]"""
from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from typing import TYPE_CHECKING

from mixer_convert.command import Parser, add_json, add_quiet, command, emit
from mixer_convert.extras import require

if TYPE_CHECKING:
    from mixer_jax.configs import TrainConfig

PROG = "mixer-train"


def build_parser() -> Parser:
    from mixer_jax.configs import CONFIGS

    p = Parser(prog=PROG, description="Train or fine-tune an MLP-Mixer in Flax.")
    p.add_argument("--config", default="digits", choices=sorted(CONFIGS), help="named config (mixer_jax/configs.py)")
    p.add_argument("--workdir", help="checkpoints, metrics.jsonl, TensorBoard events, metrics.png, "
                                                    "model.npz, classes.json; an existing run there is resumed "
                                                    "(--set steps=0: only evaluate its latest checkpoint, "
                                                    "or init_from, reporting top-1 and top-5)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set steps=200 --set optim.lr=0.01 "
                        "--set data.data_dir=/data --set init_from=Mixer-B_16.npz")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a run although the config changes what it computes (steps, schedule, batch, "
                        "model, data...); without it such a resume is refused, listing the differences")
    p.add_argument("--compile-only", metavar="TOPOLOGY",
                   help="compile the run's train step for a TPU slice (e.g. v5e:4x4, v4:2x2x1, v5p:2x2x1, v6e:2x2, "
                        "v3:2x2; needs the 'tpu' extra), for H100s (h100, h100:8; the 'gpu-compile' extra) or "
                        "'local' (this machine's devices), reading no data and "
                        "writing nothing: per-chip memory against HBM, FLOPs, the step-time lower bound; exit 1 "
                        "if it does not fit. The number of classes: --set data.num_classes=N")
    add_quiet(p)
    add_json(p)
    p.add_argument("--coordinator", help="multi-host: coordinator address host:port (jax.distributed.initialize)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    return p


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    require("train")
    args = build_parser().parse_args(argv)
    if args.compile_only is None and args.workdir is None:
        raise ValueError("--workdir is required (except with --compile-only)")
    multi_host = [flag for flag, value in (("--coordinator", args.coordinator), ("--num-processes", args.num_processes),
                                           ("--process-id", args.process_id)) if value is not None]
    if args.compile_only is not None and multi_host:  # (a --workdir is allowed: it is not written to)
        raise ValueError(f"--compile-only compiles for every host of the topology in one process: drop "
                         f"{', '.join(multi_host)}")
    if args.compile_only not in (None, "local"):
        from mixer_jax.compile_only import is_gpu, deviceless_env
        require("gpu-compile" if is_gpu(args.compile_only) else "tpu")
        deviceless_env()  # before JAX loads libtpu (or the CUDA plugin)
    from mixer_jax.configs import get_config
    from mixer_jax.overrides import override

    cfg = override(get_config(args.config), args.overrides)
    if args.compile_only is not None:
        from mixer_jax.compile_only import is_gpu, without_cuda_noise

        # before anything imports JAX, which loads the CUDA plugin
        with without_cuda_noise() if is_gpu(args.compile_only) else contextlib.nullcontext():
            return compile_only(cfg, args)
    import jax

    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPU/TPU ignore it
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from mixer_jax.train import NonFiniteLossError, train_and_evaluate

    try:
        result = train_and_evaluate(cfg, args.workdir, progress=not args.quiet,
                                    allow_config_change=args.allow_config_change)
    except NonFiniteLossError as e:
        print(f"{PROG}: stopped: {e}", file=sys.stderr)
        return 3
    if jax.process_index() != 0:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"{PROG}: interrupted at step {result.step}; checkpoint saved in {args.workdir}/checkpoints. "
              f"Resume with: {shlex.join(['mixer-train', *argv])}", file=sys.stderr)
        return 130
    out = {"workdir": str(args.workdir), "step": result.step, "evaluated_only": cfg.steps == 0,
           "what": f"step {result.step} of {args.workdir}" if result.step else cfg.init_from,
           "data": f"{cfg.data.name} {cfg.data.eval_split}", **result.eval}
    emit(out, args.json, _summary)
    return 0


def compile_only(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """--compile-only: the report, exit 1 when the step does not fit."""
    from mixer_jax.compile_only import compile_train_step, summary
    from mixer_jax.train import num_classes_without_data

    def progress(text: str) -> None:
        if not args.quiet:
            print(f"{PROG}: {text}", file=sys.stderr)
    report = compile_train_step(cfg, args.compile_only, num_classes_without_data(cfg), progress)
    emit(report.json(), args.json, summary)
    return 0 if report.fits else 1


def _summary(out: dict) -> str:
    ev = f"top-1 {out.get('eval_accuracy', float('nan')):.4f}, top-5 {out.get('eval_top5', float('nan')):.4f}"
    if out["evaluated_only"]:
        return f"evaluated {out['what']} on {out['data']}: {ev}"
    return f"done: step {out['step']}, eval {ev}; outputs in {out['workdir']}"


if __name__ == "__main__":
    sys.exit(main())
