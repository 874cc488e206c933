"""The run's metrics: ``metrics.jsonl`` (one JSON record per line, in step order), the non-finite
guard, and ``metrics.png``.

A resumed run first drops the records a killed run logged past its last checkpoint (so no step
is logged twice) and repairs a torn last line (a kill in the middle of a write).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable


class NonFiniteLossError(RuntimeError):
    pass


def last_good_text(last_good: int | None, ckpt_dir: Path) -> str:
    if last_good is None:
        return f"No checkpoint was written before it (nothing saved in {ckpt_dir})"
    return f"The last good checkpoint is step {last_good} in {ckpt_dir}"


def check_finite(records: list[dict], last_good: int | None, ckpt_dir: Path) -> None:
    """Stop at the first non-finite training loss, naming the checkpoint to go back to."""
    for rec in records:
        if not math.isfinite(rec["loss"]):
            raise NonFiniteLossError(
                f"loss is {rec['loss']} at step {rec['step']}; stopping. {last_good_text(last_good, ckpt_dir)} "
                "(lower optim.lr, raise warmup, or check the data)")


class MetricsLog:
    """Append-only JSON lines, written only by the main process."""

    def __init__(self, path: Path, resume_step: int, enabled: bool, report: Callable[[str], None] = print) -> None:
        self.path, self.enabled = Path(path), enabled
        self._f = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self._truncate(resume_step, report)
            self._f = open(self.path, "a")

    def _truncate(self, resume_step: int, report: Callable[[str], None]) -> None:
        kept, torn = [], 0
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                torn += 1  # a write cut short by a kill: the step is re-run and logged again
                continue
            if step <= resume_step:
                kept.append(line)
        if torn:
            report(f"{self.path}: dropped {torn} damaged line(s) (a write cut short)")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, records: list[dict]) -> None:
        if self._f is not None:
            for rec in records:
                self._f.write(json.dumps(rec) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def plot_metrics(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    axes[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    axes[0].set_title("loss")
    axes[1].plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train (batch)")
    axes[1].plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="eval")
    axes[1].set_title("accuracy")
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
