"""What a checkpoint source may be, and how much it may declare, checked before any data is read.

:meth:`Source.open` is the one check of a local source: only regular files (and folders of them,
such as an orbax checkpoint) are read; FIFOs, devices and sockets have no size and may never end,
links to nothing or in loops are refused. A format reader gets the :class:`Source`, never a bare
path, and declares every tensor to it (:meth:`Source.declare`): each shape is checked and the
running total is capped (:data:`MAX_BYTES`), so a few-MB file cannot make us allocate gigabytes.
A key given twice in a JSON or msgpack map is an error (a parser would keep the last one).
Third-party readers meeting damaged data raise many exception types; :meth:`Source.reading`
turns them into one :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mixer_convert.errors import CheckpointError, why
from mixer_convert.spec import config_for, num_params
from mixer_convert.trees import TreeError, flatten

# A tensor a reader declares, not yet read: (shape, dtype, load). Names and shapes are mapped and
# checked before any data is read.
Entry = tuple[tuple[int, ...], Any, Callable[[], np.ndarray]]

# No Mixer is larger than H/14 (with a 21k head) by much: four times its float32 size bounds what a
# checkpoint may declare (7.3 GB) unless the caller lifts it (max_bytes=None, --allow-large).
MAX_BYTES = 4 * 4 * num_params(config_for("H/14", num_classes=21843))
# Metadata that a reader holds whole (a state dict's pickle, orbax's _METADATA): ~200 bytes per
# tensor, H/14 ~100 KB; anything near this is not a Mixer checkpoint's.
MAX_METADATA_BYTES = 16 * 2**20
MAX_NDIM = 8
MAX_FILES = 100_000  # entries in an orbax folder


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
    """Every entry below a checkpoint folder a readable regular file or folder (at most
    :data:`MAX_FILES`), no link to a folder."""
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


def pread_into(fd: int, buf: memoryview, offset: int, exact: bool = True) -> int:
    """Fill ``buf`` from ``fd`` at ``offset`` (positional reads, the file offset untouched);
    returns how many bytes there were, or raises if ``exact`` and the file ended first."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            if exact:
                raise CheckpointError(f"file ended {len(buf) - done} bytes early (truncated?)")
            break
        done += n
    return done


def _refs(items: list, i: int) -> int:
    return sys.getrefcount(items[i])


# What _refs says of an object only a list refers to, measured the same way: an interpreter's own
# temporary references (which differ between Python versions) cancel out; any other holder (an array
# made from the buffer, a view of it, a memoryview) makes the count larger.
_HELD_BY_THE_LIST_ONLY = _refs([object()], 0)


class Buffers:
    """Buffers for reading tensors, each handed out again once nothing refers to it (its reference
    count says so). A fresh multi-MB buffer per tensor costs the kernel a zeroed page per 4 KiB on
    the first write into it (measured: ~15% of an L/16 conversion's time); a checkpoint's tensors come
    in a few sizes, so a handful of buffers serve them all. Kept by one open source, freed with it."""

    KEEP = 4  # buffers kept: the converter has at most ~4 tensors in flight (read, transform, queue, write)
    MIN_BYTES = 1 << 20  # smaller ones cost little to allocate

    def __init__(self) -> None:
        self._kept: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, size: int) -> memoryview:
        """``size`` writable bytes, contents undefined."""
        if size < self.MIN_BYTES:
            return memoryview(np.empty(size, np.uint8))  # not bytearray: that would zero it first
        with self._lock:
            for i in range(len(self._kept)):
                if size <= self._kept[i].size <= 2 * size and self._free(i):
                    return memoryview(self._kept[i])[:size]
            free = [i for i in range(len(self._kept)) if self._free(i)]
            if len(self._kept) >= self.KEEP and free:
                del self._kept[free[0]]
            a = np.empty(size, np.uint8)
            if len(self._kept) < self.KEEP:
                self._kept.append(a)
            return memoryview(a)

    def _free(self, i: int) -> bool:
        return _refs(self._kept, i) == _HELD_BY_THE_LIST_ONLY

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()


class Source:
    """A local checkpoint that passed :func:`check_source`, with the budget of what it may declare
    (``max_bytes``; None: no limit). A folder's reader checks its tree (:meth:`check_tree`)."""

    def __init__(self, path: Path, st: os.stat_result, max_bytes: int | None) -> None:
        self.path, self.stat, self.max_bytes = path, st, max_bytes
        self.declared = 0
        self.buffers = Buffers()
        self._file = None

    @classmethod
    def open(cls, path: str | os.PathLike, max_bytes: int | None = MAX_BYTES) -> "Source":
        path = Path(path)
        return cls(path, check_source(path), max_bytes)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.stat.st_mode)

    @property
    def where(self) -> str:
        return str(self.path)

    def check_tree(self) -> None:
        """A folder's readers call this once they know it is theirs (see :func:`check_tree`)."""
        check_tree(self.path)

    def declare(self, key: str, shape: Any, dtype: Any) -> tuple[int, ...]:
        """A tensor the file declares: its shape checked and its bytes counted against the budget."""
        shape = check_shape(self.where, key, shape)
        self.declared += nbytes(shape, np.dtype(dtype) if dtype is not None else np.dtype("u1"))
        check_size(self.where, self.declared, self.max_bytes)
        return shape

    def cap(self, size: int, what: str) -> None:
        """A whole file or member the reader must hold (``what``: 'is a msgpack file of')."""
        check_size(self.where, size, self.max_bytes, what)

    def read_at(self, offset: int, size: int) -> memoryview:
        """``size`` bytes at ``offset``, read into a buffer of its own (:class:`Buffers`); the file
        ending first is an error."""
        buf = self.buffers.get(size)
        if self._file is None:  # opened on the first read, kept for the rest (closed by close())
            self._file = open(self.path, "rb", buffering=0)
        try:
            pread_into(self._file.fileno(), buf, offset)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        return buf

    def close(self) -> None:
        """Close the file :meth:`read_at` opened and drop the read buffers kept for reuse."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.buffers.clear()

    def reading(self, what: str):
        """Turn a third-party reader's failure on damaged input into one CheckpointError."""
        return reading(self.path, what)


def tree_entries(where: str, tree: Any) -> dict[str, Any]:
    """A decoded tree (msgpack, orbax) as '/'-joined names -> leaves; two paths giving one name
    (a key holding '/') or absurd nesting are refused as CheckpointErrors naming ``where``."""
    try:
        return flatten(tree, "/", sequences=True)
    except TreeError as e:
        raise CheckpointError(f"{where}: {e}; not a parameter tree") from None


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
