"""mixer-parity: gradients agree, the report passes on agreeing models (Linen, NNX and PyTorch), fails on a
broken one."""
import json

import numpy as np
import pytest

from conftest import images, requires_jax, requires_torch
from mixer_convert import config_for, random_params

pytestmark = [requires_jax, requires_torch]
# Each report runs the models several times (5-10 s): the fast tier runs one (NNX vs PyTorch) and
# the usage errors; the others are slow.


@pytest.mark.slow  # the fast tier compares gradients through test_nnx.py (Linen, NNX, PyTorch)
def test_loss_gradients_agree_for_every_parameter():
    from mixer_convert.tools.parity import compare_params, flax_grads, torch_grads
    from mixer_convert.tools.parity import GRAD_ATOL_GLOBAL, GRAD_RTOL

    cfg = config_for("S/16", image_size=64, num_classes=10)
    flat = random_params(cfg, 0)
    x, y = images(4, 64, 64), np.array([0, 3, 3, 9])
    rows = compare_params(flax_grads(cfg, flat, x, y), torch_grads(cfg, flat, x, y))
    assert len(rows) == len(flat)
    big = max(r.scale for r in rows)
    assert big > 1e-3  # gradients are not trivially zero
    for r in rows:
        assert r.max_abs <= GRAD_RTOL * r.scale + GRAD_ATOL_GLOBAL * big, r


@pytest.mark.slow
def test_token_mixing_output_bias_gradient_is_zero_as_the_bound_assumes():
    """Each token-mixing Dense_1 bias adds a per-token constant across channels; every consumer
    is a LayerNorm over channels, which removes it. The reference says so too."""
    from mixer_convert.tools.parity import flax_grads

    cfg = config_for("S/16", image_size=64, num_classes=10)
    g = flax_grads(cfg, random_params(cfg, 1), images(2, 64, 64), np.array([1, 2]))
    big = max(float(np.abs(v).max()) for v in g.values())
    assert float(np.abs(g["MixerBlock_3/token_mixing/Dense_1/bias"]).max()) < 1e-6 * big
    assert float(np.abs(g["MixerBlock_3/token_mixing/Dense_0/bias"]).max()) > 1e-3 * big


@pytest.mark.slow
def test_report_passes_writes_json_and_names_every_block(tmp_path, capsys):
    from mixer_convert.tools.parity_report import main

    assert main(["--variant", "S/32", "--image-size", "64", "64", "--no-timm", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "MixerBlock_7" in out and "S/32: PASS" in out
    for pair in ("Linen vs PyTorch", "NNX vs PyTorch"):
        assert f"gradients fp32, {pair} (102 parameters): ok" in out
    assert "gradients fp32, NNX vs Linen: bit-identical (102 arrays): ok" in out
    r = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    assert set(r["checks"]) == {"forward_fp32", "forward_bf16", "grads_fp32", "nnx_forward_fp32", "nnx_forward_bf16",
                                "nnx_grads_fp32", "nnx_linen_forward_fp32", "nnx_linen_forward_bf16",
                                "nnx_linen_grads_fp32"}
    assert all(r["checks"].values()) and all(r["nnx_linen_bitwise"].values())


@pytest.mark.slow
def test_linen_only_report_has_exactly_the_keys_it_always_had(tmp_path, capsys):
    from mixer_convert.tools.parity_report import main

    assert main(["--variant", "S/32", "--image-size", "64", "64", "--no-timm", "--flax-api", "linen",
                 "--json", str(tmp_path / "r.json")]) == 0
    assert "NNX" not in capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())
    report = r["reports"][0]
    assert r["pass"] and set(report["checks"]) == {"forward_fp32", "forward_bf16", "grads_fp32"}
    assert {"forward_fp32", "first_divergence_fp32", "forward_bf16", "grads_fp32", "grads_worst"} <= set(report)


def test_nnx_only_report_checks_nnx_against_pytorch(tmp_path, capsys):
    from mixer_convert.tools.parity_report import main

    assert main(["--variant", "S/32", "--image-size", "64", "64", "--no-timm", "--no-grads", "--flax-api", "nnx",
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "forward fp32, NNX vs PyTorch: ok" in out and "Linen" not in out
    r = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    assert set(r["checks"]) == {"nnx_forward_fp32", "nnx_forward_bf16"} and r["flax_api"] == "nnx"


@pytest.mark.slow
def test_nnx_differing_from_linen_fails_the_report_on_the_cpu(monkeypatch, capsys):
    import mixer_jax.nnx as jn
    from mixer_convert.tools.parity_report import main

    orig = jn.MlpMixer.__call__

    def nudged(self, x, **kw):  # one ulp-sized change: within every PyTorch bound, but not bitwise
        out = orig(self, x, **kw)
        if kw.get("return_intermediates"):
            return out[0], {**out[1], "logits": out[1]["logits"] * (1 + 2 ** -22)}
        return out
    monkeypatch.setattr(jn.MlpMixer, "__call__", nudged)
    assert main(["--variant", "S/32", "--image-size", "64", "64", "--no-timm", "--no-grads", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "forward fp32, NNX vs PyTorch: ok" in out
    assert "forward fp32, NNX vs Linen: not bit-identical, worst logits" in out and "S/32: FAIL" in out


@pytest.mark.slow
def test_report_fails_and_names_the_block_when_pytorch_is_wrong(monkeypatch, capsys):
    import mixer_torch.model as tm
    from mixer_convert.tools.parity_report import main

    orig = tm.MixerBlock.forward

    def broken(self, x):
        out = orig(self, x)
        return out + 1e-3 if getattr(self, "broken", False) else out
    monkeypatch.setattr(tm.MixerBlock, "forward", broken)
    orig_init = tm.MlpMixer.__init__

    def init(self, cfg):
        orig_init(self, cfg)
        self.MixerBlock_4.broken = True
    monkeypatch.setattr(tm.MlpMixer, "__init__", init)
    assert main(["--variant", "S/32", "--image-size", "64", "64", "--no-timm", "--no-grads"]) == 1
    out = capsys.readouterr().out
    for pair in ("Linen vs PyTorch", "NNX vs PyTorch"):
        assert f"forward fp32, {pair}: FAIL (first divergence: MixerBlock_4)" in out
    assert "forward fp32, NNX vs Linen: bit-identical" in out and "S/32: FAIL" in out


@pytest.mark.slow
def test_report_accepts_a_weights_file(tmp_path, capsys):
    from mixer_convert.tools.parity_report import main

    cfg = config_for("S/32", image_size=64, num_classes=5)
    np.savez(tmp_path / "w.npz", **random_params(cfg, 2))
    assert main(["--variant", "S/32", "--weights", str(tmp_path / "w.npz"), "--no-timm", "--no-grads"]) == 0
    assert "w.npz" in capsys.readouterr().out


@pytest.mark.slow
def test_weights_alone_fix_the_architecture_even_a_non_standard_one(tmp_path, capsys):
    """As `mixer-parity --weights runs/digits/model.npz`: the digits model is no published variant."""
    from mixer_convert.spec import MixerConfig
    from mixer_convert.tools.parity_report import main

    cfg = MixerConfig(patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64,
                      image_size=(16, 24), num_classes=10)  # non-square too
    np.savez(tmp_path / "model.npz", **random_params(cfg, 3))
    assert main(["--weights", str(tmp_path / "model.npz"), "--image-size", "16", "24", "--no-timm"]) == 0
    captured = capsys.readouterr()
    assert "== custom  weights:" in captured.out and "at 16x24" in captured.out and "custom: PASS" in captured.out
    stages = [line.split(": ", 1)[1] for line in captured.err.splitlines() if line.startswith("[1/1] ")]
    assert stages[:4] == ["loading weights", "fp32 forward", "bf16 forward", "gradients"] and "PASS" in stages[-1]


@pytest.mark.slow  # every model loads a bfloat16 .npz in the fast tier (test_models.py)
def test_a_bfloat16_npz_as_big_vision_writes_it_is_checked_with_its_own_values(tmp_path, capsys):
    from mixer_convert.tools.parity_report import load_case, main
    from helpers.checkpoints import NON_SQUARE, bf16_npz

    want = bf16_npz(tmp_path / "bf16.npz", NON_SQUARE)  # non-square too: 32x48, 4x4 patches
    _, cfg, flat = load_case(None, str(tmp_path / "bf16.npz"), (32, 48))
    assert cfg == NON_SQUARE and flat.keys() == want.keys()
    assert all(flat[k].dtype == np.float32 and np.array_equal(flat[k], want[k]) for k in want)
    assert main(["--weights", str(tmp_path / "bf16.npz"), "--image-size", "32", "48", "--no-timm", "--no-grads"]) == 0
    assert "custom: PASS" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--variant", "S/32", "--variant", "B/16", "--weights", "{w}"], "--weights takes at most one --variant"),
    (["--variant", "X/7"], "unknown Mixer variant 'X/7'"),
    (["--weights", "{missing}"], "no such checkpoint"),
    (["--weights", "{w}", "--variant", "B/16"], "checkpoint is S/32, not B/16"),
    (["--variant", "S/32", "--batch", "0"], "argument --batch: expected a positive integer, got 0"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, argv, match):
    from mixer_convert.tools.parity_report import main

    np.savez(tmp_path / "w.npz", **random_params(config_for("S/32", image_size=64, num_classes=5), 2))
    argv = [a.format(w=tmp_path / "w.npz", missing=tmp_path / "missing.npz") for a in argv]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert len(err) == 1 and err[0].startswith("mixer-parity: error: ") and match in err[0], err
