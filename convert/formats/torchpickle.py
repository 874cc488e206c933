"""PyTorch's state-dict pickle, read and written without torch.

A ``.pt`` archive holds ``<name>/data.pkl``, the pickled dict of tensors, and one member per
storage (``<name>/data/<key>``). In the pickle each tensor is ``torch._utils._rebuild_tensor_v2(
storage, offset, size, stride, requires_grad, hooks)``, its storage a persistent reference
``('storage', torch.FloatStorage, key, 'cpu', numel)``.

Reading unpickles with a restricted Unpickler whose globals are only those a tensor state dict
uses, each mapped to a function of ours that records where a tensor lives; nothing else can be
named, so nothing else can run (the guarantee of ``torch.load(weights_only=True)``). Writing
emits the opcodes ``torch.save`` emits for a dict of tensors, so torch, timm and ``torch.load(...,
mmap=True)`` read the result as their own. Both are here so converting to and from PyTorch needs
no torch import (seconds of a conversion's time) and streams each tensor from and into the file.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import struct
from typing import Any, Iterable

import numpy as np

from mixer_convert.arrays import np_dtype

# torch's legacy storage type names, as the pickle spells them -> element dtype
STORAGES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
            "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
            "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}
_STORAGE_OF = {"float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
               "bfloat16": "BFloat16Storage"}


class UnsupportedPickle(pickle.UnpicklingError):
    """A global that a plain tensor state dict does not use."""


@dataclasses.dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.rebuilt = 0  # tensors the pickle builds (a key given twice builds one more than it keeps)

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return lambda data, *rest: data
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in STORAGES:
            return name
        raise UnsupportedPickle(f"global {module}.{name} is not allowed in a tensor state dict")

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in STORAGES
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.200}")
        name = STORAGES[pid[1]]
        return StorageRef(pid[2], np_dtype(name), pid[4])

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRef:
        if not (isinstance(storage, StorageRef) and _ints(offset) and _ints(*size) and _ints(*stride)
                and len(size) == len(stride)):
            raise pickle.UnpicklingError("a tensor rebuilt from malformed arguments")
        self.rebuilt += 1
        return TensorRef(storage, offset, tuple(size), tuple(stride))


def _ints(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def load(data: bytes) -> tuple[Any, int]:
    """The unpickled object (tensors as :class:`TensorRef`) and how many tensors the pickle built.
    Raises :class:`UnsupportedPickle` for a global outside the allowed few, pickle errors for
    anything malformed."""
    u = _StateDictUnpickler(data)
    return u.load(), u.rebuilt


def view(ref: TensorRef, storage: np.ndarray) -> np.ndarray:
    """The tensor's values from its storage's elements (``storage``: 1-D, ``ref.storage.numel`` long)."""
    if not ref.shape or ref.stride == _contiguous(ref.shape):
        return storage[ref.offset:ref.offset + int(np.prod(ref.shape, dtype=np.int64))].reshape(ref.shape)
    return np.lib.stride_tricks.as_strided(storage[ref.offset:], ref.shape,
                                           tuple(s * storage.itemsize for s in ref.stride), writeable=False)


def extent(ref: TensorRef) -> int:
    """One past the last storage element the tensor touches (0 for an empty tensor)."""
    if 0 in ref.shape:
        return 0
    return ref.offset + 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


# ---- writing ------------------------------------------------------------------------------------


def _int(n: int) -> bytes:
    if 0 <= n < 256:
        return pickle.BININT1 + bytes([n])
    if 0 <= n < 65536:
        return pickle.BININT2 + struct.pack("<H", n)
    if -2**31 <= n < 2**31:
        return pickle.BININT + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(raw)]) + raw


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _tuple(items: Iterable[int]) -> bytes:
    return pickle.MARK + b"".join(_int(i) for i in items) + pickle.TUPLE


def dumps(tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
    """The pickle of ``{name: tensor}`` for contiguous tensors of the given shapes and dtypes,
    tensor i stored whole in storage ``str(i)``, as ``torch.save`` writes it (protocol 2)."""
    out = [pickle.PROTO + b"\x02", pickle.EMPTY_DICT, pickle.MARK]
    for i, (name, shape, dtype) in enumerate(tensors):
        storage = _STORAGE_OF[np.dtype(dtype).name]
        numel = int(np.prod(shape, dtype=np.int64))
        out += [_str(name), pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n", pickle.MARK,
                pickle.MARK, _str("storage"), pickle.GLOBAL + f"torch\n{storage}\n".encode(), _str(str(i)),
                _str("cpu"), _int(numel), pickle.TUPLE, pickle.BINPERSID,
                _int(0), _tuple(shape), _tuple(_contiguous(tuple(shape))), pickle.NEWFALSE,
                pickle.GLOBAL + b"collections\nOrderedDict\n", pickle.EMPTY_TUPLE, pickle.REDUCE,
                pickle.TUPLE, pickle.REDUCE]
    out += [pickle.SETITEMS, pickle.STOP]
    return b"".join(out)
