"""The PyTorch model deployed: torch.jit.script, torch.export with a dynamic batch, ONNX (run
with onnxruntime) and torch.compile all give the float64 reference's logits."""
import numpy as np
import pytest

from conftest import has_module, images, requires_torch
from helpers.checkpoints import TINY as CFG
from mixer_convert import random_params
from mixer_convert.reference import forward

pytestmark = requires_torch


@pytest.fixture
def model_and_input():
    import torch
    from mixer_torch import MlpMixer, load_flat

    flat = random_params(CFG, 0)
    x = images(2, 48, 48)
    return load_flat(MlpMixer(CFG), flat).eval(), torch.from_numpy(x.transpose(0, 3, 1, 2)), forward(flat, CFG, x)


def test_torch_jit_script_keeps_names_and_outputs(model_and_input, tmp_path):
    import torch

    model, x, ref = model_and_input
    scripted = torch.jit.script(model)
    assert list(scripted.state_dict()) == list(model.state_dict())
    scripted.save(str(tmp_path / "m.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.load(str(tmp_path / "m.pt"))(x).numpy(), ref, atol=1e-5)


def test_torch_export_with_a_dynamic_batch(model_and_input):
    import torch

    model, x, ref = model_and_input
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    with torch.no_grad():
        np.testing.assert_allclose(ep.module()(x).numpy(), ref, atol=1e-5)
        np.testing.assert_allclose(ep.module()(x[:1]).numpy(), ref[:1], atol=1e-5)


@pytest.mark.slow  # the ONNX exporter: ~5 s
@pytest.mark.skipif(not (has_module("onnx") and has_module("onnxscript") and has_module("onnxruntime")),
                    reason="needs the onnx extra (onnx, onnxscript, onnxruntime)")
def test_onnx_export_runs_in_onnxruntime_with_our_logits(model_and_input, tmp_path):
    import onnxruntime
    import torch

    model, x, ref = model_and_input
    torch.onnx.export(model, (x,), tmp_path / "m.onnx", dynamo=True, input_names=["images"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
    sess = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for n in (2, 1):
        got = sess.run(["logits"], {"images": x[:n].numpy()})[0]
        np.testing.assert_allclose(got, ref[:n], atol=1e-5)


@pytest.mark.slow  # inductor compiles C++ on CPU: about a minute on a 2-core machine
def test_torch_compile_gives_the_same_logits(model_and_input):
    import torch

    model, x, ref = model_and_input
    with torch.no_grad():
        np.testing.assert_allclose(torch.compile(model)(x).numpy(), ref, atol=1e-5)
