"""mixer-demo (mixer_convert.tools.demo): train in Flax, convert with --verify, and the PyTorch model
reproducing the Flax one on the digits' test split; usage errors in one line."""
import pytest

from conftest import has_module
from mixer_convert.tools import demo


def test_a_usage_error_is_one_line_with_exit_2(capsys, tmp_path):
    assert demo.main(["--workdir", str(tmp_path / "w"), "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mixer-demo: error: argument --steps: expected a positive integer, got 0 (see mixer-demo --help)"]
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (has_module("torch") and has_module("optax") and has_module("grain")),
                    reason="needs the train and torch extras")
def test_the_demo_trains_converts_and_the_frameworks_agree(capsys, tmp_path):
    assert demo.main(["--workdir", str(tmp_path / "w"), "--steps", "20", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "[3/3] PyTorch vs Flax on the whole test split" in out and "OK: PyTorch reproduces" in out
    assert (tmp_path / "w" / "model.npz").exists() and (tmp_path / "w" / "model.pt").exists()
