"""``.safetensors``: an 8-byte header length, a JSON header of {name: dtype, shape, offsets}, the data.

Hand-written, not the safetensors library, for two guarantees it does not give: writing streams
one tensor at a time (its ``save_file`` needs every tensor in memory at once), and a name given
twice in the header is refused (the library keeps the last). The header is validated as the
library validates it (bounded UTF-8 JSON, known dtypes, integer shapes, contiguous offsets that
cover the data exactly); tensors are memory-mapped, read only when used.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mixer_convert.arrays import np_dtype, raw_as_declared
from mixer_convert.errors import CheckpointError, why
from mixer_convert.source import Entry, Source, nbytes, no_duplicate_keys

MAX_HEADER = 100_000_000  # the safetensors library's own limit
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
NP_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64


def read_header(path: Path, size: int) -> tuple[int, dict[str, dict]]:
    """(header length, tensors) validated as the safetensors library does (read_metadata, validate):
    a bounded UTF-8 JSON object of {name: {dtype, shape, data_offsets}} plus an optional
    ``__metadata__`` of strings; offsets contiguous from 0, each span exactly its tensor's size,
    the last ending at the end of the file. Duplicate names are refused."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes is larger than the format allows")
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors header")
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"), object_pairs_hook=no_duplicate_keys(str(path)))
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({why(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    spans = []
    for k, info in header.items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: safetensors entry {k!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise CheckpointError(f"{path}: safetensors entry {k!r} has no dtype")
        if not isinstance(shape, list) or not all(is_uint(d) for d in shape):
            raise CheckpointError(f"{path}: safetensors entry {k!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_uint(o) for o in offsets)):
            raise CheckpointError(f"{path}: safetensors entry {k!r} has invalid data_offsets {offsets!r}")
        spans.append((offsets[0], offsets[1], k))
    end = 0
    for begin, stop, k in sorted(spans):
        if begin != end or stop < begin:
            raise CheckpointError(f"{path}: safetensors tensor {k!r} overlaps another or leaves a gap "
                                  f"(data_offsets {begin}..{stop}, expected to start at {end})")
        end = stop
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: safetensors data runs past the end of the file (it needs {8 + n + end} "
                              f"bytes, the file has {size}; truncated?)")
    if 8 + n + end < size:
        raise CheckpointError(f"{path}: {size - 8 - n - end} bytes after the last safetensors tensor (corrupt?)")
    return n, header


def read(src: Source) -> tuple[dict[str, Entry], Callable[[], None]]:
    path, size = src.path, src.stat.st_size
    n, header = read_header(path, size)
    entries = {}
    for k, info in header.items():
        if info["dtype"] not in ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {k!r} has unsupported dtype {info['dtype']!r}")
        dtype = np_dtype(ST_DTYPES[info["dtype"]])
        shape = src.declare(k, info["shape"], dtype)
        begin, end = info["data_offsets"]
        if end - begin != nbytes(shape, dtype):
            raise CheckpointError(f"{path}: tensor {k!r} is {shape} {info['dtype']} but spans {end - begin} bytes")

        def load(begin=begin, end=end, shape=shape, dtype=dtype):
            return np.frombuffer(src.read_at(8 + n + begin, end - begin), dtype).reshape(shape)
        entries[k] = (shape, dtype, load)
    return entries, src.close  # closes the file the tensors are read from, drops the read buffers


def write(path: Path, items: Iterator[tuple[str, np.ndarray]], specs: list[tuple[str, tuple, np.dtype]],
          metadata: dict[str, str] | None = None) -> None:
    """The header from ``specs`` first, then each array of ``items`` as it comes."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for k, shape, dtype in specs:
        size = nbytes(tuple(shape), dtype)
        header[k] = {"dtype": NP_TO_ST[dtype.name], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for data in raw_as_declared(items, specs, "safetensors writer", "the header"):
            f.write(data)
