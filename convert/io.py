"""Read and write Mixer checkpoints in every format we support, one tensor at a time.

Everything is converted through the canonical flat dict ('/'-joined official names, official
layouts). Readers return a lazy mapping so a converter holds at most one source tensor at a
time; writers stream where the format allows (npz, safetensors) and write atomically (temp
file + rename, no partial output on error).

Formats (``detect_format``): ``npz`` (official; ``params/`` and ``opt/target/`` prefixes and
big_vision's legacy ``Mixer/encoderblock_N`` layout accepted), ``msgpack`` (Flax
serialization; needs flax), ``orbax`` (a directory; needs orbax), ``torch`` (.pt/.pth/.bin
state dict, our naming or timm's; needs torch), ``safetensors`` (our naming or timm's; pure
numpy). Nothing here unpickles: ``np.load(allow_pickle=False)``, ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mixer_convert.layouts import LAYOUTS, canonicalize
from mixer_convert.params import check_params, check_variant, infer_config
from mixer_convert.spec import MixerConfig

FORMATS = ("npz", "msgpack", "orbax", "torch", "safetensors")
DTYPES = ("keep", "float32", "bfloat16", "float16")  # --dtype choices
_SUFFIX_FORMAT = {".npz": "npz", ".msgpack": "msgpack", ".flax": "msgpack", ".pt": "torch", ".pth": "torch",
                  ".bin": "torch", ".safetensors": "safetensors"}


class CheckpointError(ValueError):
    """The file cannot be read as a Mixer checkpoint (corrupt, truncated, wrong kind)."""


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def _is_bf16(dtype: np.dtype) -> bool:
    # By name, so the float32 paths never import ml_dtypes (a torch-only install may lack it).
    return dtype.name == "bfloat16"


# --------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------


def detect_format(path: str | os.PathLike) -> str:
    """By content where possible (a .bin may be anything), else by suffix."""
    p = Path(path)
    if p.is_dir():
        return "orbax"
    if not p.exists():
        raise FileNotFoundError(f"no such checkpoint: {str(p)!r}")
    with open(p, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{p}: corrupt or truncated zip archive ({e})") from None
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if all(n.endswith(".npy") for n in names):
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
# Reading
# --------------------------------------------------------------------------------------


class LazyParams(Mapping):
    """Canonical name -> array, read from the source only when asked for.

    ``shapes`` is known without reading any data, so configs can be inferred and keys
    checked before a byte of weights is loaded.
    """

    def __init__(self, loaders: dict[str, tuple[tuple[int, ...], Any, Callable[[], np.ndarray]]],
                 source: str, layout: str, close: Callable[[], None] | None = None) -> None:
        self._loaders, self.source, self.layout, self._close = loaders, source, layout, close

    def __getitem__(self, key: str) -> np.ndarray:
        return self._loaders[key][2]()

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


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an .npy stream from its header alone (no data read)."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = fmt.read_array_header_2_0(f)
    else:  # v3 only adds utf8 field names; rare enough to read the array for its header
        arr = fmt.read_array(f, allow_pickle=False)
        shape, dtype = arr.shape, arr.dtype
    return tuple(shape), dtype


def _read_npz(path: Path) -> tuple[dict[str, tuple], Callable[[], None]]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read as .npz ({e})") from None
    entries = {}
    for name in npz.files:
        try:
            with npz.zip.open(name + ".npy") as f:
                shape, dtype = _npy_header(f)
        except Exception as e:
            npz.close()
            raise CheckpointError(f"{path}: entry {name!r} is damaged ({e})") from None
        if dtype.hasobject:
            npz.close()
            raise CheckpointError(f"{path}: entry {name!r} holds Python objects; refusing to unpickle")

        def load(name=name):
            try:
                return npz[name]
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read {name!r} ({e}); truncated or corrupt file?") from None
        entries[name] = (tuple(shape), dtype, load)
    return entries, npz.close


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _eager(flat: Mapping[str, Any]) -> dict[str, tuple]:
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype, (lambda v=v: np.asarray(v))) for k, v in flat.items()}


def _read_msgpack(path: Path) -> dict[str, tuple]:
    from flax import serialization

    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as Flax msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path}: Flax msgpack does not hold a parameter tree")
    return _eager(_flatten(tree))


def _read_orbax(path: Path) -> dict[str, tuple]:
    import orbax.checkpoint as ocp
    from jax.tree_util import tree_map as jax_tree_map

    ckptr = ocp.PyTreeCheckpointer()
    try:
        # Restore straight to host numpy: a converter has no use for device arrays or shardings.
        meta = ckptr.metadata(path.absolute()).item_metadata
        meta = getattr(meta, "tree", meta)
        as_numpy = jax_tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        tree = ckptr.restore(path.absolute(), args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as an orbax checkpoint ({type(e).__name__}: {e})") from None
    return _eager(_flatten(tree))


def torch_to_numpy(t) -> np.ndarray:
    """A tensor as numpy without a copy where possible; bfloat16 becomes ml_dtypes.bfloat16."""
    import torch

    t = t.detach().cpu()
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


def _torch_entries(sd: Mapping[str, Any]) -> dict[str, tuple]:
    import torch

    def dtype_of(t):
        return _bf16() if t.dtype == torch.bfloat16 else _torch_np_dtype(t.dtype)

    return {k: (tuple(v.shape), dtype_of(v), (lambda v=v: torch_to_numpy(v))) for k, v in sd.items()}


def _torch_np_dtype(dt):
    import torch
    try:
        return torch.empty(0, dtype=dt).numpy().dtype
    except TypeError:
        return np.dtype("V1")  # no numpy equivalent; rejected by the dtype check with the torch name


def _read_torch(path: Path) -> dict[str, tuple]:
    import pickle

    import torch

    try:
        # mmap (no copy in RAM) needs the zip format; torch's legacy format loads without it
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refusing to load: not a plain tensor state dict "
                              f"(weights_only=True rejected it: {str(e).splitlines()[0]})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return _torch_entries(obj)


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def np_dtype(name: str) -> np.dtype:
    return _bf16() if name == "bfloat16" else np.dtype(name)


def _read_safetensors(path: Path) -> dict[str, tuple]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors header")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    entries = {}
    for k, info in header.items():
        if info.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {k!r} has unsupported dtype {info.get('dtype')!r}")
        dtype = np_dtype(_ST_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if 8 + n + end > size or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {k!r} runs past the end of the file (truncated?)")

        def load(begin=begin, shape=shape, dtype=dtype):
            return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape)
        entries[k] = (shape, dtype, load)
    return entries


def read_params(path: str | os.PathLike, fmt: str | None = None, prefix: str | None = None) -> LazyParams:
    """Any supported checkpoint -> lazy canonical params (through :func:`layouts.canonicalize`:
    unknown and duplicated keys are errors). Raises CheckpointError on damage."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    close = None
    if fmt == "npz":
        entries, close = _read_npz(path)
    elif fmt == "msgpack":
        entries = _read_msgpack(path)
    elif fmt == "orbax":
        entries = _read_orbax(path)
    elif fmt == "torch":
        entries = _read_torch(path)
    elif fmt == "safetensors":
        entries = _read_safetensors(path)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    try:
        layout, entries = canonicalize(entries, prefix=prefix)
    except Exception:
        if close:
            close()
        raise
    return LazyParams(entries, str(path), layout, close)


def shape_view(params: LazyParams) -> dict[str, _Shaped]:
    return {k: _Shaped(s) for k, s in params.shapes.items()}


def open_params(path: str | os.PathLike, variant: str | None = None, image_size=None,
                prefix: str | None = None) -> tuple[LazyParams, MixerConfig]:
    """A local checkpoint as lazy canonical params and its config, inferred from the shapes and
    checked (every name and shape, and ``variant`` if given) before any data is read. The caller
    closes the params. (mixer_convert.load adds name resolution and the transforms.)"""
    params = read_params(path, prefix=prefix)
    try:
        shapes = shape_view(params)
        cfg = infer_config(shapes, image_size=image_size)
        if variant:
            check_variant(cfg, variant)
        check_params(shapes, cfg, what=str(path))
    except Exception:
        params.close()
        raise
    return params, cfg


# --------------------------------------------------------------------------------------
# Per-tensor checks and dtype
# --------------------------------------------------------------------------------------


def cast(key: str, arr: np.ndarray, dtype: str) -> np.ndarray:
    """Float tensors only; ``keep`` leaves the dtype as it is."""
    if arr.dtype.kind not in "f" and not _is_bf16(arr.dtype):
        raise CheckpointError(f"tensor {key!r} has unsupported dtype {arr.dtype}; Mixer weights are float")
    if dtype == "keep":
        return arr
    return arr.astype(np_dtype(dtype), copy=False)


def nonfinite(arr: np.ndarray) -> int:
    return int(arr.size - np.count_nonzero(np.isfinite(arr.astype(np.float32, copy=False))))


# --------------------------------------------------------------------------------------
# Writing (atomic)
# --------------------------------------------------------------------------------------


def check_destination(dst: Path, force: bool) -> None:
    """An existing output is kept unless the caller said to overwrite it."""
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass --force (force=True) to overwrite it")


@contextlib.contextmanager
def atomic_path(dst: Path, force: bool, is_dir: bool = False):
    """Yield a temporary path beside ``dst``; rename it over ``dst`` only if the body succeeds."""
    check_destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    target = tmp / dst.name
    try:
        yield target
        if is_dir and dst.exists():  # a directory cannot be renamed over: move the old one aside first
            os.replace(dst, tmp / "replaced")
        os.replace(target, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
        nbytes = int(np.prod(shape)) * dtype.itemsize
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
    the finished temporary file; if it raises, ``dst`` is not created.
    """
    dst = Path(dst)
    layout = layout or ("torch" if fmt in ("torch", "safetensors") else "flax")
    lay = LAYOUTS[layout]
    if fmt in ("npz", "msgpack", "orbax") and layout != "flax":
        raise ValueError(f"{fmt} files hold the Flax (official) naming, not {layout!r}")

    def items() -> Iterator[tuple[str, np.ndarray]]:
        for k in flat:
            v = flat[k]
            if progress:
                progress(k, v)
            yield lay.key_to(k), lay.value_to(k, v)

    with atomic_path(dst, force, is_dir=(fmt == "orbax")) as tmp:
        if fmt == "npz":
            _write_npz(items(), tmp)
        elif fmt == "safetensors":
            shapes = getattr(flat, "shapes", None) or {k: np.shape(flat[k]) for k in flat}
            dtypes = getattr(flat, "dtypes", None) or {k: np.asarray(flat[k]).dtype for k in flat}
            ks = [(lay.key_to(k), lay.shape_to(k, shapes[k]), np.dtype(dtypes[k])) for k in flat]
            _write_safetensors(ks, items(), tmp)
        elif fmt == "torch":
            import torch
            torch.save({k: numpy_to_torch(v) for k, v in items()}, tmp)
        elif fmt == "msgpack":
            from flax import serialization
            tmp.write_bytes(serialization.msgpack_serialize(_nest({k: np.asarray(v) for k, v in items()})))
        elif fmt == "orbax":
            import orbax.checkpoint as ocp
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ocp.PyTreeCheckpointer().save(tmp.absolute(), _nest({k: np.asarray(v) for k, v in items()}))
        else:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
        if before_commit is not None:
            before_commit(tmp)
    return dst
