"""Runs one training job in its own process (so tests can set XLA_FLAGS, start several
processes, or SIGKILL it) and writes the final params and history to OUT.npz.

  python tests/helpers/train_worker.py WORKDIR OUT.npz [--devices N]
      [--coordinator ADDR --num-processes N --process-id I] [--set key=value ...]
"""
import argparse
import json
import os
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1])]  # the checkout, and tests/ for helpers


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--kill-at", type=int, help="SIGKILL this process right after that step")
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax
    import numpy as np

    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from mixer_jax.overrides import override
    from mixer_jax.model import params_to_flat
    from mixer_jax.train import train_and_evaluate
    from helpers.training import tiny_digits

    cfg = override(tiny_digits(), args.overrides)
    def kill(step):
        if step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    res = train_and_evaluate(cfg, args.workdir, progress=False, on_step=kill if args.kill_at else None)
    if jax.process_index() == 0:
        flat = params_to_flat(res.params)
        np.savez(args.out, **flat, __history__=np.array(json.dumps(res.history)),
                 __eval__=np.array(res.eval.get("eval_accuracy", -1.0)), __devices__=np.array(jax.device_count()))


if __name__ == "__main__":
    main()
