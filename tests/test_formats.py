"""mixer_convert.formats: which format a checkpoint is (by content first: a .bin may be anything),
which format and naming an output path asks for, and the one module per format."""
import zipfile

import pytest

from mixer_convert.errors import CheckpointError
from mixer_convert.formats import FORMATS, NAMINGS, format_of as detect_format, module, naming, output_format
from mixer_convert.save import write_params


def test_detect_format_by_content_not_suffix(official, tmp_path):
    src, _ = official
    (tmp_path / "weights.bin").write_bytes(src.read_bytes())
    assert detect_format(tmp_path / "weights.bin") == "npz"
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="neither"):
        detect_format(tmp_path / "x.zip")


@pytest.mark.parametrize("fmt, name", [("safetensors", "w.safetensors"), ("npz", "w.npz")])
def test_content_wins_over_a_misleading_suffix(official, tmp_path, fmt, name):
    src, flat = official
    written = write_params(flat, tmp_path / name, fmt=fmt)
    for misleading in ("w.pt", "w.msgpack", "w"):
        (tmp_path / misleading).write_bytes(written.read_bytes())
        assert detect_format(tmp_path / misleading) == fmt


def test_without_telling_content_the_suffix_decides_and_an_npz_must_be_a_zip(tmp_path):
    (tmp_path / "w.msgpack").write_bytes(b"\x80")
    assert detect_format(tmp_path / "w.msgpack") == "msgpack"
    (tmp_path / "legacy.pth").write_bytes(b"\x80\x02" + bytes(20))  # torch's legacy format is no zip
    assert detect_format(tmp_path / "legacy.pth") == "torch"
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a valid npz file \\(no zip header"):
        detect_format(tmp_path / "bad.npz")
    (tmp_path / "w.ckpt").write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match="cannot tell the format from content or suffix"):
        detect_format(tmp_path / "w.ckpt")


def test_a_folder_is_orbax_or_a_model_folder_by_its_marker_files(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="a folder, but not an orbax checkpoint"):
        detect_format(tmp_path / "plain")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "_METADATA").write_text("{}")
    assert detect_format(tmp_path / "ckpt") == "orbax"


def test_a_missing_source_is_named():
    with pytest.raises(FileNotFoundError, match="no such checkpoint: 'nope.npz'"):
        detect_format("nope.npz")


@pytest.mark.parametrize("path, to, want", [
    ("o.npz", None, ("npz", "flax")), ("o.msgpack", None, ("msgpack", "flax")), ("o.flax", None, ("msgpack", "flax")),
    ("o.pt", None, ("torch", "torch")), ("o.PTH", None, ("torch", "torch")), ("o.bin", None, ("torch", "torch")),
    ("o.safetensors", None, ("safetensors", "torch")), ("o.pth", "timm", ("torch", "timm")),
    ("o.safetensors", "timm", ("safetensors", "timm")), ("o.safetensors", "torch", ("safetensors", "torch")),
    ("o.npz", "flax", ("npz", "flax")), ("o", "flax", ("orbax", "flax")), ("o.msgpack", "flax", ("msgpack", "flax")),
    ("out_dir", "orbax", ("orbax", "flax")), ("o.bin", "npz", ("npz", "flax")),
    ("folder", "timm-hub", ("timm-hub", "timm")),
])
def test_output_format_and_naming_come_from_to_or_the_suffix(path, to, want):
    assert output_format(path, to) == want


def test_an_output_without_a_known_suffix_or_with_an_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="cannot tell the output format of 'out.ckpt' from its suffix; pass --to"):
        output_format("out.ckpt", None)
    with pytest.raises(ValueError, match="unknown output kind 'jax'"):
        output_format("out.npz", "jax")


def test_each_format_has_a_default_naming_and_refuses_namings_it_cannot_hold():
    assert set(NAMINGS) == set(FORMATS)
    assert {fmt: naming(fmt, None) for fmt in FORMATS} == {"npz": "flax", "msgpack": "flax", "orbax": "flax",
                                                           "torch": "torch", "safetensors": "torch",
                                                           "timm-hub": "timm"}
    assert naming("orbax", "nnx") == "nnx" and naming("safetensors", "timm") == "timm"
    for fmt, layout, match in [("npz", "nnx", "npz files hold the Flax \\(official\\) naming, not 'nnx'"),
                               ("msgpack", "timm", "msgpack files hold the Flax"), ("orbax", "torch", "orbax files"),
                               ("timm-hub", "torch", "timm model folders hold timm's naming, not 'torch'")]:
        with pytest.raises(ValueError, match=match):
            naming(fmt, layout)


def test_each_format_has_its_module_with_a_reader_and_a_writer():
    for fmt in FORMATS:
        m = module(fmt)
        assert callable(m.read) and callable(m.write) and m.__name__.endswith(fmt.replace("-", "_"))
    with pytest.raises(ValueError, match="unknown format 'zip'"):
        module("zip")
