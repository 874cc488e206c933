"""``.npz``: Google's official format, a zip of ``.npy`` arrays named by '/'-joined paths.

Read member by member (nothing unpickled: object arrays are refused); written like
``np.savez`` (stored, not compressed) one tensor at a time. bfloat16 has no numpy dtype of its
own: numpy writes it as the 2-byte void type ``V2``, as big_vision's checkpoints hold it, and a
``V2`` array with no fields is read back as bfloat16.
"""
from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mixer_convert.arrays import bf16, contiguous, raw
from mixer_convert.errors import CheckpointError
from mixer_convert.formats.archive import Zip, ZipWriter
from mixer_convert.source import Entry, Source, check_shape, nbytes


def _header(f, where: str, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of an .npy stream from its header alone (no data read)."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:  # 3.0 exists only for structured dtypes with non-latin field names: never weights
        raise CheckpointError(f"{where}: entry {key!r} is in .npy format {version}, which holds no float tensor")
    if dtype.hasobject:
        raise CheckpointError(f"{where}: entry {key!r} holds Python objects; refusing to unpickle")
    if dtype.names is not None or dtype.subdtype is not None:
        raise CheckpointError(f"{where}: entry {key!r} has a structured dtype {dtype}; not a tensor")
    if dtype.kind == "V" and dtype.itemsize == 2:
        dtype = bf16()  # numpy's spelling of bfloat16 (ml_dtypes.bfloat16.str is '<V2')
    return check_shape(where, key, shape), bool(fortran), dtype


_HEADER_MAX = 1 << 20  # an .npy header is a few hundred bytes; this bounds what is parsed
_HEADER_FIRST = 4096  # read first; more only if the header's length field asks for it


def _stored_header(z: Zip, info: zipfile.ZipInfo) -> io.BytesIO:
    """The start of a stored member, enough to hold its .npy header (not a MiB of tensor data)."""
    head = z.read_stored(info, 0, min(_HEADER_FIRST, info.file_size))
    if len(head) >= 12 and bytes(head[:6]) == b"\x93NUMPY":  # magic, version, header length (2 or 4 bytes)
        length = 10 + int.from_bytes(head[8:10], "little") if head[6] == 1 else 12 + int.from_bytes(head[8:12], "little")
        if length > len(head):
            head = z.read_stored(info, 0, min(length, _HEADER_MAX, info.file_size))
    return io.BytesIO(head)


def read(src: Source) -> tuple[dict[str, Entry], Callable[[], None]]:
    path = src.path
    z = Zip(path)
    try:
        entries = {}
        for info in z.members:
            if not info.filename.endswith(".npy"):
                raise CheckpointError(f"{path}: member {info.filename!r} is not an .npy array")
            entries[info.filename[:-4]] = _entry(src, z, info)
    except BaseException:
        z.close()
        raise
    return entries, z.close


def _entry(src: Source, z: Zip, info: zipfile.ZipInfo) -> Entry:
    path, key = src.path, info.filename[:-4]
    stored = info.compress_type == zipfile.ZIP_STORED
    with src.reading(f".npz (entry {key!r})"):
        with (_stored_header(z, info) if stored else z.open(info)) as f:
            shape, fortran, dtype = _header(f, str(path), key)
            offset = f.tell()
    src.declare(key, shape, dtype)
    size = nbytes(shape, dtype)
    if offset + size != info.file_size:
        raise CheckpointError(f"{path}: entry {key!r} declares {shape} {dtype} ({size} bytes) but holds "
                              f"{info.file_size - offset} bytes; truncated or corrupt")
    native, order = dtype.newbyteorder("="), "F" if fortran else "C"

    def load() -> np.ndarray:
        if stored:  # one read of the whole member, its CRC checked
            arr = np.frombuffer(z.read_stored(info), dtype, math.prod(shape), offset) if size else np.zeros(0, dtype)
        else:  # deflated (np.savez_compressed): streamed, zipfile checks the CRC at the end
            arr = np.empty(size, np.uint8)
            with src.reading(".npz"):
                z.read_into(info, offset, memoryview(arr))
            arr = arr.view(dtype)
        return arr.reshape(shape, order=order).astype(native, copy=False)  # big-endian files become native
    return shape, native, load


def write(path: Path, items: Iterator[tuple[str, np.ndarray]], specs: list) -> None:
    """Like ``np.savez`` (stored, .npy version 1.0 headers), each tensor written as it comes, its
    data 64-byte aligned in the file so a reader's views of it are aligned."""
    with open(path, "wb") as f:
        z = ZipWriter(f)
        for k, v in items:
            # C order always, so a round trip through a transposing format gives the same bytes.
            v = contiguous(v)
            head = io.BytesIO()
            np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(v))
            z.add(k + ".npy", [head.getvalue(), raw(v)], align=64)
        z.close()
