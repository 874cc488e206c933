"""Writing a checkpoint: the destination's format and naming, one check of the destination, then
the format's writer inside an atomic output (:mod:`mixer_convert.atomic`).

An :class:`Output` is planned first (format, naming, the destination checked: an existing file
is kept unless ``force``, a folder is never replaced by a file), so a command fails before it
downloads or reads anything; :meth:`Output.write` then streams canonical tensors through the
naming's per-tensor maps into the format's writer, one tensor at a time where the format allows.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Iterator, Mapping
from contextlib import closing
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from mixer_convert import formats
from mixer_convert.atomic import check_destination, check_interrupted, writing
from mixer_convert.errors import CheckpointError, WriteError, why
from mixer_convert.arrays import contiguous
from mixer_convert.layouts import LAYOUTS, Layout

Progress = Callable[[str, np.ndarray], None]  # called with each canonical tensor as it is written
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Output:
    path: Path
    fmt: str
    layout: str

    @classmethod
    def plan(cls, dst: str | os.PathLike, to: str | None = None, *, fmt: str | None = None,
             layout: str | None = None, force: bool = False) -> "Output":
        """The output for ``dst``: format and naming from ``to`` (a ``--to`` choice) or its suffix,
        or given as ``fmt``/``layout``; the destination is checked here, once."""
        if fmt is None:
            fmt, layout = formats.output_format(dst, to)
        formats.module(fmt)  # an unknown format fails here, before anything is written
        out = cls(Path(dst), fmt, formats.naming(fmt, layout))
        check_destination(out.path, force, out.is_dir)
        return out

    @property
    def is_dir(self) -> bool:
        return self.fmt in formats.FOLDER_FORMATS

    def refuse_source(self, src: Path) -> None:
        """The source is never modified: the output may not be it (by any path), lie inside a
        source folder (orbax), or be a folder holding it (replacing it would delete the source)."""
        dst = self.path
        try:
            s, d = src.resolve(), dst.resolve()
            same = d == s or (os.path.lexists(dst) and src.exists() and os.path.samefile(src, dst))
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop on Python < 3.13
            raise CheckpointError(f"cannot resolve {src} or {dst} ({e})") from None
        if same:
            raise ValueError("source and destination are the same file; the source is never modified")
        if s in d.parents:
            raise ValueError(f"destination {dst} lies inside the source {src}; the source is never modified")
        if d in s.parents:
            raise ValueError(f"destination {dst} contains the source {src}; replacing it would delete the source")

    def write(self, flat: Mapping[str, np.ndarray], progress: Progress | None = None,
              before_commit: Callable[[Path], None] | None = None, source: Path | None = None,
              format_options: Mapping | None = None) -> Path:
        """Canonical tensors (taken from ``flat`` one at a time, in its order) into the output.
        ``before_commit(tmp)`` runs on the finished temporary; if it raises, nothing is written.
        ``source``: the file the tensors come from, which the output may not touch;
        ``format_options``: for the format's writer (timm-hub: ``preprocess``). A failure of
        the destination (disk full, read-only, ...) is one CheckpointError naming it."""
        if source is not None:
            self.refuse_source(source)
        lay = LAYOUTS[self.layout]
        shapes = getattr(flat, "shapes", None) or {k: np.shape(flat[k]) for k in flat}
        dtypes = getattr(flat, "dtypes", None) or {k: np.asarray(flat[k]).dtype for k in flat}
        specs = [(lay.key_to(k), lay.shape_to(k, shapes[k]), np.dtype(dtypes[k])) for k in flat]

        try:
            with writing(self.path, self.is_dir) as tmp, closing(prefetched(mapped(flat, lay, progress))) as items:
                formats.write(self.fmt, tmp, items, specs, **(format_options or {}))
                if before_commit is not None:
                    before_commit(tmp)
        except WriteError as e:
            raise CheckpointError(f"cannot write {self.path}: {e}") from None
        except OSError as e:
            raise CheckpointError(f"cannot write {self.path} ({why(e)})") from None
        return self.path


def mapped(flat: Mapping[str, np.ndarray], lay: Layout, progress: Progress | None) -> Iterator[tuple[str, np.ndarray]]:
    """Each canonical tensor read, in ``lay``'s naming and layout, in C order, as the writers take it."""
    for k in flat:
        check_interrupted()
        v = flat[k]
        if progress:
            progress(k, v)
        yield lay.key_to(k), contiguous(lay.value_to(k, v))


def prefetched(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """``items`` produced up to ``depth`` ahead in a second thread. Reading a tensor (its CRC, the
    NaN check, a transpose) and writing the previous one (its CRC, the write) release the GIL, so
    the two overlap on two cores. The producer's error is raised here; closing stops it."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    worker = threading.Thread(target=_produce, args=(items, q, stop), daemon=True, name="mixer-prefetch")
    worker.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()


def _produce(items: Iterator, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in items:
            if not _put(q, ("item", item), stop):
                return
        _put(q, ("done", None), stop)
    except BaseException as e:  # noqa: B902 (handed to the consumer, which raises it)
        _put(q, ("error", e), stop)


def _put(q: queue.Queue, entry: tuple, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(entry, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def write_params(flat: Mapping[str, np.ndarray], dst: str | os.PathLike, fmt: str = "npz", layout: str | None = None,
                 force: bool = False, progress: Progress | None = None,
                 before_commit: Callable[[Path], None] | None = None) -> Path:
    """Canonical params -> a file at ``dst`` in ``fmt`` and naming ``layout``, atomically
    (:meth:`Output.plan` then :meth:`Output.write`)."""
    return Output.plan(dst, fmt=fmt, layout=layout, force=force).write(flat, progress, before_commit)
