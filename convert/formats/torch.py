"""PyTorch checkpoints (.pt/.pth/.bin): a pickled state dict of tensors; needs torch.

Nothing is unpickled that ``torch.load(weights_only=True)`` would not accept, and everything it
would trust is checked first: one ``data.pkl`` of bounded size (torch reads it whole), no
duplicate or encrypted members, a bounded total, every CRC; the pickle's opcodes are counted
without unpickling, so a key given twice (two tensors rebuilt, one reachable) is refused.
The legacy (non-zip) format is read too. Written with ``torch.save``.
"""
from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mixer_convert.dtypes import bf16, is_bf16
from mixer_convert.errors import CheckpointError, WriteError, needs, why
from mixer_convert.formats.archive import Zip
from mixer_convert.source import Entry, MAX_METADATA_BYTES, Source


def torch_to_numpy(t) -> np.ndarray:
    """A tensor as numpy without a copy where possible; bfloat16 becomes ml_dtypes.bfloat16."""
    import torch

    t = t.detach().cpu().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(bf16())
    return t.numpy()


def numpy_to_torch(v: np.ndarray):
    """The inverse, copying only when torch needs its own writable C-ordered buffer. A transposed
    view is made contiguous by torch, about 3x faster than numpy's copy of a large transpose."""
    import torch

    if not v.flags.writeable:
        v = np.array(v, order="C")
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
        if not isinstance(k, str):
            raise CheckpointError(f"{where}: state dict key {k!r} is not a string")
        dtype = _torch_np_dtype(v.dtype, where, k)
        out[k] = (src.declare(k, tuple(v.shape), dtype), dtype,
                  (lambda v=v: torch_to_numpy(v)))
    return out


def _persistent_ids(data) -> int:
    """How many tensors a torch pickle rebuilds (one persistent id each), read without unpickling."""
    return sum(op.name in ("PERSID", "BINPERSID") for op, _, _ in pickletools.genops(data))


def _unique_tensors(obj: Any, depth: int = 0, seen: set | None = None) -> set:
    import torch

    seen = set() if seen is None else seen
    if depth > 32:
        raise CheckpointError("nested more than 32 levels deep; not a state dict")
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.is_quantized:
            raise CheckpointError(f"holds a {'quantized' if obj.is_quantized else obj.layout} tensor, "
                                  "not a dense one")
        seen.add(id(obj))
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _unique_tensors(v, depth + 1, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _unique_tensors(v, depth + 1, seen)
    return seen


def _check_torch_zip(src: Source) -> int:
    """Everything torch.load would trust, checked first: one data.pkl of bounded size (torch reads
    it whole), no duplicate or encrypted members, a bounded total, every CRC. Returns how many
    tensors the pickle rebuilds."""
    path = src.path
    with Zip(path) as z, src.reading("a PyTorch checkpoint"):
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
        if any(i.CRC for i in z.members):
            for i in z.members:
                z.verify(i)
        else:  # torch.save with compute_crc32=False writes 0 for every CRC: nothing to check
            for i in z.members:
                i.CRC = None  # tells zipfile not to check
        return _persistent_ids(z.read(pkl, MAX_METADATA_BYTES))


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


def read(src: Source) -> tuple[dict[str, Entry], None]:
    torch = needs("torch", "torch", "reading a PyTorch checkpoint")
    path = src.path
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        rebuilt = _check_torch_zip(src)
    else:
        src.cap(src.stat.st_size, "is a legacy PyTorch file of")
        with src.reading("a PyTorch checkpoint"):
            rebuilt = _count_legacy(path)
    obj = _torch_load(torch, path, is_zip)
    try:
        held = len(_unique_tensors(obj))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if held != rebuilt:
        raise CheckpointError(f"{path}: the pickle builds {rebuilt} tensors but only {held} are reachable; "
                              "a key given twice? refusing an ambiguous file")
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return _torch_entries(obj, src), None


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


def write(path: Path, items: Iterator[tuple[str, np.ndarray]], specs: list) -> None:
    torch = needs("torch", "torch", "writing a PyTorch checkpoint")
    sd = {k: numpy_to_torch(v) for k, v in items}
    try:
        torch.save(sd, path)
    except RuntimeError as e:  # torch's zip writer reports a failed write ("unexpected pos ...") this way
        raise WriteError(f"torch.save failed ({why(e)}); disk full or not writable?") from None
