"""The models are built from the one spec: same tree, official initialisers, clear input errors; all three
(Linen, NNX, PyTorch) load every format, non-square grids and big_vision's bfloat16 .npz included."""
import subprocess
import sys

import numpy as np
import pytest

from checkpoint_files import NON_SQUARE, bf16_npz
from conftest import ROOT, images, requires_jax, requires_torch, subprocess_env
from mixer_convert import config_for, param_shapes
from mixer_convert.layouts import LAYOUTS

# Narrow and shallow so that building a model is cheap; the full variants are built in the slow tests.
SMALL = dict(variant="S/32", image_size=(64, 96), num_classes=7, hidden_dim=64, num_blocks=2, tokens_mlp_dim=32,
             channels_mlp_dim=128)


def small_cfg(**kw):
    args = dict(SMALL, **kw)
    return config_for(args.pop("variant"), **args)


# ---- Flax ------------------------------------------------------------------------------------


@requires_jax
@pytest.mark.slow
def test_flax_param_tree_equals_the_spec_exactly():
    from mixer_jax import create_model, init_params, params_to_flat

    for cfg in (config_for("B/16"), small_cfg(), small_cfg(num_classes=None)):
        flat = params_to_flat(init_params(create_model(cfg), 0))
        assert {k: v.shape for k, v in flat.items()} == param_shapes(cfg)


@requires_jax
def test_flax_head_is_zero_initialised_and_kernels_are_lecun_normal():
    from mixer_jax import create_model, init_params, params_to_flat

    flat = params_to_flat(init_params(create_model("S/32", num_classes=10), 0))
    assert not flat["head/kernel"].any() and not flat["head/bias"].any()
    w = flat["MixerBlock_0/channel_mixing/Dense_0/kernel"]
    assert abs(w.std() * np.sqrt(512) - 1) < 0.05


@requires_jax
def test_flax_without_head_returns_pre_logits():
    import jax
    from mixer_jax import create_model, init_params

    model = create_model(small_cfg(num_classes=None))
    out = model.apply({"params": init_params(model, 0)}, images(2, 64, 96))
    assert out.shape == (2, 64)
    assert jax.numpy.isfinite(out).all()


@requires_jax
@pytest.mark.parametrize("shape, match", [
    ((2, 64, 90, 3), "not divisible by the patch size"),
    ((2, 96, 64, 3), "does not match the model's 64x96"),
    ((2, 64, 96, 1), "expected 3 input channels"),
    ((64, 96, 3), "4 dims"),
])
def test_flax_bad_image_shapes_raise_naming_the_problem(shape, match):
    from mixer_jax import create_model, init_params

    model = create_model(small_cfg())
    params = init_params(model, 0)
    with pytest.raises(ValueError, match=match):
        model.apply({"params": params}, np.zeros(shape, np.float32))


# ---- PyTorch ----------------------------------------------------------------------------------


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
@pytest.mark.slow
def test_compat_constructor_keeps_the_original_ports_argument_meanings():
    import torch
    from mixer_torch import MLP_Mixer

    m = MLP_Mixer()  # original defaults: 224x224x3, patch 16, 10 classes, 8 mixers, 512 features
    c = m.config
    assert (c.image_size, c.in_chans, c.patch_size, c.num_classes) == ((224, 224), 3, (16, 16), 10)
    assert (c.num_blocks, c.hidden_dim) == (8, 512)
    assert c.tokens_mlp_dim == int(4 * 196) and c.channels_mlp_dim == int(0.5 * 512)
    assert c.dropout_rate == 0.5
    m2 = MLP_Mixer(image_shape=(64, 32, 1), patch_size=8, num_classes=3, num_mixers=2, num_features=16,
                   expansion_token=0.5, expansion_channel=2, dropout=0.0)
    assert (m2.config.tokens_mlp_dim, m2.config.channels_mlp_dim, m2.config.in_chans) == (16, 32, 1)
    x = torch.randn(4, 1, 64, 32)
    torch.nn.init.normal_(m2.head.weight)
    assert m2.eval()(x).shape == (4, 3)
    with pytest.raises(ValueError, match="not divisible"):
        MLP_Mixer(image_shape=(30, 30, 3), patch_size=16)


@requires_torch
@pytest.mark.slow
def test_module_entry_point_prints_logits_for_a_random_image_like_the_original_script():
    r = subprocess.run([sys.executable, "-m", "mixer_torch.mlp_mixer"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "logits (1, 10)" in r.stdout and "tensor([[" in r.stdout
    assert "RuntimeWarning" not in r.stderr


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


# ---- every model from a non-square checkpoint in every format ----------------------------------------

FORMAT_FILES = {"npz": ("w.npz", None), "msgpack": ("w.msgpack", requires_jax), "orbax": ("w_orbax", requires_jax),
                "torch": ("w.pt", requires_torch), "safetensors": ("w.safetensors", None)}


def _from_checkpoint(model: str):
    """The model's from_checkpoint, returning its weights as canonical numpy."""
    if model == "linen":
        import mixer_jax
        from mixer_jax.model import params_to_flat
        return lambda path, **kw: params_to_flat(mixer_jax.from_checkpoint(path, **kw)[1])
    if model == "nnx":
        from mixer_jax.nnx import from_checkpoint, state_to_flat
        return lambda path, **kw: state_to_flat(from_checkpoint(path, **kw))
    import mixer_torch
    return lambda path, **kw: mixer_torch.to_flat(mixer_torch.from_checkpoint(path, **kw))


MODEL_MARKS = {"linen": requires_jax, "nnx": requires_jax, "torch": requires_torch}


@pytest.mark.parametrize("model", [pytest.param(m, marks=mark) for m, mark in MODEL_MARKS.items()])
@pytest.mark.parametrize("fmt", [pytest.param(f, marks=mark or []) for f, (_, mark) in FORMAT_FILES.items()])
def test_every_model_loads_a_non_square_checkpoint_given_its_image_size(tmp_path, fmt, model):
    from mixer_convert import random_params
    from mixer_convert.save import write_params

    flat = random_params(NON_SQUARE, 0)
    path = write_params(flat, tmp_path / FORMAT_FILES[fmt][0], fmt=fmt)
    load = _from_checkpoint(model)
    with pytest.raises(ValueError, match="checkpoint has 96 tokens, not a square grid; pass image_size"):
        load(path)
    got = load(path, image_size=(32, 48))
    assert got.keys() == flat.keys() and all(np.array_equal(got[k], flat[k]) for k in flat)
    with pytest.raises(ValueError, match=r"image_size 32x32 does not fit the checkpoint: it gives 8x8 = 64 "
                                         r"patches of 4x4, the checkpoint has 96 tokens$"):
        load(path, image_size=(32, 32))


@pytest.mark.parametrize("model", [pytest.param(m, marks=mark) for m, mark in MODEL_MARKS.items()])
def test_a_contradicting_image_size_is_an_error_naming_both_sizes(tmp_path, model):
    from mixer_convert import random_params
    from mixer_convert.save import write_params

    square = NON_SQUARE.replace(image_size=(32, 32))  # 64 tokens: an 8x8 grid
    path = write_params(random_params(square, 1), tmp_path / "sq.npz")
    load = _from_checkpoint(model)
    with pytest.raises(ValueError, match=r"image_size 32x48 does not fit the checkpoint: it gives 8x12 = 96 patches "
                                         r"of 4x4, the checkpoint has 64 tokens \(8x8 patches: 32x32 images\)"):
        load(path, image_size=(32, 48))
    assert load(path, image_size=(32, 32)).keys() == param_shapes(square).keys()


# ---- every model from a bfloat16 .npz as big_vision writes it ----------------------------------------

BF16_GRIDS = {"square": (NON_SQUARE.replace(image_size=(32, 32)), None), "non-square": (NON_SQUARE, (32, 48))}


@pytest.mark.parametrize("model", [pytest.param(m, marks=mark) for m, mark in MODEL_MARKS.items()])
@pytest.mark.parametrize("grid", BF16_GRIDS)
def test_every_model_loads_a_bfloat16_npz_as_big_vision_writes_it(tmp_path, grid, model):
    cfg, image_size = BF16_GRIDS[grid]
    want = bf16_npz(tmp_path / "bf16.npz", cfg)
    got = _from_checkpoint(model)(tmp_path / "bf16.npz", image_size=image_size)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k], np.float32), want[k], err_msg=k)
