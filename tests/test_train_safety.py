"""The training stack's guard rails, piece by piece: config validation and --set conflicts, the
metrics log's repair, the non-finite guard, checkpoint fallback, resume-config rule, Ctrl-C."""
import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, requires_jax, subprocess_env

pytestmark = requires_jax


def tiny(**kw):
    from tests_config import tiny_digits
    return dataclasses.replace(tiny_digits(), **kw)


# ---- config values: every bad one names its key and the allowed range -----------------------------

BAD_VALUES = [
    ("log_every=0", "log_every must be an integer >= 1"),
    ("eval_batch_size=-1", "eval_batch_size must be an integer >= 0"),
    ("keep_checkpoints=0", "keep_checkpoints must be an integer >= 1"),
    ("eval_every=-1", "eval_every must be an integer >= 0"),
    ("checkpoint_every=-5", "checkpoint_every must be an integer >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be an integer >= 0"),
    ("optim.b2=2", "optim.b2 must be a number in [0, 1)"),
    ("optim.momentum=nan", "optim.momentum must be a number in [0, 1)"),
    ("optim.grad_clip=nan", "optim.grad_clip must be a finite number >= 0"),
    ("optim.lr=nan", "optim.lr must be a finite number > 0"),
    ("optim.lr=-1", "optim.lr must be a finite number > 0"),
    ("mixup_alpha=nan", "mixup_alpha must be a finite number >= 0"),
    ("data.crop_area=nan", "data.crop_area must be two numbers lo,hi with 0 < lo <= hi <= 1"),
    ("data.crop_area=0,0", "data.crop_area must be two numbers"),
    ("data.crop_area=0.9,0.2", "data.crop_area must be two numbers"),
    ("seed=-1", "seed must be an integer >= 0"),
    ("label_smoothing=1", "label_smoothing must be a number in [0, 1)"),
    ("optim.name=lamb", "optim.name must be 'sgd' or 'adam'"),
    ("data.train_augment=rotate", "data.train_augment must be"),
]


@pytest.mark.parametrize("assignment,message", BAD_VALUES)
def test_every_bad_config_value_is_refused_naming_the_key_and_range(assignment, message):
    from mixer_jax.configs import get_config, override, validate

    cfg = override(get_config("digits"), [assignment])
    with pytest.raises(ValueError, match="bad training config") as e:
        validate(cfg, num_devices=1)
    assert message in str(e.value)


def test_the_named_configs_are_valid():
    from mixer_jax.configs import CONFIGS, validate

    for name, make in CONFIGS.items():
        validate(make(), num_devices=1)


@pytest.mark.parametrize("section", ["model", "data", "optim"])
def test_a_whole_section_cannot_be_replaced_by_a_value(section):
    from mixer_jax.configs import get_config, override

    with pytest.raises(ValueError, match=f"'{section}' is a section, not a value; set its fields, e.g. {section}\\."):
        override(get_config("digits"), [f"{section}=5"])


def test_model_fields_the_data_decides_cannot_be_set():
    from mixer_jax.configs import get_config, override

    with pytest.raises(ValueError, match="model.num_classes cannot be set: it is decided by the dataset"):
        override(get_config("digits"), ["model.num_classes=7"])
    with pytest.raises(ValueError, match=r"model.image_size cannot be set: it is decided by data.image_size"):
        override(get_config("digits"), ["model.image_size=64"])


def test_with_init_from_only_regularisation_model_fields_can_be_set():
    from mixer_jax.configs import get_config, override

    with pytest.raises(ValueError, match="model.hidden_dim cannot be set together with init_from: the checkpoint "
                                         "decides the architecture"):
        override(get_config("finetune"), ["init_from=m.npz", "model.hidden_dim=16"])
    cfg = override(get_config("finetune"), ["model.stoch_depth=0.1", "model.dropout_rate=0.1", "init_from=m.npz"])
    assert (cfg.model.stoch_depth, cfg.model.dropout_rate) == (0.1, 0.1)


@pytest.mark.parametrize("assignment", [a for a, _ in BAD_VALUES] + ["model=5", "data=x", "optim=x", "steps=many",
                                                                     "nosuchkey=1", "model.num_classes=3"])
def test_a_bad_value_on_the_command_line_is_one_line_and_exit_2(assignment, tmp_path, capsys):
    from mixer_jax.cli import main

    assert main(["--workdir", str(tmp_path / "w"), "--set", assignment]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixer-train: error: ") and err.count("\n") == 1, err
    assert assignment.split("=")[0] in err and not (tmp_path / "w").exists()


# ---- metrics log ----------------------------------------------------------------------------------


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


# ---- checkpoints: fingerprint, fallback, config on resume -------------------------------------------


def _state(value: float):
    import jax.numpy as jnp
    return {"w": jnp.full((64, 64), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def _abstract(tree):
    import jax
    import orbax.checkpoint as ocp
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def _flip_a_byte_in_the_largest_file(step_dir: Path) -> None:
    f = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped byte", "deleted state", "wrong fingerprint"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage):
    from mixer_jax.checkpointing import Checkpointer

    ck = Checkpointer(tmp_path / "ck", keep=3, is_main=True)
    for step in (4, 8):
        ck.save(step, _state(step), {"config": {}})
    ck.close()
    if damage == "flipped byte":
        _flip_a_byte_in_the_largest_file(tmp_path / "ck" / "8" / "state")
    elif damage == "deleted state":
        import shutil
        shutil.rmtree(tmp_path / "ck" / "8" / "state")
    else:
        meta = tmp_path / "ck" / "8" / "meta" / "metadata"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "fingerprint": "0" * 64}))
    notes = []
    ck = Checkpointer(tmp_path / "ck", keep=3, is_main=True, report=notes.append)
    step, state, meta = ck.restore_latest(_abstract(_state(0)))
    assert step == 4 and float(state["w"][0, 0]) == 4.0
    assert any("checkpoint step 8 is damaged" in n for n in notes)
    assert any(p.name.startswith("corrupt-8-") for p in (tmp_path / "ck").iterdir())  # moved aside, not deleted
    ck.save(8, _state(8), {"config": {}})  # the step can be written again
    assert ck.steps() == [4, 8]
    ck.close()


def test_when_no_checkpoint_is_intact_the_run_refuses_to_start_over(tmp_path):
    from mixer_jax.checkpointing import Checkpointer, CheckpointError

    ck = Checkpointer(tmp_path / "ck", keep=3, is_main=True)
    ck.save(4, _state(4), {"config": {}})
    ck.close()
    _flip_a_byte_in_the_largest_file(tmp_path / "ck" / "4" / "state")
    ck = Checkpointer(tmp_path / "ck", keep=3, is_main=True, report=lambda s: None)
    with pytest.raises(CheckpointError, match="no intact checkpoint .* refusing to start over"):
        ck.restore_latest(_abstract(_state(0)))
    ck.close()
    assert any(p.name.startswith("corrupt-4-") for p in (tmp_path / "ck").iterdir())


def test_resume_config_changes_that_change_the_run_are_listed_and_refused():
    from mixer_jax.checkpointing import ResumeConfigError, check_resume_config, config_changes, jsonable

    a = jsonable(tiny())
    b = jsonable(tiny(steps=20, log_every=1, eval_every=3, optim=dataclasses.replace(tiny().optim, lr=0.5)))
    assert config_changes(a, b) == ["optim.lr: 0.05 -> 0.5", "steps: 8 -> 20"]  # log/eval cadence may change
    with pytest.raises(ResumeConfigError, match="optim.lr: 0.05 -> 0.5; steps: 8 -> 20. .*--allow-config-change"):
        check_resume_config(a, b, 4, allow_change=False)
    notes = []
    check_resume_config(a, b, 4, allow_change=True, report=notes.append)
    assert notes and notes[0].startswith("warning:")


@pytest.mark.slow
def test_resuming_with_other_steps_is_refused_then_allowed_with_the_flag(tmp_path):
    from mixer_jax.checkpointing import ResumeConfigError
    from mixer_jax.train import train_and_evaluate

    train_and_evaluate(tiny(steps=2, checkpoint_every=2), tmp_path / "w", progress=False)
    with pytest.raises(ResumeConfigError, match="steps: 2 -> 4"):
        train_and_evaluate(tiny(steps=4), tmp_path / "w", progress=False)
    res = train_and_evaluate(tiny(steps=4), tmp_path / "w", progress=False, allow_config_change=True)
    assert res.step == 4 and [h["step"] for h in res.history] == [3, 4]


# ---- init_from: which head; ~ in paths -----------------------------------------------------------


def _tiny_checkpoint(path, num_classes):
    from mixer_convert import config_for, random_params

    cfg = config_for("S/16", patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64,
                     image_size=16, num_classes=num_classes)
    flat = random_params(cfg, 0)
    np.savez(path, **flat)
    return flat


def test_init_from_keeps_a_head_of_the_right_size_and_replaces_any_other(tmp_path):
    from mixer_jax.model import params_to_flat
    from mixer_jax.train import load_init_params

    same = _tiny_checkpoint(tmp_path / "ten.npz", 10)
    params, cfg = load_init_params(tiny(init_from=str(tmp_path / "ten.npz")), num_classes=10)
    np.testing.assert_array_equal(params_to_flat(params)["head/kernel"], same["head/kernel"])
    _tiny_checkpoint(tmp_path / "other.npz", 21)
    params, cfg = load_init_params(tiny(init_from=str(tmp_path / "other.npz")), num_classes=10)
    head = params_to_flat(params)["head/kernel"]
    assert cfg.num_classes == 10 and head.shape == (32, 10) and not head.any()


def test_a_tilde_in_workdir_and_init_from_means_home(tmp_path, monkeypatch):
    from mixer_jax.train import train_and_evaluate

    monkeypatch.setenv("HOME", str(tmp_path))
    _tiny_checkpoint(tmp_path / "m.npz", 10)
    res = train_and_evaluate(tiny(steps=1, init_from="~/m.npz"), "~/runs/w", progress=False)
    assert res.step == 1 and (tmp_path / "runs" / "w" / "model.npz").exists()


# ---- Ctrl-C ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_resumes(tmp_path):
    args = ["--config", "digits", "--workdir", str(tmp_path / "w"), "--quiet", "--set", "steps=400",
            "--set", "log_every=1", "--set", "eval_every=0", "--set", "checkpoint_every=0",
            "--set", "model.num_blocks=1", "--set", "model.hidden_dim=16", "--set", "data.image_size=16"]
    code = "import sys; from mixer_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=subprocess_env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in p.stdout:
        if line.startswith("step 5:"):
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert 5 <= step < 400 and (tmp_path / "w" / "checkpoints" / str(step)).is_dir()
    resume = err.split("Resume with: ")[1].strip()
    assert resume.startswith("mixer-train --config digits --workdir ")
    assert not (tmp_path / "w" / "model.npz").exists()  # an interrupted run exports nothing
    logged = [json.loads(line)["step"] for line in open(tmp_path / "w" / "metrics.jsonl")]
    assert logged == sorted(logged) and logged[-1] == step
