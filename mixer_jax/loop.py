"""The training loop, as small functions: one step, evaluate, save, flush the metrics, and the
stop handling (Ctrl-C / SIGTERM, agreed between processes). ``train_loop`` runs them in order;
``mixer_jax.train`` builds what they need (:class:`Loop`) and runs the whole training."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding

from mixer_jax.checkpointing import Checkpointer, to_host
from mixer_jax.configs import TrainConfig
from mixer_jax.input_pipeline import eval_iterator
from mixer_jax.metrics import Console, MetricsLog, NonFiniteLossError, TensorBoardLog, check_finite, \
    last_good_text, plot_metrics


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A run's jitted, sharded functions and the shardings of their inputs."""

    train_step: Callable  # (state, images, labels, rng) -> (state, metrics)
    eval_step: Callable  # (state, images, labels, mask) -> sums
    param_norm: Callable  # params -> global norm
    batch_sharding: NamedSharding  # (accum, micro, ...) split along micro
    eval_sharding: NamedSharding
    accum_steps: int
    micro_batch: int  # this process's rows of one micro-batch
    to_disk: Callable = lambda state: state  # the state as checkpoints hold it (mixer_jax.state.Layout)


@dataclasses.dataclass
class Sinks:
    """Where a run's results go; the non-main processes' write nothing but checkpoints."""

    ckpt: Checkpointer
    log: MetricsLog | None = None
    tensorboard: TensorBoardLog | None = None
    console: Console = dataclasses.field(default_factory=lambda: Console(False, False))

    def close(self) -> None:
        for sink in (self.console, self.log, self.tensorboard, self.ckpt):
            if sink is not None:
                sink.close()


@dataclasses.dataclass(frozen=True)
class Loop:
    """Everything the loop's functions read; the training state itself is passed along."""

    cfg: TrainConfig
    compiled: Compiled
    sinks: Sinks
    batches: Any  # input_pipeline.TrainIterator
    eval_source: Any
    workdir: Path
    rng: jax.Array
    config_json: dict
    on_step: Callable[[int], None] | None = None


class StepPlan(NamedTuple):
    flush: bool  # pull the pending metrics to the host and log them
    evaluate: bool
    save: bool
    stop: bool  # a stop request: leave the loop after this step


def plan_step(done: int, cfg: TrainConfig, stopping: bool) -> StepPlan:
    """What happens after optimizer step ``done``. The metrics are flushed before any eval record
    (metrics.jsonl stays in step order) and before any checkpoint (nothing saved after a NaN). The
    last step's eval and checkpoint are :func:`finish`'s."""
    last = done == cfg.steps
    boundary = bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
    evaluating = bool(cfg.eval_every and done % cfg.eval_every == 0)
    return StepPlan(flush=done % cfg.log_every == 0 or boundary or evaluating or stopping or last,
                    evaluate=evaluating and not last, save=(boundary or stopping) and not last,
                    stop=stopping and not last)


class Meter:
    """The per-step metrics still on the device, and the clock for images per second."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size, self.pending, self.since = batch_size, [], time.perf_counter()

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def take(self) -> list[dict]:
        """The pending metrics as host records (one device->host transfer), images per second
        measured since the last take; empties the meter."""
        now = time.perf_counter()
        ips = len(self.pending) * self.batch_size / max(now - self.since, 1e-9)
        host = to_host([m for _, m in self.pending])
        records = [{"step": step, **{k: float(v) for k, v in m.items()}, "img_per_s": ips}
                   for (step, _), m in zip(self.pending, host)]
        self.pending, self.since = [], now
        return records


def global_array(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local)


def run_step(loop: Loop, state, images: np.ndarray, labels: np.ndarray):
    """One optimizer step on this process's rows of the global batch."""
    c = loop.compiled
    x = images.reshape(c.accum_steps, c.micro_batch, *images.shape[1:])
    y = labels.reshape(c.accum_steps, c.micro_batch)
    return c.train_step(state, global_array(x, c.batch_sharding), global_array(y, c.batch_sharding), loop.rng)


def evaluate(state, cfg: TrainConfig, compiled: Compiled, eval_source) -> dict[str, float]:
    """Top-1, top-5 and mean loss over the whole eval split (every process runs it)."""
    tot = {"correct": 0.0, "correct5": 0.0, "loss_sum": 0.0, "count": 0.0}
    batch = cfg.eval_batch_size or cfg.batch_size // cfg.accum_steps
    for x, y, m in eval_iterator(cfg.data, eval_source, batch, jax.process_index(), jax.process_count()):
        out = compiled.eval_step(state, *(global_array(a, compiled.eval_sharding) for a in (x, y, m)))
        for k in tot:
            tot[k] += float(out[k])
    n = max(tot["count"], 1)
    return {"eval_accuracy": tot["correct"] / n, "eval_top5": tot["correct5"] / n, "eval_loss": tot["loss_sum"] / n}


def write_records(sinks: Sinks, records: list[dict]) -> None:
    for sink in (sinks.log, sinks.tensorboard):
        if sink is not None:
            sink.write(records)


def flush(meter: Meter, sinks: Sinks, last_good: int | None) -> list[dict]:
    """Log the pending per-step metrics; a non-finite loss stops the run before anything is saved."""
    if not meter.pending:
        return []
    records = meter.take()
    check_finite(records, last_good, sinks.ckpt.dir)
    write_records(sinks, records)
    sinks.console.metrics(records[-1])
    return records


def record_eval(step: int, ev: dict[str, float], loop: Loop) -> None:
    """An eval result to every sink, and metrics.png redrawn (a user without TensorBoard can look mid-run)."""
    write_records(loop.sinks, [{"step": step, **ev}])
    if loop.sinks.tensorboard is not None:
        loop.sinks.tensorboard.flush()
    loop.sinks.console.print(f"step {step}: eval accuracy {ev['eval_accuracy']:.4f} loss {ev['eval_loss']:.4f}")
    if loop.sinks.ckpt.is_main:
        plot_metrics(loop.workdir / "metrics.jsonl", loop.workdir / "metrics.png")


def save(step: int, state, loop: Loop, last_good: int | None) -> int:
    """A checkpoint of ``state`` at ``step`` (the new last good step). Every metric up to ``step``
    is on disk first, so a run resumed from it logs no step twice and misses none."""
    # A finite loss at this step does not make the updated params finite; check them too.
    if not math.isfinite(float(to_host(loop.compiled.param_norm(state.params)))):
        raise NonFiniteLossError(f"parameters became NaN/Inf at step {step}; stopping. "
                                 f"{last_good_text(last_good, loop.sinks.ckpt.dir)}")
    if loop.sinks.tensorboard is not None:
        loop.sinks.tensorboard.flush()
    loop.sinks.ckpt.save(step, loop.compiled.to_disk(state),
                         {"data_position": loop.batches.position(step), "config": loop.config_json})
    return step


@contextlib.contextmanager
def stop_requests():
    """SIGINT/SIGTERM during training set a flag (the loop saves and stops at the next step
    boundary) instead of raising inside a step; a second Ctrl-C interrupts at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {s: signal.signal(s, _stop_handler(flag)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stop_handler(flag: threading.Event) -> Callable:
    def handler(signum, frame):
        if flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.set()
    return handler


def agreed(flag: bool) -> bool:
    """A stop request seen by any process stops every process at the same step (otherwise the
    others would wait forever in the next step's collectives)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


class LoopEnd(NamedTuple):
    state: Any
    done: int  # the last step run
    last_good: int | None  # the newest checkpoint written
    history: list[dict]  # this process's training records, in step order


def train_loop(loop: Loop, state, start: int, last_good: int | None) -> LoopEnd:
    """Steps ``start+1 .. cfg.steps``, or fewer if a stop is requested (then saved at the step reached)."""
    cfg, sinks = loop.cfg, loop.sinks
    meter, history, done = Meter(cfg.batch_size), [], start
    with stop_requests() as stop:
        for step in range(start, cfg.steps):
            state, metrics = run_step(loop, state, *next(loop.batches))
            done = step + 1
            meter.add(done, metrics)
            sinks.console.step()
            plan = plan_step(done, cfg, agreed(stop.is_set()))
            if plan.flush:
                history += flush(meter, sinks, last_good)
            if plan.evaluate:
                record_eval(done, evaluate(state, cfg, loop.compiled, loop.eval_source), loop)
            if plan.save and sinks.ckpt.latest_step() != done:
                last_good = save(done, state, loop, last_good)
            if loop.on_step is not None:
                loop.on_step(done)
            if plan.stop:
                break
        history += flush(meter, sinks, last_good)
    return LoopEnd(state, done, last_good, history)


def finish(loop: Loop, end: LoopEnd) -> dict[str, float]:
    """After the last step: the final eval, recorded, then the final checkpoint. A run that already
    has that checkpoint (a finished run started again) has its final eval recorded: it is only
    returned, so no step is logged twice."""
    result = evaluate(end.state, loop.cfg, loop.compiled, loop.eval_source)
    if loop.sinks.ckpt.latest_step() != end.done:
        record_eval(end.done, result, loop)
        save(end.done, end.state, loop, end.last_good)
    return result
