"""``.npz``: Google's official format, a zip of ``.npy`` arrays named by '/'-joined paths.

Read member by member (nothing unpickled: object arrays are refused); written like
``np.savez`` (stored, not compressed) one tensor at a time. bfloat16 has no numpy dtype of its
own: numpy writes it as the 2-byte void type ``V2``, as big_vision's checkpoints hold it, and a
``V2`` array with no fields is read back as bfloat16.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mixer_convert.dtypes import bf16
from mixer_convert.errors import CheckpointError
from mixer_convert.formats.archive import Zip
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
    with src.reading(f".npz (entry {key!r})"), z.open(info) as f:
        shape, fortran, dtype = _header(f, str(path), key)
        offset = f.tell()
    src.declare(key, shape, dtype)
    size = nbytes(shape, dtype)
    if offset + size != info.file_size:
        raise CheckpointError(f"{path}: entry {key!r} declares {shape} {dtype} ({size} bytes) but holds "
                              f"{info.file_size - offset} bytes; truncated or corrupt")
    native = dtype.newbyteorder("=")

    def load() -> np.ndarray:
        buf = np.empty(size, np.uint8)  # exactly the declared size, checked above
        with src.reading(".npz"):
            z.read_into(info, offset, memoryview(buf))
        arr = buf.view(dtype).reshape(shape, order="F" if fortran else "C")
        return arr.astype(native, copy=False)  # big-endian files become native
    return shape, native, load


def write(path: Path, items: Iterator[tuple[str, np.ndarray]], specs: list) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for k, v in items:
            with z.open(k + ".npy", "w", force_zip64=True) as f:
                # C order always, so a round trip through a transposing format gives the same bytes.
                np.lib.format.write_array(f, np.ascontiguousarray(v), allow_pickle=False)
