"""mixer_convert.layouts: one canonical name per tensor whatever the naming (ours, timm's,
prefixed official trees, big_vision's legacy layout, a saved NNX state), one parameter tree per
file chosen by name, and every ambiguity an error naming what clashes."""
import numpy as np
import pytest

from helpers.checkpoints import TINY, assert_same, load_np
from mixer_convert import ParamMismatchError, random_params
from mixer_convert.load import open_checkpoint, read_params
from mixer_convert.tools.bridge import convert_checkpoint


@pytest.mark.parametrize("prefix", ["params/", "opt/target/"])
def test_prefixed_official_files_are_understood(tmp_path, prefix):
    flat = random_params(TINY, 1)
    extra = {"opt/state/momentum/stem/kernel": np.zeros(3, np.float32)} if prefix == "opt/target/" else {}
    np.savez(tmp_path / "p.npz", **{prefix + k: v for k, v in flat.items()}, **extra)
    convert_checkpoint(tmp_path / "p.npz", tmp_path / "out.npz", progress=False)
    assert_same(load_np(tmp_path / "out.npz"), flat)


def test_big_vision_legacy_layout_is_understood(tmp_path):
    flat = random_params(TINY, 2)
    legacy = {}
    for k, v in flat.items():
        k2 = k.replace("stem/", "embedding/").replace("pre_head_layer_norm/", "Mixer/encoder_norm/")
        k2 = k2.replace("MixerBlock_", "Mixer/encoderblock_").replace("LayerNorm_1", "LayerNorm_2")  # pre-Linen count
        for phase in ("token_mixing", "channel_mixing"):
            for dense, (kn, bn) in (("Dense_0", ("kernel1", "bias1")), ("Dense_1", ("kernel2", "bias2"))):
                if f"/{phase}/{dense}/" in k2:
                    leaf = kn if k2.endswith("kernel") else bn
                    k2 = k2.split(f"/{phase}/")[0] + f"/{phase}_phase_0/{leaf}"
                    v = v[None]  # the legacy layout carried a unit dim
        legacy[k2] = v
    np.savez(tmp_path / "legacy.npz", **legacy)
    convert_checkpoint(tmp_path / "legacy.npz", tmp_path / "out.npz", progress=False)
    assert_same(load_np(tmp_path / "out.npz"), flat)


@pytest.mark.parametrize("layout, extra, names", [
    ("torch", {"module.stem.weight": "stem.weight"}, ("stem.weight", "module.stem.weight")),
    ("torch", {"pre_head_layer_norm.scale": "pre_head_layer_norm.weight"},
     ("pre_head_layer_norm.weight", "pre_head_layer_norm.scale")),
    ("timm", {"module.norm.weight": "norm.weight"}, ("norm.weight", "module.norm.weight")),
    ("flax", {"Mixer/encoder_norm/scale": "pre_head_layer_norm/scale"},
     ("Mixer/encoder_norm/scale", "pre_head_layer_norm/scale")),
])
def test_one_tensor_under_two_names_is_an_error_naming_both(layout, extra, names):
    from mixer_convert.layouts import LAYOUTS, canonicalize, entries_of

    lay = LAYOUTS[layout]
    flat = random_params(TINY, 0)
    named = {lay.key_to(k): lay.value_to(k, v) for k, v in flat.items()}
    named.update({new: np.zeros_like(named[old]) for new, old in extra.items()})  # zeros: last-wins would be silent
    with pytest.raises(ParamMismatchError) as e:
        canonicalize(entries_of(named), layout)
    assert all(repr(n) in str(e.value) for n in names) and "given 2 times" in str(e.value)
    assert e.value.duplicated and not e.value.missing


def test_the_param_tree_is_chosen_by_name_never_by_path_length():
    from mixer_convert.layouts import AmbiguousParamsError, entries_of, select_root

    flat = random_params(TINY, 0)
    zeros = {k: np.zeros_like(v) for k, v in flat.items()}

    def tree(**parts):
        return entries_of({f"{p.replace('__', '/')}/{k}": v for p, vals in parts.items() for k, v in vals.items()})

    for beside in ("opt/1", "opt_state/0/mu", "o"):  # optimizer slots, whatever their length
        chosen = select_root(tree(params=flat, **{beside.replace("/", "__"): zeros}))
        assert set(chosen) == set(flat) and np.array_equal(chosen["stem/kernel"][2](), flat["stem/kernel"])
    chosen = select_root(tree(opt__target=flat, opt__1=zeros))
    assert np.array_equal(chosen["stem/kernel"][2](), flat["stem/kernel"])
    with pytest.raises(AmbiguousParamsError, match=r"'opt/target/', 'params/'; pick one with --prefix") as e:
        select_root(tree(params=zeros, opt__target=flat))
    assert e.value.roots == ["opt/target/", "params/"]
    picked = select_root(tree(params=zeros, opt__target=flat), prefix="opt/target")
    assert np.array_equal(picked["stem/kernel"][2](), flat["stem/kernel"])
    with pytest.raises(ValueError, match=r"no parameter tree under prefix 'nope/'"):
        select_root(tree(params=flat), prefix="nope/")


def test_a_saved_nnx_state_is_read_by_its_weights_names_without_its_rng_state(tmp_path):
    """As orbax saves nnx.state(model): each array under a trailing 'value', RNG streams' integer key
    data and counters beside the weights (tests/test_nnx.py saves real NNX models)."""
    flat = random_params(TINY, 3)
    state = {f"{k}/value": v for k, v in flat.items()}
    state.update({"MixerBlock_1/token_mixing/Dropout_0/rngs/key/value": np.array([1, 2], np.uint32),
                  "MixerBlock_1/token_mixing/Dropout_0/rngs/count/value": np.array(3, np.uint32),
                  "MixerBlock_2/rngs/dropout/key": np.array([4, 5], np.uint32)})
    np.savez(tmp_path / "state.npz", **{f"params/{k}": v for k, v in state.items()})
    params = read_params(tmp_path / "state.npz")
    assert set(params) == set(flat) and all(np.array_equal(params[k], flat[k]) for k in flat)


@pytest.mark.parametrize("beside, match", [
    ({"MixerBlock_0/rngs/key": np.zeros(2, np.float32)}, "unexpected (1): MixerBlock_0/rngs/key"),  # float: a weight
    ({"MixerBlock_0/step": np.array(3, np.uint32)}, "unexpected (1): MixerBlock_0/step"),  # integer, not RNG state
    ({"stem/bias/value": np.zeros(24, np.float32)}, "stem/bias is given 2 times, as 'stem/bias', 'stem/bias/value'"),
])
def test_nnx_state_reading_never_drops_or_overwrites_a_weight(tmp_path, beside, match):
    np.savez(tmp_path / "w.npz", **random_params(TINY, 0), **beside)
    with pytest.raises(ParamMismatchError) as e:
        open_checkpoint(tmp_path / "w.npz")
    assert match in str(e.value)


@pytest.mark.parametrize("layout", ["torch", "timm", "flax", "nnx"])
def test_every_layouts_value_and_shape_maps_agree_and_invert_each_other(layout):
    from mixer_convert.layouts import LAYOUTS

    lay = LAYOUTS[layout]
    for key, shape in [("stem/kernel", (2, 3, 4, 5)), ("head/kernel", (6, 7)), ("stem/bias", (5,)),
                       ("pre_head_layer_norm/scale", (4,))]:
        arr = np.arange(np.prod(shape)).reshape(shape)
        there = lay.value_to(key, arr)
        assert there.shape == lay.shape_to(key, shape) and np.shares_memory(there, arr)  # a view
        assert np.array_equal(lay.value_from(key, there), arr) and lay.shape_from(key, there.shape) == shape
    want = {"torch": (5, 4, 2, 3), "timm": (5, 4, 2, 3)}.get(layout, (2, 3, 4, 5))  # Conv HWIO -> OIHW
    assert lay.shape_to("stem/kernel", (2, 3, 4, 5)) == want
