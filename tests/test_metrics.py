"""mixer_jax.metrics: metrics.jsonl's repair on resume, the non-finite guard, TensorBoard events
(read back with TensorBoard's own reader: a resumed run shows no step twice), metrics.png."""
import json

import pytest

from conftest import requires_jax
from helpers.tensorboard_events import scalars, texts

pytestmark = requires_jax


def test_metrics_log_drops_records_past_the_resume_step_and_repairs_a_torn_line(tmp_path):
    from mixer_jax.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 7)]
    path.write_text("\n".join(lines) + '\n{"step": 7, "lo')  # killed in the middle of a write
    notes = []
    log = MetricsLog(path, resume_step=4, enabled=True, report=notes.append)
    log.write([{"step": 5, "loss": 0.5}])
    log.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert notes and "dropped 1 damaged line" in notes[0]


def test_metrics_log_of_a_non_main_process_writes_nothing(tmp_path):
    from mixer_jax.metrics import MetricsLog

    log = MetricsLog(tmp_path / "m.jsonl", 0, enabled=False)
    log.write([{"step": 1}])
    log.close()
    assert not (tmp_path / "m.jsonl").exists()


def test_non_finite_loss_names_the_last_good_checkpoint_or_says_there_is_none(tmp_path):
    from mixer_jax.metrics import NonFiniteLossError, check_finite

    check_finite([{"step": 1, "loss": 0.3}], None, tmp_path)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2; stopping. The last good checkpoint is step 1"):
        check_finite([{"step": 1, "loss": 0.3}, {"step": 2, "loss": float("nan")}], 1, tmp_path)
    with pytest.raises(NonFiniteLossError, match="No checkpoint was written before it"):
        check_finite([{"step": 1, "loss": float("inf")}], None, tmp_path)


# ---- TensorBoard -----------------------------------------------------------------------------------


def _train(step, loss):
    return {"step": step, "loss": loss, "accuracy": 0.5, "lr": 0.1, "grad_norm": 1.0, "img_per_s": 100.0}


def test_every_train_and_eval_value_becomes_a_scalar_at_its_step(tmp_path):
    from mixer_jax.metrics import TENSORBOARD_TAGS, TensorBoardLog

    tb = TensorBoardLog(tmp_path, 0, enabled=True, config_text="    {\"steps\": 2}")
    tb.write([_train(1, 2.0), _train(2, 1.5), {"step": 2, "eval_accuracy": 0.7, "eval_top5": 0.9, "eval_loss": 1.1}])
    tb.close()
    got = scalars(tmp_path)
    assert set(got) == set(TENSORBOARD_TAGS.values())
    assert got["train/loss"] == [(1, 2.0), (2, 1.5)] and got["eval/top1"] == [(2, pytest.approx(0.7))]
    assert got["eval/top5"] == [(2, pytest.approx(0.9))] and got["train/img_per_s"] == [(1, 100.0), (2, 100.0)]
    assert texts(tmp_path) == {"config/text_summary": [(0, '    {"steps": 2}')]}


def test_a_resumed_run_shows_no_step_twice_and_the_config_once(tmp_path):
    from mixer_jax.metrics import TensorBoardLog

    first = TensorBoardLog(tmp_path, 0, enabled=True, config_text="cfg")
    first.write([_train(s, 10.0 + s) for s in range(1, 11)])  # steps 9 and 10 come after the checkpoint at 8
    first.flush()  # what a kill leaves: everything written, nothing closed
    resumed = TensorBoardLog(tmp_path, 8, enabled=True, config_text=None)
    resumed.write([_train(s, 20.0 + s) for s in range(9, 13)])
    resumed.close()
    first.close()
    loss = scalars(tmp_path)["train/loss"]
    assert [s for s, _ in loss] == list(range(1, 13))
    assert [v for _, v in loss] == [10.0 + s for s in range(1, 9)] + [20.0 + s for s in range(9, 13)]
    assert texts(tmp_path)["config/text_summary"] == [(0, "cfg")]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2


def test_a_run_that_starts_over_hides_everything_of_the_one_before(tmp_path):
    from mixer_jax.metrics import TensorBoardLog

    old = TensorBoardLog(tmp_path, 0, enabled=True, config_text="old")
    old.write([_train(s, 1.0) for s in range(1, 4)])
    old.close()
    new = TensorBoardLog(tmp_path, 0, enabled=True, config_text="new")  # killed before its first checkpoint
    new.write([_train(1, 2.0)])
    new.close()
    assert scalars(tmp_path)["train/loss"] == [(1, 2.0)]
    assert texts(tmp_path)["config/text_summary"] == [(0, "new")]


def test_tensorboard_of_a_non_main_process_writes_nothing(tmp_path):
    from mixer_jax.metrics import TensorBoardLog

    tb = TensorBoardLog(tmp_path / "tb", 0, enabled=False, config_text="cfg")
    tb.write([_train(1, 1.0)])
    tb.flush()
    tb.close()
    assert not (tmp_path / "tb").exists()


def test_tensorboard_needs_no_tensorflow(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, import_blocker, subprocess_env

    code = import_blocker("tensorflow") + f"""
from mixer_jax.metrics import TensorBoardLog
tb = TensorBoardLog({str(tmp_path)!r}, 0, enabled=True, config_text="cfg")
tb.write([{{"step": 1, "loss": 1.0}}])
tb.close()
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert scalars(tmp_path)["train/loss"] == [(1, 1.0)]


# ---- metrics.png --------------------------------------------------------------------------------------


def test_the_plot_is_replaced_whole_and_leaves_no_temporary(tmp_path):
    from mixer_jax.metrics import plot_metrics

    recs = [_train(s, 2.0 / s) for s in range(1, 6)] + [{"step": 5, "eval_accuracy": 0.5, "eval_top5": 0.9,
                                                          "eval_loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "metrics.png").write_bytes(b"an older picture")
    plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "metrics.png"]
