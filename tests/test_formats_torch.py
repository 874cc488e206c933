"""mixer_convert.formats.torch: PyTorch checkpoints (.pt/.pth/.bin), the zip format read and written
without torch, the legacy format and other forms through torch.load(weights_only=True); pickled
code is refused. (The pickle itself: test_formats_torchpickle.py.)"""
import zipfile

import numpy as np
import pytest

from conftest import requires_torch
from mixer_convert.errors import CheckpointError
from mixer_convert.load import read_params
from mixer_convert.tools.bridge import convert_checkpoint


@requires_torch
def test_pickled_code_in_a_torch_file_is_refused(tmp_path):
    import torch

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"stem.weight": torch.zeros(1), "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_params(tmp_path / "evil.pt")


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



def _data_offset(blob: bytes, info: zipfile.ZipInfo) -> int:
    """Where a member's data starts: after its local header (whose extra field may differ from the directory's)."""
    name_len = int.from_bytes(blob[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(blob[info.header_offset + 28:info.header_offset + 30], "little")
    return info.header_offset + 30 + name_len + extra_len


@requires_torch
def test_storages_are_64_byte_aligned_as_torch_load_mmap_wants(official, tmp_path):
    src, _ = official
    convert_checkpoint(src, tmp_path / "m.pt", progress=False)
    blob = (tmp_path / "m.pt").read_bytes()
    with zipfile.ZipFile(tmp_path / "m.pt") as z:
        assert z.testzip() is None
        storages = [i for i in z.infolist() if "/data/" in i.filename]
        assert storages and all(_data_offset(blob, i) % 64 == 0 for i in storages)
        assert z.read("m/.storage_alignment") == b"64" and z.read("m/byteorder") == b"little"


def test_a_flipped_storage_byte_is_refused_when_the_tensor_is_read(official, tmp_path):
    src, flat = official
    convert_checkpoint(src, tmp_path / "m.pt", progress=False)
    blob = bytearray((tmp_path / "m.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "m.pt") as z:
        blob[_data_offset(bytes(blob), z.getinfo("m/data/0")) + 3] ^= 1  # storage 0: stem.weight
    (tmp_path / "flipped.pt").write_bytes(bytes(blob))
    with read_params(tmp_path / "flipped.pt") as params:
        assert np.array_equal(params["stem/bias"], flat["stem/bias"])  # the other storages are intact
        with pytest.raises(CheckpointError, match="member 'm/data/0' is corrupt \\(Bad CRC-32\\)"):
            params["stem/kernel"]


@requires_torch
def test_a_file_torch_saved_without_crcs_is_read(official, tmp_path):
    import torch
    from torch.utils.serialization import config

    src, flat = official
    convert_checkpoint(src, tmp_path / "m.pt", progress=False)
    sd = torch.load(tmp_path / "m.pt", weights_only=True)
    config.save.compute_crc32 = False
    try:
        torch.save(sd, tmp_path / "nocrc.pt")
    finally:
        config.save.compute_crc32 = True
    assert not any(i.CRC for i in zipfile.ZipFile(tmp_path / "nocrc.pt").infolist())
    with read_params(tmp_path / "nocrc.pt") as params:
        assert all(np.array_equal(params[k], flat[k]) for k in flat)


@requires_torch
def test_a_file_only_torch_load_reads_has_its_storages_crcs_checked_before_torch_load(official, tmp_path,
                                                                                       monkeypatch):
    import torch

    from mixer_convert.formats import torch as torch_format

    src, flat = official
    convert_checkpoint(src, tmp_path / "m.pt", progress=False)
    sd = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save({"state_dict": sd, "input": torch.Size([3, 224, 224])}, tmp_path / "t.pt")  # a global of torch's
    with read_params(tmp_path / "t.pt") as params:  # read through torch.load(weights_only=True)
        assert all(np.array_equal(params[k], flat[k]) for k in flat)
    blob = bytearray((tmp_path / "t.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "t.pt") as z:
        blob[_data_offset(bytes(blob), z.getinfo("t/data/0")) + 3] ^= 1
    (tmp_path / "t.pt").write_bytes(bytes(blob))
    monkeypatch.setattr(torch_format, "_torch_load", lambda *a: pytest.fail("torch.load reached a corrupt file"))
    with pytest.raises(CheckpointError, match="Bad CRC-32"):
        read_params(tmp_path / "t.pt")
