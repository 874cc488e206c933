"""Where a training run's arrays live on the devices: the 2-D mesh (``data`` x ``fsdp``), the
FSDP rule for the parameters and optimizer state, and :class:`Placement`, what a model applies
inside itself so that each block's weights are gathered where they are used.

The rule (big_vision's ``fsdp``): every array of at least ``min_bytes`` is split over the ``fsdp``
axis along its largest dimension that the axis size divides (a stacked array never along its
block axis, which a scan slices); smaller arrays, and arrays with no such dimension, are
replicated. The batch is split over both axes, so ``fsdp`` devices also share the batch: FSDP is
data parallelism whose state is not replicated. Inside the model each block's weights are
all-gathered just before the block and dropped after it (recomputed in the backward pass with
``remat``); their gradients come back reduce-scattered to the state's sharding.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixer_jax.configs import mesh_shape
from mixer_jax.stacking import STACKED

AXES = ("data", "fsdp")
BATCH = P(AXES)  # the batch dimension split over every device


def make_mesh(data: int, fsdp: int, devices: Sequence | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over ``devices`` (default: every device of every process),
    ``fsdp`` the minor axis, so that the devices sharing a state shard are neighbours."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def fsdp_spec(shape: tuple[int, ...], itemsize: int, fsdp: int, min_bytes: int, skip_first: bool = False) -> P:
    """The PartitionSpec of one array under the FSDP rule (module docstring)."""
    if fsdp == 1 or math.prod(shape) * itemsize < min_bytes:
        return P()
    candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp == 0 and not (skip_first and i == 0)]
    if not candidates:
        return P()
    _, axis = max(candidates, key=lambda c: (c[0], -c[1]))  # largest, the first of equals
    return P(*(["fsdp" if i == axis else None for i in range(len(shape))]))


def state_shardings(abstract: Any, mesh: Mesh, min_bytes: int, stacked_paths: tuple[str, ...] = (STACKED,)) -> Any:
    """A NamedSharding for every leaf of an abstract state (params and optimizer state alike:
    Adam's moments get their parameter's sharding, scalars are replicated)."""
    fsdp = mesh.shape["fsdp"]

    def one(path, leaf):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        stacked = any(k in stacked_paths for k in keys)
        return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), np.dtype(leaf.dtype).itemsize, fsdp, min_bytes,
                                             skip_first=stacked))
    return jax.tree_util.tree_map_with_path(one, abstract)


@dataclasses.dataclass(frozen=True)
class Placement:
    """What a model does inside itself on a mesh: the activations between blocks stay split along
    the batch over ``batch_axes``, and each block's weights are all-gathered where used (a no-op
    for weights that are replicated already)."""

    mesh: Mesh
    batch_axes: tuple[str, ...] = AXES

    def batch(self, x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(self.batch_axes)))

    def gathered(self, tree: Any) -> Any:
        replicated = NamedSharding(self.mesh, P())
        return jax.tree_util.tree_map(lambda w: jax.lax.with_sharding_constraint(w, replicated), tree)
