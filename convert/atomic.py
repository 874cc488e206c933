"""Atomic output: a file or folder appears at its destination complete or not at all.

Everything is written to a temporary folder beside the destination (``.<name>.<pid>.<random>.tmp``)
and renamed into place only when the writer succeeded; on any failure, an interrupt included,
the temporary and the folders made for it are removed. Temporaries that a killed run (SIGKILL)
left behind are recognised by their dead pid and removed by the next run; a live run's are not.

SIGINT/SIGTERM (:func:`interruptible`) become :class:`Interrupted`, which unwinds like
KeyboardInterrupt. The signal is also remembered: a library may swallow the exception (Python
ignores exceptions raised in a finaliser or a garbage-collector callback, which is where a
signal can land while XLA or orbax work), so writers call :func:`check_interrupted` between
pieces of work and :func:`atomic_path` calls it before the rename. An interrupted output is
therefore never committed, whether or not the exception reached us. A signal that arrives while a
module is being imported is held back (raising there can crash an extension module's
initialisation) and delivered again as soon as the import is over, to whichever handler is then in
place (training's own, if it took over meanwhile).
"""
from __future__ import annotations

import _thread
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from mixer_convert.errors import CheckpointError


# ---- signals ----------------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGINT/SIGTERM: unwinds like KeyboardInterrupt, so every ``finally`` removes its temporaries."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


_received: list[int] = []  # the first signal of the current interruptible() block
_deferred: list[int] = []  # that signal, while it waits for an import to finish
_sent = threading.Event()  # the held-back signal was sent again; its handler has not run yet
_watchers: list[threading.Thread] = []  # the _redeliver thread of the current block, if any


def _importing(frame) -> bool:
    """Whether ``frame`` runs inside an import. An exception raised there can unwind through a C
    extension's initialisation (JAX's, tensorstore's), which then crashes the process (seen:
    SIGSEGV, or nanobind's std::terminate) instead of unwinding; the signal waits, remembered,
    to be delivered again once the import is over (:func:`_redeliver`)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _send(thread_id: int, signum: int) -> None:
    """``signum`` to one thread, as the kernel would deliver it: it wakes a blocking call and goes
    to whatever handler is installed then (the default action included)."""
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(thread_id, signum)
    else:  # Windows: calls the Python handler only
        _thread.interrupt_main(signum)


def _redeliver(signum: int, ours) -> None:
    """In a thread of its own: wait until the main thread has left every import, then send it the
    held-back signal again. Held back and never delivered, a Ctrl-C during the imports at a
    command's start would be seen only when the command had finished its work. If the handler is
    no longer ``ours`` (training installed its own stop request meanwhile), the signal is that
    handler's to act on, once, and not this block's to raise again at its end."""
    main = threading.main_thread().ident
    while _deferred:  # until the handler raises it, a check takes it, or the block ends
        frame = sys._current_frames().get(main)
        if frame is None:  # the main thread is gone
            return
        importing = _importing(frame)
        del frame
        if not importing and signal.getsignal(signum) is not ours:
            sent = _sent.is_set()  # and our handler never ran (it clears the flag): theirs got it
            _deferred.clear()
            _received.clear()
            if not sent:
                _send(main, signum)
            return
        if not importing and not _sent.is_set():  # sent once; again only if it landed in a new import
            _sent.set()
            _send(main, signum)
        time.sleep(0.005)


def check_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal arrived inside :func:`interruptible`, even one whose
    exception a library swallowed. A signal held back during an import is raised here, then, and
    not sent again (sent again, it would cut the clean-up short: a temporary left behind)."""
    first = _received[:1]  # one read: the waiting thread may clear the list meanwhile
    if first:
        _deferred.clear()
        raise Interrupted(first[0])


@contextlib.contextmanager
def interruptible():
    """Turn SIGINT/SIGTERM into :class:`Interrupted` for the duration. A second signal is ignored
    (the clean-up runs to its end) but never resets the first. Where Python cannot raise the
    exception (a finaliser or a gc callback, e.g. XLA's), it would print "Exception ignored in
    ..." and carry on: that report is dropped, the signal is remembered, and the next
    :func:`check_interrupted` (between tensors, before the commit) raises it. Not reentrant: the
    state of a held-back signal is the module's."""
    closing: list[bool] = []

    def handler(signum, frame):
        held = bool(_deferred)
        _sent.clear()
        first = _received[:1]
        if closing:  # the block is ending: remembered, raised once the previous handlers are back
            if not first:
                _received.append(signum)
            return
        if first and not held:  # a second signal
            return
        if not first:
            _received.append(signum)
            first = [signum]
        if _importing(frame):  # held back until the import is over (again, if another began)
            if not held:
                _deferred.append(signum)
                _watchers.append(threading.Thread(target=_redeliver, args=(signum, handler), daemon=True,
                                                  name="mixer-signal-after-import"))
                _watchers[-1].start()
            return
        _deferred.clear()
        raise Interrupted(first[0])

    def unraisable(info) -> None:
        if not isinstance(info.exc_value, Interrupted):
            previous_hook(info)

    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    _received.clear()
    _sent.clear()  # an earlier block's, sent as it ended
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
        check_interrupted()  # a signal whose exception was swallowed still counts
    finally:
        # From here a signal is only remembered: raised, it would cut the restoring short (signal.signal
        # runs pending handlers first) and leave this block's handler installed.
        closing.append(True)
        _deferred.clear()  # a held-back signal is not sent after the block, to a handler not ours
        while _watchers:
            _watchers.pop().join()
        for s, h in previous.items():
            signal.signal(s, h)
        if sys.unraisablehook is unraisable:  # not if a library chained its own hook on top meanwhile
            sys.unraisablehook = previous_hook
        late = _received[:1]
        _received.clear()
    if late:  # arrived while the block, done, was restoring: it still counts
        raise Interrupted(late[0])


# ---- destinations and temporaries --------------------------------------------------------------


def check_destination(dst: Path, force: bool, is_dir: bool = False) -> None:
    """An existing output is kept unless the caller said to overwrite it; a directory is never
    replaced by a file."""
    if os.path.lexists(dst) and not force:
        raise FileExistsError(f"{dst} exists; pass --force (force=True) to overwrite it")
    if not is_dir and dst.is_dir() and not dst.is_symlink():
        raise CheckpointError(f"{dst} is a directory; refusing to replace a directory with a file")


_TMP_SUFFIX = ".tmp"


def _temp_prefix(dst: Path) -> str:
    return f".{dst.name}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(dst: Path) -> list[Path]:
    """Temporaries of ``dst`` left by a killed run are removed: ``.<name>.<pid>.<random>.tmp``
    folders whose process is gone (and the pid-less ``.<name>.<random>.tmp`` of earlier versions),
    each holding nothing but a partial ``<name>``. A live run's temporaries are left alone."""
    ours = re.compile(re.escape(_temp_prefix(dst)) + r"(?:(\d+)\.)?[a-z0-9_]{8}" + re.escape(_TMP_SUFFIX))
    removed = []
    try:
        names = os.listdir(dst.parent)
    except OSError:
        return removed
    for name in names:
        m = ours.fullmatch(name)
        if m is None or (m.group(1) and _pid_alive(int(m.group(1)))):
            continue
        folder = dst.parent / name
        try:  # what atomic_path makes: a real folder holding the partial output (orbax: its own temp)
            if folder.is_symlink() or not folder.is_dir() or not all(
                    n == "replaced" or n.startswith(dst.name) for n in os.listdir(folder)):
                continue
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (innermost last) so a failure can remove them."""
    missing = []
    p = folder
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    made = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # made by someone else meanwhile: not ours to remove
            continue
        made.append(d)
    return made


@contextlib.contextmanager
def writing(dst: Path, is_dir: bool = False):
    """Yield a temporary path beside ``dst`` (checked already, by :func:`check_destination`);
    rename it over ``dst`` only if the body succeeds and no signal arrived meanwhile.

    On any failure (an interrupt included) the temporary, and the folders made for ``dst``, are
    removed. Stale temporaries of ``dst`` from killed runs are removed first.
    """
    dst = Path(dst)
    created: list[Path] = []
    try:
        created = _make_parents(dst.parent)
        remove_stale_temps(dst)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(dst)}{os.getpid()}.", suffix=_TMP_SUFFIX,
                                    dir=dst.parent))
        try:
            target = tmp / dst.name
            yield target
            check_interrupted()  # never commit an output whose writing a signal cut short
            _commit(target, dst, tmp / "replaced", is_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty: never anything but what we made
        raise


@contextlib.contextmanager
def atomic_path(dst: Path, force: bool, is_dir: bool = False):
    """:func:`check_destination` then :func:`writing`: for small outputs written in one go."""
    check_destination(Path(dst), force, is_dir)
    with writing(dst, is_dir) as tmp:
        yield tmp


def _commit(target: Path, dst: Path, aside: Path, is_dir: bool) -> None:
    if is_dir and os.path.lexists(dst):
        os.replace(dst, aside)  # nothing can be renamed over a directory: move the old one aside first
        try:
            os.replace(target, dst)
        except BaseException:
            os.replace(aside, dst)  # put the old one back
            raise
    else:
        os.replace(target, dst)
