"""The optimizer and its learning-rate schedule, built from the config's ``optim`` section."""
from __future__ import annotations

import jax
import optax

from mixer_jax.configs import OptimConfig


def make_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then cosine or linear decay to 0 at ``total_steps``."""
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(total_steps, warmup + 1), 0.0)
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup),
                                 optax.linear_schedule(o.lr, 0.0, max(total_steps - warmup, 1))], [warmup])


def _kernel_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def make_optimizer(o: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clip, SGD momentum or Adam, decoupled weight decay on kernels, the schedule."""
    sched = make_schedule(o, total_steps)
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    if o.name == "adam":
        parts.append(optax.scale_by_adam(o.b1, o.b2))
    elif o.momentum:
        parts.append(optax.trace(decay=o.momentum))
    if o.weight_decay:
        # Decoupled: added after the adaptive scaling, so it is multiplied by the schedule below.
        parts.append(optax.add_decayed_weights(o.weight_decay, mask=_kernel_mask))
    parts.append(optax.scale_by_learning_rate(sched))
    return optax.chain(*parts), sched
