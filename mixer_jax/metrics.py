"""Where the run's metrics go: ``metrics.jsonl`` (one JSON record per line, in step order),
TensorBoard event files, the console, ``metrics.png``; and the non-finite guard.

A resumed run first drops the records a killed run logged past its last checkpoint (so no step
is logged twice) and repairs a torn last line (a kill in the middle of a write); its TensorBoard
events start with a purge marker, so TensorBoard hides what the killed run wrote past it.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

# record key -> TensorBoard tag
TENSORBOARD_TAGS = {"loss": "train/loss", "accuracy": "train/accuracy", "lr": "train/lr",
                    "grad_norm": "train/grad_norm", "img_per_s": "train/img_per_s", "eval_accuracy": "eval/top1",
                    "eval_top5": "eval/top5", "eval_loss": "eval/loss"}


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


class TensorBoardLog:
    """TensorBoard event files in ``logdir`` (tensorboardX: no TensorFlow at run time), written by
    the main process only. A run resumed at step ``start`` first writes TensorBoard's purge marker
    (a SessionLog START at ``start + 1``; at 0 for a run that starts over): TensorBoard then drops
    every event of earlier files at or past it, so a step a killed run logged after its last
    checkpoint does not show twice. ``config_text`` (markdown) is written once, at ``start``."""

    FLUSH_SECS = 10.0  # logged scalars reach the file at least this often; eval and checkpoints flush at once

    def __init__(self, logdir: Path, start: int, enabled: bool, config_text: str | None = None) -> None:
        self._w = None
        if not enabled:
            return
        # tensorboardX's EventsWriter writes in this thread: an event is in the file once flushed,
        # before the checkpoint that follows it. (Its SummaryWriter queues events for a thread, and
        # its flush() does not wait for the queue.)
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        Path(logdir).mkdir(parents=True, exist_ok=True)
        # The file is named by the second it was opened in; the suffix keeps a writer opened in the same
        # second from truncating the previous file, and sorts after it (TensorBoard reads files in name order).
        self._w = EventsWriter(str(Path(logdir) / "events"), f".{time.time_ns()}")
        self._event = Event
        self._w.write_event(Event(wall_time=time.time(), step=start + 1 if start else 0,
                                  session_log=SessionLog(status=SessionLog.START)))
        if config_text is not None:
            from tensorboardX.summary import text
            self._write(start, text("config", config_text))
        self.flush()

    def _write(self, step: int, summary) -> None:
        self._w.write_event(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def write(self, records: list[dict]) -> None:
        """Each record's known keys (:data:`TENSORBOARD_TAGS`) as scalars at its step."""
        if self._w is None:
            return
        from tensorboardX.summary import scalar
        for rec in records:
            for key, tag in TENSORBOARD_TAGS.items():
                if key in rec:
                    self._write(rec["step"], scalar(tag, float(rec[key])))
        if time.monotonic() - self._flushed > self.FLUSH_SECS:
            self.flush()

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


class Console:
    """Progress for people: a tqdm bar, or one line per log when there is none (main process only)."""

    def __init__(self, want_bar: bool, enabled: bool) -> None:
        self.want_bar, self.enabled, self.bar = want_bar, enabled, None

    def start_bar(self, total: int, initial: int) -> None:
        if self.want_bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def print(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def metrics(self, rec: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}", lr=f"{rec['lr']:.2e}",
                                 img_s=f"{rec['img_per_s']:.0f}")
        elif self.enabled:
            print(f"step {rec['step']}: loss {rec['loss']:.4f} accuracy {rec['accuracy']:.3f} "
                  f"lr {rec['lr']:.2e} {rec['img_per_s']:.0f} img/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_metrics(metrics_path: Path, png: Path) -> None:
    """Loss, accuracy and learning rate against the step, drawn from ``metrics.jsonl``; ``png`` is
    replaced atomically, so a viewer never sees half a picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixer_convert.atomic import atomic_path

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
    try:
        with atomic_path(Path(png), force=True) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
