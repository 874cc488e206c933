"""mixer_torch.model (the PyTorch Mixer): its state dict follows the spec by the one naming rule,
the official initialisers, timm's attributes (features, head, reset_classifier), loading without a
wasted random init, exact export back to canonical weights, and bad image shapes named."""
import numpy as np
import pytest

from conftest import images, requires_torch
from helpers.checkpoints import TINY as CFG
from helpers.models import small_cfg
from mixer_convert import config_for, param_shapes, random_params
from mixer_convert.layouts import LAYOUTS

pytestmark = requires_torch


@requires_torch
@pytest.mark.slow
def test_torch_state_dict_follows_the_spec_by_the_one_rule():
    from mixer_torch import create_model

    lay = LAYOUTS["torch"]
    for cfg in (config_for("B/16"), small_cfg(), small_cfg(num_classes=None)):
        sd = create_model(cfg).state_dict()
        want = {lay.key_to(k): lay.shape_to(k, s) for k, s in param_shapes(cfg).items()}
        assert {k: tuple(v.shape) for k, v in sd.items()} == want


@requires_torch
def test_torch_init_matches_the_official_initialisers():
    from mixer_torch import create_model

    m = create_model("S/32", num_classes=10)
    assert not m.head.weight.any() and not m.head.bias.any()
    w = m.MixerBlock_0.channel_mixing.Dense_0.weight
    assert abs(w.std().item() * np.sqrt(512) - 1) < 0.05
    assert w.abs().max().item() <= 2 / np.sqrt(512) / 0.8796 + 1e-6  # truncated at 2 sd
    assert not m.MixerBlock_0.token_mixing.Dense_0.bias.any()
    assert (m.pre_head_layer_norm.weight == 1).all()


@requires_torch
def test_torch_features_head_and_reset_classifier():
    import torch
    from mixer_torch import create_model

    m = create_model(small_cfg()).eval()
    x = torch.from_numpy(images(2, 64, 96).transpose(0, 3, 1, 2).copy())
    feats = m.forward_features(x)
    assert feats.shape == (2, 6, 64)
    assert torch.equal(m.forward_head(feats, pre_logits=True), feats.mean(1))
    m.reset_classifier(5)
    assert m(x).shape == (2, 5) and not m(x).any() and m.config.num_classes == 5
    m.reset_classifier(None)
    assert m(x).shape == (2, 64) and "head.weight" not in m.state_dict()


@requires_torch
@pytest.mark.parametrize("shape, match", [
    ((2, 3, 64, 90), "not divisible by the patch size"),
    ((2, 3, 96, 64), "does not match the model's 64x96"),
    ((2, 4, 64, 96), "expected 3 input channels"),
    ((2, 64, 96, 3), "expected 3 input channels"),  # NHWC handed to the NCHW model
])
def test_torch_bad_image_shapes_raise_naming_the_problem(shape, match):
    import torch
    from mixer_torch import create_model

    with pytest.raises(ValueError, match=match):
        create_model(small_cfg())(torch.zeros(shape))


@requires_torch
def test_torch_load_then_export_is_exact_and_keeps_bf16():
    import ml_dtypes
    import torch
    from mixer_convert import random_params
    from mixer_torch import MlpMixer, load_flat, to_flat

    cfg = small_cfg()
    flat = random_params(cfg, 0)
    back = to_flat(load_flat(MlpMixer(cfg), flat))
    assert back.keys() == flat.keys() and all(np.array_equal(back[k], flat[k]) for k in flat)
    bf = to_flat(load_flat(MlpMixer(cfg), flat).to(torch.bfloat16))
    assert bf["stem/kernel"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(bf["stem/kernel"], flat["stem/kernel"].astype(ml_dtypes.bfloat16))


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
