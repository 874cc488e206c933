"""The blocks' parameters one per block (the official layout, ``MixerBlock_0`` ... ``MixerBlock_{N-1}``)
or stacked along a new leading axis (``MixerBlock``, what a scanned model holds: ``model.scan``).

Checkpoints on disk always hold the official layout, whatever the model computes with, so every
file a scanned run writes loads anywhere the official files do. The conversions work on any tree
whose dicts mirror the parameters: the params, the optimizer state (Adam's ``mu`` and ``nu``),
gradients, and abstract trees of ``jax.ShapeDtypeStruct`` (their shardings follow: a stacked
array's is its blocks' with the leading axis unsharded).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

STACKED = "MixerBlock"  # the scanned model's name for its one stacked block (nn.scan's, nnx's)
_BLOCK = re.compile(r"MixerBlock_(\d+)")


def _blocks(node: Mapping) -> list[str]:
    """``MixerBlock_i`` keys of a dict, in block order, checked to be 0..N-1."""
    keys = sorted((int(m.group(1)), k) for k in node if isinstance(k, str) and (m := _BLOCK.fullmatch(k)))
    if [i for i, _ in keys] != list(range(len(keys))):
        raise ValueError(f"blocks {[k for _, k in keys]} are not MixerBlock_0..MixerBlock_{len(keys) - 1}")
    return [k for _, k in keys]


def _is_params_dict(x: Any) -> bool:
    return isinstance(x, Mapping) and ("MixerBlock_0" in x or STACKED in x)


def _stack_leaves(*leaves):
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        sharding = first.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
    if isinstance(first, np.ndarray):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _unstack_leaf(leaf, n: int) -> list:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
        if isinstance(sharding, NamedSharding):
            spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
            if spec[0] is not None:
                raise ValueError(f"a stacked array sharded along its block axis ({sharding.spec}) cannot be unstacked")
            sharding = NamedSharding(sharding.mesh, P(*spec[1:]))
        return [jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)] * n
    return [leaf[i] for i in range(n)]


def _stack_node(node: Mapping) -> dict:
    names = _blocks(node)
    if not names:
        return dict(node)
    out = {k: v for k, v in node.items() if k not in names}
    out[STACKED] = jax.tree_util.tree_map(_stack_leaves, *(node[k] for k in names))
    return out


def _unstack_node(node: Mapping) -> dict:
    if STACKED not in node:
        return dict(node)
    stacked = node[STACKED]
    n = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(stacked)}
    if len(n) != 1:
        raise ValueError(f"stacked blocks disagree on their number: {sorted(n)}")
    n = n.pop()
    parts = jax.tree_util.tree_map(lambda leaf: _unstack_leaf(leaf, n), stacked)
    out = {k: v for k, v in node.items() if k != STACKED}
    for i in range(n):
        out[f"MixerBlock_{i}"] = jax.tree_util.tree_map(lambda p: p[i], parts, is_leaf=lambda x: isinstance(x, list))
    return out


def stack_blocks(tree: Any) -> Any:
    """Official layout -> stacked, in every params-like dict of ``tree`` (other leaves unchanged)."""
    return jax.tree_util.tree_map(lambda x: _stack_node(x) if _is_params_dict(x) else x, tree,
                                  is_leaf=_is_params_dict)


def unstack_blocks(tree: Any) -> Any:
    """Stacked -> official layout (the inverse of :func:`stack_blocks`)."""
    return jax.tree_util.tree_map(lambda x: _unstack_node(x) if _is_params_dict(x) else x, tree,
                                  is_leaf=_is_params_dict)


def is_stacked(params: Mapping) -> bool:
    return STACKED in params
