"""Hostile and broken inputs (issue #10): mixer-convert, every from_checkpoint() and init_from, run
on damaged, mutated and malicious files, semantic traps, odd paths and destinations, and signals.

Every case is judged by one rule (tests/helpers/hostile.py ``judge``): exit 0 or 2, never a traceback; a
failure is one line ``mixer-convert: error: ...`` with nothing left behind; a success writes exactly
the weights the source holds. Seeded random mutations cover what targeted cases would not think of.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, has_module, requires_jax, requires_torch, subprocess_env
from helpers.hostile import (MUTATORS, PROG_ERROR, TINY, WITHOUT_ROOT_PRIVILEGE, deflate_bomb, disk_full_after,
                     expected_after, fresh_dir, judge, memory_at_most, mutate, npy_header, raw_zip, rezip, run_cli,
                     run_cli_process, safetensors_file, safetensors_parts, same_weights, snapshot, tiny_flat,
                     unchecked_regions, write_bases, zstd_rle)
from mixer_convert import ParamMismatchError, param_shapes
from mixer_convert.errors import CheckpointError
from mixer_convert.source import MAX_BYTES
from mixer_convert.errors import one_line as _one_line

SEED = 20_100  # issue #10
FLAT = tiny_flat(0)
GiB = 2**30
requires_orbax = pytest.mark.skipif(not has_module("orbax"), reason="needs orbax (the train extra)")
OTHER_CASES = 0  # cases of the tests below that are not in a table; docs/converting.md reports the total


def cases(n: int):
    """Marks a test as trying ``n`` hostile cases (for the tally in docs/converting.md)."""
    def count(test):
        global OTHER_CASES
        OTHER_CASES += n
        return test
    return count


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    formats = ["npz", "safetensors", "timm"]
    formats += ["pt", "pt-legacy"] if has_module("torch") else []
    formats += ["msgpack"] if has_module("flax") else []
    formats += ["orbax"] if has_module("orbax") else []
    return write_bases(tmp_path_factory.mktemp("bases"), FLAT, formats)


def convert_and_judge(src: Path, work: Path, expected, error: str | None = None, extra: tuple[str, ...] = ()) -> str:
    """Run the CLI on ``src`` into a folder it must create, and judge the outcome."""
    dst = work / "made" / "out.npz"
    before = snapshot(src)
    outcome = run_cli([str(src), str(dst), "--quiet", *extra])
    verdict = judge(outcome, work, dst, expected, error)
    assert snapshot(src) == before, "the source was modified"
    return verdict


# ==== mutated: seeded random damage to every format ==================================================

MUTATION_FORMATS = {"npz": None, "safetensors": None, "timm": None, "pt": requires_torch,
                    "pt-legacy": requires_torch, "msgpack": requires_jax}
PER_MUTATOR = 6
MUTATION_CASES = len(MUTATION_FORMATS) * len(MUTATORS) * PER_MUTATOR


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=m or []) for f, m in MUTATION_FORMATS.items()])
def test_seeded_mutations_are_refused_or_read_faithfully(fmt, bases, tmp_path):
    src = bases[fmt]
    blob = src.read_bytes()
    regions = unchecked_regions(fmt, blob, FLAT)
    failures, verdicts = [], []
    for kind in MUTATORS:
        for i in range(PER_MUTATOR):
            case = f"{fmt}-{kind}-{i}"
            seed = SEED + 1000 * list(MUTATORS).index(kind) + i
            mutated = mutate(blob, kind, seed)
            path = tmp_path / "src" / case / src.name
            path.parent.mkdir(parents=True)
            path.write_bytes(mutated)
            try:
                verdicts.append(convert_and_judge(path, fresh_dir(tmp_path, "w-" + case), expected_after(
                    blob, mutated, FLAT, regions)))
            except AssertionError as e:
                failures.append(f"{case}: {e}")
    assert not failures, "\n".join(failures)
    assert len(verdicts) == len(MUTATORS) * PER_MUTATOR
    assert "refused" in verdicts  # the mutations did damage something


ORBAX_MUTATIONS = 16


@requires_orbax
def test_seeded_mutations_of_orbax_metadata_are_refused_or_harmless(bases, tmp_path):
    """The tree's structure lives in _METADATA and the OCDBT manifests; the array data files carry
    no checksum (like safetensors) and are not mutated here."""
    src = bases["orbax"]
    targets = sorted(p.relative_to(src) for p in src.rglob("*")
                     if p.is_file() and (p.name in ("_METADATA", "_CHECKPOINT_METADATA") or p.suffix == ".ocdbt"))
    failures = []
    for i in range(ORBAX_MUTATIONS):
        case = f"orbax-{i}"
        copy = tmp_path / "src" / case / src.name
        shutil.copytree(src, copy)
        target = copy / targets[i % len(targets)]
        target.write_bytes(mutate(target.read_bytes(), ["flip", "truncate", "headflip", "zero"][i % 4], SEED + i))
        try:
            convert_and_judge(copy, fresh_dir(tmp_path, "w-" + case), FLAT)
        except AssertionError as e:
            failures.append(f"{case} ({targets[i % len(targets)]}): {e}")
    assert not failures, "\n".join(failures)


SAFETENSORS_HEADER_MUTATIONS = 120


def test_safetensors_headers_are_judged_as_the_safetensors_library_judges_them(bases, tmp_path):
    """Differential: whatever the library refuses we refuse; whatever it accepts we accept, unless
    a tensor has a dtype no Mixer has (float8, unsigned, ...), which we refuse by name."""
    safetensors = pytest.importorskip("safetensors")
    from mixer_convert.formats.safetensors import read as _read_safetensors
    from mixer_convert.source import Source

    blob = bases["safetensors"].read_bytes()
    header_end = 8 + int.from_bytes(blob[:8], "little")
    rng = np.random.default_rng(SEED)
    disagree, verdicts = [], []
    for i in range(SAFETENSORS_HEADER_MUTATIONS):
        b = bytearray(blob)
        at = int(rng.integers(8, header_end)) if i % 4 else int(rng.integers(8))  # mostly the JSON
        if i % 3 == 0:
            b[at] ^= 1 << int(rng.integers(8))
        elif i % 3 == 1:
            b[at] = int(rng.choice(list(b'0123456789[]{},:"-. e')))
        else:
            del b[at]
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(bytes(b))
        try:
            with safetensors.safe_open(str(path), framework="numpy") as f:
                library = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        except Exception:  # the library's verdict: invalid
            library = None
        try:
            _read_safetensors(Source.open(path, None))
            ours = True
        except CheckpointError:
            ours = False
        mixer_dtypes = library is not None and set(library.values()) <= {"F64", "F32", "F16", "BF16", "I64", "I32",
                                                                            "I16", "I8", "U8", "BOOL"}
        verdicts.append((library is not None, ours))
        if (library is None and ours) or (mixer_dtypes and not ours):
            disagree.append(f"{i}: library {'accepts' if library is not None else 'refuses'}, we "
                            f"{'accept' if ours else 'refuse'}")
    assert not disagree, disagree
    assert (True, True) in verdicts and (False, False) in verdicts  # both verdicts were exercised


# ==== targeted cases: damaged, malicious, semantic, paths ==============================================
# CASES: name -> (framework needed, builder, extra CLI args, expected). A builder gets (bases, folder)
# and returns the source it made; expected is the weights a case must convert to, or a regex its one
# error line must match.

def _with(flat: dict, **changes) -> dict:
    out = dict(flat)
    out.update({k.replace("__", "/"): v for k, v in changes.items()})
    return out


def _npz(d: Path, name: str, flat: dict) -> Path:
    np.savez(d / name, **flat)
    return d / name


def _torch_sd(flat: dict) -> dict:
    import torch

    from mixer_convert.layouts import canonical_to_torch
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in canonical_to_torch(flat, TINY).items()}


def _pt(d: Path, name: str, sd: dict, legacy: bool = False) -> Path:
    import torch
    torch.save(sd, d / name, _use_new_zipfile_serialization=not legacy)
    return d / name


def _pt_edit(d: Path, name: str, key: str, change) -> Path:
    """The model as a .pt with one tensor changed by ``change(torch, tensor)``."""
    import torch

    sd = _torch_sd(FLAT)
    sd[key] = change(torch, sd[key])
    return _pt(d, name, sd)


def _pt_without_crcs(d: Path) -> Path:
    """torch.save with compute_crc32=False writes 0 for every CRC: nothing to check, still readable."""
    from torch.utils.serialization import config

    config.save.compute_crc32 = False
    try:
        path = _pt(d, "nocrc.pt", _torch_sd(FLAT))
    finally:
        config.save.compute_crc32 = True
    assert not any(i.CRC for i in zipfile.ZipFile(path).infolist())
    return path


def _first_storage(path: Path) -> str:
    return next(n for n in zipfile.ZipFile(path).namelist() if "/data/" in n)


def _flip_in_member(src: Path, dst: Path, member: str, at: int = 7) -> Path:
    blob = bytearray(src.read_bytes())
    data = zipfile.ZipFile(src).read(member)
    off = blob.find(data[:64])
    blob[off + at] ^= 0x10
    dst.write_bytes(bytes(blob))
    return dst


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _st_edit(b, d: Path, name: str, edit) -> Path:
    header, data = safetensors_parts(b["safetensors"])
    header = json.loads(json.dumps(header))
    new = edit(header)
    return safetensors_file(d / name, new if new is not None else header, data)


def _first_key(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _set(obj, key, value):
    obj[key] = value


def _legacy_tree(flat: dict) -> dict:
    """big_vision's legacy names for ``flat`` (the converter's own test builds the same)."""
    legacy = {}
    for k, v in flat.items():
        k2 = k.replace("stem/", "embedding/").replace("pre_head_layer_norm/", "Mixer/encoder_norm/")
        k2 = k2.replace("MixerBlock_", "Mixer/encoderblock_").replace("LayerNorm_1", "LayerNorm_2")
        for phase in ("token_mixing", "channel_mixing"):
            for dense, (kn, bn) in (("Dense_0", ("kernel1", "bias1")), ("Dense_1", ("kernel2", "bias2"))):
                if f"/{phase}/{dense}/" in k2:
                    k2 = k2.split(f"/{phase}/")[0] + f"/{phase}_phase_0/{kn if k2.endswith('kernel') else bn}"
                    v = v[None]
        legacy[k2] = v
    return legacy


def _pt_pickle_dup(b, d: Path, legacy: bool) -> Path:
    """One state-dict key given twice inside the pickle itself (last would win)."""
    sd = _torch_sd(FLAT)
    sd["stem.weighX"] = 0 * sd["stem.weight"]  # same length as the key it will become
    src = _pt(d, "twice_src.pt", sd, legacy)
    if legacy:
        (d / "twice.pt").write_bytes(src.read_bytes().replace(b"stem.weighX", b"stem.weight"))
        return d / "twice.pt"
    return rezip(src, d / "twice.pt", lambda n, data: data.replace(b"stem.weighX", b"stem.weight")
                 if n.endswith("data.pkl") else data)


def _pkl_bomb(b, d: Path, mib: int) -> Path:
    """A .pt whose data.pkl inflates to ``mib`` MiB (the real pickle, then zeros; CRC not computed
    for the large one: it must be refused before it is read)."""
    with zipfile.ZipFile(b["pt"]) as z:
        members = []
        for i in z.infolist():
            data = z.read(i)
            if i.filename.endswith("data.pkl"):
                packed, crc, size = deflate_bomb(data, mib * 2**20, crc=mib <= 64)
                members.append((i.filename, packed, zipfile.ZIP_DEFLATED, crc, size))
            else:
                members.append((i.filename, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data)))
    return raw_zip(d / "bomb.pt", members)


def _npz_declaring(d: Path, name: str, key: str, floats: int) -> Path:
    """An .npz whose ``key`` member is a consistent (floats,) float32 array of zeros, deflated: a GiB
    costs a MB (CRC not computed: it must be refused before it is read)."""
    members = []
    for k, v in FLAT.items():
        if k == key:
            packed, crc, size = deflate_bomb(npy_header((floats,)), 4 * floats, crc=False)
            members.append((k + ".npy", packed, zipfile.ZIP_DEFLATED, crc, size))
        else:
            buf = io.BytesIO()
            np.lib.format.write_array(buf, v)
            members.append((k + ".npy", buf.getvalue(), zipfile.ZIP_STORED, zlib.crc32(buf.getvalue()),
                            len(buf.getvalue())))
    return raw_zip(d / name, members)


def _orbax_copy(b, d: Path, edit) -> Path:
    dst = d / "ckpt"
    shutil.copytree(b["orbax"], dst)
    edit(dst)
    return dst


def _orbax_dup_key(root: Path) -> None:
    meta = (root / "_METADATA").read_text()
    tree = json.loads(meta)["tree_metadata"]
    key, value = next(iter(tree.items()))
    # the same key once more, at the end of the tree object
    i = meta.rindex("}}")
    (root / "_METADATA").write_text(meta[:i + 1] + ", " + json.dumps(key) + ": " + json.dumps(value) + meta[i + 1:])


def _orbax_zarr_bomb(b, d: Path) -> Path:
    """An orbax checkpoint (zarr, no OCDBT) whose stem bias declares 3.2 GB, stored as one zstd
    chunk of ~100 KB that inflates to all of it."""
    import orbax.checkpoint as ocp

    from mixer_convert.trees import nest as _nest
    root = d / "ckpt"
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(root.absolute(), _nest(FLAT))
    n = 800_000_000
    meta = json.loads((root / "stem.bias" / ".zarray").read_text())
    meta.update(shape=[n], chunks=[n])
    (root / "stem.bias" / ".zarray").write_text(json.dumps(meta))
    (root / "stem.bias" / "0").write_bytes(zstd_rle(0, 4 * n))
    return root


def _legacy_storage_bomb(b, d: Path) -> Path:
    """A legacy torch file whose one storage (and tensor) declares 800M floats; the file is tiny."""
    import pickletools
    import struct

    src = _pt(d, "one.pth", {"stem.bias": _torch_sd(FLAT)["stem.bias"]}, legacy=True)
    blob = src.read_bytes()
    f = io.BytesIO(blob)
    for _ in range(3):
        for _ in pickletools.genops(f):
            pass
    ints = [(pos, arg) for op, arg, pos in pickletools.genops(f) if op.name == "BININT1" and arg == 24]
    out = bytearray(blob)
    for pos, _ in reversed(ints[:2]):  # storage numel, then the tensor's size
        out[pos:pos + 2] = b"J" + struct.pack("<i", 800_000_000)
    (d / "big.pth").write_bytes(bytes(out))
    return d / "big.pth"


def _sparse_file(path: Path, size: int, head: bytes) -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def _st_over_cap(b, d: Path) -> Path:
    """A consistent safetensors Mixer with an enormous head: 7.7 GB declared, a sparse file."""
    k = 80_000_000
    flat = {key: np.broadcast_to(np.float32(0), shape) for key, shape in
            param_shapes(TINY.replace(num_classes=k)).items()}
    from mixer_convert.layouts import LAYOUTS
    header, offset = {}, 0
    for key, v in flat.items():
        shape = LAYOUTS["torch"].shape_to(key, v.shape)
        nbytes = int(np.prod(shape)) * 4
        header[LAYOUTS["torch"].key_to(key)] = {"dtype": "F32", "shape": list(shape),
                                                "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    head = len(blob).to_bytes(8, "little") + blob
    return _sparse_file(d / "huge.safetensors", len(head) + offset, head)


def _msgpack_raw(b) -> dict:
    import msgpack
    return msgpack.unpackb(b["msgpack"].read_bytes(), raw=False, ext_hook=lambda c, data: msgpack.ExtType(c, data))


def _msgpack_dup(b, d: Path) -> Path:
    """Two top-level keys 'stem' (the second is the head's values under the stem's name)."""
    import msgpack

    items = [("stem" if k == "head" else k, v) for k, v in _msgpack_raw(b).items()]
    p = msgpack.Packer()
    (d / "dup.msgpack").write_bytes(p.pack_map_header(len(items)) + b"".join(p.pack(k) + p.pack(v) for k, v in items))
    return d / "dup.msgpack"


def _msgpack_with(b, d: Path, name: str, change) -> Path:
    import msgpack

    tree = _msgpack_raw(b)
    tree = change(tree) or tree
    (d / name).write_bytes(msgpack.packb(tree))
    return d / name


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "pipe.npz")
    return d / "pipe.npz"


def _socket(d: Path) -> Path:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(d / "sock.safetensors"))  # the socket file outlives the socket
    return d / "sock.safetensors"


def _symlink(d: Path, name: str, target: str) -> Path:
    (d / name).symlink_to(target)
    return d / name


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _empty(d: Path, name: str) -> Path:
    return _write(d / name, b"")


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _prefixed(prefix: str, flat: dict) -> dict:
    return {prefix + k: v for k, v in flat.items()}


def _zeroed(flat: dict) -> dict:
    return {k: np.zeros_like(v) for k, v in flat.items()}


def _st_dup(b, d: Path) -> Path:
    header, data = safetensors_parts(b["safetensors"])
    blob = json.dumps(header).encode()
    k = "stem.weight"
    blob = blob[:-1] + b", " + json.dumps(k).encode() + b": " + json.dumps(header[k]).encode() + b"}"
    return safetensors_file(d / "dup.safetensors", blob, data)


def _tied(sd: dict) -> dict:
    sd["head.bias"] = sd["pre_head_layer_norm.bias"][:5]  # a view sharing another tensor's storage
    return sd


def _tied_flat() -> dict:
    return _with(FLAT, head__bias=FLAT["pre_head_layer_norm/bias"][:5])


NOT_FOUND = r"no such checkpoint"
T, J, O = "torch", "jax", "orbax"
CASES = {
    # ---- damaged -------------------------------------------------------------------------------
    "damaged/empty-npz": (None, lambda b, d: _empty(d, "e.npz"), (), r"not a valid npz"),
    "damaged/empty-safetensors": (None, lambda b, d: _empty(d, "e.safetensors"), (), r"truncated"),
    "damaged/empty-pt": (T, lambda b, d: _empty(d, "e.pt"), (), r"not a PyTorch checkpoint"),
    "damaged/empty-msgpack": (J, lambda b, d: _empty(d, "e.msgpack"), (), r"cannot read as Flax msgpack"),
    "damaged/pt-flipped-tensor-byte": (T, lambda b, d: _flip_in_member(b["pt"], d / "f.pt", _first_storage(b["pt"])),
                                       (), r"Bad CRC-32"),
    "damaged/npz-flipped-tensor-byte": (None, lambda b, d: _flip_in_member(
        b["npz"], d / "f.npz", "MixerBlock_1/channel_mixing/Dense_0/kernel.npy", 200), (), r"Bad CRC-32"),
    "damaged/pt-short-storage": (T, lambda b, d: rezip(b["pt"], d / "s.pt", lambda n, data: data[: len(data) // 2]
                                                       if n == _first_storage(b["pt"]) else data), (),
                                 r"cannot read as a PyTorch"),
    "damaged/npz-member-shorter-than-header": (None, lambda b, d: rezip(b["npz"], d / "s.npz", lambda n, data:
                                                                        data[:-4] if n == "stem/bias.npy" else data),
                                               (), r"'stem/bias' declares \(24,\) float32 \(96 bytes\) but holds 92"),
    "damaged/legacy-pt-truncated": (T, lambda b, d: _write(d / "t.pth", b["pt-legacy"].read_bytes()[:-500]), (),
                                    r"cannot read as a PyTorch"),
    "damaged/safetensors-trailing-bytes": (None, lambda b, d: _write(d / "t.safetensors",
                                                                     b["safetensors"].read_bytes() + b"\0" * 8), (),
                                           r"8 bytes after the last safetensors tensor"),
    "damaged/orbax-data-files-missing": (O, lambda b, d: _orbax_copy(b, d, lambda r: [p.unlink() for p in
                                                                                     r.glob("ocdbt.process_0/d/*")]),
                                         (), r"cannot read .*orbax"),
    "damaged/orbax-metadata-cut": (O, lambda b, d: _orbax_copy(b, d, lambda r: (r / "_METADATA").write_text(
        (r / "_METADATA").read_text()[:300])), (), r"cannot read as an orbax checkpoint"),
    "damaged/orbax-empty-dir": (O, lambda b, d: _mkdir(d / "empty"), (), r"a folder, but not an orbax checkpoint"),
    # ---- malicious -----------------------------------------------------------------------------
    "malicious/pt-pickled-code": (T, lambda b, d: _pt(d, "evil.pt", {"stem.weight": _Evil()}), (),
                                  r"refusing to load"),
    "malicious/legacy-pt-pickled-code": (T, lambda b, d: _pt(d, "evil.pth", {"stem.weight": _Evil()}, legacy=True),
                                         (), r"refusing to load"),
    "malicious/npz-object-array": (None, lambda b, d: _npz(d, "o.npz", _with(FLAT, evil=np.array([{}], object))), (),
                                   r"refusing to unpickle"),
    "malicious/pt-data-pkl-inflates-to-64MiB": (T, lambda b, d: _pkl_bomb(b, d, 64), (),
                                                r"data.pkl declares 67\d+ bytes"),
    "malicious/npz-one-tensor-declares-3GiB": (None, lambda b, d: _npz_declaring(d, "b.npz", "stem/bias", 3 * 2**28),
                                               (), r"stem/bias has \(805306368,\), model needs \(24,\)"),
    "malicious/safetensors-consistent-7.7GB-mixer": (None, _st_over_cap, (), r"declares tensors of 7.\d+ GiB, more "
                                                                              r"than any Mixer"),
    "malicious/msgpack-8GiB-sparse-file": (J, lambda b, d: _sparse_file(d / "big.msgpack", 8 * GiB, b"\x80"), (),
                                           r"is a msgpack file of 8.00 GiB, more than any"),
    "malicious/zip-duplicate-member-npz": (None, lambda b, d: rezip(b["npz"], d / "dup.npz", extra=(
        ("stem/kernel.npy", zipfile.ZipFile(b["npz"]).read("stem/kernel.npy")),)), (),
                                           r"'stem/kernel.npy' is stored 2 times"),
    "malicious/zip-duplicate-member-pt": (T, lambda b, d: rezip(b["pt"], d / "dup.pt", extra=(
        (_first_storage(b["pt"]), bytes(73728)),)), (), r"is stored 2 times"),
    "malicious/zip-encrypted-member": (None, lambda b, d: raw_zip(d / "enc.npz", [(
        "stem/bias.npy", b"x", 0, zlib.crc32(b"x"), 1)], flags=1), (), r"encrypted"),
    "malicious/zip-bzip2-member": (None, lambda b, d: rezip(b["npz"], d / "bz.npz", compress=zipfile.ZIP_BZIP2), (),
                                   r"unsupported compression method 12"),
    "malicious/pt-two-data-pkl": (T, lambda b, d: rezip(b["pt"], d / "two.pt", extra=(
        ("other/data.pkl", b"\x80\x02}q\x00."),)), (), r"has 2"),
    "malicious/pt-key-twice-in-pickle": (T, lambda b, d: _pt_pickle_dup(b, d, False), (),
                                         r"builds 43 tensors but only 42 are reachable"),
    "malicious/legacy-pt-key-twice-in-pickle": (T, lambda b, d: _pt_pickle_dup(b, d, True), (),
                                                r"builds 43 tensors but only 42 are reachable"),
    "malicious/pt-sparse-tensor": (T, lambda b, d: _pt(d, "sp.pt", {**_torch_sd(FLAT), "stem.bias":
                                                                    _torch_sd(FLAT)["stem.bias"].to_sparse()}),
                                   (), r"sparse_coo tensor, not a dense one"),
    "malicious/legacy-pt-storage-declares-3GB": (T, _legacy_storage_bomb, (), r"storage has wrong byte size"),
    "malicious/safetensors-header-is-a-list": (None, lambda b, d: safetensors_file(d / "l.safetensors", b"[1, 2]"),
                                               (), r"JSON list, not an object"),
    "malicious/safetensors-header-is-an-int": (None, lambda b, d: safetensors_file(d / "i.safetensors", b"12345678"),
                                               (), r"JSON int, not an object"),
    "malicious/safetensors-entry-not-an-object": (None, lambda b, d: _st_edit(b, d, "n.safetensors", lambda h: _set(
        h, _first_key(h), 3)), (), r"entry 'stem.weight' is not an object"),
    "malicious/safetensors-no-offsets": (None, lambda b, d: _st_edit(b, d, "o.safetensors", lambda h: h[
        _first_key(h)].pop("data_offsets") and None), (), r"invalid data_offsets None"),
    "malicious/safetensors-float-shape": (None, lambda b, d: _st_edit(b, d, "f.safetensors", lambda h: _set(
        h[_first_key(h)], "shape", [float(x) for x in h[_first_key(h)]["shape"]])), (), r"invalid shape \[24\.0"),
    "malicious/safetensors-string-shape": (None, lambda b, d: _st_edit(b, d, "s.safetensors", lambda h: _set(
        h[_first_key(h)], "shape", [str(x) for x in h[_first_key(h)]["shape"]])), (), r"invalid shape \['24'"),
    "malicious/safetensors-bool-shape": (None, lambda b, d: _st_edit(b, d, "b.safetensors", lambda h: _set(
        h[_first_key(h)], "shape", [True, 1])), (), r"invalid shape \[True"),
    "malicious/safetensors-negative-shape": (None, lambda b, d: _st_edit(b, d, "n.safetensors", lambda h: _set(
        h[_first_key(h)], "shape", [-1, 24])), (), r"invalid shape \[-1"),
    "malicious/safetensors-100000-deep-json": (None, lambda b, d: safetensors_file(
        d / "d.safetensors", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), (), r"corrupt safetensors header"),
    "malicious/safetensors-overlapping-offsets": (None, lambda b, d: _st_edit(b, d, "o.safetensors", lambda h: _set(
        h[list(h)[2]], "data_offsets", h[list(h)[1]]["data_offsets"])), (), r"overlaps another or leaves a gap"),
    "malicious/safetensors-header-length-2**63": (None, lambda b, d: safetensors_file(d / "h.safetensors", b"{}",
                                                                                      length=2**63), (),
                                                  r"larger than the format allows"),
    "malicious/safetensors-header-not-utf8": (None, lambda b, d: safetensors_file(d / "u.safetensors",
                                                                                  b'{"\xff": 1}'), (),
                                              r"corrupt safetensors header"),
    "malicious/safetensors-duplicate-key": (None, lambda b, d: _st_dup(b, d), (), r"'stem.weight' appears 2 times"),
    "malicious/safetensors-metadata-not-strings": (None, lambda b, d: _st_edit(b, d, "m.safetensors", lambda h: _set(
        h, "__metadata__", {"a": 1})), (), r"__metadata__ must map strings to strings"),
    "malicious/safetensors-unknown-dtype": (None, lambda b, d: _st_edit(b, d, "t.safetensors", lambda h: _set(
        h[_first_key(h)], "dtype", "F8_E4M3")), (), r"unsupported dtype 'F8_E4M3'"),
    "malicious/msgpack-duplicate-key": (J, _msgpack_dup, (), r"key 'stem' appears 2 times"),
    "malicious/msgpack-key-with-slash-shadows-a-path": (J, lambda b, d: _msgpack_with(
        b, d, "s.msgpack", lambda t: _set(t, "stem/kernel", t["stem"]["kernel"])), (),
                                                        r"two entries are both named 'stem/kernel'"),
    "malicious/msgpack-5000-deep": (J, lambda b, d: _write(d / "d.msgpack", b"\x81\xa1a" * 5000 + b"\xc0"), (),
                                    r"cannot read as Flax msgpack"),
    "malicious/msgpack-not-a-map": (J, lambda b, d: _write(d / "l.msgpack", b"\x93\x01\x02\x03"), (),
                                    r"does not hold a parameter tree"),
    "malicious/orbax-metadata-key-twice": (O, lambda b, d: _orbax_copy(b, d, _orbax_dup_key), (), r"appears 2 times"),
    "malicious/orbax-3GB-zstd-chunk": (O, _orbax_zarr_bomb, (), r"stem/bias has \(800000000,\), model needs \(24,\)"),
    # ---- semantic ------------------------------------------------------------------------------
    "semantic/module-prefix-beside-plain-key": (T, lambda b, d: _pt(d, "m.pt", {
        **_torch_sd(FLAT), "module.stem.weight": 0 * _torch_sd(FLAT)["stem.weight"]}), (),
                                                r"stem/kernel is given 2 times, as 'stem.weight', "
                                                r"'module.stem.weight'"),
    "semantic/scale-beside-weight": (T, lambda b, d: _pt(d, "s.pt", {
        **_torch_sd(FLAT), "pre_head_layer_norm.scale": _torch_sd(FLAT)["pre_head_layer_norm.weight"]}), (),
                                     r"pre_head_layer_norm/scale is given 2 times"),
    "semantic/legacy-and-canonical-layouts-in-one-npz": (None, lambda b, d: _npz(d, "l.npz", {
        **FLAT, **_legacy_tree(_zeroed(FLAT))}), (),
                                                         r"stem/kernel is given 2 times, as 'stem/kernel', "
                                                         r"'embedding/kernel'"),
    "semantic/params-and-opt-target": (None, lambda b, d: _npz(d, "p.npz", {**_prefixed("params/", FLAT),
                                                                            **_prefixed("opt/target/", _zeroed(FLAT))}),
                                       (), r"2 parameter trees, under 'opt/target/', 'params/'; pick one with "
                                           r"--prefix"),
    "semantic/params-and-opt-target-with-prefix": (None, lambda b, d: _npz(d, "p.npz", {
        **_prefixed("params/", _zeroed(FLAT)), **_prefixed("opt/target/", FLAT)}), ("--prefix", "opt/target"), FLAT),
    "semantic/params-beside-optimizer-slot": (None, lambda b, d: _npz(d, "p.npz", {
        **_prefixed("params/", FLAT), **_prefixed("opt/1/", _zeroed(FLAT))}), (), FLAT),
    "semantic/top-level-and-params": (None, lambda b, d: _npz(d, "p.npz", {**FLAT, **_prefixed("params/", FLAT)}), (),
                                      r"'\(top level\)', 'params/'"),
    "semantic/prefix-that-is-not-there": (None, lambda b, d: b["npz"], ("--prefix", "params"),
                                          r"no parameter tree under prefix 'params/'"),
    "semantic/int-tensor-npz": (None, lambda b, d: _npz(d, "i.npz", _with(FLAT, stem__bias=np.zeros(24, np.int32))),
                                (), r"'stem/bias' has unsupported dtype int32"),
    "semantic/bool-tensor-npz": (None, lambda b, d: _npz(d, "b.npz", _with(FLAT, stem__bias=np.ones(24, bool))), (),
                                 r"unsupported dtype bool"),
    "semantic/complex-tensor-npz": (None, lambda b, d: _npz(d, "c.npz", _with(
        FLAT, stem__bias=FLAT["stem/bias"].astype(np.complex64))), (), r"unsupported dtype complex64"),
    "semantic/int-tensor-pt": (T, lambda b, d: _pt_edit(d, "i.pt", "stem.bias", lambda torch, t: t.int()), (),
                               r"unsupported dtype int32"),
    "semantic/float8-tensor-pt": (T, lambda b, d: _pt_edit(d, "f8.pt", "stem.bias", lambda torch, t: t.to(
        torch.float8_e4m3fn)), (), r"'stem.bias' has unsupported dtype torch.float8_e4m3fn"),
    "semantic/int-tensor-safetensors": (None, lambda b, d: _st_edit(b, d, "i.safetensors", lambda h: _set(
        h["stem.bias"], "dtype", "I32")), (), r"unsupported dtype int32"),
    "semantic/nan-weights": (None, lambda b, d: _npz(d, "n.npz", _with(
        FLAT, stem__bias=np.full(24, np.nan, np.float32))), (), r"24 of 24 values are NaN or Inf \(pass "
                                                                  r"--allow-nonfinite"),
    "semantic/weights-of-1e30-fail-verify": (None, lambda b, d: _npz(d, "big.npz", {
        k: v * np.float32(1e30) for k, v in FLAT.items()}), ("--verify",),
                                             r"verification failed: \d+ of 10 probe logits are NaN or Inf"),
    "semantic/wrong-variant": (None, lambda b, d: b["npz"], ("--variant", "B/16"), r"not B/16"),
    "semantic/unknown-and-missing-keys": (None, lambda b, d: _npz(d, "u.npz", {
        **{k: v for k, v in FLAT.items() if k != "head/bias"}, "head/extra": FLAT["head/bias"]}), (),
                                          r"missing \(1\): head/bias; unexpected \(1\): head/extra"),
    "semantic/scalar-where-a-tensor-belongs": (None, lambda b, d: _npz(d, "s.npz", _with(
        FLAT, stem__bias=np.float32(1))), (), r"stem/bias has \(\), model needs \(24,\)"),
    "semantic/big-endian-npz": (None, lambda b, d: _npz(d, "be.npz", {k: v.astype(">f4") for k, v in FLAT.items()}),
                                (), FLAT),
    "semantic/fortran-order-npz": (None, lambda b, d: _npz(d, "f.npz", {k: np.asfortranarray(v) for k, v in
                                                                        FLAT.items()}), (), FLAT),
    "semantic/pt-saved-without-crcs": (T, lambda b, d: _pt_without_crcs(d), (), FLAT),
    "semantic/tied-tensors-in-pt": (T, lambda b, d: _pt(d, "tied.pt", _tied(_torch_sd(FLAT))), (), _tied_flat()),
    "semantic/msgpack-train-state": (J, lambda b, d: _msgpack_with(b, d, "ts.msgpack", lambda t: {
        "params": t, "opt_state": {"1": {"mu": t}}, "step": 7}), (), FLAT),
    "semantic/msgpack-step-counter-beside-weights": (J, lambda b, d: _msgpack_with(
        b, d, "st.msgpack", lambda t: _set(t, "step", 3)), (), r"unexpected \(1\): step"),
    # ---- paths ---------------------------------------------------------------------------------
    "paths/fifo": (None, lambda b, d: _fifo(d), (), r"a FIFO, not a checkpoint file"),
    "paths/dev-zero-as-msgpack": (None, lambda b, d: _symlink(d, "z.msgpack", "/dev/zero"), (),
                                  r"a character device, not a checkpoint file"),
    "paths/dev-urandom-as-pt": (None, lambda b, d: _symlink(d, "r.pt", "/dev/urandom"), (), r"a character device"),
    "paths/socket": (None, lambda b, d: _socket(d), (), r"a socket, not a checkpoint file"),
    "paths/symlink-loop": (None, lambda b, d: _symlink(d, "loop.npz", "loop.npz"), (), r"symlink loop"),
    "paths/dangling-symlink": (None, lambda b, d: _symlink(d, "gone.npz", "nowhere.npz"), (), r"a symlink to nothing"),
    "paths/missing": (None, lambda b, d: d / "missing.npz", (), NOT_FOUND),
    "paths/name-too-long": (None, lambda b, d: d / ("x" * 300 + ".npz"), (), r"File name too long"),
    "paths/directory-that-is-not-orbax": (O, lambda b, d: _mkdir(d / "weights.npz"), (),
                                          r"a folder, but not an orbax checkpoint"),
    "paths/fifo-inside-orbax": (O, lambda b, d: _orbax_copy(b, d, lambda r: os.mkfifo(r / "d" / "pipe")), (),
                                r"pipe: a FIFO"),
    "paths/device-symlink-inside-orbax": (O, lambda b, d: _orbax_copy(b, d, lambda r: (r / "d" / "z").symlink_to(
        "/dev/zero")), (), r"z: a character device"),
}


_NEEDS = {T: requires_torch, J: requires_jax, O: requires_orbax}
TARGETED_CASES = len(CASES)


@pytest.mark.parametrize("name", [pytest.param(n, marks=_NEEDS.get(c[0], [])) for n, c in CASES.items()])
def test_targeted_case(name, bases, tmp_path):
    _, build, extra, expected = CASES[name]
    folder = tmp_path / "src"
    folder.mkdir()
    src = build(bases, folder)
    work = fresh_dir(tmp_path, "work")
    if isinstance(expected, str):
        assert convert_and_judge(src, work, None, error=expected, extra=extra) == "refused"
    else:
        assert convert_and_judge(src, work, expected, extra=extra) == "converted"
    assert not (Path.cwd() / "pwned").exists() and not (folder / "pwned").exists()


# ==== the loaders: every from_checkpoint() and init_from share the converter's checks ==================

LOADER_CASES = ["semantic/module-prefix-beside-plain-key", "semantic/legacy-and-canonical-layouts-in-one-npz",
                "semantic/params-and-opt-target", "semantic/int-tensor-npz", "semantic/complex-tensor-npz",
                "semantic/int-tensor-pt", "malicious/zip-duplicate-member-npz", "malicious/safetensors-duplicate-key",
                "malicious/pt-key-twice-in-pickle", "damaged/pt-flipped-tensor-byte", "paths/fifo",
                "malicious/npz-one-tensor-declares-3GiB"]
LOADERS = ["load_checkpoint", pytest.param("mixer_torch", marks=requires_torch),
           pytest.param("mixer_jax", marks=requires_jax), pytest.param("mixer_jax.nnx", marks=requires_jax),
           pytest.param("init_from", marks=requires_jax)]


def _load(loader: str, path: Path, **kw):
    if loader == "load_checkpoint":
        from mixer_convert.load import load_checkpoint
        return load_checkpoint(path, **kw)[0]
    if loader == "mixer_torch":
        from mixer_torch import from_checkpoint, to_flat
        return to_flat(from_checkpoint(path, **kw))
    if loader == "mixer_jax":
        from mixer_jax import from_checkpoint
        from mixer_jax.model import params_to_flat
        return params_to_flat(from_checkpoint(path, **kw)[1])
    if loader == "mixer_jax.nnx":
        from mixer_jax.nnx import from_checkpoint, state_to_flat
        return state_to_flat(from_checkpoint(path, **kw))
    import dataclasses

    from mixer_jax.model import params_to_flat
    from mixer_jax.train import TrainConfig, load_init_params
    cfg = TrainConfig(init_from=str(path))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=48))
    assert not kw, "init_from has no prefix option"
    return params_to_flat(load_init_params(cfg, num_classes=5)[0])


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", LOADER_CASES)
def test_loaders_refuse_what_the_converter_refuses(loader, case, bases, tmp_path):
    needs, build, _, error = CASES[case]
    if needs == T:
        pytest.importorskip("torch")
    src = build(bases, tmp_path)
    with pytest.raises((CheckpointError, ParamMismatchError, ValueError)) as e:
        _load(loader, src)
    assert re.search(error, _one_line(e.value)), str(e.value)


@cases(4)
@pytest.mark.parametrize("loader", LOADERS[:4])  # init_from has no prefix option
def test_loaders_take_the_prefix_of_the_tree_to_load(loader, tmp_path):
    src = _npz(tmp_path, "p.npz", {**_prefixed("params/", _zeroed(FLAT)), **_prefixed("opt/target/", FLAT)})
    got = _load(loader, src, prefix="opt/target/")
    assert all(np.array_equal(got[k], FLAT[k]) for k in FLAT)


@cases(2)
def test_declared_size_limit_is_the_callers_to_lift(bases):
    from mixer_convert.load import load_checkpoint

    nbytes = sum(v.nbytes for v in FLAT.values())
    with pytest.raises(CheckpointError, match=r"more than any Mixer"):
        load_checkpoint(bases["npz"], max_bytes=nbytes - 1)
    flat, _ = load_checkpoint(bases["npz"], max_bytes=None)
    assert same_weights(flat, FLAT)
    assert 6.5 * GiB < MAX_BYTES < 7 * GiB  # 4x H/14 with a 21k head, float32: 7.3 GB


# ==== destination ========================================================================================


def _run(src: Path, dst: Path, *extra: str):
    return run_cli([str(src), str(dst), "--quiet", *extra])


@cases(1)
def test_an_existing_output_is_kept_without_force(bases, tmp_path):
    dst = tmp_path / "out.npz"
    dst.write_bytes(b"precious")
    out = _run(bases["npz"], dst)
    assert out.rc == 2 and out.lines == [f"{PROG_ERROR}{dst} exists; pass --force (force=True) to overwrite it"]
    assert dst.read_bytes() == b"precious"


@cases(1)
def test_a_directory_is_never_replaced_by_a_file_even_with_force(bases, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    out = _run(bases["npz"], tmp_path / "out", "--to", "npz", "--force")
    assert out.rc == 2 and "is a directory; refusing to replace a directory with a file" in out.lines[0]
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["out"]


@cases(4)
@pytest.mark.parametrize("how", ["same path", "hard link", "inside a source directory", "holds the source"])
def test_the_source_is_never_the_destination(bases, tmp_path, how):
    if how in ("inside a source directory",) and "orbax" not in bases:
        pytest.skip("needs orbax")
    src = tmp_path / "src.npz"
    shutil.copy(bases["npz"], src)
    if how == "same path":
        dst, extra = src, ("--force",)
    elif how == "hard link":
        dst, extra = tmp_path / "link.npz", ("--force",)
        os.link(src, dst)
    elif how == "inside a source directory":
        src = tmp_path / "ckpt"
        shutil.copytree(bases["orbax"], src)
        dst, extra = src / "out.npz", ()
    else:  # an orbax output with --force would replace the folder that holds the source
        (tmp_path / "folder").mkdir()
        src = shutil.copy(bases["npz"], tmp_path / "folder" / "src.npz")
        dst, extra = tmp_path / "folder", ("--to", "orbax", "--force")
    before = snapshot(src)
    out = _run(src, dst, *extra)
    assert out.rc == 2 and len(out.lines) == 1 and "source" in out.lines[0], out.stderr
    assert snapshot(src) == before


@cases(1)
def test_folders_made_for_a_failed_output_are_removed(tmp_path):
    src = _npz(tmp_path, "nan.npz", _with(FLAT, stem__bias=np.full(24, np.nan, np.float32)))
    work = fresh_dir(tmp_path, "work")
    out = _run(src, work / "a" / "b" / "c" / "out.npz")  # fails mid-write, on the NaN tensor
    assert out.rc == 2 and os.listdir(work) == []


@cases(2)
def test_a_destination_under_a_file_or_a_loop_is_one_line(bases, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for dst in (tmp_path / "file" / "out.npz", tmp_path / "loop" / "out.npz"):
        out = _run(bases["npz"], dst)
        assert out.rc == 2 and len(out.lines) == 1 and out.lines[0].startswith(PROG_ERROR), out.stderr
    assert sorted(os.listdir(tmp_path)) == ["file", "loop"]


@cases(2)
@requires_orbax
@pytest.mark.parametrize("old", ["file", "folder"])
def test_force_replaces_an_orbax_output_whole(bases, tmp_path, old):
    dst = tmp_path / "ckpt"
    dst.mkdir() if old == "folder" else dst.write_text("old")
    if old == "folder":
        (dst / "stale").write_text("old")
    out = _run(bases["npz"], dst, "--to", "orbax", "--force")
    assert out.rc == 0, out.stderr
    assert not (dst / "stale").exists() and sorted(os.listdir(tmp_path)) == ["ckpt"]
    from mixer_convert.load import read_params
    with read_params(dst) as params:
        assert same_weights({k: np.asarray(v) for k, v in params.items()}, FLAT)


@cases(1)
def test_a_read_only_filesystem_is_one_line(bases, tmp_path, monkeypatch):
    """EROFS cannot be made without privileges; its errno is injected where the first write happens."""
    import errno
    import tempfile

    def erofs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, "mkdtemp", erofs)
    out = _run(bases["npz"], tmp_path / "new" / "out.npz")
    assert out.rc == 2 and out.lines == [f"{PROG_ERROR}cannot write {tmp_path / 'new' / 'out.npz'} "
                                         f"(OSError: Read-only file system)"]
    assert os.listdir(tmp_path) == []


# ---- in a fresh process: permissions, a full disk -----------------------------------------------------


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl/rlimit semantics are Linux's")


@cases(3)
@linux_only
@pytest.mark.parametrize("what", ["unreadable source", "read-only folder", "read-only parent of new folders"])
def test_permission_errors_are_one_line(bases, tmp_path, what):
    src = shutil.copy(bases["npz"], tmp_path / "src.npz")
    work = tmp_path / "work"
    work.mkdir()
    dst = work / "out.npz" if what != "read-only parent of new folders" else work / "a" / "b" / "out.npz"
    if what == "unreadable source":
        os.chmod(src, 0)
    else:
        os.chmod(work, 0o555)
    try:
        out, _ = run_cli_process([str(src), str(dst), "--quiet"], setup=WITHOUT_ROOT_PRIVILEGE)
    finally:
        os.chmod(work, 0o755)
        os.chmod(src, 0o644)
    assert out.rc == 2 and len(out.lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert re.search(r"[Pp]ermission denied", out.lines[0]), out.lines[0]
    assert os.listdir(work) == []


@pytest.mark.slow  # a filled filesystem per format; a read-only one is in the fast tier
@cases(5)
@linux_only
@pytest.mark.parametrize("fmt", ["npz", pytest.param("pt", marks=requires_torch), "safetensors",
                                 pytest.param("msgpack", marks=requires_jax),
                                 pytest.param("orbax", marks=requires_orbax)])
def test_a_full_disk_is_one_line_and_leaves_nothing(bases, tmp_path, fmt):
    work = fresh_dir(tmp_path, "work")
    dst = work / "new" / (f"out.{fmt}" if fmt != "orbax" else "ckpt")
    to = ["--to", "orbax"] if fmt == "orbax" else []
    out, _ = run_cli_process([str(bases["npz"]), str(dst), "--quiet", *to], setup=disk_full_after(20_000))
    assert out.rc == 2 and len(out.lines) == 1, out.stderr
    assert re.search(r"cannot write .*(File too large|torch.save failed|orbax failed)", out.lines[0]), out.lines[0]
    assert os.listdir(work) == []


# ---- in a fresh process: one line, no noise, for every kind of reader ----------------------------------

PROCESS_SOURCES = ["damaged/pt-flipped-tensor-byte", "damaged/orbax-metadata-cut", "damaged/orbax-empty-dir",
                   "malicious/safetensors-100000-deep-json", "malicious/msgpack-duplicate-key",
                   "semantic/params-and-opt-target", "paths/fifo"]


@pytest.mark.slow  # a fresh interpreter per case; the same cases run in-process in the fast tier
@cases(len(PROCESS_SOURCES))
@pytest.mark.parametrize("case", PROCESS_SOURCES)
def test_a_fresh_process_prints_one_line_and_nothing_else(case, bases, tmp_path):
    needs, build, extra, error = CASES[case]
    if needs and not has_module({T: "torch", J: "flax", O: "orbax"}[needs]):
        pytest.skip(f"needs {needs}")
    src = build(bases, tmp_path)
    out, _ = run_cli_process([str(src), str(tmp_path / "out.npz"), *extra])
    assert out.rc == 2 and len(out.lines) == 1 and re.search(error, out.lines[0]), out.stderr


@pytest.mark.slow  # a fresh interpreter; failed orbax restores run in-process in the fast tier
@cases(1)
@requires_orbax
def test_orbax_noise_after_a_failed_restore_is_silenced(bases, tmp_path):
    """Data files missing: orbax fails on the first array while tensorstore still reads the others,
    which then print "RuntimeError: Event loop is closed" on stderr unless silenced."""
    src = CASES["damaged/orbax-data-files-missing"][1](bases, tmp_path)
    out, _ = run_cli_process([str(src), str(tmp_path / "out.npz"), "--quiet"])
    assert out.rc == 2 and len(out.lines) == 1 and "Event loop" not in out.stderr, out.stderr


# ---- memory: bombs small on disk are refused before they inflate ----------------------------------------

MEMORY_BOMBS = {
    "malicious/npz-one-tensor-declares-3GiB": (None, CASES["malicious/npz-one-tensor-declares-3GiB"][1]),
    "malicious/orbax-3GB-zstd-chunk": (O, _orbax_zarr_bomb),
    "malicious/legacy-pt-storage-declares-3GB": (T, _legacy_storage_bomb),
    "malicious/safetensors-consistent-7.7GB-mixer": (None, _st_over_cap),
    "malicious/pt-data-pkl-inflates-to-2GiB": (T, lambda b, d: _pkl_bomb(b, d, 2048)),
    "paths/dev-zero-as-msgpack": (None, lambda b, d: _symlink(d, "z.msgpack", "/dev/zero")),
}


@pytest.mark.slow  # a fresh interpreter per bomb, its memory measured; the size caps are in the fast tier
@cases(len(MEMORY_BOMBS))
@linux_only
@pytest.mark.parametrize("case", [pytest.param(c, marks=_NEEDS.get(n, [])) for c, (n, _) in MEMORY_BOMBS.items()])
def test_bombs_are_refused_in_bounded_memory(case, bases, tmp_path):
    _, build = MEMORY_BOMBS[case]
    src = build(bases, tmp_path)
    on_disk = sum(p.stat().st_blocks * 512 for p in ([src] if src.is_file() else src.rglob("*"))
                  if p.is_file() and not p.is_symlink())
    assert on_disk < 16 * 2**20
    # RLIMIT_AS: a safety net for this machine should the checks regress; the assertion is on RSS
    out, peak = run_cli_process([str(src), str(tmp_path / "out.npz"), "--quiet"], setup=memory_at_most(6 * GiB))
    assert out.rc == 2 and len(out.lines) == 1 and "out of memory" not in out.stderr, out.stderr
    assert 0 < peak < 1 * GiB, f"peak RSS {peak / GiB:.2f} GiB for a {on_disk / 2**20:.1f} MiB bomb"


# ==== signals ==============================================================================================

# A converter whose write is held at its third tensor (two already handed to the writer: well inside
# the write) until the test creates GATE; it creates HELD once it waits there. The test acts on
# that event, not after a delay, so a slow or loaded machine cannot let the write finish first.
_HELD_CONVERT = """
import os, sys, time
from pathlib import Path
from mixer_convert.load import LazyParams
held, gate = Path(os.environ["MIXER_TEST_HELD"]), Path(os.environ["MIXER_TEST_GATE"])
read, calls = LazyParams.__getitem__, []
def held_at_the_third(self, k):
    calls.append(k)
    if len(calls) == 3:
        held.touch()
        deadline = time.monotonic() + 600  # a hang guard only: the test opens the gate
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return read(self, k)
LazyParams.__getitem__ = held_at_the_third
from mixer_convert.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


class _Held:
    """A conversion ``src`` -> ``dst`` in its own process, held inside its write (``marks``: a new
    folder for its two marker files, outside the folders the tests list)."""

    def __init__(self, src: Path, dst: Path, marks: Path):
        marks.mkdir()
        self.held, self.gate = marks / "held", marks / "gate"
        self.proc = subprocess.Popen([sys.executable, "-c", _HELD_CONVERT, str(src), str(dst), "--quiet"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=subprocess_env(MIXER_TEST_HELD=str(self.held),
                                                        MIXER_TEST_GATE=str(self.gate)))

    def wait_until_held(self) -> None:
        deadline = time.monotonic() + 300  # a hang guard, not a phase: the event is HELD appearing
        while not self.held.exists():
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "the conversion never started writing"
            time.sleep(0.02)

    def release(self) -> None:
        self.gate.touch()


def _temps(folder: Path, dst: Path) -> list[Path]:
    return sorted(folder.glob(f".{dst.name}.*.tmp")) if folder.exists() else []


@pytest.mark.slow  # a converter process signalled mid-write; test_atomic.py's signal cases are fast
@cases(2)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_write_removes_the_temporary_and_says_so(bases, tmp_path, sig):
    work = fresh_dir(tmp_path, "work")
    dst = work / "new" / "out.safetensors"
    conversion = _Held(bases["npz"], dst, tmp_path / "marks")
    conversion.wait_until_held()
    assert _temps(dst.parent, dst), "held inside the write, yet no temporary"
    conversion.proc.send_signal(sig)  # while the write cannot finish: it is held
    conversion.release()  # the prefetching thread goes on, as a real read would, and sees the stop
    _, err = conversion.proc.communicate(timeout=300)
    name = signal.Signals(sig).name
    assert conversion.proc.returncode == 128 + sig and err.splitlines() == [
        f"{PROG_ERROR}interrupted by {name}; nothing was written"], err
    assert os.listdir(work) == []  # no temporary, no output, not even the folder made for it


@pytest.mark.slow  # converter processes killed; stale temporaries are removed in test_atomic.py's fast tier
@cases(1)
def test_a_rerun_removes_what_a_killed_run_left_but_not_a_live_runs_temporary(bases, tmp_path):
    work = fresh_dir(tmp_path, "work")
    dst = work / "out.safetensors"
    killed = _Held(bases["npz"], dst, tmp_path / "killed")
    killed.wait_until_held()
    killed.proc.kill()
    killed.proc.communicate(timeout=300)
    stale = _temps(work, dst)
    assert len(stale) == 1 and (stale[0] / dst.name).exists()  # SIGKILL cannot be cleaned up after
    live = _Held(bases["npz"], dst, tmp_path / "live")  # a second, live conversion to the same file
    try:
        live.wait_until_held()  # and held there until the end of the test: it cannot finish meanwhile
        live_temp = [t for t in _temps(work, dst) if t != stale[0]]
        assert run_cli([str(bases["npz"]), str(dst), "--quiet"]).rc == 0
        assert not stale[0].exists()  # the dead run's temporary is gone
        assert live_temp and all(t.exists() for t in live_temp)  # the live one's is not touched
    finally:
        live.proc.terminate()
        live.release()
        live.proc.communicate(timeout=300)
    assert sorted(os.listdir(work)) == [dst.name]
    from mixer_convert.load import read_params
    with read_params(dst) as params:
        assert same_weights({k: np.asarray(v) for k, v in params.items()}, FLAT)


# ==== the tally docs/converting.md reports ("Hostile inputs") ================================================

TOTAL_CASES = (MUTATION_CASES + ORBAX_MUTATIONS + SAFETENSORS_HEADER_MUTATIONS + TARGETED_CASES
               + len(LOADER_CASES) * len(LOADERS) + OTHER_CASES)


def test_the_documentation_reports_these_counts():
    text = " ".join((ROOT / "docs" / "converting.md").read_text().split())
    m = re.search(r"(\d[\d,]*) hostile cases", text.replace("**", ""))
    assert m, "docs/converting.md: no 'N hostile cases' in the Hostile inputs section"
    assert int(m.group(1).replace(",", "")) == TOTAL_CASES, (m.group(1), TOTAL_CASES)
    kinds = {k: sum(name.startswith(k + "/") for name in CASES) for k in ("damaged", "malicious", "semantic", "paths")}
    for part in (f"{MUTATION_CASES} seeded random mutations", f"{ORBAX_MUTATIONS} of orbax metadata",
                 f"{SAFETENSORS_HEADER_MUTATIONS} of safetensors headers",
                 f"{TARGETED_CASES} targeted cases ({kinds['damaged']} damaged, {kinds['malicious']} malicious, "
                 f"{kinds['semantic']} semantic, {kinds['paths']} paths)",
                 f"{len(LOADER_CASES) * len(LOADERS)} through the five loaders", f"{OTHER_CASES} more"):
        assert part in text, part
