"""mixer_convert.tools.verify (convert_checkpoint(verify=True), --verify): the output read back
bit for bit, the logits of a framework's model on it against the float64 reference within a
printed tolerance, a failure beyond it leaving no output, and NaN/Inf weights warned about once."""
import numpy as np
import pytest

from conftest import requires_jax, requires_torch
from helpers.checkpoints import TINY
from mixer_convert import random_params
from mixer_convert.tools.bridge import convert_checkpoint


@pytest.mark.parametrize("to", [pytest.param("torch", marks=requires_torch), pytest.param("flax", marks=requires_jax),
                                "safetensors"])
def test_verify_reports_bit_identical_readback_and_tiny_logit_error(official, tmp_path, to):
    src, _ = official
    suffix = {"torch": ".pt", "flax": ".msgpack", "safetensors": ".safetensors"}[to]
    rep = convert_checkpoint(src, tmp_path / f"out{suffix}", None if to == "safetensors" else to,
                             verify=True, progress=False)
    assert rep.verification.readback_exact is True
    assert rep.verification.logits_max_abs < 1e-4
    assert "max-abs" in rep.summary()


def test_verify_prints_its_tolerance_and_fails_beyond_it(official, tmp_path, monkeypatch):
    from mixer_convert.tools import bridge

    src, _ = official
    rep = convert_checkpoint(src, tmp_path / "a.safetensors", verify=True, progress=False)
    assert f"(tolerance {rep.verification.logits_tolerance:.1e})" in rep.summary() \
        and rep.verification.logits_tolerance >= 1e-4
    from mixer_convert.tools import verify
    real = verify._framework_forward
    monkeypatch.setattr(verify, "_framework_forward", lambda *a: (real(*a)[0] + 1e-2, "a forward off by 1e-2"))
    with pytest.raises(bridge.VerificationError, match=r"differ by 1.00\de-02, more than the tolerance 1.0e-04"):
        convert_checkpoint(src, tmp_path / "b.safetensors", verify=True, progress=False)
    assert not (tmp_path / "b.safetensors").exists()


def test_verify_with_allowed_nan_warns_once_per_tensor(tmp_path):
    flat = random_params(TINY, 0)
    flat["stem/bias"][0] = np.inf
    np.savez(tmp_path / "inf.npz", **flat)
    with pytest.warns(UserWarning):
        rep = convert_checkpoint(tmp_path / "inf.npz", tmp_path / "o.safetensors", allow_nonfinite=True, verify=True,
                                 progress=False)
    assert rep.warnings == ["stem/bias: 1 of 24 values are NaN or Inf"] and rep.verification.readback_exact


@pytest.mark.parametrize("layout, names, framework", [
    pytest.param("torch", "our PyTorch model", "torch", marks=requires_torch),
    pytest.param("timm", "our PyTorch model", "torch", marks=requires_torch),
    pytest.param("flax", "our Flax model", "flax", marks=requires_jax),
    pytest.param("nnx", "our Flax NNX model", "flax", marks=requires_jax),
    ("torch", "numpy reference on the written file", None), ("flax", "numpy reference on the written file", None)])
def test_each_naming_is_verified_with_its_frameworks_model_or_else_the_numpy_reference(layout, names, framework,
                                                                                        monkeypatch):
    from mixer_convert import reference
    from mixer_convert.tools import verify
    from mixer_convert.tools.verify import probe_images

    if framework is None:
        monkeypatch.setattr(verify, "importable", lambda module: False)
    flat, cfg = random_params(TINY, 0), TINY
    x = probe_images(cfg)
    logits, what = verify._framework_forward(flat, cfg, layout, x)
    assert what.startswith(names) and logits.shape == (2, cfg.num_classes)
    np.testing.assert_allclose(logits, reference.forward(flat, cfg, x), rtol=0, atol=1e-4)
