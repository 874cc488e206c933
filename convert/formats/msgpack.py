"""Flax msgpack (``flax.serialization``): a nested map of arrays; needs flax.

A map key given twice is refused (flax's decoder would keep the last): a first pass with the
plain msgpack decoder finds them without decoding array payloads.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mixer_convert.errors import CheckpointError, needs
from mixer_convert.source import Entry, Source, no_duplicate_keys, tree_entries
from mixer_convert.trees import nest


def leaf_entry(src: Source, key: str, v: Any) -> Entry:
    """An in-memory leaf of a decoded tree as an entry; a non-array where a tensor should be is
    kept as a 0-d array (step counters and the like) so the strict checks name it, or refused."""
    if isinstance(v, (np.ndarray, np.generic)):
        arr = np.asarray(v)
    elif v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        arr = np.asarray(v)
    else:
        raise CheckpointError(f"{src.path}: entry {key!r} is a {type(v).__name__}, not an array")
    return src.declare(key, arr.shape, arr.dtype), arr.dtype, (lambda: arr)


def read(src: Source) -> tuple[dict[str, Entry], None]:
    serialization = needs("flax.serialization", "jax", "reading a Flax msgpack file")
    import msgpack

    path = src.path
    src.cap(src.stat.st_size, "is a msgpack file of")
    with src.reading("Flax msgpack"):
        data = path.read_bytes()
        msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=lambda code, payload: None,
                        object_pairs_hook=no_duplicate_keys(str(path)))
        tree = serialization.msgpack_restore(data)
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path}: Flax msgpack does not hold a parameter tree")
    return {k: leaf_entry(src, k, v) for k, v in tree_entries(str(path), tree).items()}, None


def write(path: Path, items: Iterator[tuple[str, np.ndarray]], specs: list) -> None:
    serialization = needs("flax.serialization", "jax", "writing a Flax msgpack file")
    path.write_bytes(serialization.msgpack_serialize(nest({k: np.asarray(v) for k, v in items})))
