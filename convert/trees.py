"""Nested trees <-> flat dicts with joined keys: a checkpoint's parameter tree ('/'-joined official
names) and a training config's sections ('.'-joined keys) go through the same two functions."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mixer_convert.errors import CheckpointError

MAX_DEPTH = 64


def flatten(tree: Mapping, sep: str = "/", *, lists: bool = True, where: str = "tree") -> dict[str, Any]:
    """Nested mappings (and, with ``lists``, lists and tuples) -> ``{joined key: leaf}``.

    Two paths that give one key (a key that itself holds ``sep``) are an error naming it, never an
    overwrite; so is nesting deeper than :data:`MAX_DEPTH`. ``where`` names the tree in errors.
    """
    out: dict[str, Any] = {}
    branches = (Mapping, list, tuple) if lists else (Mapping,)

    def walk(node: Any, prefix: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{where}: nested more than {MAX_DEPTH} levels deep; not a parameter tree")
        for k, v in (node.items() if isinstance(node, Mapping) else enumerate(node)):
            key = f"{prefix}{sep}{k}" if prefix else str(k)
            if isinstance(v, branches):
                walk(v, key, depth + 1)
            elif key in out:
                raise CheckpointError(f"{where}: two entries are both named {key!r}")
            else:
                out[key] = v

    walk(tree, "", 0)
    return out


def nest(flat: Mapping[str, Any], sep: str = "/") -> dict:
    """The inverse of :func:`flatten` for mappings."""
    tree: dict = {}
    for k, v in flat.items():
        node = tree
        *parents, leaf = k.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
