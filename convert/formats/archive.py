"""Zip archives (.npz, PyTorch's format) read member by member, safely.

Refused up front: duplicate member names (which copy wins is up to the reader), encryption,
compression other than stored/deflate. Members are streamed in chunks and never past their
declared size; zipfile checks each CRC at the end of a member.
"""
from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

from mixer_convert.errors import CheckpointError, why

CHUNK = 4 * 2**20  # bytes per read when streaming a member


class Zip:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.zf = zipfile.ZipFile(path)
            self.members = self.zf.infolist()
        except Exception as e:
            raise CheckpointError(f"{path}: corrupt or truncated zip archive ({why(e)})") from None
        try:
            self._check_members()
        except BaseException:
            self.zf.close()
            raise

    def _check_members(self) -> None:
        counts = Counter(i.filename for i in self.members)
        dups = sorted(n for n, c in counts.items() if c > 1)
        if dups:
            raise CheckpointError(f"{self.path}: zip member {dups[0]!r} is stored {counts[dups[0]]} times; "
                                  "refusing an ambiguous archive")
        for i in self.members:
            if i.flag_bits & 0x1:
                raise CheckpointError(f"{self.path}: zip member {i.filename!r} is encrypted")
            if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise CheckpointError(f"{self.path}: zip member {i.filename!r} uses unsupported compression "
                                      f"method {i.compress_type}")

    def __enter__(self) -> "Zip":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.zf.close()

    def open(self, info: zipfile.ZipInfo):
        return self.zf.open(info)

    def read_into(self, info: zipfile.ZipInfo, skip: int, out: memoryview) -> None:
        """Bytes ``skip:`` of a member into ``out``, which must be exactly the rest of it."""
        with self.zf.open(info) as f:
            if len(f.read(skip)) != skip:
                raise CheckpointError(f"{self.path}: member {info.filename!r} is truncated")
            pos = 0
            while pos < len(out):
                n = f.readinto(out[pos:pos + CHUNK])
                if not n:
                    raise CheckpointError(f"{self.path}: member {info.filename!r} is truncated")
                pos += n
            if f.read(1):  # also completes the stream, so zipfile checks the CRC
                raise CheckpointError(f"{self.path}: member {info.filename!r} holds more than its header declares")

    def read(self, info: zipfile.ZipInfo, limit: int) -> bytes:
        """A whole member of at most ``limit`` bytes."""
        if info.file_size > limit:
            raise CheckpointError(f"{self.path}: member {info.filename!r} declares {info.file_size} bytes, "
                                  f"more than the {limit} allowed")
        buf = bytearray(info.file_size)
        self.read_into(info, 0, memoryview(buf))
        return bytes(buf)

    def verify(self, info: zipfile.ZipInfo) -> None:
        """Stream a member to its end (zipfile checks size and CRC) without keeping it."""
        with self.zf.open(info) as f:
            n = 0
            while chunk := f.read(CHUNK):
                n += len(chunk)
            if n != info.file_size:
                raise CheckpointError(f"{self.path}: member {info.filename!r} is truncated")
