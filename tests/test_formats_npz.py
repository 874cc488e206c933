"""mixer_convert.formats.npz: Google's official .npz, read member by member from its headers
(never unpickling), written like np.savez; bfloat16 as numpy's 2-byte void type."""
import ml_dtypes
import numpy as np
import pytest

from helpers.checkpoints import TINY
from mixer_convert import random_params
from mixer_convert.errors import CheckpointError
from mixer_convert.formats import npz
from mixer_convert.load import read_params
from mixer_convert.source import Source


def test_object_arrays_are_never_unpickled(tmp_path):
    flat = random_params(TINY, 0)
    np.savez(tmp_path / "obj.npz", **flat, evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_params(tmp_path / "obj.npz")


def _read(path):
    entries, close = npz.read(Source.open(path))
    try:
        return {k: (shape, dtype, load()) for k, (shape, dtype, load) in entries.items()}
    finally:
        close()


def test_compressed_fortran_ordered_and_big_endian_members_read_as_numpy_reads_them(tmp_path):
    arrays = {"c": np.arange(12, dtype=np.float32).reshape(3, 4), "f": np.asfortranarray(np.ones((2, 3)) * [1, 2, 3]),
              "be": np.arange(5, dtype=">f4"), "empty": np.zeros((0, 2), np.float16)}
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "a.npz", **arrays)
        got = _read(tmp_path / "a.npz")
        for k, v in arrays.items():
            shape, dtype, arr = got[k]
            assert shape == v.shape and dtype == v.dtype.newbyteorder("=") and np.array_equal(arr, v)
            assert arr.dtype.isnative


def test_a_two_byte_void_member_is_bfloat16(tmp_path):
    bf = np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16)
    np.savez(tmp_path / "bf.npz", w=bf)
    assert np.load(tmp_path / "bf.npz")["w"].dtype == np.dtype("V2")
    shape, dtype, arr = _read(tmp_path / "bf.npz")["w"]
    assert dtype == np.dtype(ml_dtypes.bfloat16) and arr.tobytes() == bf.tobytes()


@pytest.mark.parametrize("value, match", [
    (np.zeros(2, [("a", np.float32), ("b", np.float32)]), "has a structured dtype"),
    (np.array([{"a": 1}], dtype=object), "holds Python objects; refusing to unpickle"),
])
def test_structured_and_object_members_are_refused_by_their_headers(tmp_path, value, match):
    np.savez(tmp_path / "x.npz", w=value)
    with pytest.raises(CheckpointError, match=match):
        _read(tmp_path / "x.npz")


def test_a_member_that_is_not_an_npy_array_is_refused(tmp_path):
    import zipfile

    np.savez(tmp_path / "x.npz", w=np.zeros(2, np.float32))
    with zipfile.ZipFile(tmp_path / "x.npz", "a") as z:
        z.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointError, match="member 'notes.txt' is not an .npy array"):
        _read(tmp_path / "x.npz")


def test_writing_then_reading_is_exact_and_nothing_is_read_before_it_is_asked_for(tmp_path):
    flat = random_params(TINY, 0)
    npz.write(tmp_path / "w.npz", iter(flat.items()), [])
    params = read_params(tmp_path / "w.npz")
    with params:
        assert params.format == "npz" and params.shapes == {k: v.shape for k, v in flat.items()}
        assert all(np.array_equal(params[k], flat[k]) for k in flat)


def test_reading_the_headers_reads_a_few_kib_per_member_not_its_data(tmp_path, monkeypatch):
    from mixer_convert.formats.archive import Zip

    np.savez(tmp_path / "big.npz", a=np.ones((512, 1024), np.float32), b=np.zeros((3, 5), np.float32))
    sizes, read_stored = [], Zip.read_stored
    monkeypatch.setattr(Zip, "read_stored", lambda self, info, at=0, size=None: sizes.append(size)
                        or read_stored(self, info, at, size))
    entries, close = npz.read(Source.open(tmp_path / "big.npz"))
    close()
    assert entries["a"][0] == (512, 1024) and max(sizes) <= npz._HEADER_FIRST


def test_a_header_longer_than_the_first_read_is_read_whole(tmp_path):
    """numpy pads headers with spaces; one padded past the first 4 KiB still parses exactly."""
    import zipfile

    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }".ljust(6000 - 10 - 1) + "\n"
    npy = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1") + arr.tobytes()
    with zipfile.ZipFile(tmp_path / "long.npz", "w") as zf:
        zf.writestr("x.npy", npy)
    assert len(npy) - arr.nbytes > npz._HEADER_FIRST
    got = _read(tmp_path / "long.npz")["x"]
    assert got[0] == (3, 4) and np.array_equal(got[2], arr)
