"""Atomic output: a destination appears complete or not at all, whatever interrupts the writing --
an exception, SIGINT/SIGTERM, or a signal that lands where Python cannot raise it (a finaliser or
a garbage-collector callback, as XLA's is during a Flax conversion)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import has_module, subprocess_env
from mixer_convert.atomic import Interrupted, atomic_path, check_destination, check_interrupted, interruptible, writing
from mixer_convert.errors import CheckpointError


def test_a_failed_body_leaves_nothing_and_removes_the_folders_it_made(tmp_path):
    dst = tmp_path / "a" / "b" / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(dst, force=False) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("writer failed")
    assert os.listdir(tmp_path) == []


def test_an_existing_output_is_kept_without_force_and_a_folder_never_replaced_by_a_file(tmp_path):
    (tmp_path / "out.bin").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="pass --force"):
        check_destination(tmp_path / "out.bin", force=False)
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        check_destination(tmp_path / "dir", force=True)
    with atomic_path(tmp_path / "out.bin", force=True) as tmp:
        tmp.write_bytes(b"new")
    assert (tmp_path / "out.bin").read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["dir", "out.bin"]


# A finaliser that receives a signal while it runs: Python cannot raise there. Run in a child so
# the signal goes to a process of its own.
_SWALLOWED = """
import gc, os, signal, sys, time
from pathlib import Path
from mixer_convert.atomic import Interrupted, interruptible, writing

class Ticking:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the handler runs here, inside the finaliser

dst = Path(sys.argv[1])
try:
    with interruptible():
        with writing(dst) as tmp:
            tmp.write_bytes(b"complete")
            Ticking()  # collected at once: __del__ runs, the Interrupted raised in it is swallowed
            print("still running after the signal", flush=True)
except Interrupted as e:
    print("interrupted", e.signum, flush=True)
"""


def test_a_signal_swallowed_inside_a_finaliser_still_stops_the_commit_silently(tmp_path):
    dst = tmp_path / "out.bin"
    r = subprocess.run([sys.executable, "-c", _SWALLOWED, str(dst)], capture_output=True, text=True, timeout=300,
                       env=subprocess_env())
    assert r.stdout.splitlines() == ["still running after the signal", f"interrupted {int(signal.SIGINT)}"], r
    assert "Exception ignored" not in r.stderr and r.stderr == "", r.stderr
    assert os.listdir(tmp_path) == []  # nothing committed, no temporary left


def test_interruptible_restores_the_handlers_and_forgets_the_signal(tmp_path):
    before = signal.getsignal(signal.SIGINT), sys.unraisablehook
    with interruptible():
        pass
    assert (signal.getsignal(signal.SIGINT), sys.unraisablehook) == before
    with writing(tmp_path / "ok.bin") as tmp:  # no stale signal from an earlier block
        tmp.write_bytes(b"x")
    assert (tmp_path / "ok.bin").read_bytes() == b"x"


# ---- a real conversion interrupted in its slow part, repeatedly --------------------------------------


@pytest.fixture(scope="module")
def l16_npz(tmp_path_factory) -> Path:
    """Random L/16 weights (833 MB): the size at which a signal once went missing under load."""
    from mixer_convert import config_for, param_shapes
    from mixer_convert.save import write_params

    rng = np.random.default_rng(0)
    flat = {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in param_shapes(config_for("L/16")).items()}
    return write_params(flat, tmp_path_factory.mktemp("l16") / "L16.npz")


@pytest.mark.slow
@pytest.mark.skipif(not has_module("orbax.checkpoint"), reason="needs the jax and train extras")
@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
@pytest.mark.parametrize("delay", [0.2, 1.0, 2.5])
def test_ctrl_c_during_an_l16_conversion_always_stops_it_with_nothing_written(l16_npz, tmp_path, fmt, delay):
    dst = tmp_path / ("out" if fmt == "orbax" else "out.msgpack")
    proc = subprocess.Popen([sys.executable, "-m", "mixer_convert.tools.cli", str(l16_npz), str(dst), "--to", fmt,
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(f".{dst.name}.") for p in tmp_path.iterdir()):  # writing has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, (proc.returncode, err)
    assert err.splitlines() == ["mixer-convert: error: interrupted by SIGINT; nothing was written"], err
    assert "Exception ignored" not in err and out == ""
    assert os.listdir(tmp_path) == []  # no output, no temporary


def test_a_dead_runs_temporary_is_removed_and_a_live_runs_is_kept(tmp_path):
    dead = tmp_path / ".out.bin.999999999.abcdefgh.tmp"  # no process has that pid
    live = tmp_path / f".out.bin.{os.getpid()}.ijklmnop.tmp"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "out.bin").write_bytes(b"partial")
    with writing(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"whole")
    assert not dead.exists() and (live / "out.bin").read_bytes() == b"partial"
    assert (tmp_path / "out.bin").read_bytes() == b"whole"


def test_a_signal_during_an_import_waits_for_the_import_then_stops_the_work_after_it(tmp_path, monkeypatch):
    """Raised inside an import, the exception would unwind through whatever extension module is
    initialising (JAX's, tensorstore's), which crashed the converter (SIGSEGV) in the stress runs."""
    (tmp_path / "slow_extension.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nfinished = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    imported, worked = [], []
    with pytest.raises(Interrupted):
        with interruptible():
            import slow_extension  # the signal lands in its body
            imported.append(slow_extension.finished)  # the import ran to its end
            for _ in range(500):  # long work that never checks: the signal is delivered anyway
                worked.append(1)
                time.sleep(0.01)
    assert imported == [True] and len(worked) < 100


def test_a_held_back_signal_raised_by_a_check_is_not_sent_again_into_the_clean_up(tmp_path, monkeypatch):
    """Seen in the stress run: the check raised it, then the thread waiting for the import to end sent
    it again, cutting the temporary's removal short (exit 130, one line, a temporary left behind)."""
    (tmp_path / "signal_then_check.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cleaned = []
    with pytest.raises(Interrupted):
        with interruptible():
            try:
                import signal_then_check  # noqa: F401
                check_interrupted()  # right after the import, before the signal is sent again
            finally:
                for _ in range(20):  # a clean-up that takes a while
                    time.sleep(0.01)
                cleaned.append(True)
    assert cleaned == [True]


def test_a_sigterm_during_an_import_stops_the_work_after_it_too(tmp_path, monkeypatch):
    (tmp_path / "term_in_import.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(Interrupted, match="SIGTERM"):
        with interruptible():
            import term_in_import  # noqa: F401
            time.sleep(5)  # a real signal wakes the sleep: no need to wait it out


def test_a_held_back_signal_sent_once_and_taken_by_another_handler_is_not_sent_twice(monkeypatch):
    """The waiting thread sent the signal while ours was installed, then the program installed its
    own (training's stop request) before ours ran: theirs got it; a second one would stop training
    at once instead of at the next step."""
    from mixer_convert import atomic

    sent = []
    monkeypatch.setattr(atomic, "_send", lambda thread, signum: sent.append(signum))
    monkeypatch.setattr(atomic.signal, "getsignal", lambda signum: "theirs")
    for already_sent, expected in ((True, []), (False, [signal.SIGINT])):
        atomic._deferred[:], atomic._received[:] = [signal.SIGINT], [signal.SIGINT]
        atomic._sent.set() if already_sent else atomic._sent.clear()
        atomic._redeliver(signal.SIGINT, "ours")  # returns at once: the main thread is not importing
        assert sent == expected and atomic._deferred == [] and atomic._received == []
        sent.clear()
    atomic._sent.clear()


def test_a_signal_held_back_during_an_import_goes_to_the_handler_that_took_over_after_it(tmp_path, monkeypatch):
    """Training installs its own stop request after its imports: a Ctrl-C during those imports is
    its to act on (save and stop), not a second interruption at the end."""
    (tmp_path / "takes_over.py").write_text(  # the signal, then (still importing) another handler
        "import os, signal\nseen = []\nos.kill(os.getpid(), signal.SIGINT)\n"
        "signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ours = signal.getsignal(signal.SIGINT)
    with interruptible():
        try:
            import takes_over
            for _ in range(500):
                if takes_over.seen:
                    break
                time.sleep(0.01)
        finally:
            signal.signal(signal.SIGINT, ours)
    assert takes_over.seen == [signal.SIGINT]  # and the block ended without raising
