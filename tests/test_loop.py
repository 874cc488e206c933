"""mixer_jax.loop: what happens after each step (flush, eval, save, stop), the metrics meter, the
non-finite guards, Ctrl-C handling, and the loop's order of events, with a stand-in step (nothing
compiled: the real steps are tested in test_steps.py, whole runs in test_train.py)."""
import dataclasses
import json
import os
import signal
from typing import NamedTuple

import numpy as np
import pytest

from conftest import requires_jax

pytestmark = requires_jax


def tiny(**kw):
    from helpers.training import tiny_digits
    return dataclasses.replace(tiny_digits(), **kw)


def test_the_plan_of_each_step_follows_the_cadences():
    from mixer_jax.loop import plan_step

    cfg = tiny(steps=8, log_every=2, eval_every=3, checkpoint_every=4)
    plans = {done: plan_step(done, cfg, stopping=False) for done in range(1, 9)}
    assert [d for d, p in plans.items() if p.flush] == [2, 3, 4, 6, 8]  # eval and checkpoint steps flush too
    assert [d for d, p in plans.items() if p.evaluate] == [3, 6]  # the last step's eval and checkpoint:
    assert [d for d, p in plans.items() if p.save] == [4]  # finish()'s
    assert not any(p.stop for p in plans.values())
    assert plan_step(5, cfg, stopping=True) == (True, False, True, True)  # a stop flushes and saves
    assert plan_step(8, cfg, stopping=True) == (True, False, False, False)  # the last step finishes normally
    assert not any(plan_step(d, tiny(checkpoint_every=0, eval_every=0), False).save for d in range(1, 9))


def test_the_meter_turns_device_metrics_into_records_with_images_per_second():
    import jax.numpy as jnp
    from mixer_jax.loop import Meter

    meter = Meter(batch_size=32)
    for step in (1, 2):
        meter.add(step, {"loss": jnp.float32(step / 2), "accuracy": jnp.float32(0.5)})
    records = meter.take()
    assert [(r["step"], r["loss"], r["accuracy"]) for r in records] == [(1, 0.5, 0.5), (2, 1.0, 0.5)]
    assert all(type(r["loss"]) is float and r["img_per_s"] > 0 for r in records)
    assert meter.pending == [] and meter.take() == []


class _Ckpt:
    """The Checkpointer's surface the loop uses, recording what it is asked."""

    def __init__(self, tmp_path):
        self.dir, self.saved, self.is_main = tmp_path / "checkpoints", [], True

    def latest_step(self):
        return self.saved[-1] if self.saved else None

    def save(self, step, state, meta):
        self.saved.append(step)

    def close(self):
        pass


def _sinks(tmp_path):
    from mixer_jax.loop import Sinks
    from mixer_jax.metrics import MetricsLog, TensorBoardLog

    return Sinks(_Ckpt(tmp_path), MetricsLog(tmp_path / "metrics.jsonl", 0, True), TensorBoardLog(tmp_path, 0, True))


def test_a_non_finite_loss_stops_before_it_is_logged(tmp_path):
    import jax.numpy as jnp
    from mixer_jax.loop import Meter, flush
    from mixer_jax.metrics import NonFiniteLossError

    sinks, meter = _sinks(tmp_path), Meter(32)
    meter.add(1, {"loss": jnp.float32(0.3), "accuracy": 0.1, "lr": 0.1})
    assert [r["step"] for r in flush(meter, sinks, None)] == [1]
    meter.add(2, {"loss": jnp.float32(np.nan), "accuracy": 0.1, "lr": 0.1})
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2; stopping. The last good checkpoint is step 1"):
        flush(meter, sinks, 1)
    sinks.close()
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1]


class State(NamedTuple):
    params: dict


def _loop(tmp_path, cfg, norm=0.0, on_step=None):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mixer_jax.loop import Compiled, Loop

    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))

    def step(state, x, y, rng):  # a stand-in optimizer step: counts, and reports the batch's first label
        metrics = {"loss": float(y[0, 0]), "accuracy": 0.5, "lr": 0.1, "grad_norm": 1.0}
        return State({"w": state.params["w"] + 1}), metrics

    class Batches:
        def __init__(self):
            self.n = 0

        def __next__(self):
            self.n += 1
            return np.zeros((cfg.batch_size, 1, 1, 3), np.uint8), np.full(cfg.batch_size, self.n, np.int32)

        def position(self, step):
            return {"epoch": 0, "index": step * cfg.batch_size}

    compiled = Compiled(step, None, lambda params: norm, NamedSharding(mesh, P(None, "data")),
                        NamedSharding(mesh, P("data")), cfg.accum_steps, cfg.batch_size // cfg.accum_steps)
    return Loop(cfg, compiled, _sinks(tmp_path), Batches(), None, tmp_path, jax.random.PRNGKey(0), {}, on_step)


def test_the_loop_logs_evaluates_and_saves_in_step_order_and_finishes_once(tmp_path, monkeypatch):
    import mixer_jax.loop as loop_module

    monkeypatch.setattr(loop_module, "evaluate", lambda state, cfg, compiled, src: {
        "eval_accuracy": float(state.params["w"]), "eval_top5": 1.0, "eval_loss": 0.0})
    drawn = []  # metrics.png is redrawn at each eval, from the records logged so far
    monkeypatch.setattr(loop_module, "plot_metrics", lambda src, png: drawn.append(
        (png.name, [json.loads(line)["step"] for line in open(src)][-1])))
    seen = []
    loop = _loop(tmp_path, tiny(steps=6, log_every=2, eval_every=3, checkpoint_every=4),
                 on_step=lambda step: seen.append((step, list(loop.sinks.ckpt.saved))))
    end = loop_module.train_loop(loop, State({"w": np.float32(0)}), 0, None)
    assert (end.done, end.last_good, float(end.state.params["w"])) == (6, 4, 6.0)
    assert [r["step"] for r in end.history] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in end.history] == [1, 2, 3, 4, 5, 6]  # the batches in order
    assert loop.sinks.ckpt.saved == [4]
    assert seen[3] == (4, [4])  # on_step runs after that step's checkpoint
    assert loop_module.finish(loop, end)["eval_accuracy"] == 6.0
    assert loop.sinks.ckpt.saved == [4, 6]  # the final checkpoint after the final eval is recorded
    assert loop_module.finish(loop, end)["eval_accuracy"] == 6.0  # a finished run started again: nothing logged
    loop.sinks.close()
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], "eval_accuracy" in r) for r in recs] == [
        (1, False), (2, False), (3, False), (3, True), (4, False), (5, False), (6, False), (6, True)]
    assert recs[3]["eval_accuracy"] == 3.0  # evaluated on the state after step 3
    assert loop.sinks.ckpt.saved == [4, 6] and drawn == [("metrics.png", 3), ("metrics.png", 6)]


def test_a_stop_request_saves_at_the_step_reached_and_leaves_the_loop(tmp_path):
    from mixer_jax.loop import train_loop

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    loop = _loop(tmp_path, tiny(steps=100, log_every=50, checkpoint_every=0),
                 on_step=lambda step: os.kill(os.getpid(), signal.SIGINT) if step == 3 else None)
    end = train_loop(loop, State({"w": np.float32(0)}), 0, None)
    loop.sinks.close()
    assert (end.done, end.last_good, loop.sinks.ckpt.saved) == (4, 4, [4])  # seen after step 3, acted on after 4
    assert [r["step"] for r in end.history] == [1, 2, 3, 4]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_parameters_that_became_non_finite_are_never_saved(tmp_path):
    from mixer_jax.loop import save
    from mixer_jax.metrics import NonFiniteLossError

    loop = _loop(tmp_path, tiny(), norm=float("inf"))
    with pytest.raises(NonFiniteLossError, match="parameters became NaN/Inf at step 8; stopping. The last good "
                                                 "checkpoint is step 4"):
        save(8, State({}), loop, 4)
    assert loop.sinks.ckpt.saved == []
    loop.sinks.close()


def test_a_second_ctrl_c_interrupts_at_once_and_one_process_needs_no_agreement():
    from mixer_jax.loop import agreed, stop_requests

    with pytest.raises(KeyboardInterrupt):
        with stop_requests() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.is_set()
            os.kill(os.getpid(), signal.SIGINT)
    assert agreed(True) is True and agreed(False) is False


def test_evaluate_averages_over_the_real_examples_of_the_whole_split(tmp_path):
    import jax.numpy as jnp
    from mixer_jax.input_pipeline import make_source
    from mixer_jax.loop import evaluate

    cfg = tiny(eval_batch_size=64)
    src = make_source(cfg.data, cfg.data.eval_split)
    assert len(src) % 64  # the last batch is padded

    def eval_step(state, images, labels, mask):  # "predicts" class 0 for every image, 3 in the top 5
        return {"correct": jnp.sum((labels == 0) * mask), "correct5": jnp.sum((labels < 3) * mask),
                "loss_sum": jnp.sum(2.0 * mask), "count": jnp.sum(mask)}

    loop = _loop(tmp_path, cfg)
    compiled = dataclasses.replace(loop.compiled, eval_step=eval_step)
    got = evaluate(None, cfg, compiled, src)
    loop.sinks.close()
    assert got == {"eval_accuracy": pytest.approx(np.mean(src.labels == 0)),
                   "eval_top5": pytest.approx(np.mean(src.labels < 3)), "eval_loss": pytest.approx(2.0)}
