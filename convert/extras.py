"""Which optional extras are installed, read from this package's own metadata.

The extras and the distributions each one brings come from the installed package's
``Requires-Dist`` (pyproject's ``optional-dependencies``, so nothing here copies them). An extra
is installed when every one of its distributions is, and each of their top-level modules can be
found (a finder that refuses a module counts as absent). A command declares what it needs with
:func:`require` after parsing its arguments (what is needed may depend on them); a module found
missing later is mapped to its extra by :func:`extra_for_module`.
"""
from __future__ import annotations

import functools
import importlib.metadata as metadata
import re

from mixer_convert.errors import MissingExtraError, importable

DIST = "mixer-toolkit"
# When a module is missing, the smallest extra that provides it is named.
_SMALLEST_FIRST = ("jax", "torch", "hub", "onnx", "tpu", "train", "dev")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.lru_cache(maxsize=None)
def extras_table() -> dict[str, tuple[str, ...]]:
    """extra -> the (normalised) distribution names it requires."""
    table: dict[str, list[str]] = {}
    for req in metadata.requires(DIST) or []:
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if extra:
            table.setdefault(extra.group(1), []).append(_normalise(re.match(r"\s*([\w.-]+)", req).group(1)))
    return {e: tuple(d) for e, d in table.items()}


@functools.lru_cache(maxsize=None)
def _modules_of(dist: str) -> tuple[str, ...] | None:
    """The top-level modules a distribution installs; None if it is not installed."""
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return None
    guess = dist.replace("-", "_")
    if importable(guess):  # the usual case, without reading the file list (a refusing finder: the listing below)
        return (guess,)
    listed = d.read_text("top_level.txt")
    if listed:
        return tuple(listed.split())
    tops = {f.parts[0].split(".")[0] for f in d.files or () if f.suffix in (".py", ".so", ".pyd") and len(f.parts) > 0}
    return tuple(sorted(t for t in tops if t and not t.endswith("-info") and t != ".."))


def has_extra(extra: str) -> bool:
    for dist in extras_table().get(extra, ()):
        modules = _modules_of(dist)
        if modules is None or not all(importable(m) for m in modules):
            return False
    return True


def require(*extras: str) -> None:
    """Raise :class:`MissingExtraError` naming every extra in ``extras`` that is not installed."""
    missing = [e for e in dict.fromkeys(extras) if not has_extra(e)]
    if missing:
        raise MissingExtraError(missing)


def extra_for_module(module: str) -> str | None:
    """The smallest extra that provides ``module`` (found missing at run time), or None."""
    top = module.split(".")[0]
    for extra in _SMALLEST_FIRST:
        for dist in extras_table().get(extra, ()):
            if top.replace("_", "-").lower() == dist or top in (_modules_of(dist) or ()):
                return extra
    return None
