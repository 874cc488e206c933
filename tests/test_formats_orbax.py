"""mixer_convert.formats.orbax: orbax checkpoint folders, read and written; an interrupt or a failure
inside orbax leaves one clean exception and no noise after it."""
import gc
import logging
import signal
import threading
import time
import warnings

import numpy as np
import pytest

from conftest import has_module
from helpers.checkpoints import TINY
from mixer_convert import random_params
from mixer_convert.atomic import Interrupted
from mixer_convert.errors import WriteError
from mixer_convert.load import read_params
from mixer_convert.save import write_params

pytestmark = pytest.mark.skipif(not has_module("orbax.checkpoint"), reason="needs orbax (the train extra)")


def test_written_then_read_is_exact_in_the_flax_naming(tmp_path):
    flat = random_params(TINY, 0)
    with read_params(write_params(flat, tmp_path / "w", fmt="orbax")) as params:
        assert (params.format, params.layout) == ("orbax", "flax")
        assert params.keys() == flat.keys() and all(np.array_equal(params[k], flat[k]) for k in flat)


class _InterruptedBeforeAwaiting:
    """orbax's run_sync when SIGINT lands between making a coroutine and awaiting it (seen in CI)."""

    def save(self, path, tree):
        async def create_temporary_path():
            pass
        pending = create_temporary_path()  # noqa: F841 (held by this frame, as orbax's is)
        raise Interrupted(signal.SIGINT)


class _Broken:
    def save(self, path, tree):
        raise ValueError("tensorstore said no")


class _InterruptedWhileAWriterRuns:
    """orbax's save when SIGINT lands while one of its writer threads (a real ``CommitFuture``, as
    its numpy handler starts) still works; that write then fails, its folder gone (seen in CI).
    The write runs until the writer is cancelled and only then fails: the interrupt lands while it
    runs, however slowly either thread is scheduled (a fixed 0.3 s write could end first)."""

    writer = None

    def save(self, path, tree):
        import asyncio

        from orbax.checkpoint._src.futures import future

        running, stopped = threading.Event(), threading.Event()

        async def write_into_a_removed_folder():
            running.set()
            deadline = time.monotonic() + 120  # a hang guard only: the writer is cancelled
            while not stopped.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            raise ValueError("NOT_FOUND: Error writing in OCDBT database")
        writer = future.CommitFuture(write_into_a_removed_folder(), name="np_type_handler")
        thread, cancel = writer._t, writer._t.cancel

        def cancel_then_fail():
            cancel()
            stopped.set()
        thread.cancel = cancel_then_fail
        type(self).writer = writer
        assert running.wait(120), "the writer thread never started"
        raise Interrupted(signal.SIGINT)


def _write_with(monkeypatch, tmp_path, checkpointer):
    import orbax.checkpoint as ocp
    from mixer_convert.formats import orbax

    monkeypatch.setattr(ocp, "PyTreeCheckpointer", checkpointer)
    orbax.write(tmp_path / "out", iter(random_params(TINY, 0).items()), [])


def test_an_interrupt_inside_orbax_warns_of_no_unawaited_coroutine_afterwards(monkeypatch, tmp_path):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(Interrupted) as caught:
            _write_with(monkeypatch, tmp_path, _InterruptedBeforeAwaiting)
        del caught  # the converter drops the exception after its one error line
        gc.collect()
    assert not [w for w in seen if "never awaited" in str(w.message)]


def test_a_failure_inside_orbax_is_one_write_error(monkeypatch, tmp_path):
    with pytest.raises(WriteError, match="orbax failed .*tensorstore said no"):
        _write_with(monkeypatch, tmp_path, _Broken)


def test_an_interrupt_stops_orbaxs_writer_threads_before_returning_and_they_log_nothing(monkeypatch, tmp_path,
                                                                                         caplog):
    with caplog.at_level(logging.INFO, logger="absl"), pytest.raises(Interrupted):
        _write_with(monkeypatch, tmp_path, _InterruptedWhileAWriterRuns)
    writer = _InterruptedWhileAWriterRuns.writer._t
    assert not writer.is_alive()  # joined: nothing writes under the temporary once it is removed
    time.sleep(0.1)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
