"""PyTorch checkpoints (.pt/.pth/.bin): a pickled state dict of tensors.

The zip format that ``torch.save`` writes is read and written here without torch
(:mod:`~mixer_convert.formats.torchpickle`): each storage is read in one positional read,
its CRC checked before use; the archive is checked first (one ``data.pkl`` of bounded size, every
member in its folder, no duplicate or encrypted members, a bounded total). A key given twice is
refused (the pickle builds more tensors than the dict keeps). A pickle naming globals beyond a
plain state dict's is handed to ``torch.load(weights_only=True)`` when torch is installed (it
refuses anything that could run code), as is the legacy (non-zip) format.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mixer_convert.arrays import bf16, contiguous, is_bf16, raw_as_declared
from mixer_convert.errors import CheckpointError, importable, needs, why
import mixer_convert.formats.torchpickle as torchpickle
from mixer_convert.formats.archive import Zip, ZipWriter
from mixer_convert.source import Entry, MAX_METADATA_BYTES, Source


def torch_to_numpy(t) -> np.ndarray:
    """A tensor as numpy without a copy where possible; bfloat16 becomes ml_dtypes.bfloat16."""
    import torch

    t = t.detach().cpu().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(bf16())
    return t.numpy()


def numpy_to_torch(v: np.ndarray):
    """The inverse, copying only when torch needs its own writable C-ordered buffer (a transposed
    view tile by tile: :func:`~mixer_convert.layouts.contiguous`)."""
    import torch

    v = contiguous(v)
    if not v.flags.writeable:
        v = v.copy()
    t = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) if is_bf16(v.dtype) else torch.from_numpy(v)
    return t.contiguous()


def _torch_np_dtype(dt, where: str, key: str) -> np.dtype:
    import torch

    if dt == torch.bfloat16:
        return bf16()
    try:
        return torch.empty(0, dtype=dt).numpy().dtype
    except TypeError:  # no numpy equivalent (float8, unsigned 16-64 bit, ...): no Mixer weight either
        raise CheckpointError(f"{where}: tensor {key!r} has unsupported dtype {dt}; Mixer weights are float") from None


def _torch_entries(sd: Mapping[str, Any], src: Source) -> dict[str, tuple]:
    where = src.where
    out = {}
    for k, v in sd.items():
        dtype = _torch_np_dtype(v.dtype, where, k)
        out[k] = (src.declare(k, tuple(v.shape), dtype), dtype,
                  (lambda v=v: torch_to_numpy(v)))
    return out


def _persistent_ids(data) -> int:
    """How many tensors a torch pickle rebuilds (one persistent id each), read without unpickling."""
    return sum(op.name in ("PERSID", "BINPERSID") for op, _, _ in pickletools.genops(data))


def _count_legacy(path: Path) -> int:
    """The legacy (non-zip) format is pickles (magic, version, system info, the state, its storage
    keys) then raw storages. Returns the state's tensor count; the pickles must fit in
    MAX_METADATA_BYTES, so scanning them never holds more."""
    with open(path, "rb") as f:
        head = io.BytesIO(f.read(MAX_METADATA_BYTES))
    try:
        for _ in range(3):
            for _ in pickletools.genops(head):
                pass
        return _persistent_ids(head)
    except ValueError as e:
        if head.tell() >= MAX_METADATA_BYTES - 16:
            raise CheckpointError(f"{path}: its pickles run past {MAX_METADATA_BYTES} bytes; not a state dict") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({why(e)})") from None


def read(src: Source) -> tuple[dict[str, Entry], Callable[[], None] | None]:
    path = src.path
    if not zipfile.is_zipfile(path):
        return _read_with_torch(src), None
    z = Zip(path)
    try:
        archive = _check_archive(src, z)
        try:
            obj, rebuilt = torchpickle.load(archive.pickle)
        except torchpickle.UnsupportedPickle as e:
            if not importable("torch"):
                raise CheckpointError(f"{path}: refusing to load: not a plain tensor state dict ({e})") from None
            # A state dict in another form torch writes: its weights_only reader judges it, once the
            # storages' CRCs are checked too (torch checks none; the other members' were checked above).
            with src.reading("a PyTorch checkpoint"):
                for info in archive.storages.values():
                    z.verify(info)
            z.close()
            return _read_with_torch(src, _persistent_ids(archive.pickle)), None
        except Exception as e:
            raise CheckpointError(f"{path}: refusing to load: not a plain tensor state dict ({why(e)})") from None
        entries = _archive_entries(src, z, archive, obj, rebuilt)
    except BaseException:
        z.close()
        raise
    return entries, z.close


@dataclasses.dataclass(frozen=True)
class _Archive:
    """A checked archive (:func:`_check_archive`): data.pkl and byteorder read, their CRCs checked."""
    pickle: bytes  # data.pkl
    big_endian: bool  # byteorder says 'big'
    storages: dict[str, zipfile.ZipInfo]  # storage key -> its member (data/<key>), CRC checked when read


def _check_archive(src: Source, z: Zip) -> _Archive:
    """One data.pkl of bounded size, every member inside its folder, a bounded total; every member
    but the storages read once now, its CRC checked (the storages' when each is read)."""
    path = src.path
    pkls = [i for i in z.members if i.filename.endswith("data.pkl")]
    if len(pkls) != 1:
        raise CheckpointError(f"{path}: a PyTorch archive has one data.pkl, this one has {len(pkls)}")
    pkl = pkls[0]
    folder = pkl.filename[: -len("data.pkl")]
    stray = [i.filename for i in z.members if not i.filename.startswith(folder)]
    if stray:
        raise CheckpointError(f"{path}: member {stray[0]!r} lies outside the archive's folder {folder!r}")
    if pkl.file_size > MAX_METADATA_BYTES:
        raise CheckpointError(f"{path}: {pkl.filename} declares {pkl.file_size} bytes; a state dict's pickle "
                              f"is far smaller (limit {MAX_METADATA_BYTES})")
    src.cap(sum(i.file_size for i in z.members if i is not pkl), "holds tensor data of")
    if not any(i.CRC for i in z.members):  # torch.save(compute_crc32=False) writes 0 for every CRC
        for i in z.members:
            i.CRC = None  # nothing to check, for zipfile and for Zip.check_crc
    storages, data, byteorder = {}, b"", None
    with src.reading("a PyTorch checkpoint"):
        for i in z.members:
            if i.filename.startswith(folder + "data/"):
                storages[i.filename[len(folder + "data/"):]] = i
            elif i is pkl:
                data = z.read(i, MAX_METADATA_BYTES)
            elif i.filename == folder + "byteorder":
                byteorder = z.read(i, 16)
            else:
                z.verify(i)
    return _Archive(data, byteorder == b"big", storages)


def _archive_entries(src: Source, z: Zip, archive: _Archive, obj: Any, rebuilt: int) -> dict[str, Entry]:
    path = src.path
    sd = _plain_state_dict(obj, torchpickle.TensorRef, rebuilt, path)
    storages: dict[str, np.ndarray] = {}  # only storages that several tensors view stay read
    owners = collections.Counter(ref.storage.key for ref in sd.values())

    def storage(ref: torchpickle.TensorRef) -> np.ndarray:
        s = ref.storage
        if s.key not in storages:
            data = z.read_stored(archive.storages[s.key])
            dtype = s.dtype.newbyteorder(">") if archive.big_endian else s.dtype
            storages[s.key] = np.frombuffer(data, dtype, s.numel)
        return storages.pop(s.key) if owners[s.key] == 1 else storages[s.key]

    entries = {}
    for key, ref in sd.items():
        _check_storage(path, key, ref, archive.storages.get(ref.storage.key))
        entries[key] = (src.declare(key, ref.shape, ref.storage.dtype), ref.storage.dtype,
                        (lambda ref=ref: torchpickle.view(ref, storage(ref)).astype(ref.storage.dtype, copy=False)))
    return entries


def _check_storage(path: Path, key: str, ref: torchpickle.TensorRef, info: zipfile.ZipInfo | None) -> None:
    s, problem = ref.storage, None
    if info is None:
        problem = f"tensor {key!r} refers to storage {s.key!r}, which the archive does not hold"
    elif info.file_size != s.numel * s.dtype.itemsize:
        problem = f"storage {s.key!r} holds {info.file_size} bytes, the pickle says {s.numel} x {s.dtype}"
    elif torchpickle.extent(ref) > s.numel:
        problem = f"tensor {key!r} reaches past the end of its storage"
    if problem:
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({problem}; truncated or corrupt?)")


def _plain_state_dict(obj: Any, tensor: type, rebuilt: int, path: Path,
                      check: Callable[[Any], None] = lambda t: None) -> Mapping:
    """The state dict in an unpickled ``obj`` whose tensors are ``tensor``s (each passed to ``check``),
    refused unless every tensor the pickle rebuilt is reachable once (a key given twice builds one
    more than the dict keeps) and the state dict maps strings to tensors."""
    held = _tensors(obj, tensor, check, path)
    if len(held) != rebuilt:
        raise CheckpointError(f"{path}: the pickle builds {rebuilt} tensors but only {len(held)} are reachable; "
                              "a key given twice? refusing an ambiguous file")
    sd = _state_dict(obj)
    if not isinstance(sd, Mapping) or not all(isinstance(v, tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    for key in sd:
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state dict key {key!r} is not a string")
    return sd


def _tensors(obj: Any, tensor: type, check: Callable[[Any], None], path: Path, depth: int = 0,
             seen: dict | None = None) -> dict[int, Any]:
    """Every distinct ``tensor`` in nested dicts, lists and tuples, by identity."""
    seen = {} if seen is None else seen
    if depth > 32:
        raise CheckpointError(f"{path}: nested more than 32 levels deep; not a state dict")
    if isinstance(obj, tensor):
        check(obj)
        seen[id(obj)] = obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _tensors(v, tensor, check, path, depth + 1, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, tensor, check, path, depth + 1, seen)
    return seen


def _state_dict(obj: Any) -> Any:
    """The state dict inside a training checkpoint's dict, wherever the usual keys put it."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    return obj


# ---- through torch: the legacy format, and state dicts in forms torch alone knows -----------------


def _read_with_torch(src: Source, rebuilt: int | None = None) -> dict[str, Entry]:
    """``rebuilt``: how many tensors a zip archive's pickle rebuilds, the archive already checked
    (:func:`read`); None for the legacy format, checked here."""
    torch = needs("torch", "torch", "reading this PyTorch checkpoint")
    path, is_zip = src.path, rebuilt is not None
    if not is_zip:
        src.cap(src.stat.st_size, "is a legacy PyTorch file of")
        with src.reading("a PyTorch checkpoint"):
            rebuilt = _count_legacy(path)
    obj = _torch_load(torch, path, is_zip)

    def dense(t) -> None:
        if t.layout != torch.strided or t.is_quantized:
            raise CheckpointError(f"{path}: holds a {'quantized' if t.is_quantized else t.layout} tensor, "
                                  "not a dense one")
    return _torch_entries(_plain_state_dict(obj, torch.Tensor, rebuilt, path, dense), src)


def _torch_load(torch, path: Path, is_zip: bool):
    import pickle

    try:
        # mmap: tensor data stays in the file until read (the zip format only)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refusing to load: not a plain tensor state dict "
                              f"(weights_only=True rejected it: {str(e).splitlines()[0]})") from None
    except MemoryError:
        raise CheckpointError(f"{path}: out of memory reading it as a PyTorch checkpoint") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({why(e)})") from None


# ---- writing ----------------------------------------------------------------------------------------


def write(path: Path, items: Iterator[tuple[str, np.ndarray]], specs: list) -> None:
    """The archive ``torch.save`` writes for a dict of contiguous tensors (storages 64-byte aligned,
    as ``torch.load(..., mmap=True)`` wants), one tensor at a time."""
    folder = path.stem or "archive"
    pkl = torchpickle.dumps(specs)
    with open(path, "wb") as f:
        z = ZipWriter(f)
        z.add(f"{folder}/data.pkl", [pkl])
        for name, value in ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little")):
            z.add(f"{folder}/{name}", [value])
        for i, data in enumerate(raw_as_declared(items, specs, "PyTorch writer", "the pickle")):
            z.add(f"{folder}/data/{i}", [data], align=64)
        z.add(f"{folder}/version", [b"3\n"])
        z.add(f"{folder}/.data/serialization_id", [str(int(hashlib.sha256(pkl).hexdigest(), 16) % 10**40).encode()])
        z.close()
