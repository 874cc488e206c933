"""mixer_convert.load: the one loading order (read_params, open_checkpoint, load_checkpoint): a
prefix picks one of several trees, non-float and non-finite weights are refused before use
(unless allowed), a new head is fresh and zero."""
import numpy as np
import pytest

from helpers.checkpoints import TINY
from mixer_convert import config_for, random_params
from mixer_convert.errors import CheckpointError
from mixer_convert.load import load_checkpoint, read_params
from mixer_convert.tools.bridge import convert_checkpoint

ONE_BLOCK = config_for("S/16", image_size=32, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4, channels_mlp_dim=8,
                       num_classes=3)


def _saved_with(tmp_path, key, values):
    flat = random_params(ONE_BLOCK, 0)
    flat[key] = flat[key].copy()
    flat[key].flat[:len(values)] = values
    np.savez(tmp_path / "w.npz", **flat)
    return tmp_path / "w.npz", flat


def test_nan_or_inf_weights_are_refused_naming_file_key_and_count(tmp_path):
    path, _ = _saved_with(tmp_path, "MixerBlock_0/channel_mixing/Dense_1/kernel", [np.nan, np.inf, -np.inf])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg == (f"{path}: MixerBlock_0/channel_mixing/Dense_1/kernel: 3 of 64 values are NaN or Inf "
                   "(pass allow_nonfinite=True to load them anyway)")


def test_the_caller_supplies_the_way_its_user_allows_them(tmp_path):
    path, _ = _saved_with(tmp_path, "stem/bias", [np.nan])
    with pytest.raises(CheckpointError, match=r"1 of 8 values are NaN or Inf \(--set x=true\)$"):
        load_checkpoint(path, nonfinite_hint="--set x=true")


def test_allowed_non_finite_weights_load_unchanged(tmp_path):
    path, flat = _saved_with(tmp_path, "stem/bias", [np.nan, np.inf])
    got, cfg = load_checkpoint(path, allow_nonfinite=True)
    assert cfg == ONE_BLOCK and np.isnan(got["stem/bias"][0]) and np.isinf(got["stem/bias"][1])
    assert all(np.array_equal(got[k], flat[k], equal_nan=True) for k in flat)


def test_finite_low_precision_weights_pass_the_check(tmp_path):
    flat = {k: v.astype(np.float16) for k, v in random_params(ONE_BLOCK, 0).items()}
    np.savez(tmp_path / "h.npz", **flat)
    got, _ = load_checkpoint(tmp_path / "h.npz")
    assert got["stem/bias"].dtype == np.float16


def test_read_params_and_open_checkpoint_take_a_prefix(tmp_path):
    from mixer_convert.load import open_checkpoint

    flat = random_params(TINY, 0)
    np.savez(tmp_path / "two.npz", **{f"params/{k}": np.zeros_like(v) for k, v in flat.items()},
             **{f"opt/target/{k}": v for k, v in flat.items()})
    with pytest.raises(ValueError, match="2 parameter trees"):
        read_params(tmp_path / "two.npz")
    assert np.array_equal(read_params(tmp_path / "two.npz", prefix="opt/target/")["stem/kernel"], flat["stem/kernel"])
    params, cfg = open_checkpoint(tmp_path / "two.npz", prefix="params")
    assert cfg == TINY and not params["stem/kernel"].any()
    params.close()


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64, np.uint8])
def test_loading_refuses_non_float_tensors_before_reading_them(tmp_path, dtype):
    from mixer_convert.load import load_checkpoint, open_checkpoint

    flat = random_params(TINY, 0)
    flat["MixerBlock_1/LayerNorm_0/scale"] = flat["MixerBlock_1/LayerNorm_0/scale"].astype(dtype)
    np.savez(tmp_path / "odd.npz", **flat)
    for load in (load_checkpoint, open_checkpoint):
        with pytest.raises(CheckpointError, match=rf"'MixerBlock_1/LayerNorm_0/scale' has unsupported dtype "
                                                  rf"{np.dtype(dtype)}"):
            load(tmp_path / "odd.npz")


def test_integer_weights_are_an_unsupported_dtype(tmp_path):
    flat = random_params(TINY, 0)
    flat["stem/bias"] = np.zeros(24, np.int32)
    np.savez(tmp_path / "int.npz", **flat)
    with pytest.raises(CheckpointError, match="stem/bias.*unsupported dtype int32"):
        convert_checkpoint(tmp_path / "int.npz", tmp_path / "o.npz", progress=False)


def test_new_head_is_fresh_and_zero(official):
    from mixer_convert.load import load_checkpoint

    src, flat = official
    new, cfg = load_checkpoint(src, num_classes=11)
    assert cfg.num_classes == 11 and new["head/kernel"].shape == (24, 11) and not new["head/kernel"].any()
    assert np.array_equal(new["stem/kernel"], flat["stem/kernel"])
    kept, _ = load_checkpoint(src)
    assert np.array_equal(kept["head/kernel"], flat["head/kernel"])
    none, cfg0 = load_checkpoint(src, num_classes=None)
    assert "head/kernel" not in none and cfg0.num_classes is None
