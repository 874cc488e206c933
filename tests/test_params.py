"""mixer_convert.params: the architecture read from tensor shapes alone (infer_config,
check_variant), the strict check of every name and shape (check_params, check_config), and
LazyParams, which reads, casts and NaN-checks each tensor only when asked for."""
import warnings

import numpy as np
import pytest

from helpers.checkpoints import TINY
from mixer_convert import (VARIANTS, ParamMismatchError, check_params, check_variant, config_for, infer_config,
                           param_shapes, random_params)
from mixer_convert.errors import CheckpointError
from mixer_convert.layouts import entries_of
from mixer_convert.params import LazyParams, NonFiniteWeightsError, check_config
from mixer_convert.tools.bridge import convert_checkpoint


# ---- infer_config, check_variant ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_is_inferred_from_shapes_alone(variant):
    cfg = config_for(variant, num_classes=21843)
    assert infer_config(param_shapes(cfg)) == cfg


def test_a_user_named_variant_that_disagrees_with_the_weights_is_an_error():
    inferred = infer_config(param_shapes(config_for("B/32")))
    check_variant(inferred, "B/32")
    with pytest.raises(ValueError, match="checkpoint is B/32, not B/16: patch_size"):
        check_variant(inferred, "B/16")
    with pytest.raises(ValueError, match="not an MLP-Mixer checkpoint"):
        infer_config({"conv1/kernel": (7, 7, 3, 64)})


def test_official_files_need_no_flags_and_a_wrong_variant_is_an_error(tmp_path):
    cfg = config_for("B/32", image_size=64, num_classes=7)  # real B/32 widths on a 2x2 grid
    np.savez(tmp_path / "b32.npz", **random_params(cfg, 0))
    rep = convert_checkpoint(tmp_path / "b32.npz", tmp_path / "b.safetensors", variant="Mixer-B_32", progress=False)
    assert rep.config == cfg
    with pytest.raises(ValueError, match="checkpoint is B/32, not L/32"):
        convert_checkpoint(tmp_path / "b32.npz", tmp_path / "l.safetensors", variant="L/32", progress=False)
    assert not (tmp_path / "l.safetensors").exists()


def test_non_square_grid_needs_and_takes_image_size(tmp_path):
    cfg = TINY.replace(image_size=(32, 48))  # a 2x3 grid: 6 tokens fit no square
    np.savez(tmp_path / "ns.npz", **random_params(cfg, 0))
    with pytest.raises(ValueError, match="6 tokens, not a square grid; pass image_size"):
        convert_checkpoint(tmp_path / "ns.npz", tmp_path / "o.npz", progress=False)
    rep = convert_checkpoint(tmp_path / "ns.npz", tmp_path / "o.npz", image_size=(32, 48), progress=False)
    assert rep.config == cfg


def test_non_mixer_checkpoints_are_rejected(tmp_path):
    np.savez(tmp_path / "resnet.npz", **{"conv1/kernel": np.zeros((7, 7, 3, 8), np.float32),
                                         "bn1/scale": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="not an MLP-Mixer checkpoint"):
        convert_checkpoint(tmp_path / "resnet.npz", tmp_path / "o.npz", progress=False)


@pytest.mark.parametrize("value, shape", [("abc", ()), (np.zeros((3, 3), np.float32), (3, 3))])
def test_a_stem_kernel_of_the_wrong_rank_is_not_a_mixer_naming_its_shape(value, shape):
    shapes = {k: np.shape(v) for k, v in random_params(TINY, 0).items()}
    shapes["stem/kernel"] = np.shape(value)
    with pytest.raises(ValueError) as e:
        infer_config(shapes)
    assert str(e.value) == f"not an MLP-Mixer checkpoint: 'stem/kernel' has shape {shape}, a Mixer's has 4 dims"


def test_a_checkpoint_without_blocks_or_without_a_token_mixing_kernel_is_not_a_mixer():
    shapes = param_shapes(TINY)
    no_blocks = {k: v for k, v in shapes.items() if not k.startswith("MixerBlock_")}
    with pytest.raises(ValueError, match="not an MLP-Mixer checkpoint: no MixerBlock_0 parameters"):
        infer_config(no_blocks)
    no_token = {k: v for k, v in shapes.items() if k != "MixerBlock_0/token_mixing/Dense_0/kernel"}
    with pytest.raises(ValueError, match="not an MLP-Mixer checkpoint: no 'MixerBlock_0/token_mixing/Dense_0/kernel'"):
        infer_config(no_token)


def test_image_size_k_times_the_checkpoints_says_to_load_it_with_scale_k():
    with pytest.raises(ValueError, match=r"image_size 96x96 does not fit the checkpoint: it gives 6x6 = 36 patches "
                                         r"of 16x16, the checkpoint has 9 tokens \(3x3 patches: 48x48 images\); "
                                         r"for 96x96 images load it with scale=2"):
        infer_config(param_shapes(TINY), image_size=96)


# ---- check_params, check_config -----------------------------------------------------------------------------


def test_check_params_lists_every_missing_unexpected_and_misshaped_key():
    cfg = config_for("S/32", num_classes=10)
    flat = random_params(cfg)
    del flat["MixerBlock_3/LayerNorm_1/bias"]
    flat["extra/thing"] = flat["stem/bias"]
    flat["head/kernel"] = flat["head/kernel"][:, :5]
    with pytest.raises(ParamMismatchError) as e:
        check_params(flat, cfg)
    msg = str(e.value)
    assert "MixerBlock_3/LayerNorm_1/bias" in msg and "extra/thing" in msg
    assert "head/kernel has (512, 5), model needs (512, 10)" in msg


def test_missing_unexpected_and_misshaped_keys_are_all_listed(tmp_path):
    flat = random_params(TINY, 0)
    del flat["MixerBlock_1/LayerNorm_0/bias"]
    flat["MixerBlock_1/extra/kernel"] = np.zeros((2, 2), np.float32)
    flat["MixerBlock_2/channel_mixing/Dense_0/bias"] = np.zeros(41, np.float32)
    np.savez(tmp_path / "bad.npz", **flat)
    with pytest.raises(ParamMismatchError) as e:
        convert_checkpoint(tmp_path / "bad.npz", tmp_path / "o.npz", progress=False)
    msg = str(e.value)
    assert "missing (1): MixerBlock_1/LayerNorm_0/bias" in msg
    assert "unexpected (1): MixerBlock_1/extra/kernel" in msg
    assert "MixerBlock_2/channel_mixing/Dense_0/bias has (41,), model needs (40,)" in msg
    assert not (tmp_path / "o.npz").exists()


def test_check_config_returns_the_config_after_checking_names_shapes_variant_and_dtypes():
    shapes = param_shapes(TINY)
    floats = {k: np.dtype(np.float32) for k in shapes}
    assert check_config(shapes, floats) == TINY
    with pytest.raises(ValueError, match="checkpoint is a non-standard Mixer, not S/16: hidden_dim"):
        check_config(shapes, floats, variant="S/16")
    with pytest.raises(ParamMismatchError, match="in.npz does not match the model:\n  unexpected \\(1\\): extra"):
        check_config({**shapes, "extra": (1,)}, floats, what="in.npz")
    with pytest.raises(CheckpointError, match=r"^in.npz: tensor 'head/bias' has unsupported dtype int64"):
        check_config(shapes, {**floats, "head/bias": np.dtype(np.int64)}, what="in.npz")


# ---- LazyParams ---------------------------------------------------------------------------------------------------


def _lazy(flat, **kw):
    reads = []
    entries = {k: (shape, dtype, (lambda k=k, load=load: (reads.append(k), load())[1]))
               for k, (shape, dtype, load) in entries_of(flat).items()}
    return LazyParams(entries, "src.npz", "npz", "flax", **kw), reads


def test_lazy_params_read_nothing_until_a_tensor_is_asked_for():
    flat = random_params(TINY, 0)
    params, reads = _lazy(flat)
    assert len(params) == len(flat) and "stem/kernel" in params and "nope" not in params
    assert params.shapes == {k: v.shape for k, v in flat.items()}
    assert params.dtypes == {k: v.dtype for k, v in flat.items()}
    assert reads == []
    assert np.array_equal(params["head/bias"], flat["head/bias"]) and reads == ["head/bias"]


def test_lazy_params_cast_to_the_requested_dtype_and_report_it_before_reading():
    import ml_dtypes

    params, reads = _lazy(random_params(TINY, 0), dtype="bfloat16")
    assert set(params.dtypes.values()) == {np.dtype(ml_dtypes.bfloat16)} and reads == []
    assert params["stem/bias"].dtype == np.dtype(ml_dtypes.bfloat16)


def test_lazy_params_refuse_nan_unless_allowed_then_warn_through_the_callers_function():
    flat = random_params(TINY, 0)
    flat["stem/bias"][:2] = [np.nan, -np.inf]
    refusing, _ = _lazy(flat, allow_nonfinite=False, hint="--allow-it")
    with pytest.raises(NonFiniteWeightsError,
                       match=r"^src.npz: stem/bias: 2 of 24 values are NaN or Inf \(--allow-it\)$"):
        refusing["stem/bias"]
    warned = []
    allowing, _ = _lazy(flat, allow_nonfinite=True, warn=warned.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caller decides how to warn; nothing else does
        got = allowing["stem/bias"]
    assert np.isnan(got[0]) and warned == ["stem/bias: 2 of 24 values are NaN or Inf"]


def test_order_cfg_gives_the_official_order_whatever_the_files():
    flat = random_params(TINY, 0)
    shuffled = dict(sorted(flat.items(), reverse=True))
    params, _ = _lazy(shuffled, order=TINY)
    assert list(params) == list(param_shapes(TINY)) != list(shuffled)


def test_a_tensor_that_does_not_hold_its_declared_shape_or_fails_to_read_is_one_error_naming_it():
    flat = random_params(TINY, 0)
    entries = entries_of(flat)
    entries["stem/bias"] = ((25,), np.dtype(np.float32), lambda: flat["stem/bias"])
    entries["head/bias"] = ((5,), np.dtype(np.float32), lambda: 1 / 0)
    params = LazyParams(entries, "src.npz", "npz", "flax")
    with pytest.raises(CheckpointError, match=r"src.npz: 'stem/bias' holds shape \(24,\), its header said \(25,\)"):
        params["stem/bias"]
    with pytest.raises(CheckpointError, match=r"src.npz: cannot read 'head/bias' \(ZeroDivisionError: division by "
                                              r"zero\); truncated or corrupt\?"):
        params["head/bias"]


def test_closing_lazy_params_closes_the_source_once():
    closed = []
    params = LazyParams(entries_of(random_params(TINY, 0)), "src.npz", "npz", "flax", lambda: closed.append(1))
    with params:
        pass
    params.close()
    assert closed == [1]
