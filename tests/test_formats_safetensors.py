"""mixer_convert.formats.safetensors: written one tensor at a time and read as the safetensors
library reads it (the header validated as it validates it), and a name given twice refused."""
import json
import struct

import ml_dtypes
import numpy as np
import pytest

from mixer_convert.errors import CheckpointError
from mixer_convert.formats import safetensors as st
from mixer_convert.source import Source

TENSORS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16),
           "c": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16), "d": np.full((1, 2), 0.5)}


def _write(path, tensors=TENSORS):
    st.write(path, iter(tensors.items()), [(k, v.shape, v.dtype) for k, v in tensors.items()])
    return path


def _read(path):
    entries, close = st.read(Source.open(path))
    try:
        return {k: load() for k, (_, _, load) in entries.items()}
    finally:
        close()


def _raw(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_the_library_reads_what_we_write_and_we_read_it_back(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    path = _write(tmp_path / "w.safetensors")
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert list(f.keys()) == sorted(TENSORS) and f.metadata() == {"format": "pt"}
        assert np.array_equal(f.get_tensor("a"), TENSORS["a"]) and f.get_tensor("d").dtype == np.float64
        assert f.get_slice("c").get_dtype() == "BF16"
    got = _read(path)
    assert all(got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes() for k, v in TENSORS.items())
    assert (8 + struct.unpack("<Q", path.read_bytes()[:8])[0]) % 8 == 0  # the header is padded to 8 bytes


def test_a_name_given_twice_in_the_header_is_refused(tmp_path):
    entry = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    head = b'{"a":' + entry + b',"a":' + entry + b'}'
    with pytest.raises(CheckpointError, match="key 'a' appears 2 times in one map"):
        _read(_raw(tmp_path / "dup.safetensors", head, bytes(4)))


@pytest.mark.parametrize("header, data, match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 4, r"runs past the end of the file"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 12, r"8 bytes after the last safetensors tensor"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, r"leaves a gap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4, r"is \(2,\) F32 but spans 4 bytes"),
    ({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, 1, r"unsupported dtype 'F8_E4M3'"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, r"invalid shape \[-1\]"),
    ({"__metadata__": {"x": 1}}, 0, r"__metadata__ must map strings to strings"),
    ([], 0, r"header is a JSON list, not an object"),
])
def test_a_header_the_library_would_refuse_is_refused(tmp_path, header, data, match):
    with pytest.raises(CheckpointError, match=match):
        _read(_raw(tmp_path / "x.safetensors", json.dumps(header).encode(), bytes(data)))


def test_a_header_longer_than_the_file_is_a_truncated_file(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors header"):
        _read(tmp_path / "t.safetensors")
