"""Install profiles for the command-line tools: a command whose optional dependencies are missing
says in one line which extra to install (exit code 2), instead of a ModuleNotFoundError traceback.

Each ``main`` declares what it needs with :func:`require` (after parsing its arguments, since
what is needed may depend on them) and is wrapped in :func:`cli_errors`, which also maps any
later import failure of a known optional module to its extra.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from typing import Callable

# Extra -> the modules whose absence means the extra is not installed (pyproject's extras).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "jax": ("jax", "flax"),
    "train": ("jax", "flax", "optax", "orbax.checkpoint", "sklearn", "tensorboardX"),
}
# A module found missing at run time -> the smallest extra that provides it.
_MODULE_EXTRA = {"torch": "torch", "jax": "jax", "jaxlib": "jax", "flax": "jax", "optax": "jax", "orbax": "jax",
                 "sklearn": "train", "tensorflow_datasets": "train", "matplotlib": "train", "tensorboardX": "train"}


class MissingExtraError(RuntimeError):
    """``extras`` are all needed, or with ``any_of`` any one of them will do."""

    def __init__(self, extras: list[str], module: str | None = None, any_of: bool = False) -> None:
        self.extras, self.module = extras, module
        why = f" (no module {module!r})" if module else ""
        if any_of:
            names = " or ".join(f"'{e}'" for e in extras)
            pips = " or ".join(f'"mixer-toolkit[{e}]"' for e in extras)
            msg = f"needs the {names} extra{why}: pip install {pips}"
        else:
            names = " and ".join(f"'{e}'" for e in extras)
            msg = (f"needs the {names} extra{'s' if len(extras) > 1 else ''}{why}: "
                   f'pip install "mixer-toolkit[{",".join(extras)}]"')
        super().__init__(msg)


def importable(module: str) -> bool:
    """Whether ``module`` can be found, without importing it (a finder that refuses it counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def has_extra(extra: str) -> bool:
    return all(importable(m) for m in EXTRA_MODULES[extra])


def require(*extras: str) -> None:
    """Raise :class:`MissingExtraError` naming every extra in ``extras`` that is not installed."""
    missing = [e for e in dict.fromkeys(extras) if not has_extra(e)]
    if missing:
        raise MissingExtraError(missing)


def cli_errors(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Wrap a CLI ``main``: a missing extra becomes ``prog: error: needs the 'x' extra: ...`` on
    stderr and exit code 2. Other import errors propagate (a broken install is not a profile)."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except MissingExtraError as e:
                err = e
            except ModuleNotFoundError as e:
                extra = _MODULE_EXTRA.get((e.name or "").split(".")[0])
                if extra is None:
                    raise
                err = MissingExtraError([extra], e.name)
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
        return run
    return wrap
