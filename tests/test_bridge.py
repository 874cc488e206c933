"""mixer_convert.tools.bridge (convert_checkpoint): exact round trips through every format, the
naming and layout of what it writes, dtype choices, and the safety of its outputs (never
overwritten without force, nothing written on bad input, NaN/Inf refused unless allowed)."""
import numpy as np
import pytest

from conftest import requires_jax, requires_torch
from helpers.checkpoints import TINY, assert_same, load_np, sha
from mixer_convert import random_params
from mixer_convert.errors import CheckpointError
from mixer_convert.load import read_params
from mixer_convert.save import write_params
from mixer_convert.tools.bridge import NonFiniteWeightsError, convert_checkpoint


ROUND_TRIPS = [("model.pt", "torch", requires_torch), ("model.bin", "torch", requires_torch),
               ("model.pth", "timm", requires_torch), ("model.safetensors", "torch", None),
               ("timm.safetensors", "timm", None), ("model.msgpack", "flax", requires_jax),
               ("model_orbax", "orbax", requires_jax), ("nnx_state", "nnx", requires_jax),
               ("nnx.msgpack", "nnx", requires_jax)]


@pytest.mark.parametrize("name, to", [pytest.param(n, t, marks=m or []) for n, t, m in ROUND_TRIPS])
def test_round_trip_through_each_format_is_bit_identical(official, tmp_path, name, to):
    src, flat = official
    before = sha(src)
    mid = tmp_path / name
    convert_checkpoint(src, mid, to, progress=False)
    back = tmp_path / "back.npz"
    convert_checkpoint(mid, back, progress=False)
    assert_same(load_np(back), flat)
    # and the output file itself is byte-for-byte what converting the source directly gives
    direct = tmp_path / "direct.npz"
    convert_checkpoint(src, direct, "npz", progress=False)
    assert sha(back) == sha(direct)
    assert sha(src) == before  # the source is never modified


@requires_torch
def test_torch_output_holds_our_naming_and_layouts(official, tmp_path):
    import torch

    src, flat = official
    convert_checkpoint(src, tmp_path / "m.pt", progress=False)
    sd = torch.load(tmp_path / "m.pt", weights_only=True)
    assert torch.equal(sd["MixerBlock_2.token_mixing.Dense_0.weight"],
                       torch.from_numpy(flat["MixerBlock_2/token_mixing/Dense_0/kernel"].T.copy()))
    assert torch.equal(sd["stem.weight"], torch.from_numpy(flat["stem/kernel"].transpose(3, 2, 0, 1).copy()))
    assert torch.equal(sd["pre_head_layer_norm.weight"], torch.from_numpy(flat["pre_head_layer_norm/scale"]))


def test_bf16_converts_with_a_dtype_choice(official, tmp_path):
    import ml_dtypes

    src, flat = official
    convert_checkpoint(src, tmp_path / "bf.safetensors", dtype="bfloat16", progress=False)
    back = read_params(tmp_path / "bf.safetensors")
    assert back.dtypes["stem/kernel"] == np.dtype(ml_dtypes.bfloat16)
    # numpy spells bfloat16 as the 2-byte void type in .npz (as big_vision's files hold it); it reads back bfloat16
    convert_checkpoint(tmp_path / "bf.safetensors", tmp_path / "bf.npz", progress=False)
    assert np.load(tmp_path / "bf.npz")["stem/kernel"].dtype == np.dtype("V2")
    again = read_params(tmp_path / "bf.npz")
    assert again.dtypes["stem/kernel"] == np.dtype(ml_dtypes.bfloat16)
    assert all(np.array_equal(again[k].view(np.uint16), back[k].view(np.uint16)) for k in back)
    convert_checkpoint(tmp_path / "bf.safetensors", tmp_path / "f32.npz", dtype="float32",
                       progress=False)
    got = load_np(tmp_path / "f32.npz")["stem/kernel"]
    np.testing.assert_array_equal(got, flat["stem/kernel"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_existing_output_is_not_overwritten_without_force(official, tmp_path):
    src, _ = official
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="--force"):
        convert_checkpoint(src, dst, progress=False)
    assert dst.read_bytes() == b"precious"
    convert_checkpoint(src, dst, force=True, progress=False)
    assert dst.read_bytes() != b"precious"


def test_truncated_and_corrupt_files_give_an_error_and_no_output(official, tmp_path):
    src, _ = official
    data = src.read_bytes()
    cases = {"trunc.npz": data[: len(data) // 2], "garbage.npz": b"\x00" * 100,
             "trunc.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError):
            convert_checkpoint(tmp_path / name, tmp_path / f"{name}.out.npz", progress=False)
        assert not (tmp_path / f"{name}.out.npz").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_a_truncated_tensor_mid_file_leaves_no_output(tmp_path):
    write_params(random_params(TINY, 0), tmp_path / "m.safetensors", fmt="safetensors")
    blob = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[:-100])
    with pytest.raises(CheckpointError, match="past the end"):
        convert_checkpoint(tmp_path / "cut.safetensors", tmp_path / "o.npz", progress=False)
    assert not (tmp_path / "o.npz").exists()


def test_nan_weights_are_refused_unless_allowed(tmp_path):
    flat = random_params(TINY, 0)
    flat["MixerBlock_2/channel_mixing/Dense_1/kernel"][3, 4] = np.nan
    np.savez(tmp_path / "nan.npz", **flat)
    with pytest.raises(NonFiniteWeightsError, match="MixerBlock_2/channel_mixing/Dense_1/kernel: 1 of"):
        convert_checkpoint(tmp_path / "nan.npz", tmp_path / "o.safetensors", progress=False)
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.warns(UserWarning, match="NaN or Inf"):
        rep = convert_checkpoint(tmp_path / "nan.npz", tmp_path / "o.safetensors",
                                 allow_nonfinite=True, progress=False)
    assert len(rep.warnings) == 1 and (tmp_path / "o.safetensors").exists()
