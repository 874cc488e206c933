"""Every model alike (Linen, NNX, PyTorch): each loads a non-square checkpoint in every format
given its image size and names both sizes when one contradicts it; stochastic depth (big_vision's
rule) and dropout behave the same way in each.

big_vision: block i drops each residual branch per sample with p_i = i/(n-1) * stoch_depth
and does NOT rescale the kept branch. So in training a sample whose branches are both
kept gives exactly the eval-mode output, and one whose branches are both dropped passes
the block's input through unchanged.
"""
import numpy as np
import pytest

from conftest import images, requires_jax, requires_torch
from helpers.checkpoints import NON_SQUARE, bf16_npz
from mixer_convert import config_for, param_shapes, random_params




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


# ---- regularisation: stochastic depth and dropout ------------------------------------------------------


CFG = config_for("S/32", image_size=64, num_blocks=2, stoch_depth=0.5, num_classes=3)


N = 256


def _check_train_outputs(eval_inter, train_inter):
    b0_eval, b1_eval = eval_inter["MixerBlock_0"], eval_inter["MixerBlock_1"]
    # block 0 has p=0: never dropped.
    np.testing.assert_allclose(train_inter["MixerBlock_0"], b0_eval, atol=1e-5)
    b1 = train_inter["MixerBlock_1"]
    kept = np.all(np.isclose(b1, b1_eval, atol=1e-5), axis=(1, 2))
    dropped = np.all(np.isclose(b1, b0_eval, atol=1e-5), axis=(1, 2))
    # P(both kept) = P(both dropped) = 1/4 at p=0.5; binomial(256, .25) sd is about 7.
    assert 30 < kept.sum() < 100 and 30 < dropped.sum() < 100, (kept.sum(), dropped.sum())


@requires_jax
def test_flax_stochastic_depth_is_per_sample_and_not_rescaled():
    import jax
    from mixer_jax import MlpMixer, params_from_flat

    model = MlpMixer(CFG)
    params = params_from_flat(random_params(CFG, 0), CFG)
    x = np.repeat(images(1, 64, 64), N, axis=0)
    _, ev = model.apply({"params": params}, x, return_intermediates=True)
    _, tr = model.apply({"params": params}, x, train=True, return_intermediates=True,
                        rngs={"dropout": jax.random.PRNGKey(0)})
    _check_train_outputs({k: np.asarray(v) for k, v in ev.items()}, {k: np.asarray(v) for k, v in tr.items()})


@requires_jax
def test_nnx_stochastic_depth_is_per_sample_and_not_rescaled():
    from flax import nnx
    from mixer_jax.nnx import from_flat

    model = from_flat(random_params(CFG, 0), CFG, rngs=0)
    x = np.repeat(images(1, 64, 64), N, axis=0)
    _, ev = model(x, deterministic=True, return_intermediates=True)
    _, tr = nnx.jit(lambda m, x: m(x, return_intermediates=True))(model, x)  # built in training mode (NNX)
    _check_train_outputs({k: np.asarray(v) for k, v in ev.items()}, {k: np.asarray(v) for k, v in tr.items()})


@requires_torch
def test_torch_stochastic_depth_is_per_sample_and_not_rescaled():
    import torch
    from mixer_torch import MlpMixer, load_flat

    torch.manual_seed(0)
    model = load_flat(MlpMixer(CFG), random_params(CFG, 0))
    x = torch.from_numpy(np.repeat(images(1, 64, 64), N, axis=0).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        _, ev = model.eval()(x, return_intermediates=True)
        _, tr = model.train()(x, return_intermediates=True)
    _check_train_outputs({k: v.numpy() for k, v in ev.items()}, {k: v.numpy() for k, v in tr.items()})


@pytest.mark.slow  # three models compiled for training: ~6 s
@requires_jax
@requires_torch
def test_dropout_acts_only_in_training_in_every_model():
    import jax
    import torch
    from mixer_jax import MlpMixer as JM, params_from_flat
    from mixer_jax.nnx import from_flat
    from mixer_torch import MlpMixer as TM, load_flat

    cfg = CFG.replace(stoch_depth=0.0, dropout_rate=0.3)
    flat = random_params(cfg, 0)
    x = images(4, 64, 64)
    jm, jp = JM(cfg), params_from_flat(flat, cfg)
    tm = load_flat(TM(cfg), flat)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        t_eval, t_train = tm.eval()(xt).numpy(), tm.train()(xt).numpy()
    j_eval = np.asarray(jm.apply({"params": jp}, x))
    j_train = np.asarray(jm.apply({"params": jp}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)}))
    np.testing.assert_allclose(j_eval, t_eval, atol=1e-4)
    assert np.abs(j_train - j_eval).max() > 1e-2 and np.abs(t_train - t_eval).max() > 1e-2
    nm = from_flat(flat, cfg, rngs=1)
    n_train, n_eval = np.asarray(nm(x)), np.asarray(nm(x, deterministic=True))
    np.testing.assert_array_equal(n_eval, j_eval)  # eager, op by op, as the Linen apply above
    assert np.abs(n_train - n_eval).max() > 1e-2
