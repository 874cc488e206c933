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


class MissingExtraError(ImportError):
    """An optional dependency is not installed: ``extras`` are all needed, or with ``any_of`` any
    one of them will do. The message names the extra and the pip command."""

    def __init__(self, extras: list[str], module: str | None = None, any_of: bool = False,
                 what: str | None = None) -> None:
        self.extras, self.module = extras, module
        why_ = f" (no module {module!r})" if module else ""
        for_ = f" for {what}" if what else ""
        if any_of:
            names = " or ".join(f"'{e}'" for e in extras)
            pips = " or ".join(f'"mixer-toolkit[{e}]"' for e in extras)
            msg = f"needs the {names} extra{for_}{why_}: pip install {pips}"
        else:
            names = " and ".join(f"'{e}'" for e in extras)
            msg = (f"needs the {names} extra{'s' if len(extras) > 1 else ''}{for_}{why_}: "
                   f'pip install "mixer-toolkit[{",".join(extras)}]"')
        super().__init__(msg)


def importable(module: str) -> bool:
    """Whether ``module`` can be found, without importing it (a finder that refuses it counts as absent)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def needs(module: str, extra: str, what: str):
    """Import an optional dependency, or raise :class:`MissingExtraError` naming its extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError([extra], module.split(".")[0], what=what) from None


class WriteError(CheckpointError):
    """A format's writer failed for a reason of the destination (disk full, not writable); the
    caller names the destination."""
