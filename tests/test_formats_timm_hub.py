"""timm / Hugging Face model folders (mixer_convert.formats.timm_hub): what --to timm-hub writes,
every loader reading it, exact round trips, the variants timm lacks, and folders that lie.
(timm's own local-dir: loader on these folders: tests/test_timm_oracle.py.)"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, import_blocker, requires_jax, requires_torch, subprocess_env
from helpers.hostile import judge, run_cli
from mixer_convert import config_for, random_params
from mixer_convert.formats import format_of
from mixer_convert.formats.timm_hub import PREPROCESSING, hub_config, timm_name
from mixer_convert.layouts import timm_key
from mixer_convert.load import load_checkpoint, read_params
from mixer_convert.reference import forward
from mixer_convert.save import write_params
from mixer_convert.spec import TIMM_NAMES, param_shapes
from mixer_convert.tools.bridge import convert_checkpoint

S32 = config_for("S/32")  # the smallest Mixer timm has


def npz_of(flat, path):
    np.savez(path, **flat)
    return path


def read_npz(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """An official-layout S/32 .npz and the folder mixer-convert --to timm-hub makes of it."""
    d = tmp_path_factory.mktemp("hub")
    flat = random_params(S32, 0)
    src = npz_of(flat, d / "Mixer-S_32.npz")
    report = convert_checkpoint(src, d / "folder", "timm-hub", progress=False)
    return src, d / "folder", flat, report


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """A float16 S/32 folder written by the library (no card): a cheap base for hostile folders."""
    d = tmp_path_factory.mktemp("half")
    flat = random_params(S32, 1, dtype=np.float16)
    return write_params(flat, d / "folder", fmt="timm-hub"), flat


def variant_folder(base, d, config=None, edit=None, weights="model.safetensors"):
    """A folder beside ``base``: config.json as given (or edited), the weights a link to base's."""
    d.mkdir(parents=True, exist_ok=True)
    doc = json.loads((base / "config.json").read_text())
    if edit:
        edit(doc)
    text = config if config is not None else json.dumps(doc)
    (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    if weights:
        (d / weights).symlink_to(base / "model.safetensors")
    return d


# ---- what is written -------------------------------------------------------------------------------


def test_folder_holds_config_weights_in_timm_naming_and_a_card(official):
    _, folder, flat, _ = official
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    doc = json.loads((folder / "config.json").read_text())
    assert doc["architecture"] == TIMM_NAMES["S/32"] == "mixer_s32_224"
    assert (doc["num_classes"], doc["num_features"]) == (S32.num_classes, S32.hidden_dim)
    assert doc["model_args"] == {"in_chans": 3, "num_classes": 1000, "global_pool": "avg", "img_size": [224, 224]}
    pre = doc["pretrained_cfg"]
    assert pre["input_size"] == [3, 224, 224] and pre["mean"] == pre["std"] == [0.5, 0.5, 0.5]
    assert {k: pre[k] for k in PREPROCESSING["vit_jax"]} == PREPROCESSING["vit_jax"]  # the default
    assert (pre["first_conv"], pre["classifier"], pre["license"]) == ("stem.proj", "head", "apache-2.0")
    with read_params(folder / "model.safetensors") as p:  # the file alone: timm's naming
        assert p.layout == "timm"
    from mixer_convert.formats.safetensors import read_header
    _, header = read_header(folder / "model.safetensors", (folder / "model.safetensors").stat().st_size)
    assert sorted(header) == sorted(timm_key(k) for k in param_shapes(S32))


@pytest.mark.parametrize("preprocess", sorted(PREPROCESSING))
def test_preprocessing_choice_is_what_config_json_asks_timm_for(preprocess):
    pre = hub_config(S32, preprocess)["pretrained_cfg"]
    assert {k: pre[k] for k in PREPROCESSING[preprocess]} == PREPROCESSING[preprocess]
    # both official pipelines end in (x - 127.5) / 127.5 = (x/255 - mean) / std
    x = np.arange(256.0)
    assert np.allclose((x / 255 - pre["mean"][0]) / pre["std"][0], (x - 127.5) / 127.5)


def test_big_vision_crop_is_224_of_256_and_vit_jax_resizes_the_whole_image():
    assert PREPROCESSING["big_vision"]["crop_pct"] * 256 == 224
    assert PREPROCESSING["vit_jax"] == {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"}


@pytest.mark.parametrize("cfg, match", [
    (config_for("S/8"), r"timm has no S/8 Mixer; its Mixers are mixer_s32_224 \(S/32\), .*mixer_l16_224 \(L/16\)"),
    (config_for("H/14"), r"timm has no H/14 Mixer; its Mixers are mixer_s32_224"),
    (config_for("B/16", image_size=384), r"takes 224x224 images; these B/16 weights are for 384x384 \(24x24 patches\)"),
    (config_for("B/32", image_size=(224, 448)), r"these B/32 weights are for 224x448 \(7x14 patches\)"),
    (config_for("S/32", hidden_dim=256), r"timm has no Mixer of this \(non-standard\) shape"),
    (config_for("S/32", in_chans=1), r"RGB images; these weights have 1 input channels"),
])
def test_models_timm_lacks_are_refused_naming_the_ones_it_has(cfg, match):
    with pytest.raises(ValueError, match=match):
        timm_name(cfg)


def test_a_refused_model_leaves_nothing_behind(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    src = npz_of(random_params(config_for("S/32", image_size=64, num_classes=3), 0), tmp_path / "small.npz")
    out = run_cli([str(src), str(work / "out" / "folder"), "--to", "timm-hub"])
    judge(out, work, work / "out" / "folder", None, r"timm's mixer_s32_224 takes 224x224 images")


@pytest.mark.parametrize("num_classes", [10, None])
def test_any_head_size_is_written_and_none_means_timm_num_classes_0(tmp_path, num_classes):
    cfg = S32.replace(num_classes=num_classes)
    flat = random_params(cfg, 2, dtype=np.float16)
    folder = write_params(flat, tmp_path / "f", fmt="timm-hub")
    doc = json.loads((folder / "config.json").read_text())
    assert doc["num_classes"] == doc["model_args"]["num_classes"] == doc["pretrained_cfg"]["num_classes"] == \
        (num_classes or 0)
    back, got = load_checkpoint(folder)
    assert got == cfg and all(np.array_equal(back[k], flat[k]) for k in flat)


def test_preprocess_is_only_for_model_folders(official, tmp_path):
    with pytest.raises(ValueError, match="only for timm model folders"):
        convert_checkpoint(official[0], tmp_path / "x.npz", preprocess="big_vision", progress=False)


# ---- reading it back ------------------------------------------------------------------------------


def test_round_trip_official_npz_folder_npz_is_bit_exact(official, tmp_path):
    src, folder, flat, _ = official
    out = run_cli([str(folder), str(tmp_path / "back.npz")])
    assert out.rc == 0, out.stderr
    back = read_npz(tmp_path / "back.npz")
    assert set(back) == set(flat) and all(back[k].dtype == flat[k].dtype and back[k].tobytes() == flat[k].tobytes()
                                          for k in flat)
    convert_checkpoint(src, tmp_path / "direct.npz", progress=False)
    assert (tmp_path / "back.npz").read_bytes() == (tmp_path / "direct.npz").read_bytes()


def test_the_folder_is_its_own_format_read_by_the_one_loading_path(official):
    _, folder, flat, _ = official
    assert format_of(folder) == "timm-hub"
    with read_params(folder) as p:
        assert (p.format, p.layout) == ("timm-hub", "timm")
    got, cfg = load_checkpoint(folder)
    assert cfg == S32 and all(np.array_equal(got[k], flat[k]) for k in flat)


@requires_torch
def test_torch_from_checkpoint_and_from_pretrained_read_the_folder(official):
    import torch

    import mixer_torch

    _, folder, flat, _ = official
    x = np.random.default_rng(0).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
    ref = forward(flat, S32, x)
    for model in (mixer_torch.from_checkpoint(folder), mixer_torch.from_pretrained(str(folder))):
        with torch.no_grad():
            got = model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
        assert np.abs(got - ref).max() < 1e-4


@pytest.mark.slow  # the PyTorch model reads the folder in the fast tier
@requires_jax
def test_flax_from_checkpoint_and_from_pretrained_read_the_folder(official):
    import mixer_jax

    _, folder, flat, _ = official
    x = np.random.default_rng(0).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
    ref = forward(flat, S32, x)
    for model, params in (mixer_jax.from_checkpoint(folder), mixer_jax.from_pretrained(str(folder))):
        assert np.abs(np.asarray(model.apply({"params": params}, x)) - ref).max() < 1e-4


@requires_torch
def test_pytorch_model_bin_is_read_and_model_safetensors_wins_as_in_timm(half, tmp_path):
    base, flat = half
    bin_only = variant_folder(base, tmp_path / "bin", weights=None)
    write_params(flat, tmp_path / "timm.pth", fmt="torch", layout="timm").rename(bin_only / "pytorch_model.bin")
    got, _ = load_checkpoint(bin_only)
    assert all(np.array_equal(got[k], flat[k]) for k in flat)
    both = variant_folder(base, tmp_path / "both")
    (both / "pytorch_model.bin").write_bytes(b"not read: timm loads model.safetensors first")
    got, _ = load_checkpoint(both)
    assert all(np.array_equal(got[k], flat[k]) for k in flat)


# ---- the folder output is atomic -------------------------------------------------------------------


def test_a_failure_before_commit_leaves_no_folder(official, tmp_path, monkeypatch):
    import mixer_convert.tools.model_card as card

    def fail(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(card, "write_card", fail)
    with pytest.raises(Exception, match="No space left"):
        convert_checkpoint(official[0], tmp_path / "out" / "folder", "timm-hub", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_kept_without_force_and_replaced_whole_with_it(half, official, tmp_path):
    dst = tmp_path / "folder"
    shutil.copytree(half[0], dst)
    (dst / "notes.txt").write_text("mine")
    out = run_cli([str(official[0]), str(dst), "--to", "timm-hub"])
    assert out.rc == 2 and "exists; pass --force" in out.stderr and (dst / "notes.txt").exists()
    assert run_cli([str(official[0]), str(dst), "--to", "timm-hub", "--force"]).rc == 0
    assert sorted(p.name for p in dst.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    with read_params(dst) as p:
        assert p.dtypes["stem/kernel"] == np.float32  # the new weights, not the old float16


# ---- folders that lie or are broken ------------------------------------------------------------------


def _arch(name):
    return lambda d: d.update(architecture=name)


def _classes(n):
    return lambda d: d.update(num_classes=n)


def _deep(n):
    return '{"a": ' + "[" * n + "]" * n + "}"


FOLDERS = {
    # config.json contradicting the weights: one line naming both
    "architecture-contradicts": (dict(edit=_arch("mixer_b16_224")),
                                 r"config.json and model.safetensors disagree: architecture mixer_b16_224 in "
                                 r"config.json, mixer_s32_224 in model.safetensors"),
    "num-classes-contradicts": (dict(edit=lambda d: [d.update(num_classes=10), d["model_args"].update(num_classes=10),
                                                     d["pretrained_cfg"].update(num_classes=10)]),
                                r"num_classes 10 in config.json, 1000 in model.safetensors"),
    "config-contradicts-itself": (dict(edit=_classes(10)), r"contradicts itself: num_classes 10, "
                                                            r"pretrained_cfg.num_classes 1000"),
    "img-size-contradicts": (dict(edit=lambda d: d["model_args"].update(img_size=384)),
                             r"image size 384x384 in config.json, 49 patches of 32x32 in model.safetensors"),
    "not-a-mixer": (dict(edit=_arch("vit_base_patch16_224")), r"'vit_base_patch16_224' is not one of timm's MLP-Mix"),
    "no-num-classes": (dict(edit=lambda d: [d.pop("num_classes"), d["model_args"].pop("num_classes"),
                                            d["pretrained_cfg"].pop("num_classes")]), r"gives no num_classes"),
    "num-classes-bool": (dict(edit=lambda d: [d.update(num_classes=True)]), r"num_classes must be an integer"),
    "num-classes-negative": (dict(edit=_classes(-1)), r"num_classes must be an integer >= 0, got -1"),
    "img-size-junk": (dict(edit=lambda d: d["model_args"].update(img_size="big")),
                      r"model_args.img_size must be a positive int or a pair of positive ints \(height, width\), "
                      r"got 'big'"),
    "img-size-zero": (dict(edit=lambda d: d["model_args"].update(img_size=[224, 0])),
                      r"model_args.img_size must be a positive int or a pair"),
    # malformed or hostile JSON
    "key-twice": (dict(config='{"architecture": "mixer_s32_224", "num_classes": 1000, "num_classes": 10}'),
                  r"key 'num_classes' appears 2 times"),
    "not-json": (dict(config='{"architecture": '), r"config.json: not a valid JSON config"),
    "json-array": (dict(config="[1, 2]"), r"config.json: a JSON list, not an object"),
    "not-utf8": (dict(config=b'{"architecture": "\xff"}'), r"not a valid JSON config \(UnicodeDecodeError"),
    "nested-100k-deep": (dict(config=_deep(100_000)), r"not a valid JSON config"),
    "pretrained-cfg-not-object": (dict(edit=lambda d: d.update(pretrained_cfg=[])), r"must be JSON objects"),
}


@pytest.mark.parametrize("case", sorted(FOLDERS))
def test_a_lying_or_malformed_config_is_one_error_line_and_nothing_written(half, tmp_path, case):
    kw, error = FOLDERS[case]
    src = variant_folder(half[0], tmp_path / "src", **kw)
    work = tmp_path / "work"
    work.mkdir()
    judge(run_cli([str(src), str(work / "out" / "x.npz")]), work, work / "out" / "x.npz", None, error)


def _oversized(d):
    with open(d / "config.json", "wb") as f:  # valid JSON that never ends within the bound
        f.write(b'{"architecture": "mixer_s32_224", "pad": "' + b" " * (16 * 2**20) + b'"}')


def _fifo(d):
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")


def _device(d):
    (d / "config.json").unlink()
    (d / "config.json").symlink_to("/dev/zero")


def _dir_config(d):
    (d / "config.json").unlink()
    (d / "config.json").mkdir()


def _dangling_weights(d):
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(d / "nowhere")


def _folder_link(d):
    (d / "sub").symlink_to(d.parent, target_is_directory=True)


def _torch_named(d):
    with read_params(d / "model.safetensors") as p:
        flat = {k: np.array(p[k]) for k in p}
    (d / "model.safetensors").unlink()
    write_params(flat, d / "model.safetensors", fmt="safetensors", layout="torch")


PATHS = {
    "config-over-16MiB": (_oversized, r"config.json: larger than 16 MiB"),
    "config-a-fifo": (_fifo, r"config.json: a FIFO, not a checkpoint file"),
    "config-a-device-link": (_device, r"config.json: a character device"),
    "config-a-directory": (_dir_config, r"config.json: cannot read \(IsADirectoryError"),
    "weights-a-dangling-link": (_dangling_weights, r"model.safetensors: a symlink to nothing"),
    "link-to-a-folder-inside": (_folder_link, r"a link to a folder inside a checkpoint"),
    "weights-in-our-torch-naming": (_torch_named, r"model.safetensors: tensors in torch naming, not timm's"),
}


@pytest.mark.parametrize("case", sorted(PATHS))
def test_only_regular_files_in_timm_naming_are_read(half, tmp_path, case):
    make, error = PATHS[case]
    src = variant_folder(half[0], tmp_path / "src")
    make(src)
    work = tmp_path / "work"
    work.mkdir()
    judge(run_cli([str(src), str(work / "out" / "x.npz")]), work, work / "out" / "x.npz", None, error)


def test_a_folder_that_is_both_orbax_and_timm_is_refused_and_one_that_is_neither_says_so(half, tmp_path):
    both = variant_folder(half[0], tmp_path / "both")
    (both / "_METADATA").write_text("{}")
    with pytest.raises(ValueError, match="holds both an orbax checkpoint and a timm model folder"):
        format_of(both)
    neither = variant_folder(half[0], tmp_path / "neither", weights=None)
    with pytest.raises(ValueError, match=r"a folder, but not an orbax checkpoint .* nor a timm model folder"):
        format_of(neither)


def test_a_valid_folder_with_a_legacy_single_dict_config_is_read(half, tmp_path):
    base, flat = half
    doc = json.loads((base / "config.json").read_text())
    legacy = {"architecture": doc["architecture"], "num_features": doc["num_features"], **doc["pretrained_cfg"]}
    src = variant_folder(base, tmp_path / "legacy", config=json.dumps(legacy))
    got, cfg = load_checkpoint(src)
    assert cfg == S32 and all(np.array_equal(got[k], flat[k]) for k in flat)


def test_a_core_install_writes_and_reads_model_folders_without_any_framework(official, tmp_path):
    code = import_blocker("torch", "jax", "jaxlib", "flax", "optax", "orbax") + f"""
sys.path.insert(0, {str(ROOT)!r})
from mixer_convert.tools.cli import main
assert main([{str(official[0])!r}, 'folder', '--to', 'timm-hub', '--quiet']) == 0
assert main(['folder', 'back.npz', '--quiet']) == 0
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=subprocess_env())
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    card = (tmp_path / "folder" / "README.md").read_text()
    assert "Numpy reference on the written file vs on the source" in card  # what was run, said as it was
    back = read_npz(tmp_path / "back.npz")
    assert all(back[k].tobytes() == official[2][k].tobytes() for k in official[2])
