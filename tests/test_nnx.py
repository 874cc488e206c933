"""The Flax NNX model (mixer_jax.nnx): the official parameter paths, bit-identical to Linen (forward,
every intermediate, gradients), within PyTorch's bounds, built from checkpoints through the one
loading path without random initialisation, NNX's train/eval conventions, NNX states saved by
users read back into all three models, NNX states written by ``mixer-convert --to nnx``,
checkpoints crossing between the two Flax APIs, and scan / remat / placement computing the same
function (against the plain model and Linen's same settings)."""
import numpy as np
import pytest

from conftest import has_module, images, requires_jax, requires_torch
from mixer_convert import ParamMismatchError, config_for, intermediate_names, param_shapes, random_params
from mixer_convert.save import write_params

pytestmark = requires_jax

TINY = config_for("S/16", image_size=(32, 48), hidden_dim=24, num_blocks=3, tokens_mlp_dim=8, channels_mlp_dim=40,
                  num_classes=5)  # a 2x3 patch grid
CONFIGS = {
    "non-square": TINY,
    "headless": TINY.replace(image_size=(32, 32), num_classes=None),
    "non-square patches, one channel": config_for("S/16", patch_size=(4, 8), image_size=(16, 32), in_chans=1,
                                                  hidden_dim=16, num_blocks=2, tokens_mlp_dim=12,
                                                  channels_mlp_dim=20, num_classes=3),
}
WITH_HEAD = [name for name, cfg in CONFIGS.items() if cfg.num_classes]


def fast_only(names, fast):
    """``names`` as parameters, all but ``fast`` marked slow: each behaviour keeps one fast case."""
    return [n if n == fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


def _x(cfg, batch=2, seed=1):
    return images(batch, *cfg.image_size, seed=seed, c=cfg.in_chans)


def _npz(tmp_path, cfg, seed=0, name="w.npz"):
    flat = random_params(cfg, seed)
    write_params(flat, tmp_path / name, fmt="npz")
    return tmp_path / name, flat


def assert_same_arrays(a, b):
    assert set(a) == set(b)
    for k in a:
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype and np.array_equal(a[k], b[k]), k


# ---- the parameter tree ------------------------------------------------------------------------


@pytest.mark.parametrize("name", fast_only(CONFIGS, "headless"))
def test_param_state_has_exactly_the_official_paths_and_shapes(name):
    from flax import nnx
    from mixer_jax.nnx import create_model

    cfg = CONFIGS[name]
    model = create_model(cfg, rngs=0)
    got = {"/".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert got == param_shapes(cfg)
    # without dropout or stochastic depth there is no RNG state: the model's state is its parameters
    assert len(nnx.to_flat_state(nnx.state(model))) == len(got)


@pytest.mark.parametrize("variant", fast_only(["S/32", "B/16", "H/14"], "S/32"))
def test_published_variants_have_the_official_paths_without_building_them(variant):
    from flax import nnx
    from mixer_jax.nnx import MlpMixer

    cfg = config_for(variant)
    abstract = nnx.eval_shape(lambda: MlpMixer(cfg, rngs=nnx.Rngs(0)))
    got = {"/".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    assert got == param_shapes(cfg)


def test_fresh_weights_follow_the_official_initialisers():
    from mixer_jax.nnx import create_model, state_to_flat

    flat = state_to_flat(create_model("S/32", num_blocks=1, num_classes=10, rngs=0))
    assert not flat["head/kernel"].any() and not flat["head/bias"].any()
    assert not flat["stem/bias"].any() and (flat["pre_head_layer_norm/scale"] == 1).all()
    w = flat["MixerBlock_0/channel_mixing/Dense_0/kernel"]
    assert abs(w.std() * np.sqrt(512) - 1) < 0.05 and np.abs(w).max() <= 2 / np.sqrt(512) / 0.8796 + 1e-6


def test_compute_dtype_leaves_the_parameters_float32():
    import jax.numpy as jnp
    from mixer_jax.nnx import from_flat, state_to_flat

    model = from_flat(random_params(TINY, 0), TINY, dtype=jnp.bfloat16)
    assert {v.dtype for v in state_to_flat(model).values()} == {np.dtype(np.float32)}
    assert model(_x(TINY)).dtype == jnp.bfloat16


def test_mixer_jax_exposes_the_nnx_module_lazily():
    import mixer_jax

    assert mixer_jax.nnx.MlpMixer.__module__ == "mixer_jax.nnx"


# ---- exactness: NNX against Linen and PyTorch --------------------------------------------------------

FAST_PAIRS = {("non-square", "float32"), ("non-square patches, one channel", "bfloat16")}


@pytest.mark.parametrize("name, dtype", [(n, d) if (n, d) in FAST_PAIRS else pytest.param(n, d, marks=pytest.mark.slow)
                                         for n in CONFIGS for d in ("float32", "bfloat16")])
def test_logits_and_every_intermediate_are_bit_identical_to_linen(name, dtype):
    from mixer_convert.tools.parity import flax_forward, nnx_forward

    cfg = CONFIGS[name]
    flat, x = random_params(cfg, 1), _x(cfg, 3)
    linen, nnx = flax_forward(cfg, flat, x, dtype), nnx_forward(cfg, flat, x, dtype)
    assert set(nnx) == set(intermediate_names(cfg)) == set(linen)
    assert_same_arrays(linen, nnx)


@pytest.mark.parametrize("name", fast_only(WITH_HEAD, "non-square patches, one channel"))
def test_cross_entropy_gradients_are_bit_identical_to_linen(name):
    from mixer_convert.tools.parity import flax_grads, nnx_grads

    cfg = CONFIGS[name]
    flat, x = random_params(cfg, 2), _x(cfg, 4)
    labels = np.arange(4) % cfg.num_classes
    linen, nnx = flax_grads(cfg, flat, x, labels), nnx_grads(cfg, flat, x, labels)
    assert set(nnx) == set(param_shapes(cfg))
    assert max(float(np.abs(g).max()) for g in nnx.values()) > 1e-3  # not trivially zero
    assert_same_arrays(linen, nnx)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["S/32", "B/16"])
def test_full_size_variants_are_bit_identical_to_linen(variant):
    from mixer_convert.tools.parity import flax_forward, flax_grads, nnx_forward, nnx_grads

    cfg = config_for(variant)
    flat, x = random_params(cfg, 3), _x(cfg, 2)
    assert_same_arrays(flax_forward(cfg, flat, x), nnx_forward(cfg, flat, x))
    labels = np.array([0, 999])
    assert_same_arrays(flax_grads(cfg, flat, x, labels), nnx_grads(cfg, flat, x, labels))


@requires_torch
@pytest.mark.parametrize("name", fast_only(CONFIGS, "non-square"))
def test_nnx_is_within_the_pytorch_parity_bounds(name):
    from mixer_convert.tools.parity import (FP32_LOGITS_MAX_ABS, FP32_REL, GRAD_ATOL_GLOBAL, GRAD_RTOL, compare,
                                            compare_params, first_divergence, nnx_forward, nnx_grads,
                                            torch_forward, torch_grads)

    cfg = CONFIGS[name]
    flat, x = random_params(cfg, 4), _x(cfg, 3)
    rows = compare(nnx_forward(cfg, flat, x), torch_forward(cfg, flat, x), cfg)
    assert first_divergence(rows, FP32_REL) is None and rows[-1].max_abs <= FP32_LOGITS_MAX_ABS
    if cfg.num_classes:
        labels = np.arange(3) % cfg.num_classes
        g = compare_params(nnx_grads(cfg, flat, x, labels), torch_grads(cfg, flat, x, labels))
        big = max(r.scale for r in g)
        assert all(r.max_abs <= GRAD_RTOL * r.scale + GRAD_ATOL_GLOBAL * big for r in g)


def test_a_model_from_an_official_npz_matches_the_float64_reference(tmp_path):
    from mixer_convert.reference import forward
    from mixer_jax.nnx import from_checkpoint

    cfg = config_for("S/16", image_size=(48, 32), hidden_dim=64, num_blocks=4, tokens_mlp_dim=16,
                     channels_mlp_dim=128, num_classes=10)
    path, flat = _npz(tmp_path, cfg, 5)
    x = _x(cfg, 3)
    got = np.asarray(from_checkpoint(path, image_size=(48, 32))(x), np.float64)
    ref = forward(flat, cfg, x)
    assert np.abs(ref).max() > 0.1 and np.abs(got - ref).max() < 1e-4


# ---- building from checkpoints ---------------------------------------------------------------------


def test_from_checkpoint_runs_no_random_initialiser(tmp_path, monkeypatch):
    import jax
    from jax._src import random as jax_random  # what jax.nn.initializers (lecun_normal) draws from
    from mixer_jax.nnx import create_model, from_checkpoint, state_to_flat

    concrete = []
    draw = jax_random.truncated_normal

    def spy(*args, **kwargs):
        out = draw(*args, **kwargs)
        concrete.append(not isinstance(out, jax.core.Tracer))
        return out
    monkeypatch.setattr(jax_random, "truncated_normal", spy)
    create_model(TINY, rngs=0)
    assert concrete and all(concrete)  # the spy sees a real initialisation...
    concrete.clear()
    path, flat = _npz(tmp_path, TINY)
    model = from_checkpoint(path, image_size=(32, 48))
    assert concrete and not any(concrete)  # ...and loading only traced one (shapes, no numbers)
    assert_same_arrays(state_to_flat(model), flat)


def test_a_missing_or_misshaped_key_is_refused_listing_every_one():
    from mixer_jax.nnx import flat_to_state, from_flat

    flat = random_params(TINY, 0)
    del flat["MixerBlock_1/LayerNorm_0/scale"]
    flat["head/bias"] = np.zeros(6, np.float32)
    flat["extra/kernel"] = np.zeros(1, np.float32)
    for build in (from_flat, flat_to_state):
        with pytest.raises(ParamMismatchError) as e:
            build(flat, TINY)
        msg = str(e.value)
        assert "missing (1): MixerBlock_1/LayerNorm_0/scale" in msg and "unexpected (1): extra/kernel" in msg
        assert "mis-shaped: head/bias has (6,), model needs (5,)" in msg


def test_state_and_flat_dict_convert_both_ways_exactly():
    import ml_dtypes
    from flax import nnx
    from mixer_jax.nnx import flat_to_state, from_flat, state_to_flat

    flat = random_params(TINY, 6)
    state = flat_to_state(flat, TINY)
    assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(state))
    assert_same_arrays(state_to_flat(state), {k: flat[k] for k in sorted(flat)})
    from_model = state_to_flat(from_flat(flat, TINY))
    assert_same_arrays(from_model, flat)
    assert list(from_model) == list(param_shapes(TINY))  # a model's in model order, as Linen's params_to_flat
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in flat.items()}
    assert_same_arrays(state_to_flat(from_flat(bf16, TINY)), {k: v.astype(np.float32) for k, v in bf16.items()})


def test_from_checkpoint_takes_the_linen_arguments_with_the_same_result(tmp_path):
    import mixer_jax
    from mixer_jax.model import params_to_flat
    from mixer_jax.nnx import from_checkpoint, state_to_flat

    cfg = TINY.replace(image_size=(32, 32))
    flat = random_params(cfg, 7)
    np.savez(tmp_path / "p.npz", **{f"params/{k}": v for k, v in flat.items()},
             **{f"opt/1/{k}": v for k, v in flat.items()})
    kw = dict(num_classes=9, scale=2, prefix="params/", stoch_depth=0.1)
    model = from_checkpoint(tmp_path / "p.npz", **kw)
    linen_model, linen_params = mixer_jax.from_checkpoint(tmp_path / "p.npz", **kw)
    assert model.config == linen_model.config and model.config.image_size == (64, 64)
    assert_same_arrays(state_to_flat(model), params_to_flat(linen_params))


def test_published_names_go_through_the_one_loading_path(tmp_path):
    from mixer_jax.nnx import create_model, from_pretrained, state_to_flat

    path, flat = _npz(tmp_path, TINY.replace(image_size=(32, 32)), 8)
    assert_same_arrays(state_to_flat(from_pretrained(str(path))), flat)
    with pytest.raises(ValueError, match="not B/16"):  # pretrained= is checked against the variant named
        create_model("B/16", pretrained=str(path))


# ---- train / eval ------------------------------------------------------------------------------------


@pytest.mark.slow  # ~20 s; NNX's training mode is in the fast tier through test_models.py's stochastic depth
def test_eval_mode_equals_linen_and_training_draws_fresh_masks_each_call():
    import jax
    from flax import nnx
    from mixer_convert.tools.parity import flax_forward
    from mixer_jax.nnx import from_flat

    cfg = TINY.replace(stoch_depth=0.5, dropout_rate=0.2)
    flat, x = random_params(cfg, 9), _x(cfg, 8)
    model = from_flat(flat, cfg, rngs=3)
    assert not model.MixerBlock_2.deterministic  # NNX's convention: built for training
    train = nnx.jit(lambda m, x: m(x))
    a, b = np.asarray(train(model, x)), np.asarray(train(model, x))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, np.asarray(train(from_flat(flat, cfg, rngs=3), x)))  # the seed fixes the masks
    once = nnx.jit(lambda m, x, key: m(x, rngs=nnx.Rngs(dropout=key)))  # call-time rngs, as nnx.Dropout takes
    key = jax.random.key(5)
    assert np.array_equal(once(model, x, key), once(model, x, key)) and not np.array_equal(once(model, x, key), a)
    with jax.default_matmul_precision("highest"):
        ev = nnx.jit(lambda m, x: m(x))(nnx.view(model, deterministic=True), x)
    linen = flax_forward(cfg, flat, x)["logits"]
    np.testing.assert_array_equal(np.asarray(ev), linen)
    model.eval()
    assert np.array_equal(model(x), model(x)) and np.array_equal(model(x), model(x, deterministic=True))
    model.train()
    assert not np.array_equal(model(x), model(x, deterministic=True))


@pytest.mark.slow  # ~9 s of eager NNX calls
def test_each_stochastic_module_keeps_its_own_mode():
    from flax import nnx
    from mixer_jax.nnx import MixerBlock, from_flat

    cfg = TINY.replace(dropout_rate=0.2)  # dropout only, no stochastic depth
    model = from_flat(random_params(cfg, 9), cfg)
    x = _x(cfg, 4)
    ev = np.asarray(model(x, deterministic=True))
    assert not np.array_equal(nnx.view(model, only=MixerBlock, deterministic=True)(x), ev)  # Dropouts still drop
    np.testing.assert_array_equal(nnx.view(model, only=nnx.Dropout, deterministic=True)(x), ev)


# ---- NNX states saved by users, read through the one loading path --------------------------------


def _nnx_model_with_rng_state():
    from mixer_jax.nnx import from_flat

    cfg = TINY.replace(stoch_depth=0.3, dropout_rate=0.1)  # RNG streams beside the weights
    return from_flat(random_params(cfg, 10), cfg, rngs=1)


def _save_orbax(path, tree, standard: bool):
    import orbax.checkpoint as ocp

    if standard:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(path, tree)
        ckptr.wait_until_finished()
    else:
        ocp.PyTreeCheckpointer().save(path, tree)


def _save_msgpack(path, tree):
    from flax import serialization

    path.write_bytes(serialization.msgpack_serialize(tree))


def _saves():
    import jax
    from flax import nnx

    def pure_with_key_data(state):  # typed PRNG keys do not serialise; their data does
        return nnx.to_pure_dict(state, lambda v: jax.random.key_data(v.get_value())
                                if isinstance(v, nnx.RngKey) else v.get_value())
    return {
        "orbax standard, nnx.state(model)": lambda m, p: _save_orbax(p, nnx.state(m), True),
        "orbax standard, nnx.state(model, nnx.Param)": lambda m, p: _save_orbax(p, nnx.state(m, nnx.Param), True),
        "orbax pytree, nnx.state(model)": lambda m, p: _save_orbax(p, nnx.state(m), False),
        "orbax, nnx.to_pure_dict(nnx.state(model))": lambda m, p: _save_orbax(p, nnx.to_pure_dict(nnx.state(m)), True),
        "msgpack, pure dict of nnx.state(model, nnx.Param)":
            lambda m, p: _save_msgpack(p, nnx.to_pure_dict(nnx.state(m, nnx.Param))),
        "msgpack, pure dict of nnx.state(model), key data":
            lambda m, p: _save_msgpack(p, pure_with_key_data(nnx.state(m))),
    }


SAVES = ["orbax standard, nnx.state(model)", "orbax standard, nnx.state(model, nnx.Param)",
         "orbax pytree, nnx.state(model)", "orbax, nnx.to_pure_dict(nnx.state(model))",
         "msgpack, pure dict of nnx.state(model, nnx.Param)", "msgpack, pure dict of nnx.state(model), key data"]


@pytest.mark.parametrize("save", [s if s in (SAVES[0], SAVES[-1]) else pytest.param(s, marks=pytest.mark.slow)
                                  for s in SAVES])  # one orbax and one msgpack save in the fast tier
def test_a_saved_nnx_state_loads_into_every_model_bit_exactly(tmp_path, save):
    from mixer_convert.load import load_checkpoint
    from mixer_jax.nnx import state_to_flat

    model = _nnx_model_with_rng_state()
    path = tmp_path / ("state.msgpack" if save.startswith("msgpack") else "state_orbax")
    _saves()[save](model, path)
    want = state_to_flat(model)
    flat, cfg = load_checkpoint(path, image_size=(32, 48))
    assert cfg == TINY
    assert_same_arrays(flat, want)
    for load in _loaders():
        assert_same_arrays(load(path, image_size=(32, 48)), want)


def _loaders():
    """Each model's from_checkpoint, as canonical numpy (PyTorch's where torch is installed)."""
    import mixer_jax
    from mixer_jax.model import params_to_flat
    from mixer_jax.nnx import from_checkpoint, state_to_flat

    out = [lambda p, **kw: params_to_flat(mixer_jax.from_checkpoint(p, **kw)[1]),
           lambda p, **kw: state_to_flat(from_checkpoint(p, **kw))]
    if has_module("torch"):
        import mixer_torch
        out.append(lambda p, **kw: mixer_torch.to_flat(mixer_torch.from_checkpoint(p, **kw)))
    return out


def test_mixer_convert_reads_a_saved_nnx_state(tmp_path):
    from flax import nnx
    from mixer_convert.tools.bridge import convert_checkpoint
    from mixer_jax.nnx import state_to_flat

    model = _nnx_model_with_rng_state()
    _save_orbax(tmp_path / "state", nnx.state(model), True)
    convert_checkpoint(tmp_path / "state", tmp_path / "out.npz", image_size=(32, 48), progress=False)
    with np.load(tmp_path / "out.npz") as z:
        assert_same_arrays({k: z[k] for k in z.files}, state_to_flat(model))


# ---- NNX states written by mixer-convert --to nnx, and checkpoints crossing between the Flax APIs ----


def _restore_into_abstract_model(path, cfg):
    """NNX's own way to restore: orbax's StandardCheckpointer into the state of nnx.eval_shape's model."""
    import orbax.checkpoint as ocp
    from flax import nnx
    from mixer_jax.nnx import MlpMixer

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MlpMixer(cfg, rngs=nnx.Rngs(0))))
    return graphdef, ocp.StandardCheckpointer().restore(path.absolute(), abstract)


def test_to_nnx_writes_the_orbax_state_nnx_restores_and_it_computes_linens_logits(tmp_path, capsys):
    import json

    import mixer_jax
    import orbax.checkpoint as ocp
    from flax import nnx
    from mixer_convert.tools.cli import main
    from mixer_jax.nnx import create_model, from_flat, state_to_flat

    path, flat = _npz(tmp_path, TINY)
    assert main([str(path), str(tmp_path / "state"), "--to", "nnx", "--image-size", "32", "48", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "(orbax, nnx naming)" in out and "read back: bit-identical" in out and "Flax NNX model vs numpy" in out
    graphdef, state = _restore_into_abstract_model(tmp_path / "state", TINY)
    model = nnx.merge(graphdef, state)
    linen, params = mixer_jax.from_checkpoint(path, image_size=(32, 48))
    x = _x(TINY)
    want = np.asarray(linen.apply({"params": params}, x))
    np.testing.assert_array_equal(np.asarray(model(x)), want)
    other = create_model(TINY, rngs=5)  # into an existing model, in place
    nnx.update(other, state)
    np.testing.assert_array_equal(np.asarray(other(x)), want)
    assert_same_arrays(state_to_flat(model), flat)
    # the tree NNX itself saves (key for key; orbax records the arrays' type: numpy here, jax.Array there)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save((tmp_path / "own").absolute(), nnx.state(from_flat(flat, TINY)))
    ckptr.wait_until_finished()
    trees = [json.loads((tmp_path / d / "_METADATA").read_text())["tree_metadata"] for d in ("state", "own")]
    assert {k: v["key_metadata"] for k, v in trees[0].items()} == {k: v["key_metadata"] for k, v in trees[1].items()}
    # and mixer-convert reads it back, bit-exactly
    assert main([str(tmp_path / "state"), str(tmp_path / "back.npz"), "--image-size", "32", "48", "--quiet"]) == 0
    with np.load(tmp_path / "back.npz") as z:
        assert_same_arrays({k: z[k] for k in z.files}, flat)


def test_to_nnx_msgpack_is_the_pure_dict_nnx_saves_byte_for_byte(tmp_path):
    from flax import nnx, serialization
    from mixer_convert.tools.bridge import convert_checkpoint
    from mixer_jax.nnx import create_model, from_flat

    path, flat = _npz(tmp_path, TINY)
    rep = convert_checkpoint(path, tmp_path / "nnx.msgpack", "nnx", image_size=(32, 48), progress=False)
    convert_checkpoint(path, tmp_path / "flax.msgpack", "flax", image_size=(32, 48), progress=False)
    written = (tmp_path / "nnx.msgpack").read_bytes()
    assert rep.fmt == "msgpack" and written == (tmp_path / "flax.msgpack").read_bytes()
    model = from_flat(flat, TINY)
    assert written == serialization.msgpack_serialize(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    restored = create_model(TINY, rngs=5)
    state = nnx.state(restored, nnx.Param)
    nnx.replace_by_pure_dict(state, serialization.msgpack_restore(written))  # NNX's documented restore
    nnx.update(restored, state)
    np.testing.assert_array_equal(np.asarray(restored(_x(TINY))), np.asarray(model(_x(TINY))))


def test_to_nnx_refuses_a_file_suffix_it_cannot_hold(tmp_path):
    from mixer_convert.formats import output_format
    from mixer_convert.tools.cli import main

    path, _ = _npz(tmp_path, TINY)
    with pytest.raises(ValueError, match=r"--to nnx writes an orbax folder or a .msgpack file, not a .npz file"):
        output_format(tmp_path / "x.npz", "nnx")
    assert main([str(path), str(tmp_path / "x.safetensors"), "--to", "nnx", "--quiet"]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def _linen_saves():
    """A Linen model's params saved the ways Flax users save them."""
    from flax import serialization

    def orbax(params, p):
        _save_orbax(p, params, True)

    def msgpack(params, p):
        p.write_bytes(serialization.to_bytes(params))
    return {"orbax standard": ("linen_orbax", orbax), "flax.serialization.to_bytes": ("linen.msgpack", msgpack)}


@pytest.mark.parametrize("save", ["orbax standard", "flax.serialization.to_bytes"])
def test_a_linen_checkpoint_loads_into_nnx_and_an_nnx_one_into_linen(tmp_path, save):
    import mixer_jax
    from flax import nnx
    from mixer_jax.model import params_from_flat, params_to_flat
    from mixer_jax.nnx import from_checkpoint, from_flat, state_to_flat

    flat, x = random_params(TINY, 11), _x(TINY)
    linen, params = mixer_jax.create_model(TINY), params_from_flat(flat, TINY)
    name, write = _linen_saves()[save]
    write(params, tmp_path / name)
    model = from_checkpoint(tmp_path / name, image_size=(32, 48))  # Linen -> NNX
    assert_same_arrays(state_to_flat(model), flat)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(linen.apply({"params": params}, x)))
    # NNX -> Linen: the state NNX saves (orbax; or the pure dict in msgpack)
    nnx_model = from_flat(flat, TINY)
    back = tmp_path / ("nnx.msgpack" if name.endswith(".msgpack") else "nnx_orbax")
    if back.suffix:
        _save_msgpack(back, nnx.to_pure_dict(nnx.state(nnx_model, nnx.Param)))
    else:
        _save_orbax(back, nnx.state(nnx_model), True)
    linen2, params2 = mixer_jax.from_checkpoint(back, image_size=(32, 48))
    assert_same_arrays(params_to_flat(params2), flat)
    np.testing.assert_array_equal(np.asarray(linen2.apply({"params": params2}, x)), np.asarray(nnx_model(x)))


# ---- scan, remat, placement: how the function is computed, not the function ------------------------

REMATS = ["none", "block", "dots_saveable"]


def _scaled_model(api, scan, remat, dtype="float32"):
    """(intermediates, cross-entropy gradients as official flat numpy) of TINY's model with random
    weights and head (the official zero head would make both comparisons vacuous), fp32 at full
    precision; api 'nnx' or 'linen', computed once per setting."""
    key = (api, scan, remat, dtype)
    if key not in _SCALED:
        _SCALED[key] = _nnx_scaled(scan, remat, dtype) if api == "nnx" else _linen_scaled(scan, remat, dtype)
    return _SCALED[key]


_SCALED: dict = {}
_LABELS = np.arange(4) % TINY.num_classes


def _ce(logits, labels):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits.astype("float32"), labels).mean()


def _nnx_scaled(scan, remat, dtype):
    import jax
    from flax import nnx
    from mixer_jax.nnx import from_flat, state_to_flat

    model = from_flat(random_params(TINY, 12), TINY, dtype=dtype, scan=scan, remat=remat)
    model.eval()
    with jax.default_matmul_precision("highest"):
        _, inter = nnx.jit(lambda m, x: m(x, return_intermediates=True))(model, _x(TINY, 4))
        grads = nnx.jit(nnx.grad(lambda m, x, y: _ce(m(x), y)))(model, _x(TINY, 4), _LABELS)
    return {k: np.asarray(v, np.float32) for k, v in inter.items()}, state_to_flat(grads)


def _linen_scaled(scan, remat, dtype):
    import jax
    from mixer_jax.model import MlpMixer, params_from_flat, params_to_flat
    from mixer_jax.stacking import stack_blocks, unstack_blocks

    model = MlpMixer(TINY, dtype=dtype, scan=scan, remat=remat)
    params = params_from_flat(random_params(TINY, 12), TINY)
    params = stack_blocks(params) if scan else params
    with jax.default_matmul_precision("highest"):
        _, inter = jax.jit(lambda p, x: model.apply({"params": p}, x, return_intermediates=True))(params, _x(TINY, 4))
        grads = jax.jit(jax.grad(lambda p, x, y: _ce(model.apply({"params": p}, x), y)))(params, _x(TINY, 4), _LABELS)
    return {k: np.asarray(v, np.float32) for k, v in inter.items()}, params_to_flat(unstack_blocks(grads))


@pytest.mark.parametrize("remat", fast_only(REMATS, "dots_saveable"))
def test_remat_unscanned_logits_intermediates_and_gradients_are_bit_identical_to_the_plain_model_and_linen(remat):
    inter, grads = _scaled_model("nnx", False, remat)
    plain_inter, plain_grads = _scaled_model("nnx", False, "none")
    assert set(inter) == set(intermediate_names(TINY)) and set(grads) == set(param_shapes(TINY))
    assert max(float(np.abs(g).max()) for g in grads.values()) > 1e-3  # not trivially zero
    assert_same_arrays(inter, plain_inter)
    assert_same_arrays(grads, plain_grads)
    linen_inter, linen_grads = _scaled_model("linen", False, remat)
    assert_same_arrays(inter, linen_inter)
    assert_same_arrays(grads, linen_grads)


@pytest.mark.parametrize("remat", fast_only(REMATS, "none"))
def test_scan_logits_and_intermediates_are_bit_identical_gradients_within_fp32_order_and_bit_identical_to_linen(remat):
    """Scanned, XLA may sum a gradient in another order (fp32 rounding: on the CPU a few
    token-mixing biases by ~1e-8 without remat, none with it); Linen's scan is bit for bit the same."""
    inter, grads = _scaled_model("nnx", True, remat)
    plain_inter, plain_grads = _scaled_model("nnx", False, "none")
    assert_same_arrays(inter, plain_inter)
    assert set(grads) == set(plain_grads)
    big = max(float(np.abs(g).max()) for g in plain_grads.values())
    for k, g in grads.items():
        want = plain_grads[k]
        assert np.abs(g - want).max() <= 1e-4 * np.abs(want).max() + 1e-6 * big, k
    linen_inter, linen_grads = _scaled_model("linen", True, remat)
    assert_same_arrays(inter, linen_inter)
    assert_same_arrays(grads, linen_grads)


@pytest.mark.parametrize("scan, remat", [(True, "block"), pytest.param(False, "dots_saveable", marks=pytest.mark.slow)])
def test_scan_and_remat_in_bfloat16_are_within_5e_2_of_the_plain_model(scan, remat):
    inter, _ = _scaled_model("nnx", scan, remat, "bfloat16")
    plain, _ = _scaled_model("nnx", False, "none", "bfloat16")
    for k, want in plain.items():
        assert np.abs(inter[k] - want).max() <= 5e-2 * np.abs(want).max(), k


def test_a_scanned_model_holds_linens_scanned_tree_and_converts_to_the_official_names():
    import jax
    from flax import nnx
    from flax.traverse_util import flatten_dict
    from mixer_jax.model import MlpMixer as Linen
    from mixer_jax.nnx import abstract_model, create_model, flat_to_state, from_flat, state_to_flat

    linen = jax.eval_shape(lambda: Linen(TINY, scan=True).init(jax.random.key(0), _x(TINY, 1)))["params"]
    want = {"/".join(k): v.shape for k, v in flatten_dict(linen).items()}
    assert want["MixerBlock/LayerNorm_0/scale"] == (3, 24) and "MixerBlock_0/LayerNorm_0/scale" not in want
    for model in (abstract_model(TINY, scan=True), create_model(TINY, rngs=0, scan=True, remat="block")):
        got = {"/".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        assert got == want
    flat = random_params(TINY, 13)
    model = from_flat(flat, TINY, scan=True)  # official in, stacked inside, official out (in model order)
    assert_same_arrays(state_to_flat(model), flat) and list(state_to_flat(model)) == list(param_shapes(TINY))
    assert_same_arrays(state_to_flat(flat_to_state(flat, TINY, scan=True)), flat)
    assert_same_arrays(state_to_flat(nnx.state(model, nnx.Param)), flat)
    assert_same_arrays(state_to_flat(from_flat(flat, TINY, remat="block")), flat)  # remat: the official paths


def test_from_checkpoint_builds_a_scanned_model_from_an_official_file(tmp_path):
    from mixer_jax.nnx import from_checkpoint, state_to_flat

    path, flat = _npz(tmp_path, TINY, 14)
    model = from_checkpoint(path, image_size=(32, 48), scan=True, remat="block")
    assert model.MixerBlock.token_mixing.Dense_0.kernel.shape == (3, 6, 8)
    assert_same_arrays(state_to_flat(model), flat)


def _dropped_fraction(model, x, cfg):
    """Per block, the fraction of samples whose channel-mixing branch was dropped (the weights make
    token mixing add nothing, so a block's output equals its input exactly where it was)."""
    import jax
    from flax import nnx

    _, inter = nnx.jit(lambda m, x: m(x, return_intermediates=True))(model, x)
    names = ["stem"] + [f"MixerBlock_{i}" for i in range(cfg.num_blocks)]
    return [float(np.mean(np.all(np.asarray(inter[a] == inter[b]), axis=(1, 2)))) for a, b in zip(names, names[1:])]


def test_a_scanned_model_keeps_each_blocks_stochastic_depth_rate():
    """Masks: other random numbers than the unscanned model's (one stream per block, every block
    drawing), the same rate per block: block 0 never dropped, the last at ``stoch_depth``."""
    from mixer_convert.spec import block_drop_rates
    from mixer_jax.nnx import from_flat

    cfg = TINY.replace(image_size=(16, 16), num_blocks=3, stoch_depth=0.6)
    flat = random_params(cfg, 15)
    flat = {k: v * 0 if k.endswith(("token_mixing/Dense_1/kernel", "token_mixing/Dense_1/bias")) else v
            for k, v in flat.items()}
    x, n = _x(cfg, 512), 512
    for scan in (False, True):
        model = from_flat(flat, cfg, rngs=16, scan=scan, remat="block")
        got = _dropped_fraction(model, x, cfg)
        for rate, frac in zip(block_drop_rates(cfg), got):
            assert abs(frac - rate) <= 4 * np.sqrt(rate * (1 - rate) / n), (scan, got)
        assert got[0] == 0
        model.eval()
        assert _dropped_fraction(model, x, cfg) == [0.0] * cfg.num_blocks


def test_scanned_and_rematerialised_models_keep_nnx_train_eval_and_rngs_conventions():
    """Remat draws the plain model's random numbers; a scanned model other ones, reproducibly."""
    import jax
    from flax import nnx
    from mixer_jax.nnx import from_flat

    cfg = TINY.replace(stoch_depth=0.5, dropout_rate=0.2)
    flat, x, key = random_params(cfg, 17), _x(cfg, 4), jax.random.key(5)
    train = nnx.jit(lambda m, x: m(x))
    once = nnx.jit(lambda m, x, key: m(x, rngs=nnx.Rngs(dropout=key)))
    plain = from_flat(flat, cfg, rngs=3)
    want_train, want_once = train(plain, x), once(plain, x, key)
    remat = from_flat(flat, cfg, rngs=3, remat="block")
    np.testing.assert_array_equal(train(remat, x), want_train)
    np.testing.assert_array_equal(once(remat, x, key), want_once)
    scanned = from_flat(flat, cfg, rngs=3, scan=True, remat="dots_saveable")
    a, b = train(scanned, x), train(scanned, x)
    assert not np.array_equal(a, b) and not np.array_equal(a, want_train)  # fresh masks each call
    np.testing.assert_array_equal(train(from_flat(flat, cfg, rngs=3, scan=True, remat="dots_saveable"), x), a)
    assert np.array_equal(once(scanned, x, key), once(scanned, x, key))
    plain.eval()
    want_eval = train(plain, x)
    np.testing.assert_array_equal(train(nnx.view(scanned, deterministic=True), x), want_eval)
    scanned.eval()
    np.testing.assert_array_equal(train(scanned, x), want_eval)
    scanned.train()
    assert not np.array_equal(train(scanned, x), want_eval)


PLACED = """
import numpy as np, jax
from flax import nnx
from jax.sharding import NamedSharding
from mixer_convert import config_for, random_params
from mixer_jax.nnx import from_flat
from mixer_jax.sharding import BATCH, Placement, make_mesh, state_shardings

cfg = config_for("S/16", image_size=(32, 48), hidden_dim=24, num_blocks=3, tokens_mlp_dim=8, channels_mlp_dim=40,
                 num_classes=5)
flat, mesh = random_params(cfg, 18), make_mesh(-1, 4)  # data 2 x fsdp 4
x = np.random.default_rng(1).uniform(-1, 1, (8, 32, 48, 3)).astype(np.float32)
call = nnx.jit(lambda m, x: m(x))
for scan in (False, True):
    want = np.asarray(call(from_flat(flat, cfg, scan=scan), x))
    model = from_flat(flat, cfg, scan=scan, remat="block", placement=Placement(mesh))
    nnx.update(model, jax.device_put(nnx.state(model), state_shardings(nnx.state(model), mesh, min_bytes=0)))
    params = lambda: [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    before = params()
    assert any("fsdp" in tuple(p.sharding.spec) for p in before)
    xs = jax.device_put(x, NamedSharding(mesh, BATCH))
    got = np.asarray(call(model, xs))
    assert np.abs(got - want).max() <= 1e-6, (scan, np.abs(got - want).max())
    assert "all-gather" in call.lower(model, xs).compile().as_text()  # the weights gathered where used...
    before = params()
    model(xs)  # eagerly: the model's parameters stay the very arrays they were, not gathered copies
    assert all(a is b for a, b in zip(before, params()))
print("ok")
"""


def test_a_placed_model_on_8_devices_gives_the_logits_of_the_unplaced_one():
    """FSDP on 8 simulated CPU devices (a child process: the device count is fixed at JAX's start),
    scanned and not, params sharded by the FSDP rule: the same logits within 1e-6, and the state
    keeps its shardings (the gathered weights are not written back)."""
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", PLACED], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_a_scanned_rematerialised_model_trains_through_nnx_fns_merged_inside_jit():
    """The training steps' way (mixer_jax.steps.nnx_fns): the model merged inside ``jax.jit`` from
    state held outside it, call-time rngs for the masks; its own streams are left untouched."""
    import jax
    from flax import nnx
    from mixer_jax.nnx import abstract_model, flat_to_state
    from mixer_jax.steps import nnx_fns

    cfg = TINY.replace(stoch_depth=0.5, dropout_rate=0.1)
    fns = nnx_fns(abstract_model(cfg, scan=True, remat="block"), init=None)
    params = nnx.to_pure_dict(flat_to_state(random_params(cfg, 19), cfg, scan=True))
    loss = jax.jit(lambda p, x, key: _ce(fns.apply(p, x, True, key), _LABELS))
    x, key = _x(cfg, 4), jax.random.key(0)
    assert float(loss(params, x, key)) == float(loss(params, x, key)) != float(loss(params, x, jax.random.key(1)))
    grads = jax.jit(jax.grad(loss))(params, x, key)
    assert grads["MixerBlock"]["token_mixing"]["Dense_0"]["kernel"].shape == (3, 6, 8)
