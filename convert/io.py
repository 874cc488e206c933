"""Read and write Mixer checkpoints in every format we support, one tensor at a time.

Everything is converted through the canonical flat dict ('/'-joined official names, official
layouts). Readers return a lazy mapping so a converter holds at most one source tensor at a
time; writers stream where the format allows (npz, safetensors) and write atomically (temp
file + rename, no partial output on error).

Formats (``detect_format``): ``npz`` (official; ``params/`` and ``opt/target/`` prefixes and
big_vision's legacy ``Mixer/encoderblock_N`` layout accepted), ``msgpack`` (Flax
serialization; needs flax), ``orbax`` (a directory; needs orbax), ``torch`` (.pt/.pth/.bin
state dict, our naming or timm's; needs torch), ``safetensors`` (our naming or timm's; pure
numpy). Nothing here unpickles: .npz object arrays are refused, ``torch.load(weights_only=True)``.

Hostile input (README "Hostile inputs"): only regular files (and, for orbax, directories of
them) are read; every tensor's shape and dtype is known before any data is read, and the total
is capped (``max_bytes``); zip members are streamed with their declared size as the cap and
their CRCs checked; two sources for one name are an error at every level (zip members, JSON and
msgpack keys, pickled dict keys, naming layouts).
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import os
import pickletools
import stat
import struct
import sys
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mixer_convert.atomic import atomic_path, check_destination
from mixer_convert.errors import CheckpointError
from mixer_convert.errors import why as _why
from mixer_convert.layouts import LAYOUTS, canonicalize
from mixer_convert.params import check_params, check_variant, infer_config
from mixer_convert.spec import MixerConfig, config_for, num_params

FORMATS = ("npz", "msgpack", "orbax", "torch", "safetensors")
DTYPES = ("keep", "float32", "bfloat16", "float16")  # --dtype choices
_SUFFIX_FORMAT = {".npz": "npz", ".msgpack": "msgpack", ".flax": "msgpack", ".pt": "torch", ".pth": "torch",
                  ".bin": "torch", ".safetensors": "safetensors"}

# No Mixer is larger than H/14 (with a 21k head) by much: four times its float32 size bounds what a
# checkpoint may declare (7.3 GB) unless the caller lifts it (max_bytes=None, --allow-large).
MAX_BYTES = 4 * 4 * num_params(config_for("H/14", num_classes=21843))
# A state dict's pickle is ~200 bytes per tensor (H/14: ~100 KB); anything near this is not one.
MAX_PICKLE_BYTES = 16 * 2**20
# A safetensors JSON header may be at most this long (the safetensors library's own limit).
MAX_SAFETENSORS_HEADER = 100_000_000
_CHUNK = 4 * 2**20  # bytes per read when streaming a zip member
_MAX_NDIM = 8
_MAX_FILES = 100_000  # entries in an orbax directory


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def _is_bf16(dtype: np.dtype) -> bool:
    # By name, so the float32 paths never import ml_dtypes (a torch-only install may lack it).
    return dtype.name == "bfloat16"


def _needs(module: str, extra: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CheckpointError(f"{what} needs {module.split('.')[0]} (pip install 'mixer-toolkit[{extra}]')") from None


# --------------------------------------------------------------------------------------
# What may be read: regular files, and directories of them (orbax)
# --------------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_source(path: str | os.PathLike) -> os.stat_result:
    """The source's stat (symlinks followed) if it is a regular file or a directory. FIFOs,
    devices and sockets are refused before they are opened: they have no size and may never end."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise CheckpointError(f"{p}: a symlink to nothing ({os.readlink(p)!r})") from None
        raise FileNotFoundError(f"no such checkpoint: {str(p)!r}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{p}: symlink loop") from None
        raise CheckpointError(f"{p}: cannot read ({_why(e)})") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise CheckpointError(f"{p}: {_kind(st.st_mode)}, not a checkpoint file; only regular files are read")
    if stat.S_ISREG(st.st_mode) and not os.access(p, os.R_OK):
        raise CheckpointError(f"{p}: cannot read (permission denied)")
    return st


_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")


def _check_tree(root: Path) -> None:
    """An orbax checkpoint folder: one of orbax's own files at the top, and every entry below a
    readable regular file or folder (at most _MAX_FILES of them)."""
    if not any(os.path.lexists(root / m) for m in _ORBAX_MARKERS):
        raise CheckpointError(f"{root}: a folder, but not an orbax checkpoint (no {' or '.join(_ORBAX_MARKERS[:3])})")

    def unreadable(e: OSError):
        raise CheckpointError(f"{e.filename}: cannot read ({_why(e)})")
    count = 0
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        for name in dirnames + filenames:
            count += 1
            if count > _MAX_FILES:
                raise CheckpointError(f"{root}: more than {_MAX_FILES} files; not a Mixer checkpoint")
            path = Path(dirpath) / name
            st = check_source(path)
            if stat.S_ISDIR(st.st_mode) and path.is_symlink():
                raise CheckpointError(f"{path}: a link to a folder inside a checkpoint")


# --------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------


def detect_format(path: str | os.PathLike) -> str:
    """By content where possible (a .bin may be anything), else by suffix."""
    p = Path(path)
    st = check_source(p)
    if stat.S_ISDIR(st.st_mode):
        return "orbax"
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({_why(e)})") from None
    if head[:4] == b"PK\x03\x04":
        with _Zip(p) as z:
            names = [i.filename for i in z.members]
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise CheckpointError(f"{p}: a zip archive that is neither .npz nor a PyTorch checkpoint")
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    fmt = _SUFFIX_FORMAT.get(p.suffix.lower())
    if fmt is None:
        raise CheckpointError(f"{p}: cannot tell the format from content or suffix; expected one of "
                              f"{', '.join(sorted(_SUFFIX_FORMAT))} or an orbax directory")
    if fmt == "npz":  # always a zip archive; anything else is damaged (torch also has a legacy non-zip format)
        raise CheckpointError(f"{p}: not a valid npz file (no zip header; truncated or corrupt?)")
    return fmt


def format_for_output(path: str | os.PathLike, to: str | None) -> tuple[str, str]:
    """(file format, naming layout) for an output path and a --to choice."""
    suffix = Path(path).suffix.lower()
    if to in (None, "auto"):
        if suffix in _SUFFIX_FORMAT:
            fmt = _SUFFIX_FORMAT[suffix]
            return fmt, "torch" if fmt in ("torch", "safetensors") else "flax"
        raise ValueError(f"cannot tell the output format of {str(path)!r}; pass --to")
    if to == "timm":
        return ("safetensors" if suffix == ".safetensors" else "torch"), "timm"
    if to == "torch":
        return ("safetensors" if suffix == ".safetensors" else "torch"), "torch"
    if to == "flax":
        return ("npz" if suffix == ".npz" else "orbax" if suffix == "" else "msgpack"), "flax"
    if to in ("npz", "msgpack", "orbax"):
        return to, "flax"
    raise ValueError(f"unknown output kind {to!r}; expected torch, timm, flax, npz, msgpack or orbax")


# --------------------------------------------------------------------------------------
# Reading: lazy entries, each (shape, dtype, load), shape and dtype known before any data
# --------------------------------------------------------------------------------------


class LazyParams(Mapping):
    """Canonical name -> array, read from the source only when asked for.

    ``shapes`` and ``dtypes`` are known without reading any data, so configs can be inferred
    and keys checked before a byte of weights is loaded. Every tensor read is checked against
    its declared shape; a failure to read is a :class:`CheckpointError` naming the tensor.
    """

    def __init__(self, loaders: dict[str, tuple[tuple[int, ...], Any, Callable[[], np.ndarray]]],
                 source: str, layout: str, close: Callable[[], None] | None = None) -> None:
        self._loaders, self.source, self.layout, self._close = loaders, source, layout, close

    def __getitem__(self, key: str) -> np.ndarray:
        shape, _, load = self._loaders[key]
        try:
            arr = load()
        except CheckpointError:
            raise
        except MemoryError:
            raise CheckpointError(f"{self.source}: out of memory reading {key!r}") from None
        except Exception as e:  # a third-party reader meeting damaged data
            raise CheckpointError(f"{self.source}: cannot read {key!r} ({_why(e)}); truncated or corrupt?") from None
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"{self.source}: {key!r} holds shape {tuple(arr.shape)}, its header said {shape}")
        return arr

    def __contains__(self, key: object) -> bool:  # without reading the tensor (Mapping's default would)
        return key in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[0] for k, v in self._loaders.items()}

    @property
    def dtypes(self) -> dict[str, Any]:
        return {k: v[1] for k, v in self._loaders.items()}

    def close(self) -> None:
        if self._close:
            self._close()


class _Shaped:
    """Stand-in with a .shape so key/shape checks run before any data is read."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _check_shape(where: str, key: str, shape: Any) -> tuple[int, ...]:
    """A declared shape as a tuple of non-negative ints, or a CheckpointError."""
    if isinstance(shape, list):
        shape = tuple(shape)
    if (not isinstance(shape, tuple) or len(shape) > _MAX_NDIM
            or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: tensor {key!r} declares an invalid shape {shape!r}")
    shape = tuple(int(d) for d in shape)
    if math.prod(shape) > 2**56:
        raise CheckpointError(f"{where}: tensor {key!r} declares an impossible shape {shape}")
    return shape


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize  # Python ints: no overflow


def declared_bytes(entries: Mapping[str, tuple]) -> int:
    return sum(_nbytes(shape, np.dtype(dtype) if dtype is not None else np.dtype("u1"))
               for shape, dtype, _ in entries.values())


def _check_size(where: str, nbytes: int, max_bytes: int | None, what: str = "declares tensors of") -> None:
    if max_bytes is not None and nbytes > max_bytes:
        raise CheckpointError(f"{where}: {what} {nbytes / 2**30:.2f} GiB, more than any Mixer needs (limit "
                              f"{max_bytes / 2**30:.2f} GiB, 4x H/14); pass --allow-large (max_bytes=None) to read "
                              "it anyway")


# ---- zip archives (.npz, PyTorch) ----------------------------------------------------------


class _Zip:
    """A zip archive read member by member. Refused up front: duplicate member names (which copy
    would win is up to the reader), encryption, compression other than stored/deflate. Members are
    streamed in chunks and never past their declared size; zipfile checks each CRC at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.zf = zipfile.ZipFile(path)
            self.members = self.zf.infolist()
        except Exception as e:
            raise CheckpointError(f"{path}: corrupt or truncated zip archive ({_why(e)})") from None
        try:
            counts = Counter(i.filename for i in self.members)
            dups = sorted(n for n, c in counts.items() if c > 1)
            if dups:
                raise CheckpointError(f"{path}: zip member {dups[0]!r} is stored {counts[dups[0]]} times; "
                                      "refusing an ambiguous archive")
            for i in self.members:
                if i.flag_bits & 0x1:
                    raise CheckpointError(f"{path}: zip member {i.filename!r} is encrypted")
                if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise CheckpointError(f"{path}: zip member {i.filename!r} uses unsupported compression "
                                          f"method {i.compress_type}")
        except BaseException:
            self.zf.close()
            raise

    def __enter__(self) -> "_Zip":
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
                n = f.readinto(out[pos:pos + _CHUNK])
                if not n:
                    raise CheckpointError(f"{self.path}: member {info.filename!r} is truncated")
                pos += n
            if f.read(1):  # also completes the stream, so zipfile checks the CRC
                raise CheckpointError(f"{self.path}: member {info.filename!r} holds more than its header declares")

    def read(self, info: zipfile.ZipInfo, limit: int) -> bytes:
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
            while chunk := f.read(_CHUNK):
                n += len(chunk)
            if n != info.file_size:
                raise CheckpointError(f"{self.path}: member {info.filename!r} is truncated")


@contextlib.contextmanager
def _reading(path: Path, what: str):
    """Turn a third-party reader's failure on damaged input into one CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except MemoryError:
        raise CheckpointError(f"{path}: out of memory reading it as {what}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as {what} ({_why(e)})") from None


# ---- .npz -------------------------------------------------------------------------------------


def _npy_header(f, where: str, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
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
    return _check_shape(where, key, shape), bool(fortran), dtype


def _read_npz(path: Path) -> tuple[dict[str, tuple], Callable[[], None]]:
    z = _Zip(path)
    try:
        entries = {}
        for info in z.members:
            if not info.filename.endswith(".npy"):
                raise CheckpointError(f"{path}: member {info.filename!r} is not an .npy array")
            key = info.filename[:-4]
            with _reading(path, f".npz (entry {key!r})"), z.open(info) as f:
                shape, fortran, dtype = _npy_header(f, str(path), key)
                offset = f.tell()
            nbytes = _nbytes(shape, dtype)
            if offset + nbytes != info.file_size:
                raise CheckpointError(f"{path}: entry {key!r} declares {shape} {dtype} ({nbytes} bytes) but holds "
                                      f"{info.file_size - offset} bytes; truncated or corrupt")

            def load(info=info, offset=offset, shape=shape, dtype=dtype, fortran=fortran) -> np.ndarray:
                buf = np.empty(_nbytes(shape, dtype), np.uint8)  # exactly the declared size, checked before
                with _reading(path, ".npz"):
                    z.read_into(info, offset, memoryview(buf))
                arr = buf.view(dtype).reshape(shape, order="F" if fortran else "C")
                return arr.astype(dtype.newbyteorder("="), copy=False)  # big-endian files become native
            entries[key] = (shape, dtype.newbyteorder("="), load)
    except BaseException:
        z.close()
        raise
    return entries, z.close


# ---- Flax msgpack -------------------------------------------------------------------------------


def _flatten(tree: Any, where: str, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Nested dicts/lists -> '/'-joined keys; two paths giving one key (a key that itself holds
    '/') are an error, not an overwrite."""
    if depth > 64:
        raise CheckpointError(f"{where}: nested more than 64 levels deep; not a parameter tree")
    items = tree.items() if isinstance(tree, Mapping) else enumerate(tree)
    out: dict[str, Any] = {}
    for k, v in items:
        key = f"{prefix}/{k}" if prefix else str(k)
        sub = _flatten(v, where, key, depth + 1) if isinstance(v, (Mapping, list, tuple)) else {key: v}
        for name, leaf in sub.items():
            if name in out:
                raise CheckpointError(f"{where}: two entries are both named {name!r}")
            out[name] = leaf
    return out


def _leaf_entry(where: str, key: str, v: Any) -> tuple:
    if isinstance(v, (np.ndarray, np.generic)):
        arr = np.asarray(v)
    elif v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        arr = np.asarray(v)  # step counters and the like: refused if they sit where a weight should
    else:
        raise CheckpointError(f"{where}: entry {key!r} is a {type(v).__name__}, not an array")
    return _check_shape(where, key, arr.shape), arr.dtype, (lambda: arr)


def _no_duplicate_keys(where: str):
    def hook(pairs):
        counts = Counter(k for k, _ in pairs)
        dup = next((k for k, c in counts.items() if c > 1), None)
        if dup is not None:
            raise CheckpointError(f"{where}: key {dup!r} appears {counts[dup]} times in one map; "
                                  "refusing an ambiguous file")
        return dict(pairs)
    return hook


def _read_msgpack(path: Path, max_bytes: int | None) -> dict[str, tuple]:
    serialization = _needs("flax.serialization", "jax", "reading a Flax msgpack file")
    import msgpack

    _check_size(str(path), path.stat().st_size, max_bytes, "is a msgpack file of")
    with _reading(path, "Flax msgpack"):
        data = path.read_bytes()
        # A first pass with the plain msgpack decoder finds duplicated keys (flax's would keep the
        # last); array payloads are skipped, not decoded.
        msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=lambda code, payload: None,
                        object_pairs_hook=_no_duplicate_keys(str(path)))
        tree = serialization.msgpack_restore(data)
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path}: Flax msgpack does not hold a parameter tree")
    return {k: _leaf_entry(str(path), k, v) for k, v in _flatten(tree, str(path)).items()}


# ---- orbax ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_orbax():
    """orbax/absl log warnings (and asyncio its shutdown noise) to stderr around clean failures;
    a converter reports one error line, so silence them while orbax works."""
    loggers = [logging.getLogger(n) for n in ("absl", "asyncio", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _drop_closed_loop_noise() -> None:
    """After a failed restore, tensorstore still completes the reads orbax abandoned and schedules
    them on orbax's event loop, closed by then: each prints "RuntimeError: Event loop is closed"
    through sys.unraisablehook, after the clean error. Exactly those are dropped (installed once)."""
    previous = sys.unraisablehook
    if getattr(previous, "mixer_drops_closed_loop", False):
        return

    def hook(unraisable) -> None:
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)
    hook.mixer_drops_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class _OrbaxTree:
    """Restores the whole tree on first use (after every declared shape was checked), then hands
    out one array at a time; each restored array must match what the metadata declared."""

    def __init__(self, path: Path, declared: dict[str, tuple]) -> None:
        self.path, self.declared, self.arrays = path, declared, None

    def get(self, key: str) -> np.ndarray:
        if self.arrays is None:
            import orbax.checkpoint as ocp
            from jax.tree_util import tree_map

            ckptr = ocp.PyTreeCheckpointer()
            with _reading(self.path, "an orbax checkpoint"), _quiet_orbax():
                meta = ckptr.metadata(self.path.absolute()).item_metadata
                meta = getattr(meta, "tree", meta)
                # Straight to host numpy: a converter has no use for device arrays or shardings.
                as_numpy = tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
                tree = ckptr.restore(self.path.absolute(), args=ocp.args.PyTreeRestore(restore_args=as_numpy))
            arrays = {k: v for k, v in _flatten(tree, str(self.path)).items() if v is not None}
            if set(arrays) != set(self.declared):
                raise CheckpointError(f"{self.path}: restored tree differs from its metadata")
            for k, (shape, dtype, _) in self.declared.items():
                arr = np.asarray(arrays[k])
                if arr.shape != shape or arr.dtype != dtype:
                    raise CheckpointError(f"{self.path}: {k!r} restored as {arr.shape} {arr.dtype}, its metadata "
                                          f"said {shape} {dtype}")
            self.arrays = arrays
        return np.asarray(self.arrays[key])

    def close(self) -> None:
        self.arrays = None


def _read_orbax(path: Path) -> tuple[dict[str, tuple], Callable[[], None]]:
    ocp = _needs("orbax.checkpoint", "train", "reading an orbax checkpoint")
    _drop_closed_loop_noise()
    _check_tree(path)
    if (path / "_METADATA").is_file():  # the tree's JSON: a key given twice would be read as the last one
        with _reading(path, "an orbax checkpoint"):
            if (path / "_METADATA").stat().st_size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"{path}: _METADATA is too large for a Mixer checkpoint")
            json.loads((path / "_METADATA").read_text(), object_pairs_hook=_no_duplicate_keys(str(path / "_METADATA")))
    with _reading(path, "an orbax checkpoint"), _quiet_orbax():
        meta = ocp.PyTreeCheckpointer().metadata(path.absolute()).item_metadata
        meta = getattr(meta, "tree", meta)
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{path}: orbax checkpoint does not hold a parameter tree")
    declared = {}
    for k, m in _flatten(meta, str(path)).items():
        if m is None:  # an empty optimizer state: nothing stored
            continue
        shape, dtype = getattr(m, "shape", None), getattr(m, "dtype", None)
        if shape is None or dtype is None:
            raise CheckpointError(f"{path}: entry {k!r} is not an array ({type(m).__name__})")
        with _reading(path, "an orbax checkpoint"):
            dtype = np.dtype(dtype)
        declared[k] = (_check_shape(str(path), k, shape), dtype, None)
    tree = _OrbaxTree(path, declared)
    return {k: (s, d, (lambda k=k: tree.get(k))) for k, (s, d, _) in declared.items()}, tree.close


# ---- PyTorch --------------------------------------------------------------------------------------


def torch_to_numpy(t) -> np.ndarray:
    """A tensor as numpy without a copy where possible; bfloat16 becomes ml_dtypes.bfloat16."""
    import torch

    t = t.detach().cpu().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_bf16())
    return t.numpy()


def numpy_to_torch(v: np.ndarray):
    """The inverse, copying only when torch needs its own writable C-ordered buffer. A transposed
    view is made contiguous by torch, about 3x faster than numpy's copy of a large transpose."""
    import torch

    if not v.flags.writeable:
        v = np.array(v, order="C")
    t = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) if _is_bf16(v.dtype) else torch.from_numpy(v)
    return t.contiguous()


def _torch_np_dtype(dt, where: str, key: str) -> np.dtype:
    import torch

    if dt == torch.bfloat16:
        return _bf16()
    try:
        return torch.empty(0, dtype=dt).numpy().dtype
    except TypeError:  # no numpy equivalent (float8, unsigned 16-64 bit, ...): no Mixer weight either
        raise CheckpointError(f"{where}: tensor {key!r} has unsupported dtype {dt}; Mixer weights are float") from None


def _torch_entries(sd: Mapping[str, Any], where: str) -> dict[str, tuple]:
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{where}: state dict key {k!r} is not a string")
        out[k] = (_check_shape(where, k, tuple(v.shape)), _torch_np_dtype(v.dtype, where, k),
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


def _check_torch_zip(path: Path, max_bytes: int | None) -> int:
    """Everything torch.load would trust, checked first: one data.pkl of bounded size (torch reads
    it whole), no duplicate or encrypted members, a bounded total, every CRC. Returns how many
    tensors the pickle rebuilds."""
    with _Zip(path) as z, _reading(path, "a PyTorch checkpoint"):
        pkls = [i for i in z.members if i.filename.endswith("data.pkl")]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: a PyTorch archive has one data.pkl, this one has {len(pkls)}")
        pkl = pkls[0]
        folder = pkl.filename[: -len("data.pkl")]
        stray = [i.filename for i in z.members if not i.filename.startswith(folder)]
        if stray:
            raise CheckpointError(f"{path}: member {stray[0]!r} lies outside the archive's folder {folder!r}")
        if pkl.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: {pkl.filename} declares {pkl.file_size} bytes; a state dict's pickle "
                                  f"is far smaller (limit {MAX_PICKLE_BYTES})")
        _check_size(str(path), sum(i.file_size for i in z.members if i is not pkl), max_bytes,
                    "holds tensor data of")
        if any(i.CRC for i in z.members):
            for i in z.members:
                z.verify(i)
        else:  # torch.save with compute_crc32=False writes 0 for every CRC: nothing to check
            for i in z.members:
                i.CRC = None  # tells zipfile not to check
        return _persistent_ids(z.read(pkl, MAX_PICKLE_BYTES))


def _count_legacy(path: Path) -> int:
    """The legacy (non-zip) format is pickles (magic, version, system info, the state, its storage
    keys) then raw storages. Returns the state's tensor count; the pickles must fit in
    MAX_PICKLE_BYTES, so scanning them never holds more."""
    with open(path, "rb") as f:
        head = io.BytesIO(f.read(MAX_PICKLE_BYTES))
    try:
        for _ in range(3):
            for _ in pickletools.genops(head):
                pass
        return _persistent_ids(head)
    except ValueError as e:
        if head.tell() >= MAX_PICKLE_BYTES - 16:
            raise CheckpointError(f"{path}: its pickles run past {MAX_PICKLE_BYTES} bytes; not a state dict") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_why(e)})") from None


def _read_torch(path: Path, max_bytes: int | None) -> dict[str, tuple]:
    import pickle

    torch = _needs("torch", "torch", "reading a PyTorch checkpoint")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        rebuilt = _check_torch_zip(path, max_bytes)
    else:
        _check_size(str(path), path.stat().st_size, max_bytes, "is a legacy PyTorch file of")
        with _reading(path, "a PyTorch checkpoint"):
            rebuilt = _count_legacy(path)
    try:
        # mmap: tensor data stays in the file until read (the zip format only)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refusing to load: not a plain tensor state dict "
                              f"(weights_only=True rejected it: {str(e).splitlines()[0]})") from None
    except MemoryError:
        raise CheckpointError(f"{path}: out of memory reading it as a PyTorch checkpoint") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({_why(e)})") from None
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
    return _torch_entries(obj, str(path))


# ---- safetensors ------------------------------------------------------------------------------------


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def np_dtype(name: str) -> np.dtype:
    return _bf16() if name == "bfloat16" else np.dtype(name)


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64


def _safetensors_header(path: Path, size: int) -> tuple[int, dict[str, dict]]:
    """(header length, tensors) validated as the safetensors library does (read_metadata, validate):
    a bounded UTF-8 JSON object of {name: {dtype, shape, data_offsets}} plus an optional
    ``__metadata__`` of strings; offsets contiguous from 0, each span exactly its tensor's size,
    the last ending at the end of the file. Duplicate names are refused."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_SAFETENSORS_HEADER:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes is larger than the format allows")
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors header")
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"), object_pairs_hook=_no_duplicate_keys(str(path)))
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({_why(e)})") from None
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
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise CheckpointError(f"{path}: safetensors entry {k!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
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


def _read_safetensors(path: Path) -> dict[str, tuple]:
    size = path.stat().st_size
    n, header = _safetensors_header(path, size)
    entries = {}
    for k, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {k!r} has unsupported dtype {info['dtype']!r}")
        dtype = np_dtype(_ST_DTYPES[info["dtype"]])
        shape = _check_shape(str(path), k, info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != _nbytes(shape, dtype):
            raise CheckpointError(f"{path}: tensor {k!r} is {shape} {info['dtype']} but spans {end - begin} bytes")

        def load(begin=begin, shape=shape, dtype=dtype):
            if 0 in shape:
                return np.zeros(shape, dtype)
            return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape)
        entries[k] = (shape, dtype, load)
    return entries


# ---- any format -----------------------------------------------------------------------------------


def read_params(path: str | os.PathLike, fmt: str | None = None, prefix: str | None = None,
                max_bytes: int | None = MAX_BYTES) -> LazyParams:
    """Any supported checkpoint -> lazy canonical params (through :func:`layouts.canonicalize`:
    unknown and duplicated keys are errors). Raises CheckpointError on damage, and before any data
    is read if the tensors declared add up to more than ``max_bytes`` (None: no limit)."""
    path = Path(path)
    if fmt is None:
        fmt = detect_format(path)
    else:
        check_source(path)
    close = None
    try:
        if fmt == "npz":
            entries, close = _read_npz(path)
        elif fmt == "msgpack":
            entries = _read_msgpack(path, max_bytes)
        elif fmt == "orbax":
            entries, close = _read_orbax(path)
        elif fmt == "torch":
            entries = _read_torch(path, max_bytes)
        elif fmt == "safetensors":
            entries = _read_safetensors(path)
        else:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({_why(e)})") from None
    try:
        _check_size(str(path), declared_bytes(entries), max_bytes)
        layout, entries = canonicalize(entries, prefix=prefix)
    except BaseException:
        if close:
            close()
        raise
    return LazyParams(entries, str(path), layout, close)


def shape_view(params: LazyParams) -> dict[str, _Shaped]:
    return {k: _Shaped(s) for k, s in params.shapes.items()}


# --------------------------------------------------------------------------------------
# Per-tensor checks and dtype
# --------------------------------------------------------------------------------------


def check_float(key: str, dtype: Any) -> None:
    """Mixer weights are floating point (float16/bfloat16/float32/float64); nothing else is cast."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f" and not _is_bf16(dtype):
        raise CheckpointError(f"tensor {key!r} has unsupported dtype {dtype}; Mixer weights are float")


def cast(key: str, arr: np.ndarray, dtype: str) -> np.ndarray:
    """Float tensors only; ``keep`` leaves the dtype as it is."""
    check_float(key, arr.dtype)
    if dtype == "keep":
        return arr
    return arr.astype(np_dtype(dtype), copy=False)


def nonfinite(arr: np.ndarray) -> int:
    return int(arr.size - np.count_nonzero(np.isfinite(arr.astype(np.float32, copy=False))))


def open_params(path: str | os.PathLike, variant: str | None = None, image_size=None, prefix: str | None = None,
                max_bytes: int | None = MAX_BYTES) -> tuple[LazyParams, MixerConfig]:
    """A local checkpoint as lazy canonical params and its config, inferred from the shapes; every
    name, shape and dtype is checked (and ``variant`` if given) before any data is read, and a
    checkpoint declaring more than ``max_bytes`` (None: no limit) is refused. The caller closes the
    params. (mixer_convert.load adds name resolution and the transforms.)"""
    params = read_params(path, prefix=prefix, max_bytes=max_bytes)
    try:
        shapes = shape_view(params)
        cfg = infer_config(shapes, image_size=image_size)
        if variant:
            check_variant(cfg, variant)
        check_params(shapes, cfg, what=str(path))
        for key, dtype in params.dtypes.items():
            try:
                check_float(key, dtype)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
    except BaseException:
        params.close()
        raise
    return params, cfg


# --------------------------------------------------------------------------------------
# Writing (atomic)
# --------------------------------------------------------------------------------------


def _write_npz(items: Iterator[tuple[str, np.ndarray]], path: Path) -> None:
    # Like np.savez (stored, not compressed) but one tensor at a time.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for k, v in items:
            if _is_bf16(v.dtype):
                raise CheckpointError("npz cannot hold bfloat16 (numpy has no such dtype); "
                                      "use --dtype float32 or another output format")
            with z.open(k + ".npy", "w", force_zip64=True) as f:
                # C order always, so a round trip through a transposing format gives the same bytes.
                np.lib.format.write_array(f, np.ascontiguousarray(v), allow_pickle=False)


_NP_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _write_safetensors(keys_shapes: list[tuple[str, tuple, np.dtype]], items: Iterator[tuple[str, np.ndarray]],
                       path: Path, metadata: dict[str, str] | None = None) -> None:
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for k, shape, dtype in keys_shapes:
        nbytes = _nbytes(tuple(shape), dtype)
        header[k] = {"dtype": _NP_TO_ST[dtype.name], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (k, shape, dtype), (k2, v) in zip(keys_shapes, items):
            assert k == k2 and tuple(v.shape) == tuple(shape) and v.dtype == dtype, (k, k2)
            f.write(np.ascontiguousarray(v).tobytes())


def _nest(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for k, v in flat.items():
        node = tree
        *parents, leaf = k.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def write_params(flat: Mapping[str, np.ndarray], dst: str | os.PathLike, fmt: str = "npz", layout: str | None = None,
                 force: bool = False, progress: Callable[[str, np.ndarray], None] | None = None,
                 before_commit: Callable[[Path], None] | None = None) -> Path:
    """Canonical params -> file at ``dst`` in ``fmt`` and naming ``layout``; atomic.

    Tensors are taken from ``flat`` one at a time in its order; for npz and safetensors
    each is written and dropped before the next is read. ``before_commit(tmp_path)`` runs on
    the finished temporary file; if it raises, ``dst`` is not created. A failure to write (disk
    full, read-only, ...) is a CheckpointError naming ``dst``.
    """
    dst = Path(dst)
    layout = layout or ("torch" if fmt in ("torch", "safetensors") else "flax")
    lay = LAYOUTS[layout]
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if fmt in ("npz", "msgpack", "orbax") and layout != "flax":
        raise ValueError(f"{fmt} files hold the Flax (official) naming, not {layout!r}")

    def items() -> Iterator[tuple[str, np.ndarray]]:
        for k in flat:
            v = flat[k]
            if progress:
                progress(k, v)
            yield lay.key_to(k), lay.value_to(k, v)

    check_destination(dst, force, is_dir=(fmt == "orbax"))
    try:
        with atomic_path(dst, force, is_dir=(fmt == "orbax")) as tmp:
            _write(fmt, flat, lay, items(), tmp, str(dst))
            if before_commit is not None:
                before_commit(tmp)
    except OSError as e:
        raise CheckpointError(f"cannot write {dst} ({_why(e)})") from None
    return dst


def _write(fmt: str, flat: Mapping[str, np.ndarray], lay, items: Iterator[tuple[str, np.ndarray]], tmp: Path,
           shown: str) -> None:
    if fmt == "npz":
        _write_npz(items, tmp)
    elif fmt == "safetensors":
        shapes = getattr(flat, "shapes", None) or {k: np.shape(flat[k]) for k in flat}
        dtypes = getattr(flat, "dtypes", None) or {k: np.asarray(flat[k]).dtype for k in flat}
        ks = [(lay.key_to(k), lay.shape_to(k, shapes[k]), np.dtype(dtypes[k])) for k in flat]
        _write_safetensors(ks, items, tmp)
    elif fmt == "torch":
        torch = _needs("torch", "torch", "writing a PyTorch checkpoint")
        sd = {k: numpy_to_torch(v) for k, v in items}
        try:
            torch.save(sd, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write ("unexpected pos ...") this way
            raise CheckpointError(f"cannot write {shown}: torch.save failed ({_why(e)}); disk full or "
                                  "not writable?") from None
    elif fmt == "msgpack":
        serialization = _needs("flax.serialization", "jax", "writing a Flax msgpack file")
        tmp.write_bytes(serialization.msgpack_serialize(_nest({k: np.asarray(v) for k, v in items})))
    elif fmt == "orbax":
        ocp = _needs("orbax.checkpoint", "train", "writing an orbax checkpoint")
        _drop_closed_loop_noise()
        tree = _nest({k: np.asarray(v) for k, v in items})
        try:
            with _quiet_orbax():
                ocp.PyTreeCheckpointer().save(tmp.absolute(), tree)
        except BaseException as e:
            # orbax returns on the first failed write while tensorstore finishes the others, which
            # would recreate files under the temporary after it is removed: let them land first.
            _wait_until_quiet(tmp.parent)
            if isinstance(e, (CheckpointError, OSError)) or not isinstance(e, Exception):
                raise
            raise CheckpointError(f"cannot write {shown}: orbax failed ({_why(e)}); disk full or "
                                  "not writable?") from None


def _wait_until_quiet(folder: Path, quiet: float = 0.25, limit: float = 10.0) -> None:
    """Return once nothing under ``folder`` has changed for ``quiet`` seconds (at most ``limit``)."""
    def state():
        try:
            return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))
        except OSError:
            return None
    deadline, last = time.monotonic() + limit, state()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = state()
        if now == last:
            return
        last = now
