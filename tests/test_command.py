"""mixer_convert.command: the one convention of the six commands -- every error one line on
stderr with exit 2 (usage, bad input, a missing extra), signals 128 + n, a bug said to be one (its
traceback with MIXER_TRACEBACK=1), warnings one line, ``--json`` alone JSON only, ``--json PATH``
the text and the JSON written atomically."""
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import subprocess_env
from mixer_convert.errors import CheckpointError, MissingExtraError
from mixer_convert.command import Parser, add_device, add_image_size, add_json, add_quiet, command, emit

PROG = "mixer-test"


def _parser() -> Parser:
    p = Parser(prog=PROG)
    p.add_argument("n", type=int)
    add_json(p)
    add_quiet(p)
    add_image_size(p, "H W")
    add_device(p)
    return p


@command(PROG, interrupted="; nothing was written")
def toy(argv, action=None):
    """Parses argv, runs ``action`` (to raise), prints a result as text or JSON."""
    args = _parser().parse_args(argv)
    if action is not None:
        action()
    emit({"n": args.n, "size": args.image_size, "device": args.device, "quiet": args.quiet}, args.json,
         lambda out: f"n is {out['n']}")
    return 0


def _one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and out == "", (out, err)
    return lines[0]


# ---- usage ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, match", [
    (["x"], "argument n: invalid int value: 'x'"),
    ([], "the following arguments are required: n"),
    (["1", "--image-size", "0", "4"], "argument --image-size: expected a positive integer, got 0"),
    (["1", "--image-size", "4"], "argument --image-size: expected 2 arguments"),
    (["1", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["1", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_a_usage_error_is_one_line_with_exit_2(capsys, argv, match):
    assert toy(argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"{PROG}: error: ") and match in line and line.endswith(f"(see {PROG} --help)")


def test_help_exits_0():
    assert toy(["--help"]) == 0


def test_the_shared_flags_parse_as_documented(capsys):
    assert toy(["3", "--image-size", "32", "48", "--device", "cpu", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 3, "size": [32, 48], "device": "cpu", "quiet": True}


# ---- --json ----------------------------------------------------------------------------------------------------


def test_json_alone_prints_one_json_document_and_nothing_else(capsys):
    assert toy(["7", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"n": 7, "size": None, "device": "auto", "quiet": False} and err == ""


def test_json_path_prints_the_text_and_writes_the_json_atomically(capsys, tmp_path):
    dst = tmp_path / "new" / "out.json"
    assert toy(["7", "--json", str(dst)]) == 0
    assert capsys.readouterr().out == "n is 7\n"
    assert json.loads(dst.read_text())["n"] == 7 and os.listdir(dst.parent) == ["out.json"]
    assert toy(["8", "--json", str(dst)]) == 0  # replaced whole
    assert json.loads(dst.read_text())["n"] == 8 and os.listdir(dst.parent) == ["out.json"]


def test_a_json_document_that_cannot_be_written_leaves_the_old_file(capsys, tmp_path):
    dst = tmp_path / "out.json"
    dst.write_text("old")
    with pytest.raises(TypeError):
        emit({"not json": object()}, str(dst), lambda out: "text")
    assert dst.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


# ---- errors ------------------------------------------------------------------------------------------------------


def _raise(e: BaseException):
    def action():
        raise e
    return action


@pytest.mark.parametrize("error, want", [
    (CheckpointError("w.npz: truncated"), "w.npz: truncated"),
    (ValueError("first\n  second"), "first second"),
    (FileNotFoundError("no such checkpoint: 'x'"), "no such checkpoint: 'x'"),
    (MissingExtraError(["torch"], "torch"), "needs the 'torch' extra (no module 'torch'): pip install "
                                            "\"mixer-toolkit[torch]\""),
    (ModuleNotFoundError("No module named 'torch'", name="torch"),
     "needs the 'torch' extra (no module 'torch'): pip install \"mixer-toolkit[torch]\""),
    (ModuleNotFoundError("No module named 'optax.contrib'", name="optax.contrib"),
     "needs the 'train' extra (no module 'optax.contrib'): pip install \"mixer-toolkit[train]\""),
    (MemoryError(), "out of memory"),
])
def test_bad_input_and_a_missing_extra_are_one_line_with_exit_2(capsys, error, want):
    assert toy(["1"], action=_raise(error)) == 2
    assert _one_error_line(capsys) == f"{PROG}: error: {want}"


def test_a_missing_module_that_no_extra_provides_is_a_broken_install_not_hidden():
    with pytest.raises(ModuleNotFoundError, match="no_such_module_xyz"):
        toy(["1"], action=_raise(ModuleNotFoundError("No module named 'no_such_module_xyz'",
                                                     name="no_such_module_xyz")))


def test_an_unexpected_exception_is_an_internal_error_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("MIXER_TRACEBACK", raising=False)
    assert toy(["1"], action=_raise(KeyError("k"))) == 2
    assert _one_error_line(capsys) == (f"{PROG}: error: internal error (KeyError: 'k'); please report this "
                                       "(MIXER_TRACEBACK=1 shows the traceback)")


def test_mixer_traceback_shows_the_traceback_of_an_internal_error(capsys, monkeypatch):
    monkeypatch.setenv("MIXER_TRACEBACK", "1")
    assert toy(["1"], action=_raise(KeyError("k"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in action" in err and "KeyError: 'k'" in err
    assert err.splitlines()[-1].startswith(f"{PROG}: error: internal error (KeyError: 'k')")


def test_keyboard_interrupt_exits_130(capsys):
    assert toy(["1"], action=_raise(KeyboardInterrupt())) == 130
    assert _one_error_line(capsys) == f"{PROG}: error: interrupted"


def test_a_warning_is_one_line_and_the_warning_printer_is_restored(capsys):
    import warnings

    before = warnings.showwarning

    def warn():
        warnings.warn("first line\nsecond line")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert toy(["1"], action=warn) == 0
    out, err = capsys.readouterr()
    assert err == f"{PROG}: warning: first line second line\n" and out == "n is 1\n"
    assert warnings.showwarning is before


# ---- signals: in a process of its own ---------------------------------------------------------------------------

_SIGNALLED = """
import os, signal, sys, time
from mixer_convert.command import command

@command("mixer-test", interrupted="; nothing was written")
def main(argv):
    os.kill(os.getpid(), getattr(signal, argv[0]))
    time.sleep(30)  # the signal arrives here
    print("not interrupted")
    return 0

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_a_command_exits_128_plus_its_number_in_one_line(sig):
    name = signal.Signals(sig).name
    r = subprocess.run([sys.executable, "-c", _SIGNALLED, name], capture_output=True, text=True, timeout=300,
                       env=subprocess_env())
    assert r.returncode == 128 + sig, r.stderr
    assert r.stderr == f"mixer-test: error: interrupted by {name}; nothing was written\n" and r.stdout == ""
