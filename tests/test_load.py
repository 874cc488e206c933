"""mixer_convert.load: the one loading order; here, non-finite weights refused at load."""
import numpy as np
import pytest

from mixer_convert import config_for, random_params
from mixer_convert.errors import CheckpointError
from mixer_convert.load import load_checkpoint

TINY = config_for("S/16", image_size=32, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4, channels_mlp_dim=8,
                  num_classes=3)


def _saved_with(tmp_path, key, values):
    flat = random_params(TINY, 0)
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
    assert cfg == TINY and np.isnan(got["stem/bias"][0]) and np.isinf(got["stem/bias"][1])
    assert all(np.array_equal(got[k], flat[k], equal_nan=True) for k in flat)


def test_finite_low_precision_weights_pass_the_check(tmp_path):
    flat = {k: v.astype(np.float16) for k, v in random_params(TINY, 0).items()}
    np.savez(tmp_path / "h.npz", **flat)
    got, _ = load_checkpoint(tmp_path / "h.npz")
    assert got["stem/bias"].dtype == np.float16
