"""The core's error type and its one-line rendering, shared by every reader, writer and command."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be read, written or used: corrupt, truncated, hostile, the wrong kind,
    or (training) no intact one to resume from. The message is one line naming the file."""


def why(e: BaseException) -> str:
    """An exception as one short line for an error message (``OSError``: its strerror)."""
    text = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def one_line(e: BaseException) -> str:
    """A multi-line message (a ParamMismatchError lists keys) joined into one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] + (" " + "; ".join(lines[1:]) if lines[1:] else "") if lines else type(e).__name__
