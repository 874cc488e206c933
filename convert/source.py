"""What a checkpoint source may be, and how much it may declare, checked before any data is read.

Only regular files (and, for orbax, folders of them) are read: FIFOs, devices and sockets have
no size and may never end. Every tensor's shape is checked as it is declared, and the total a
file declares is capped (:data:`MAX_BYTES`) so a few-MB file cannot make us allocate gigabytes.
A key given twice in a JSON or msgpack map is an error (a parser would keep the last one).
Third-party readers meeting damaged data raise many exception types; :func:`reading` turns them
into one :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mixer_convert.errors import CheckpointError, why
from mixer_convert.spec import config_for, num_params

# No Mixer is larger than H/14 (with a 21k head) by much: four times its float32 size bounds what a
# checkpoint may declare (7.3 GB) unless the caller lifts it (max_bytes=None, --allow-large).
MAX_BYTES = 4 * 4 * num_params(config_for("H/14", num_classes=21843))
# Metadata that a reader holds whole (a state dict's pickle, orbax's _METADATA): ~200 bytes per
# tensor, H/14 ~100 KB; anything near this is not a Mixer checkpoint's.
MAX_METADATA_BYTES = 16 * 2**20
MAX_NDIM = 8
MAX_FILES = 100_000  # entries in an orbax folder
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_source(path: str | os.PathLike) -> os.stat_result:
    """The source's stat (symlinks followed) if it is a readable regular file or a folder."""
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
        raise CheckpointError(f"{p}: cannot read ({why(e)})") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise CheckpointError(f"{p}: {_kind(st.st_mode)}, not a checkpoint file; only regular files are read")
    if stat.S_ISREG(st.st_mode) and not os.access(p, os.R_OK):
        raise CheckpointError(f"{p}: cannot read (permission denied)")
    return st


def check_tree(root: Path) -> None:
    """An orbax checkpoint folder: one of orbax's own files at the top, and every entry below a
    readable regular file or folder (at most :data:`MAX_FILES`), no link to a folder."""
    if not any(os.path.lexists(root / m) for m in ORBAX_MARKERS):
        raise CheckpointError(f"{root}: a folder, but not an orbax checkpoint (no {' or '.join(ORBAX_MARKERS[:3])})")

    def unreadable(e: OSError):
        raise CheckpointError(f"{e.filename}: cannot read ({why(e)})")
    count = 0
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        for name in dirnames + filenames:
            count += 1
            if count > MAX_FILES:
                raise CheckpointError(f"{root}: more than {MAX_FILES} files; not a Mixer checkpoint")
            path = Path(dirpath) / name
            st = check_source(path)
            if stat.S_ISDIR(st.st_mode) and path.is_symlink():
                raise CheckpointError(f"{path}: a link to a folder inside a checkpoint")


def check_shape(where: str, key: str, shape: Any) -> tuple[int, ...]:
    """A declared shape as a tuple of non-negative ints, or a CheckpointError."""
    if isinstance(shape, list):
        shape = tuple(shape)
    if (not isinstance(shape, tuple) or len(shape) > MAX_NDIM
            or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: tensor {key!r} declares an invalid shape {shape!r}")
    shape = tuple(int(d) for d in shape)
    if math.prod(shape) > 2**56:
        raise CheckpointError(f"{where}: tensor {key!r} declares an impossible shape {shape}")
    return shape


def nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize  # Python ints: no overflow


def declared_bytes(entries: Mapping[str, tuple]) -> int:
    """What the entries (shape, dtype, load) add up to."""
    return sum(nbytes(shape, np.dtype(dtype) if dtype is not None else np.dtype("u1"))
               for shape, dtype, _ in entries.values())


def check_size(where: str, size: int, max_bytes: int | None, what: str = "declares tensors of") -> None:
    """Refuse more than ``max_bytes`` (None: no limit), naming the way to lift the limit."""
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(f"{where}: {what} {size / 2**30:.2f} GiB, more than any Mixer needs (limit "
                              f"{max_bytes / 2**30:.2f} GiB, 4x H/14); pass --allow-large (max_bytes=None) to read "
                              "it anyway")


def no_duplicate_keys(where: str):
    """An ``object_pairs_hook`` for json and msgpack that refuses a key given twice in one map."""
    def hook(pairs):
        counts = Counter(k for k, _ in pairs)
        dup = next((k for k, c in counts.items() if c > 1), None)
        if dup is not None:
            raise CheckpointError(f"{where}: key {dup!r} appears {counts[dup]} times in one map; "
                                  "refusing an ambiguous file")
        return dict(pairs)
    return hook


@contextlib.contextmanager
def reading(path: Path, what: str):
    """Turn a third-party reader's failure on damaged input into one CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except MemoryError:
        raise CheckpointError(f"{path}: out of memory reading it as {what}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as {what} ({why(e)})") from None
