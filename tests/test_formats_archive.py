"""mixer_convert.formats.archive: the zip writer (what zipfile and numpy read back, 64-byte aligned
member data, zip64 fields, reproducible bytes) and the safe reader (positional reads of stored
members with their CRC checked, a local header that must name its own member, nothing past the end)."""
import io
import struct
import zipfile

import numpy as np
import pytest

from mixer_convert.errors import CheckpointError
from mixer_convert.formats import npz
from mixer_convert.formats.archive import Zip, ZipWriter

MEMBERS = {"a.bin": b"hello", "dir/b.bin": bytes(range(256)) * 3, "empty": b"", "ünï.bin": b"utf-8 name"}


def _write(path, members=MEMBERS, align=1):
    with open(path, "wb") as f:
        z = ZipWriter(f)
        for name, data in members.items():
            z.add(name, [data[:2], data[2:]], align=align)  # several chunks make one member
        z.close()
    return path


def _local_header(blob: bytes, info: zipfile.ZipInfo):
    """(fields of the local header, where the member's data starts) for ``info`` in ``blob``."""
    fields = struct.unpack("<4s2B4HL2L2H", blob[info.header_offset:info.header_offset + 30])
    name_len, extra_len = fields[-2], fields[-1]
    extra_at = info.header_offset + 30 + name_len
    return fields, blob[extra_at:extra_at + extra_len], extra_at + extra_len


# ---- writing ---------------------------------------------------------------------------------------------


def test_zipfile_reads_every_member_back_and_finds_no_bad_crc(tmp_path):
    path = _write(tmp_path / "a.zip")
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        assert z.namelist() == list(MEMBERS)
        assert {n: z.read(n) for n in z.namelist()} == MEMBERS
        assert all(i.compress_type == zipfile.ZIP_STORED and i.date_time == (1980, 1, 1, 0, 0, 0)
                   for i in z.infolist())
        assert z.getinfo("ünï.bin").flag_bits & 0x800  # a non-ASCII name is flagged as UTF-8


def test_an_npz_written_by_the_writer_is_read_by_numpy(tmp_path):
    import ml_dtypes

    flat = {"stem/kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "f16": np.ones(5, np.float16),
            "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "scalar": np.array(3.5),
            "bf16": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)}
    npz.write(tmp_path / "w.npz", iter(flat.items()), [])
    with zipfile.ZipFile(tmp_path / "w.npz") as z:
        assert z.testzip() is None
    with np.load(tmp_path / "w.npz", allow_pickle=False) as got:
        assert sorted(got.files) == sorted(flat)
        for k, v in flat.items():
            if k == "bf16":
                assert got[k].dtype == np.dtype("V2") and got[k].tobytes() == v.tobytes()
            else:
                assert got[k].dtype == v.dtype and np.array_equal(got[k], v)


@pytest.mark.parametrize("align", [64, 4096])
def test_member_data_starts_at_a_multiple_of_the_alignment(tmp_path, align):
    path = _write(tmp_path / "a.zip", align=align)
    blob = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            _, _, data_at = _local_header(blob, info)
            assert data_at % align == 0, info.filename
            assert blob[data_at:data_at + info.file_size] == MEMBERS[info.filename]


def test_sizes_and_offsets_are_in_zip64_fields(tmp_path):
    path = _write(tmp_path / "a.zip")
    blob = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            fields, extra, _ = _local_header(blob, info)
            assert fields[0] == b"PK\x03\x04" and fields[1] == 45  # version 4.5: zip64
            assert fields[8:10] == (0xFFFFFFFF, 0xFFFFFFFF)  # the sizes are in the zip64 extra field
            tag, size, usize, csize = struct.unpack("<HHQQ", extra[:20])
            assert (tag, size, usize, csize) == (1, 16, len(MEMBERS[info.filename]), len(MEMBERS[info.filename]))
            assert info.file_size == len(MEMBERS[info.filename])  # zipfile took them from the zip64 fields
    cd_start = blob.index(b"PK\x01\x02")
    (ncd,) = struct.unpack("<Q", blob[blob.index(b"PK\x06\x06") + 32:blob.index(b"PK\x06\x06") + 40])
    assert ncd == len(MEMBERS)
    locator = blob.index(b"PK\x06\x07")
    assert struct.unpack("<Q", blob[locator + 8:locator + 16])[0] == blob.index(b"PK\x06\x06")
    assert struct.unpack("<L", blob[cd_start + 42:cd_start + 46])[0] == 0xFFFFFFFF  # offset: in zip64 too


def test_the_same_members_give_the_same_bytes(tmp_path):
    a, b = _write(tmp_path / "a.zip"), _write(tmp_path / "b.zip")
    assert a.read_bytes() == b.read_bytes()
    flat = {"x": np.arange(10, dtype=np.float32)}
    npz.write(tmp_path / "1.npz", iter(flat.items()), [])
    npz.write(tmp_path / "2.npz", iter(flat.items()), [])
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()


# ---- reading ---------------------------------------------------------------------------------------------


def test_read_stored_returns_a_member_and_any_part_of_it(tmp_path):
    with Zip(_write(tmp_path / "a.zip", align=64)) as z:
        info = {i.filename: i for i in z.members}["dir/b.bin"]
        assert bytes(z.read_stored(info)) == MEMBERS["dir/b.bin"]
        assert bytes(z.read_stored(info, 10, 20)) == MEMBERS["dir/b.bin"][10:30]
        assert bytes(z.read_stored(info, 700)) == MEMBERS["dir/b.bin"][700:]
        assert bytes(z.read_stored({i.filename: i for i in z.members}["empty"])) == b""


def test_read_stored_checks_the_crc_of_a_whole_member(tmp_path):
    path = _write(tmp_path / "a.zip")
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("dir/b.bin")
    _, _, data_at = _local_header(bytes(blob), info)
    blob[data_at + 100] ^= 0x01
    path.write_bytes(bytes(blob))
    with Zip(path) as z:
        info = {i.filename: i for i in z.members}["dir/b.bin"]
        with pytest.raises(CheckpointError, match=r"member 'dir/b.bin' is corrupt \(Bad CRC-32\)"):
            z.read_stored(info)
        assert len(z.read_stored(info, 0, 50)) == 50  # a part cannot be checked; the caller checks the whole


def test_a_crc_of_zero_everywhere_means_unchecked(tmp_path):
    with Zip(_write(tmp_path / "a.zip")) as z:
        info = z.members[0]
        info.CRC = None  # what the PyTorch reader sets for torch.save(compute_crc32=False)
        assert bytes(z.read_stored(info)) == MEMBERS["a.bin"]


def test_a_local_header_naming_another_file_is_refused(tmp_path):
    path = _write(tmp_path / "a.zip")
    blob = path.read_bytes()
    i = blob.index(b"a.bin")  # the first local header's name (same length, another file)
    path.write_bytes(blob[:i] + b"x.bin" + blob[i + 5:])
    with Zip(path) as z:
        with pytest.raises(CheckpointError, match="member 'a.bin': its local header names another file"):
            z.read_stored(z.members[0])


def test_no_local_header_where_the_directory_says_is_refused(tmp_path):
    path = _write(tmp_path / "a.zip")
    blob = path.read_bytes()
    path.write_bytes(b"XX" + blob[2:])
    with Zip(path) as z:
        with pytest.raises(CheckpointError, match="has no local header where the directory says"):
            z.read_stored(z.members[0])


def test_data_past_the_end_of_the_file_is_refused_not_read(tmp_path):
    path = _write(tmp_path / "a.zip")
    with Zip(path) as z:  # the directory is read; then the file is cut short under it
        info = {i.filename: i for i in z.members}["dir/b.bin"]
        with open(path, "r+b") as f:
            f.truncate(info.header_offset + 60)
        with pytest.raises(CheckpointError, match="member 'dir/b.bin' runs past the end of the file"):
            z.read_stored(info)


def test_a_compressed_member_is_not_read_as_stored(tmp_path):
    with zipfile.ZipFile(tmp_path / "d.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x", b"a" * 1000)
    with Zip(tmp_path / "d.zip") as z:
        with pytest.raises(CheckpointError, match="member 'x' is compressed; not stored"):
            z.read_stored(z.members[0])
        assert z.read(z.members[0], 1000) == b"a" * 1000  # streamed instead
        with pytest.raises(CheckpointError, match="declares 1000 bytes, more than the 999 allowed"):
            z.read(z.members[0], 999)


@pytest.mark.parametrize("case, match", [
    ("duplicate", "zip member 'x' is stored 2 times; refusing an ambiguous archive"),
    ("bzip2", "zip member 'x' uses unsupported compression method 12"),
    ("not a zip", "corrupt or truncated zip archive"),
])
def test_an_ambiguous_unsupported_or_broken_archive_is_refused_on_open(tmp_path, case, match):
    path = tmp_path / "z.zip"
    if case == "duplicate":
        buf = io.BytesIO()
        w = ZipWriter(buf)
        w.add("x", [b"1"])
        w.add("x", [b"2"])
        w.close()
        path.write_bytes(buf.getvalue())
    elif case == "bzip2":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_BZIP2) as zf:
            zf.writestr("x", b"abc")
    else:
        path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match=match):
        Zip(path)


def test_a_deflated_member_holding_more_than_declared_is_refused(tmp_path):
    data = b"x" * 5000
    with zipfile.ZipFile(tmp_path / "d.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m", data)
    with Zip(tmp_path / "d.zip") as z:
        out = bytearray(4000)  # the caller expects less than the member holds
        with pytest.raises(CheckpointError, match="holds more than its header declares"):
            z.read_into(z.members[0], 0, memoryview(out))
