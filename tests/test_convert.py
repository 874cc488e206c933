"""The weight bridge: formats, exact round trips, config inference, safety, bad input."""
import hashlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import ROOT, images, import_blocker, requires_jax, requires_torch, subprocess_env
from mixer_convert import ParamMismatchError, config_for, random_params
from mixer_convert.tools.bridge import NonFiniteWeightsError, convert_checkpoint
from mixer_convert.errors import CheckpointError
from mixer_convert.formats import format_of as detect_format
from mixer_convert.load import open_checkpoint, read_params
from mixer_convert.save import write_params
from mixer_convert.reference import forward

TINY = config_for("S/16", image_size=48, hidden_dim=24, num_blocks=3, tokens_mlp_dim=8, channels_mlp_dim=40,
                  num_classes=5)


@pytest.fixture
def official(tmp_path):
    """An official-layout .npz as vit_jax writes it (np.savez of '/'-joined names)."""
    flat = random_params(TINY, 0)
    path = tmp_path / "Mixer-T_16.npz"
    np.savez(path, **flat)
    return path, flat


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_np(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


# ---- round trips ------------------------------------------------------------------------------


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


# ---- config inference ----------------------------------------------------------------------------


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


# ---- verification -------------------------------------------------------------------------------


@pytest.mark.parametrize("to", [pytest.param("torch", marks=requires_torch), pytest.param("flax", marks=requires_jax),
                                "safetensors"])
def test_verify_reports_bit_identical_readback_and_tiny_logit_error(official, tmp_path, to):
    src, _ = official
    suffix = {"torch": ".pt", "flax": ".msgpack", "safetensors": ".safetensors"}[to]
    rep = convert_checkpoint(src, tmp_path / f"out{suffix}", None if to == "safetensors" else to,
                             verify=True, progress=False)
    assert rep.verification.readback_exact is True
    assert rep.verification.logits_max_abs < 1e-4
    assert "max-abs" in rep.summary()


# ---- safety and bad input -----------------------------------------------------------------------


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


def test_non_mixer_checkpoints_are_rejected(tmp_path):
    np.savez(tmp_path / "resnet.npz", **{"conv1/kernel": np.zeros((7, 7, 3, 8), np.float32),
                                         "bn1/scale": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="not an MLP-Mixer checkpoint"):
        convert_checkpoint(tmp_path / "resnet.npz", tmp_path / "o.npz", progress=False)


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


def test_integer_weights_are_an_unsupported_dtype(tmp_path):
    flat = random_params(TINY, 0)
    flat["stem/bias"] = np.zeros(24, np.int32)
    np.savez(tmp_path / "int.npz", **flat)
    with pytest.raises(CheckpointError, match="stem/bias.*unsupported dtype int32"):
        convert_checkpoint(tmp_path / "int.npz", tmp_path / "o.npz", progress=False)


def test_object_arrays_are_never_unpickled(tmp_path):
    flat = random_params(TINY, 0)
    np.savez(tmp_path / "obj.npz", **flat, evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_params(tmp_path / "obj.npz")


@requires_torch
def test_pickled_code_in_a_torch_file_is_refused(tmp_path):
    import torch

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"stem.weight": torch.zeros(1), "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_params(tmp_path / "evil.pt")


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


@pytest.mark.parametrize("image_size", [None, (32, 48)], ids=["square", "non-square"])
def test_a_bfloat16_npz_as_big_vision_writes_it_converts_kept_or_cast(tmp_path, image_size):
    import ml_dtypes
    from mixer_convert.tools.cli import main
    from checkpoint_files import NON_SQUARE, bf16_npz

    cfg = NON_SQUARE.replace(image_size=image_size or (32, 32))
    want = bf16_npz(tmp_path / "bf16.npz", cfg)
    size = ["--image-size", *map(str, image_size)] if image_size else []
    for out in ("kept.npz", "kept.safetensors"):  # kept bfloat16: bit for bit (in .npz as 'V2' again)
        assert main([str(tmp_path / "bf16.npz"), str(tmp_path / out), *size, "--verify", "--quiet"]) == 0
        back = read_params(tmp_path / out)
        assert {back.dtypes[k] for k in back} == {np.dtype(ml_dtypes.bfloat16)}
        assert all(np.array_equal(back[k].astype(np.float32), want[k]) for k in want)
    with np.load(tmp_path / "bf16.npz") as a, np.load(tmp_path / "kept.npz") as b:
        assert all(b[k].dtype == np.dtype("V2") and a[k].tobytes() == b[k].tobytes() for k in a.files)
    assert main([str(tmp_path / "bf16.npz"), str(tmp_path / "f32.npz"), *size, "--dtype", "float32", "--quiet"]) == 0
    assert_same(load_np(tmp_path / "f32.npz"), want)


@requires_torch
def test_bf16_torch_checkpoints_round_trip(official, tmp_path):
    import torch

    src, _ = official
    convert_checkpoint(src, tmp_path / "bf.pt", dtype="bfloat16", progress=False)
    sd = torch.load(tmp_path / "bf.pt", weights_only=True)
    assert sd["stem.weight"].dtype == torch.bfloat16
    convert_checkpoint(tmp_path / "bf.pt", tmp_path / "bf.safetensors", progress=False)
    a, b = read_params(tmp_path / "bf.pt"), read_params(tmp_path / "bf.safetensors")
    assert all(np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)) for k in a)


def test_detect_format_by_content_not_suffix(official, tmp_path):
    src, _ = official
    (tmp_path / "weights.bin").write_bytes(src.read_bytes())
    assert detect_format(tmp_path / "weights.bin") == "npz"
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="neither"):
        detect_format(tmp_path / "x.zip")


def test_cli_reports_errors_with_exit_code_2(official, tmp_path):
    src, _ = official
    from mixer_convert.tools.cli import main
    assert main([str(src), str(tmp_path / "o.npz"), "--quiet"]) == 0
    assert main([str(src), str(tmp_path / "o.npz"), "--quiet"]) == 2  # exists
    assert main([str(tmp_path / "nope.npz"), str(tmp_path / "p.npz")]) == 2


# ---- framework independence ---------------------------------------------------------------------

def _run_blocked(blocked, code, tmp_path):
    script = import_blocker(*blocked) + f"sys.path.insert(0, {str(ROOT)!r})\n" + code
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=subprocess_env())


@requires_torch
def test_npz_to_pytorch_and_timm_works_without_jax(official, tmp_path):
    src, flat = official
    code = f"""
from mixer_convert.tools.cli import main
assert main([{str(src)!r}, 'm.pt', '--verify', '--quiet']) == 0
assert main([{str(src)!r}, 'timm.safetensors', '--to', 'timm', '--quiet']) == 0
from mixer_torch import from_checkpoint
m = from_checkpoint('timm.safetensors', num_classes=3, scale=2)
assert m.config.num_classes == 3 and m.config.image_size == (96, 96)
assert not any(k.split('.')[0] in ('jax', 'flax', 'jaxlib') for k in sys.modules)
print('ok')
"""
    r = _run_blocked({"jax", "jaxlib", "flax", "optax", "orbax"}, code, tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert "our PyTorch model" in r.stdout


@requires_jax
def test_flax_side_works_without_torch(official, tmp_path):
    src, _ = official
    code = f"""
from mixer_convert.tools.cli import main
assert main([{str(src)!r}, 'm.msgpack', '--verify', '--quiet']) == 0
assert main(['m.msgpack', 'orbax_dir', '--to', 'orbax', '--quiet']) == 0
import mixer_jax, mixer_jax.train, mixer_jax.input_pipeline
assert 'torch' not in sys.modules
print('ok')
"""
    r = _run_blocked({"torch"}, code, tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert "our Flax model" in r.stdout


# ---- fine-tuning helpers ------------------------------------------------------------------------


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


@pytest.mark.parametrize("scale", [2, 3])
def test_resized_model_on_tiled_images_equals_the_base_model_per_tile(scale):
    from mixer_convert.resize import resize_token_mixing, tile_images

    flat = random_params(TINY, 3)
    big, big_cfg = resize_token_mixing(flat, TINY, scale)
    assert big_cfg.image_size == (48 * scale, 48 * scale) and big_cfg.tokens_mlp_dim == 8 * scale ** 2
    x = images(2 * scale ** 2, 48, 48)  # different images in every tile
    base = forward(flat, TINY, x).reshape(2, scale ** 2, -1).mean(1)  # head is linear: mean of logits
    np.testing.assert_allclose(forward(big, big_cfg, tile_images(x, scale)), base, atol=1e-10)


@requires_torch
def test_resize_is_exact_in_pytorch(official):
    import torch
    from mixer_convert.resize import tile_images
    from mixer_torch import from_checkpoint

    src, _ = official
    base, big = from_checkpoint(src).eval(), from_checkpoint(src, scale=2).eval()
    assert big.config.image_size == (96, 96)
    x = images(8, 48, 48)
    with torch.no_grad():
        want = base(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).reshape(2, 4, -1).mean(1)
        got = big(torch.from_numpy(tile_images(x, 2).transpose(0, 3, 1, 2).copy()))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@requires_jax
def test_resize_is_exact_in_flax(official):
    from mixer_convert.resize import tile_images
    from mixer_jax import from_checkpoint

    src, _ = official
    base_m, base_p = from_checkpoint(src)
    big_m, big_p = from_checkpoint(src, scale=2)
    assert big_m.config.image_size == (96, 96)
    x = images(8, 48, 48)
    want = np.asarray(base_m.apply({"params": base_p}, x)).reshape(2, 4, -1).mean(1)
    got = np.asarray(big_m.apply({"params": big_p}, tile_images(x, 2)))
    np.testing.assert_allclose(got, want, atol=2e-5)


@requires_torch
def test_legacy_non_zip_torch_files_are_read(official, tmp_path):
    import torch

    src, flat = official
    convert_checkpoint(src, tmp_path / "new.pt", progress=False)
    sd = torch.load(tmp_path / "new.pt", weights_only=True)
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(tmp_path / "legacy.pth")
    back = read_params(tmp_path / "legacy.pth")
    assert all(np.array_equal(back[k], flat[k]) for k in flat)


def test_verify_with_allowed_nan_warns_once_per_tensor(tmp_path):
    flat = random_params(TINY, 0)
    flat["stem/bias"][0] = np.inf
    np.savez(tmp_path / "inf.npz", **flat)
    with pytest.warns(UserWarning):
        rep = convert_checkpoint(tmp_path / "inf.npz", tmp_path / "o.safetensors", allow_nonfinite=True, verify=True,
                                 progress=False)
    assert rep.warnings == ["stem/bias: 1 of 24 values are NaN or Inf"] and rep.verification.readback_exact


# ---- one canonical name per tensor, one tree per file (layouts.canonicalize / select_root) -----------


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


def test_verify_prints_its_tolerance_and_fails_beyond_it(official, tmp_path, monkeypatch):
    from mixer_convert.tools import bridge

    src, _ = official
    rep = convert_checkpoint(src, tmp_path / "a.safetensors", verify=True, progress=False)
    assert f"(tolerance {rep.verification.logits_tolerance:.1e})" in rep.summary() and rep.verification.logits_tolerance >= 1e-4
    from mixer_convert.tools import verify
    real = verify._framework_forward
    monkeypatch.setattr(verify, "_framework_forward", lambda *a: (real(*a)[0] + 1e-2, "a forward off by 1e-2"))
    with pytest.raises(bridge.VerificationError, match=r"differ by 1.00\de-02, more than the tolerance 1.0e-04"):
        convert_checkpoint(src, tmp_path / "b.safetensors", verify=True, progress=False)
    assert not (tmp_path / "b.safetensors").exists()
