"""Builders of damaged, mutated and malicious checkpoints, and a harness that runs mixer-convert on
them and judges the outcome (tests/test_hostile_inputs.py).

The judgement is the same for every case: exit 0 or 2; no traceback; on failure exactly one line
``mixer-convert: error: ...`` and nothing left behind (no output, no temporary, no folder made for
the output); on success the output holds exactly the weights the source holds. "The weights the
source holds" is the original model, except where a format has no checksum (safetensors, Flax
msgpack, legacy PyTorch files): there a changed data byte is a changed weight, read faithfully, and
the oracle applies the same change to that tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from conftest import subprocess_env
from helpers.checkpoints import TINY
from mixer_convert import random_params
from mixer_convert.layouts import LAYOUTS
PROG_ERROR = "mixer-convert: error: "

# ---- base files: one tiny model in every format -------------------------------------------------


def tiny_flat(seed: int = 0) -> dict[str, np.ndarray]:
    return random_params(TINY, seed)


def write_bases(folder: Path, flat: dict[str, np.ndarray], formats: list[str]) -> dict[str, Path]:
    """The model in each format (names: npz, pt, pt-legacy, safetensors, timm, msgpack, orbax)."""
    from mixer_convert.save import write_params

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for fmt in formats:
        if fmt == "npz":
            np.savez(folder / "m.npz", **flat)  # as vit_jax writes it
            out[fmt] = folder / "m.npz"
        elif fmt == "pt":
            out[fmt] = write_params(flat, folder / "m.pt", fmt="torch")
        elif fmt == "pt-legacy":
            import torch
            sd = torch.load(write_params(flat, folder / "tmp.pt", fmt="torch"), weights_only=True)
            torch.save(sd, folder / "legacy.pth", _use_new_zipfile_serialization=False)
            out[fmt] = folder / "legacy.pth"
        elif fmt == "safetensors":
            out[fmt] = write_params(flat, folder / "m.safetensors", fmt="safetensors")
        elif fmt == "timm":
            out[fmt] = write_params(flat, folder / "timm.safetensors", fmt="safetensors", layout="timm")
        elif fmt == "msgpack":
            out[fmt] = write_params(flat, folder / "m.msgpack", fmt="msgpack")
        elif fmt == "orbax":
            out[fmt] = write_params(flat, folder / "m_orbax", fmt="orbax")
    return out


def source_layout(fmt: str) -> str:
    return {"pt": "torch", "pt-legacy": "torch", "safetensors": "torch", "timm": "torch"}.get(fmt, "flax")


@dataclasses.dataclass(frozen=True)
class Region:
    """Bytes [start, end) of a file that are one tensor's raw data, with nothing checking them."""
    start: int
    end: int
    key: str  # canonical name
    shape: tuple[int, ...]  # as stored (source layout)
    dtype: np.dtype
    layout: str


def unchecked_regions(fmt: str, blob: bytes, flat: dict[str, np.ndarray]) -> list[Region]:
    """Where a changed byte must read as a changed weight (formats without checksums). Zip-based
    formats (.npz, .pt) have none: a CRC covers every member."""
    if fmt not in ("safetensors", "timm", "msgpack", "pt-legacy"):
        return []
    lay = LAYOUTS[source_layout(fmt)]
    out = []
    for k, v in flat.items():
        stored = np.ascontiguousarray(lay.value_to(k, v))
        raw = stored.tobytes()
        start = blob.find(raw)
        assert start >= 0 and blob.find(raw, start + 1) < 0, f"{k}: raw bytes not found once in the {fmt} file"
        out.append(Region(start, start + len(raw), k, stored.shape, stored.dtype, source_layout(fmt)))
    return out


def expected_after(blob: bytes, mutated: bytes, flat: dict[str, np.ndarray], regions: list[Region]
                   ) -> dict[str, np.ndarray]:
    """The weights a faithful reader finds in ``mutated``: the originals, with any change inside an
    unchecked data region applied to that tensor (only for same-length mutations)."""
    if len(mutated) != len(blob):
        return flat
    out = dict(flat)
    for r in regions:
        if mutated[r.start:r.end] != blob[r.start:r.end]:
            arr = np.frombuffer(mutated[r.start:r.end], r.dtype).reshape(r.shape)
            out[r.key] = LAYOUTS[r.layout].value_from(r.key, arr)
    return out


# ---- seeded mutations ----------------------------------------------------------------------------


def _flip(b: bytearray, rng) -> bytearray:
    i = int(rng.integers(len(b)))
    b[i] ^= 1 << int(rng.integers(8))
    return b


def _byte(b: bytearray, rng) -> bytearray:
    b[int(rng.integers(len(b)))] = int(rng.integers(256))
    return b


def _truncate(b: bytearray, rng) -> bytearray:
    return b[: int(rng.integers(len(b)))]


def _insert(b: bytearray, rng) -> bytearray:
    i = int(rng.integers(len(b) + 1))
    return b[:i] + bytearray(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()) + b[i:]


def _delete(b: bytearray, rng) -> bytearray:
    i = int(rng.integers(len(b)))
    return b[:i] + b[i + int(rng.integers(1, 64)):]


def _zero_span(b: bytearray, rng) -> bytearray:
    i = int(rng.integers(len(b)))
    n = int(rng.integers(1, 256))
    b[i:i + n] = bytes(len(b[i:i + n]))
    return b


def _header_flip(b: bytearray, rng) -> bytearray:  # the first KiB: headers, where structure lives
    i = int(rng.integers(min(len(b), 1024)))
    b[i] ^= 1 << int(rng.integers(8))
    return b


def _tail_flip(b: bytearray, rng) -> bytearray:  # the last KiB: zip central directories, trailers
    i = len(b) - 1 - int(rng.integers(min(len(b), 1024)))
    b[i] ^= 1 << int(rng.integers(8))
    return b


MUTATORS: dict[str, Callable] = {"flip": _flip, "byte": _byte, "truncate": _truncate, "insert": _insert,
                                 "delete": _delete, "zero": _zero_span, "headflip": _header_flip,
                                 "tailflip": _tail_flip}


def mutate(blob: bytes, kind: str, seed: int) -> bytes:
    out = bytes(MUTATORS[kind](bytearray(blob), np.random.default_rng(seed)))
    return out if out != blob else mutate(blob, kind, seed + 10_000)  # a no-op mutation tests nothing


# ---- hostile file builders -------------------------------------------------------------------------


def rezip(src: Path, dst: Path, mutate_member: Callable[[str, bytes], bytes] = lambda n, d: d,
          extra: tuple[tuple[str, bytes], ...] = (), compress: int = zipfile.ZIP_STORED) -> Path:
    """A copy of a zip archive with members changed (their CRCs recomputed) or added (a name
    given twice is the point of some cases: zipfile's warning about it is expected)."""
    import warnings

    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for i in a.infolist():
            b.writestr(i.filename, mutate_member(i.filename, a.read(i)), compress_type=compress)
        for name, data in extra:
            b.writestr(name, data)
    return dst


def raw_zip(path: Path, members: list[tuple[str, bytes, int, int, int]], flags: int = 0) -> Path:
    """A zip written by hand from (name, stored bytes, method, crc, uncompressed size): members can
    be pre-compressed bombs or carry flags zipfile would not write."""
    out, central = bytearray(), bytearray()
    for name, data, method, crc, size in members:
        nb, offset = name.encode(), len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0x21, crc, len(data), size, len(nb), 0)
        out += nb + data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, method, 0, 0x21, crc, len(data), size,
                               len(nb), 0, 0, 0, 0, 0, offset) + nb
    cd = len(out)
    out += central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), cd, 0)
    path.write_bytes(bytes(out))
    return path


def deflate_bomb(prefix: bytes, zeros: int, crc: bool = True) -> tuple[bytes, int, int]:
    """Raw deflate of ``prefix`` + ``zeros`` zero bytes, built from one compressed MiB repeated
    (full flushes make the blocks independent), so a GiB costs ~1 MB and no GiB of work.
    Returns (data, crc32, uncompressed size); ``crc=False`` skips the CRC (0) for bombs a reader
    must refuse before reading them at all."""
    mib = 2**20
    assert zeros % mib == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(mib)) + c.flush(zlib.Z_FULL_FLUSH)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    value = 0
    if crc:
        value = zlib.crc32(prefix)
        for _ in range(zeros // mib):
            value = zlib.crc32(bytes(mib), value)
    return head + block * (zeros // mib) + tail, value, len(prefix) + zeros


def zstd_rle(byte: int, n: int) -> bytes:
    """A zstd frame of ``n`` copies of one byte from RLE blocks: ~4 bytes per 128 KiB."""
    out = bytearray(b"\x28\xb5\x2f\xfd") + bytes([0xE0]) + struct.pack("<Q", n)  # single segment, 8-byte size
    left = n
    while True:
        size = min(left, 128 * 1024)
        left -= size
        last = int(left == 0)
        out += (last | (1 << 1) | (size << 3)).to_bytes(3, "little") + bytes([byte])
        if last:
            return bytes(out)


def safetensors_file(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """An .npy v1 header alone (no data)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


# ---- running mixer-convert -------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    rc: int | None
    stderr: str
    traceback: str = ""

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


@contextlib.contextmanager
def _fd2_to(f):
    """C-level writes to stderr (tensorstore, absl) go around sys.stderr; catch those too."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run_cli(argv: list[str]) -> Outcome:
    """mixer-convert in this process (hundreds of cases need no interpreter start each)."""
    from mixer_convert.tools.cli import main

    err = io.StringIO()
    with tempfile.TemporaryFile() as raw:
        with _fd2_to(raw), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc, tb = main(argv), ""
            except SystemExit as e:  # argparse
                rc, tb = e.code, ""
            except BaseException:
                rc, tb = None, traceback.format_exc()
        raw.seek(0)
        return Outcome(rc, err.getvalue() + raw.read().decode(errors="replace"), tb)


# The child records its own peak RSS (VmHWM: this image's, not the forked parent's) at exit.
_CHILD = """import sys
{setup}
import atexit, os
def _peak():
    with open("/proc/self/status") as f, open({hwm!r}, "w") as out:
        out.write(next(line.split()[1] for line in f if line.startswith("VmHWM")))
if os.path.exists("/proc/self/status"):
    atexit.register(_peak)
from mixer_convert.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli_process(argv: list[str], setup: str = "", timeout: float = 300) -> tuple[Outcome, int]:
    """mixer-convert in a fresh interpreter, after running ``setup`` (Python) there: (outcome, peak
    RSS in bytes, 0 where /proc is missing). Limits are set by ``setup`` in the child, not by a
    preexec_fn: forking a multithreaded parent (JAX) and running Python before exec can deadlock."""
    with tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as d:
        hwm = Path(d) / "hwm"
        cmd = [sys.executable, "-c", _CHILD.format(setup=setup, hwm=str(hwm)), *argv]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=subprocess_env())
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise
        err.seek(0)
        text = err.read().decode(errors="replace")
        peak = int(hwm.read_text()) * 1024 if hwm.exists() else 0
    return Outcome(p.returncode, text, "Traceback" if "Traceback" in text else ""), peak


# Child setups. Root ignores file permissions: drop exactly that capability from the bounding set
# (Linux prctl PR_CAPBSET_DROP) and re-exec, so the new image runs without it.
WITHOUT_ROOT_PRIVILEGE = """
import ctypes, os
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        assert libc.prctl(24, cap, 0, 0, 0) == 0, ctypes.get_errno()
    os.execv(sys.executable, [sys.executable, "-m", "mixer_convert.tools.cli", *sys.argv[1:]])
"""


def disk_full_after(nbytes: int) -> str:
    """A disk that is full after ``nbytes``: writes beyond fail with EFBIG (SIGXFSZ ignored)."""
    return (f"import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({nbytes}, {nbytes}))")


def memory_at_most(nbytes: int) -> str:
    return f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({nbytes}, {nbytes}))"


def snapshot(path: Path) -> dict[str, tuple]:
    """Every regular file under a path (a file or a directory) as (size, mtime, sha256 of the first
    64 MiB), to prove the source is untouched without reading a multi-GB sparse bomb whole;
    FIFOs, devices and unreadable paths count as absent."""
    import hashlib
    import stat

    def state(p: Path):
        try:
            st = os.stat(p)
            if not stat.S_ISREG(st.st_mode):
                return None
            with open(p, "rb") as f:
                return st.st_size, st.st_mtime_ns, hashlib.sha256(f.read(64 * 2**20)).hexdigest()
        except OSError:
            return None
    try:
        files = sorted(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [path]
    except OSError:
        return {}
    return {str(p): s for p in files if (s := state(p)) is not None}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def same_weights(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    return set(got) == set(want) and all(
        got[k].shape == want[k].shape and got[k].dtype == want[k].dtype
        and np.ascontiguousarray(got[k]).tobytes() == np.ascontiguousarray(want[k]).tobytes() for k in want)


def judge(out: Outcome, workdir: Path, dst: Path, expected: dict[str, np.ndarray] | None,
          error: str | None = None) -> str:
    """Check one run against the rules above; returns 'refused' or 'converted'. ``workdir`` must
    have been empty before the run (dst lies in a folder below it that the run had to create).
    ``error``: a regex the error line must match (targeted cases)."""
    import re

    assert not out.traceback and "Traceback" not in out.stderr, out.traceback or out.stderr
    assert out.rc in (0, 2), (out.rc, out.stderr)
    left = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    if out.rc == 2:
        assert len(out.lines) == 1 and out.lines[0].startswith(PROG_ERROR), out.stderr
        assert "internal error" not in out.stderr, out.stderr
        if error:
            assert re.search(error, out.lines[0]), (error, out.lines[0])
        assert left == [], f"left behind: {left}"
        return "refused"
    assert error is None, f"expected an error matching {error!r}, got exit 0"
    assert all(line.startswith("mixer-convert: warning: ") for line in out.lines), out.stderr
    rel = str(dst.relative_to(workdir))
    assert left == sorted({rel, *(str(p.relative_to(workdir)) for p in dst.parents if workdir in p.parents)}), left
    assert expected is not None and same_weights(read_npz(dst), expected), "exit 0 with wrong weights"
    return "converted"


def fresh_dir(root: Path, name: str) -> Path:
    d = root / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d
