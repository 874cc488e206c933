"""The train state on the mesh: made sharded (the FSDP rule of :mod:`mixer_jax.sharding`), and
converted between the layout the model computes with (stacked blocks when ``model.scan``) and
the one checkpoints hold (always the official per-block names).

A checkpoint restores onto any mesh: the restore is given the abstract state of *this* run, whose
leaves carry this run's shardings, and orbax reads each shard where it now belongs.
"""
from __future__ import annotations

import dataclasses
import functools
from functools import partial
from typing import Any, Callable

import jax
from jax.sharding import Mesh

from mixer_convert.spec import MixerConfig
from mixer_jax.configs import TrainConfig
from mixer_jax.optimizer import make_optimizer
from mixer_jax.sharding import Placement, state_shardings
from mixer_jax.stacking import stack_blocks, unstack_blocks
from mixer_jax.steps import TrainState, create_train_state, model_fns


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the state's arrays live and how they are laid out, in the run and on disk."""

    abstract: Any  # the state as the model holds it: jax.ShapeDtypeStructs carrying their shardings
    scan: bool  # blocks stacked in the run

    @functools.cached_property
    def shardings(self) -> Any:
        """A NamedSharding per leaf of the state."""
        return jax.tree_util.tree_map(lambda a: a.sharding, self.abstract)

    @property
    def disk_abstract(self) -> Any:
        """The state as checkpoints hold it (official names), with this run's shardings."""
        return unstack_blocks(self.abstract) if self.scan else self.abstract

    def to_disk(self, state: TrainState) -> TrainState:
        return self._unstack(state) if self.scan else state

    def from_disk(self, state: TrainState) -> TrainState:
        return self._stack(state) if self.scan else state

    @functools.cached_property
    def _unstack(self) -> Callable:
        return jax.jit(unstack_blocks, out_shardings=jax.tree_util.tree_map(lambda a: a.sharding, self.disk_abstract))

    @functools.cached_property
    def _stack(self) -> Callable:
        return jax.jit(stack_blocks, out_shardings=self.shardings)


def placement(mesh: Mesh) -> Placement | None:
    """FSDP's per-block gathering, when the state is split (with all data parallel the weights
    are whole on every device and the model runs as it always has)."""
    return Placement(mesh) if mesh.shape["fsdp"] > 1 else None


def state_plan(cfg: TrainConfig, model_cfg: MixerConfig, mesh: Mesh) -> tuple[Callable, Layout, Callable]:
    """(``create(rng, official params or None) -> state``, the state's layout, the learning-rate
    schedule), nothing computed yet."""
    m = cfg.model
    fns = model_fns(model_cfg, m.compute_dtype, m.api, scan=m.scan, remat=m.remat, placement=placement(mesh))
    tx, schedule = make_optimizer(cfg.optim, cfg.steps)
    make = partial(create_train_state, fns, tx)

    def create(rng, params=None):
        return make(rng, stack_blocks(params) if params is not None and m.scan else params)
    layout = layout_of(jax.eval_shape(create, jax.random.PRNGKey(0)), mesh, cfg)
    return create, layout, schedule


def build_state(cfg: TrainConfig, model_cfg: MixerConfig, init_params: dict | None, mesh: Mesh
                ) -> tuple[TrainState, Layout, Callable]:
    """The train state, sharded (fresh, or ``init_params`` in the official layout), its layout,
    and the learning-rate schedule."""
    create, layout, schedule = state_plan(cfg, model_cfg, mesh)
    return jax.jit(create, out_shardings=layout.shardings)(jax.random.PRNGKey(cfg.seed), init_params), layout, schedule


def layout_of(abstract: Any, mesh: Mesh, cfg: TrainConfig) -> Layout:
    """The layout of an abstract state: each leaf sharded by the FSDP rule over ``mesh``."""
    shardings = state_shardings(abstract, mesh, int(cfg.mesh.fsdp_min_mib * 2 ** 20))
    return Layout(jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                         abstract, shardings), cfg.model.scan)
