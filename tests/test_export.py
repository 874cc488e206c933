"""The PyTorch model for timm users and deployment: timm's attributes, loading without a wasted
random init, torch.jit.script, torch.export, ONNX (checked with onnxruntime) and torch.compile."""
import numpy as np
import pytest

from conftest import has_module, images, requires_torch
from mixer_convert import config_for, random_params
from mixer_convert.reference import forward

pytestmark = requires_torch
CFG = config_for("S/16", image_size=48, hidden_dim=24, num_blocks=3, tokens_mlp_dim=8, channels_mlp_dim=40,
                 num_classes=5)


@pytest.fixture
def model_and_input():
    import torch
    from mixer_torch import MlpMixer, load_flat

    flat = random_params(CFG, 0)
    x = images(2, 48, 48)
    return load_flat(MlpMixer(CFG), flat).eval(), torch.from_numpy(x.transpose(0, 3, 1, 2)), forward(flat, CFG, x)


def test_timm_attributes():
    from torch import nn

    from mixer_torch import create_model

    assert config_for("mixer_b32_224") == config_for("B/32")  # timm's model names are accepted
    m = create_model(CFG, num_classes=7)
    assert m.num_classes == 7 and m.num_features == 24 and m.get_classifier() is m.head
    assert m.get_classifier().out_features == 7
    m.reset_classifier(0)
    assert m.num_classes == 0 and isinstance(m.get_classifier(), nn.Identity)
    m.reset_classifier(3, global_pool="avg")
    assert m.num_classes == 3
    with pytest.raises(ValueError, match="mean over tokens"):
        m.reset_classifier(3, global_pool="max")


def test_loading_skips_the_random_init_and_gives_ordinary_float32_parameters(tmp_path, monkeypatch):
    import ml_dtypes
    import torch

    import mixer_torch.model as tm
    from mixer_convert.save import write_params

    flat = random_params(CFG, 0)
    write_params({k: v.astype(ml_dtypes.bfloat16) for k, v in flat.items()}, tmp_path / "bf16.safetensors",
                 fmt="safetensors")

    def no_init(*a, **k):
        raise AssertionError("random init ran for weights that loading overwrites")
    monkeypatch.setattr(tm, "lecun_normal_", no_init)
    m = tm.from_checkpoint(tmp_path / "bf16.safetensors")
    params = dict(m.named_parameters())
    assert params.keys() == m.state_dict().keys() and len(params) == len(flat)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" and p.requires_grad and p.is_contiguous()
               for p in params.values())
    np.testing.assert_array_equal(params["MixerBlock_1.channel_mixing.Dense_0.weight"].detach().numpy(),
                                  flat["MixerBlock_1/channel_mixing/Dense_0/kernel"].astype(ml_dtypes.bfloat16)
                                  .astype(np.float32).T)
    m.train()(torch.zeros(1, 3, 48, 48)).sum().backward()  # trainable as built
    assert m.head.weight.grad is not None


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
