"""orbax checkpoints (a folder): a PyTree saved by ``orbax.checkpoint``; needs orbax (and jax).

The tree's metadata is read and every declared shape checked before anything is restored; then
the whole tree is restored once, straight to host numpy, and handed out one array at a time,
each checked against what the metadata declared. orbax and tensorstore report through logging,
warnings and unraisable-exception hooks around clean failures; a converter says one line, so
that noise is silenced while orbax works.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mixer_convert.atomic import check_interrupted
from mixer_convert.errors import CheckpointError, WriteError, needs, why
from mixer_convert.source import Entry, MAX_METADATA_BYTES, Source, no_duplicate_keys, reading, tree_entries
from mixer_convert.trees import nest


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
    logging.getLogger("asyncio").addFilter(_abandoned_orbax_tasks)


def _abandoned_orbax_tasks(record: logging.LogRecord) -> bool:
    """After a failed save, orbax returns on the first error and leaves its other write tasks'
    failures (the same full disk) unretrieved; asyncio logs each when the task is collected,
    whenever that is. Those of orbax's tasks are dropped (the clean error said it); any other
    asyncio record passes."""
    message = record.getMessage()
    return not (message.startswith(("Task exception was never retrieved", "Future exception was never retrieved"))
                and "orbax" in message)


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
            with reading(self.path, "an orbax checkpoint"), _quiet_orbax():
                meta = ckptr.metadata(self.path.absolute()).item_metadata
                meta = getattr(meta, "tree", meta)
                # Straight to host numpy: a converter has no use for device arrays or shardings.
                as_numpy = tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
                tree = ckptr.restore(self.path.absolute(), args=ocp.args.PyTreeRestore(restore_args=as_numpy))
            arrays = {k: v for k, v in tree_entries(str(self.path), tree).items() if v is not None}
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


def read(src: Source) -> tuple[dict[str, Entry], Callable[[], None]]:
    ocp = needs("orbax.checkpoint", "train", "reading an orbax checkpoint")
    _drop_closed_loop_noise()
    src.check_tree()
    path = src.path
    _check_metadata_json(src)
    with src.reading("an orbax checkpoint"), _quiet_orbax():
        meta = ocp.PyTreeCheckpointer().metadata(path.absolute()).item_metadata
        meta = getattr(meta, "tree", meta)
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{path}: orbax checkpoint does not hold a parameter tree")
    declared = {}
    for k, m in tree_entries(str(path), meta).items():
        if m is None:  # an empty optimizer state: nothing stored
            continue
        shape, dtype = getattr(m, "shape", None), getattr(m, "dtype", None)
        if shape is None or dtype is None:
            raise CheckpointError(f"{path}: entry {k!r} is not an array ({type(m).__name__})")
        with src.reading("an orbax checkpoint"):
            dtype = np.dtype(dtype)
        declared[k] = (src.declare(k, shape, dtype), dtype, None)
    tree = _OrbaxTree(path, declared)
    return {k: (s, d, (lambda k=k: tree.get(k))) for k, (s, d, _) in declared.items()}, tree.close


def _check_metadata_json(src: Source) -> None:
    """The tree's JSON: a key given twice would be read as the last one."""
    meta = src.path / "_METADATA"
    if meta.is_file():
        with src.reading("an orbax checkpoint"):
            if meta.stat().st_size > MAX_METADATA_BYTES:
                raise CheckpointError(f"{src.path}: _METADATA is too large for a Mixer checkpoint")
            json.loads(meta.read_text(), object_pairs_hook=no_duplicate_keys(str(meta)))


def write(path: Path, items: Iterator[tuple[str, np.ndarray]], specs: list) -> None:
    ocp = needs("orbax.checkpoint", "train", "writing an orbax checkpoint")
    _drop_closed_loop_noise()
    tree = nest({k: np.asarray(v) for k, v in items})
    check_interrupted()
    before = set(threading.enumerate())
    try:
        with _quiet_orbax():
            ocp.PyTreeCheckpointer().save(path.absolute(), tree)
    except BaseException as e:
        # orbax returns on the first failed write (or an interrupt) while its writer threads and
        # tensorstore finish the others, which would recreate files under the temporary after it
        # is removed: stop them and let what they started land first.
        _cancel_writers(before)
        _wait_until_quiet(path.parent)
        if not isinstance(e, Exception):
            _drop_unawaited_coroutines(e)
            raise
        if isinstance(e, (CheckpointError, OSError)):
            raise
        raise WriteError(f"orbax failed ({why(e)}); disk full or not writable?") from None


def _cancel_writers(before: set[threading.Thread], limit: float = 60.0) -> None:
    """orbax writes in threads of its own (``_SignalingThread``, e.g. ``np_type_handler``) that
    outlive a save cut short in the main thread. One whose write then fails (its folder removed
    meanwhile) logs the error with two tracebacks after our one line. Cancelled, it fails silently;
    joined (at most ``limit`` seconds in all), it writes nothing once the temporary is removed."""
    writers = [t for t in threading.enumerate() if t not in before and callable(getattr(t, "cancel", None))]
    for t in writers:
        t.cancel()
    deadline = time.monotonic() + limit
    for t in writers:
        # Thread's own join: orbax's override logs from the main thread and re-raises the cancel.
        threading.Thread.join(t, max(0.0, deadline - time.monotonic()))


def _drop_unawaited_coroutines(e: BaseException) -> None:
    """An interrupt inside orbax's ``run_sync`` can land after a coroutine was made and before it
    was awaited; it warns "coroutine ... was never awaited" when collected, after the one-line
    error (seen in CI). The traceback's frames hold it: free them and collect it now, quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        traceback.clear_frames(e.__traceback__)
        gc.collect()


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
