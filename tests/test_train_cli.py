"""mixer-train's command line (mixer_jax.cli): one-line errors with exit code 2, NaN weights
refused before anything is compiled, Ctrl-C saving a checkpoint with exit code 130 (either Flax API)."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, requires_jax, subprocess_env
from helpers.training import BAD_VALUES

pytestmark = requires_jax


def test_cli_rejects_a_bad_override_with_exit_code_2(tmp_path, capsys):
    from mixer_jax.cli import main
    assert main(["--workdir", str(tmp_path), "--set", "batch_sise=3"]) == 2
    assert "unknown config key 'batch_sise'" in capsys.readouterr().err


@pytest.mark.parametrize("assignment", [a for a, _ in BAD_VALUES] + ["model=5", "data=x", "optim=x", "steps=many",
                                                                     "nosuchkey=1", "model.num_classes=3",
                                                                     "compute_dtype=bfloat16", "model.variant=Z/3",
                                                                     "data.image_size=0"])
def test_a_bad_value_on_the_command_line_is_one_line_and_exit_2(assignment, tmp_path, capsys):
    from mixer_jax.cli import main

    assert main(["--workdir", str(tmp_path / "w"), "--set", assignment]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixer-train: error: ") and err.count("\n") == 1, err
    assert assignment.split("=")[0] in err and not (tmp_path / "w").exists()


def test_nan_weights_in_init_from_are_refused_at_load_in_one_line(tmp_path, capsys, monkeypatch):
    from mixer_convert import config_for, random_params
    from mixer_jax import train
    from mixer_jax.cli import main

    cfg = config_for("S/16", patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64,
                     image_size=32, num_classes=10)
    flat = random_params(cfg, 0)
    flat["MixerBlock_1/token_mixing/Dense_0/kernel"][0, :3] = np.nan
    np.savez(tmp_path / "nan_weights.npz", **flat)
    monkeypatch.setattr(train, "build_state", lambda *a: pytest.fail("refused only after building the state"))
    argv = ["--workdir", str(tmp_path / "w"), "--quiet", "--set", f"init_from={tmp_path}/nan_weights.npz"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"mixer-train: error: {tmp_path}/nan_weights.npz: MixerBlock_1/token_mixing/Dense_0/kernel: 3 of "
                   "1024 values are NaN or Inf (--set init_allow_nonfinite=true trains from them anyway)\n")
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_resumes(tmp_path, api):
    args = ["--config", "digits", "--workdir", str(tmp_path / "w"), "--quiet", "--set", "steps=400",
            "--set", f"model.api={api}",
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
