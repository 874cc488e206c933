"""Zip archives (.npz, PyTorch's format): read safely, member by member, and written.

Reading: the central directory by zipfile; refused up front are duplicate member names (which
copy wins is up to the reader), encryption, compression other than stored/deflate. A stored
member is read from the file in one positional read (:meth:`Zip.read_stored`), its CRC checked
before it is used; a deflated one is streamed and never read past its declared size. (Not a
memory map: a converter's memory stays one tensor's, not the whole file's, and a file truncated
meanwhile is an error, not a SIGBUS.)

Writing (:class:`ZipWriter`): stored members, zip64 throughout, each member's data optionally
aligned (PyTorch memory-maps its storages at 64-byte boundaries). Hand-written rather than
zipfile's writer, which passes every byte through zlib's CRC and Python-level copies: here the
CRC is ISA-L's (python-isal, ~4x zlib's) where installed, and the data goes from its buffer to
the file in one write.
"""
from __future__ import annotations

import os
import struct
import zipfile
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Sequence

from mixer_convert.errors import CheckpointError, why
from mixer_convert.source import Buffers, pread_into

try:  # the same CRC-32 as zlib's, computed with SIMD
    from isal.isal_zlib import crc32
except ImportError:  # a platform without isal's wheels
    from zlib import crc32

CHUNK = 4 * 2**20  # bytes per read when streaming a member


class Zip:
    def __init__(self, path: Path) -> None:
        self.path, self._file, self._buffers = path, None, Buffers()
        self._offsets: dict[int, int] = {}  # local header offset -> data offset, each parsed once
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
        self._buffers.clear()
        if self._file is not None:
            self._file.close()
            self._file = None

    def read_stored(self, info: zipfile.ZipInfo, at: int = 0, size: int | None = None) -> memoryview:
        """Bytes ``at:at+size`` (default: all) of a stored member, read straight from the file into a
        buffer of its own (one copy, no decompressor; :class:`Buffers`), its CRC checked when the
        whole member is read."""
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(f"{self.path}: member {info.filename!r} is compressed; not stored")
        size = info.file_size - at if size is None else size
        start = self._data_offset(info)
        if start + info.file_size > self._size():
            raise CheckpointError(f"{self.path}: member {info.filename!r} runs past the end of the file (truncated?)")
        buf = self._buffers.get(size)
        pread_into(self._fd(), buf, start + at)
        if at == 0 and size == info.file_size:
            self.check_crc(info, buf)
        return buf

    def _fd(self) -> int:
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)
        return self._file.fileno()

    def _size(self) -> int:
        return os.fstat(self._fd()).st_size

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a member's data starts: after its local header, whose name must be the directory's
        (checked on the first read of the member; a header read and a data read share it)."""
        if info.header_offset not in self._offsets:
            self._offsets[info.header_offset] = self._parse_local_header(info)
        return self._offsets[info.header_offset]

    def _parse_local_header(self, info: zipfile.ZipInfo) -> int:
        head = bytearray(30)
        got = pread_into(self._fd(), memoryview(head), info.header_offset, exact=False)
        if got != 30 or head[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: member {info.filename!r} has no local header where the "
                                  "directory says (corrupt?)")
        (flags,), (name_len, extra_len) = struct.unpack("<H", head[6:8]), struct.unpack("<HH", head[26:30])
        raw = bytearray(name_len)
        pread_into(self._fd(), memoryview(raw), info.header_offset + 30, exact=False)
        if raw.decode("utf-8" if flags & 0x800 else "cp437", "replace") != info.orig_filename:
            raise CheckpointError(f"{self.path}: member {info.filename!r}: its local header names another file")
        return info.header_offset + 30 + name_len + extra_len

    def check_crc(self, info: zipfile.ZipInfo, data: memoryview) -> None:
        """The member's bytes against the CRC its directory entry declares (torch's
        ``compute_crc32=False`` writes 0 for every member: nothing to check then)."""
        if info.CRC is not None and crc32(data) != info.CRC:
            raise CheckpointError(f"{self.path}: member {info.filename!r} is corrupt (Bad CRC-32)")

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


class ZipWriter:
    """Stored members written one after another into ``f``, then the central directory."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.members = f, []
        # Every member dated 1980-01-01 00:00, zip's epoch: the same tensors give the same file bytes.
        self.date, self.time = 1 << 5 | 1, 0

    def add(self, name: str, chunks: Sequence, align: int = 1) -> None:
        """A member holding the concatenated ``chunks`` (bytes-like), its data starting at a
        multiple of ``align`` in the file."""
        crc, size = 0, 0
        for c in chunks:
            crc = crc32(c, crc)
            size += memoryview(c).nbytes
        encoded, flags = _encode(name)
        offset = self.f.tell()
        extra = struct.pack("<HHQQ", 1, 16, size, size)  # zip64 sizes
        if align > 1:  # an extra field that readers ignore, sized so the data starts aligned
            pad = -(offset + 30 + len(encoded) + len(extra) + 4) % align
            extra += struct.pack("<HH", 0x4246, pad) + b"\0" * pad
        self.f.write(struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 45, 0, flags, zipfile.ZIP_STORED, self.time,
                                 self.date, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(encoded), len(extra)))
        self.f.write(encoded + extra)
        for c in chunks:
            self.f.write(c)
        self.members.append((encoded, flags, crc, size, offset))

    def close(self) -> None:
        """The central directory and the end records (zip64 and classic)."""
        start = self.f.tell()
        for encoded, flags, crc, size, offset in self.members:
            extra = struct.pack("<HH3Q", 1, 24, size, size, offset)
            self.f.write(struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 45, 3, 45, 0, flags, zipfile.ZIP_STORED,
                                     self.time, self.date, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(encoded), len(extra),
                                     0, 0, 0, 0o600 << 16, 0xFFFFFFFF))
            self.f.write(encoded + extra)
        end = self.f.tell()
        count = len(self.members)
        self.f.write(struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, end - start, start))
        self.f.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, end, 1))
        self.f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                                 min(end - start, 0xFFFFFFFF), min(start, 0xFFFFFFFF), 0))


def _encode(name: str) -> tuple[bytes, int]:
    try:
        return name.encode("ascii"), 0
    except UnicodeEncodeError:
        return name.encode("utf-8"), 0x800  # the UTF-8 name flag
