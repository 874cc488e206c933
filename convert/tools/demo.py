"""mixer-demo: the whole toolkit end to end on the embedded digits, in a few minutes on a CPU.

1. train a small Mixer in Flax on scikit-learn's real handwritten digits (mixer_jax.train);
2. convert its official-layout .npz to a PyTorch state dict with the bridge (verified);
3. load it into the PyTorch model, evaluate the test split in both frameworks, and compare
   every block's output on the same images.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from mixer_convert.command import Parser, add_quiet, command, positive_int
from mixer_convert.extras import require


@command("mixer-demo")
def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="mixer-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/digits")
    p.add_argument("--steps", type=positive_int, help="training steps (default: the digits config's)")
    add_quiet(p)
    args = p.parse_args(argv)
    require("train", "torch")

    from mixer_convert.tools.bridge import convert_checkpoint
    from mixer_convert.tools.parity import (FP32_LOGITS_MAX_ABS, FP32_REL, compare, first_divergence, flax_forward,
                                format_table, torch_forward)
    from mixer_jax.configs import digits
    from mixer_jax.input_pipeline import eval_iterator, make_source, normalize
    from mixer_jax.train import train_and_evaluate

    cfg = digits()
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    work = Path(args.workdir)
    print(f"[1/3] training a {cfg.model.num_blocks}-block Mixer on the digits in Flax -> {work}")
    result = train_and_evaluate(cfg, work, progress=not args.quiet)
    model_cfg = result.model_config
    print(f"      Flax test accuracy: {result.eval['eval_accuracy']:.4f}")

    print("[2/3] converting model.npz -> model.pt (PyTorch naming) with --verify")
    rep = convert_checkpoint(work / "model.npz", work / "model.pt", "torch", force=True, verify=True, progress=False)
    print("      " + rep.summary().replace("\n", "\n      "))

    print("[3/3] PyTorch vs Flax on the whole test split")
    from mixer_convert.load import load_checkpoint

    flat, _ = load_checkpoint(work / "model.pt")
    src = make_source(cfg.data, cfg.data.eval_split)
    xs, ys, ms = zip(*eval_iterator(cfg.data, src, 512))  # uint8, as training sees them
    x, y = normalize(np.concatenate(xs)[np.concatenate(ms)]), np.concatenate(ys)[np.concatenate(ms)]
    jax_out = flax_forward(model_cfg, flat, x)
    torch_out = torch_forward(model_cfg, flat, x)
    rows = compare(jax_out, torch_out, model_cfg)
    print(format_table(rows))
    acc_j = float(np.mean(jax_out["logits"].argmax(-1) == y))
    acc_t = float(np.mean(torch_out["logits"].argmax(-1) == y))
    agree = float(np.mean(jax_out["logits"].argmax(-1) == torch_out["logits"].argmax(-1)))
    print(f"test images: {len(y)}; accuracy Flax {acc_j:.4f}, PyTorch {acc_t:.4f}; "
          f"same prediction on {agree:.2%}; logits max-abs difference {rows[-1].max_abs:.2e}")
    bad = first_divergence(rows, FP32_REL)  # the same bounds as the test suite and mixer-parity
    if bad is not None or rows[-1].max_abs > FP32_LOGITS_MAX_ABS:
        print(f"mixer-demo: FAILED: frameworks disagree (first at {bad.name if bad else 'logits'})", file=sys.stderr)
        return 1
    print(f"OK: PyTorch reproduces the Flax-trained model (plot: {work / 'metrics.png'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
