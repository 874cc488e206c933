"""The one convention every command follows (mixer-convert, -parity, -predict, -eval, -train, -demo).

* Errors: ``prog: error: <one line>`` on stderr, exit status 2 -- usage errors, bad input, a
  missing extra (``needs the 'torch' extra: pip install ...``) and out-of-memory alike; SIGINT and
  SIGTERM: ``prog: error: interrupted by SIGINT``, exit 128 + the signal; a bug: one line that says
  it is one (``MIXER_TRACEBACK=1`` shows the traceback). Warnings: ``prog: warning: <one line>``.
* One spelling per shared flag: ``--json [PATH]`` (alone: one JSON document on stdout instead of
  the text; with PATH: the text as usual and the JSON written to PATH), ``--quiet`` (no progress
  bars), ``--image-size H W``, ``--device auto|cpu|gpu``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

from mixer_convert.atomic import Interrupted, atomic_path, interruptible
from mixer_convert.errors import MissingExtraError, one_line
from mixer_convert.extras import extra_for_module

DEVICES = ("auto", "cpu", "gpu")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (and exit status 2, as argparse's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="one JSON document on stdout instead of the text; with PATH, the text as usual and the "
                        "JSON written to PATH")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_image_size(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--image-size", type=positive_int, nargs=2, metavar=("H", "W"), help=help)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: the accelerator where one is visible; cpu; gpu (CUDA)")


def emit(out: dict, json_to: str | None, text: Callable[[dict], str]) -> None:
    """A command's result: the text, or (``--json``) one JSON document on stdout, or (``--json
    PATH``) the text and the JSON written atomically to PATH."""
    if json_to == "-":
        print(json.dumps(out, indent=1))
        return
    print(text(out))
    if json_to is not None:
        write_json(json_to, out)


def write_json(path: str | os.PathLike, doc: dict) -> None:
    """One JSON document at ``path``, written atomically."""
    with atomic_path(Path(path), force=True) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")


def fail(prog: str, message: str, code: int = 2) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def command(prog: str, interrupted: str = "") -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Wrap a command's ``main(argv) -> exit status`` in the convention above. ``interrupted`` is
    added to the interruption line (e.g. '; nothing was written')."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            old_show = warnings.showwarning
            warnings.showwarning = lambda message, *a, **k: print(
                f"{prog}: warning: {one_line(Warning(str(message)))}", file=sys.stderr)
            try:
                with interruptible():
                    return main(*args, **kwargs)
            except Interrupted as e:
                return fail(prog, f"interrupted by {e}{interrupted}", 128 + e.signum)
            except BaseException as e:  # noqa: B902 (each kind is sorted below)
                return _report(prog, e)
            finally:
                warnings.showwarning = old_show
        return run
    return wrap


def _report(prog: str, e: BaseException) -> int:
    if isinstance(e, SystemExit):  # argparse (usage errors, --help): its code, as a return value
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C inside training's own handler
        return fail(prog, "interrupted", 130)
    if isinstance(e, ModuleNotFoundError) and not isinstance(e, MissingExtraError):
        extra = extra_for_module(e.name or "")
        if extra is None:
            raise e  # a broken install, not a missing extra
        e = MissingExtraError([extra], e.name)
    if isinstance(e, (MissingExtraError, ValueError, OSError)):  # CheckpointError, ParamMismatchError are ValueErrors
        return fail(prog, one_line(e))
    if isinstance(e, MemoryError):
        return fail(prog, "out of memory")
    if os.environ.get("MIXER_TRACEBACK"):
        traceback.print_exception(e)
    return fail(prog, f"internal error ({type(e).__name__}: {one_line(e)}); please report this "
                      "(MIXER_TRACEBACK=1 shows the traceback)")
