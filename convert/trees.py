"""Nested mappings <-> flat dicts with joined keys: the package's one tree flattener.

Parameter trees ('/'-joined, as in Google's .npz files) and training configs ('.'-joined, for
their diffs) are both flattened here. Two paths that give one key (a key that itself holds the
separator) are an error, never a silent overwrite.
"""
from __future__ import annotations

from typing import Any, Mapping


class TreeError(ValueError):
    """A tree that cannot be flattened or nested without losing an entry."""


def flatten(tree: Mapping, sep: str = "/", *, sequences: bool = False, max_depth: int = 64) -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a/b': 1}``. Every value that is not a Mapping is a leaf (lists
    too, unless ``sequences``: then their items are entries named by index). Deeper nesting than
    ``max_depth`` is refused (a hostile file could nest until the stack overflows)."""
    out: dict[str, Any] = {}
    _flatten_into(out, tree, sep, sequences, max_depth, "", 0)
    return out


def _flatten_into(out: dict, tree, sep: str, sequences: bool, max_depth: int, prefix: str, depth: int) -> None:
    if depth > max_depth:
        raise TreeError(f"nested more than {max_depth} levels deep")
    items = tree.items() if isinstance(tree, Mapping) else enumerate(tree)
    for k, v in items:
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping) or (sequences and isinstance(v, (list, tuple))):
            _flatten_into(out, v, sep, sequences, max_depth, key, depth + 1)
        elif key in out:
            raise TreeError(f"two entries are both named {key!r}")
        else:
            out[key] = v


def nest(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """The inverse of :func:`flatten`: ``{'a/b': 1}`` -> ``{'a': {'b': 1}}``. A key that is both
    a leaf and the prefix of another (``a`` and ``a/b``) is an error."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(sep)
        node = out
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TreeError(f"{sep.join(parents[:i + 1])!r} is both an entry and a section (of {key!r})")
        if last in node:
            raise TreeError(f"{key!r} is both an entry and a section" if isinstance(node[last], dict)
                            else f"two entries are both named {key!r}")
        node[last] = value
    return out
