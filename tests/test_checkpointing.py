"""mixer_jax.checkpointing: fingerprinted saves, fallback to the newest intact checkpoint, the
rule for resuming under a changed config."""
import dataclasses
import json
from pathlib import Path

import pytest

from conftest import requires_jax

pytestmark = requires_jax


def tiny(**kw):
    from helpers.training import tiny_digits
    return dataclasses.replace(tiny_digits(), **kw)


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
    from mixer_convert.errors import CheckpointError
    from mixer_jax.checkpointing import Checkpointer

    ck = Checkpointer(tmp_path / "ck", keep=3, is_main=True)
    ck.save(4, _state(4), {"config": {}})
    ck.close()
    _flip_a_byte_in_the_largest_file(tmp_path / "ck" / "4" / "state")
    ck = Checkpointer(tmp_path / "ck", keep=3, is_main=True, report=lambda s: None)
    with pytest.raises(CheckpointError, match="no intact checkpoint .* refusing to start over"):
        ck.restore_latest(_abstract(_state(0)))
    ck.close()
    assert any(p.name.startswith("corrupt-4-") for p in (tmp_path / "ck").iterdir())


def test_training_uses_the_cores_one_checkpoint_error():
    import mixer_jax.checkpointing as checkpointing
    from mixer_convert.errors import CheckpointError

    assert checkpointing.CheckpointError is CheckpointError and issubclass(CheckpointError, ValueError)


def test_resume_config_changes_that_change_the_run_are_listed_and_refused():
    from mixer_jax.checkpointing import ResumeConfigError, check_resume_config, config_changes, jsonable

    a = jsonable(tiny())
    b = jsonable(tiny(steps=20, log_every=1, eval_every=3, optim=dataclasses.replace(tiny().optim, lr=0.5)))
    assert config_changes(a, b) == ["optim.lr: 0.05 -> 0.5", "steps: 8 -> 20"]  # log/eval cadence may change
    with pytest.raises(ResumeConfigError, match="optim.lr: 0.05 -> 0.5; steps: 8 -> 20. .*--allow-config-change"):
        check_resume_config(a, b, 4, allow_change=False)
    notes = []
    assert check_resume_config(a, b, 4, allow_change=True, report=notes.append) == config_changes(a, b)
    assert notes and notes[0].startswith("warning:")
    assert check_resume_config(a, a, 4, allow_change=False) == []


def test_a_config_key_only_one_run_has_shows_as_unset():
    from mixer_jax.checkpointing import config_changes

    assert config_changes({"model": {"api": "nnx"}}, {"model": {}}) == ["model.api: 'nnx' -> '(unset)'"]
