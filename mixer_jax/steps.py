"""One training step and one eval step, written against a model as two pure functions.

A model API plugs into training by giving :class:`ModelFns`: ``init(rng) -> params`` (the
official parameter tree) and ``apply(params, images, train, rng) -> logits``. Flax linen's adapter
is :func:`linen_fns`, Flax NNX's :func:`nnx_fns` (``nnx.split``/``nnx.merge``: the params are the
same plain tree as Linen's); each is registered in ``MODEL_APIS`` (``model.api``) and the loop,
checkpoints and outputs are the same for both. The state carries ``apply`` as its ``apply_fn``, so
the steps need nothing else of the model.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from mixer_convert.spec import MixerConfig
from mixer_jax.input_pipeline import normalize
from mixer_jax.model import MlpMixer, init_params
from mixer_jax.sharding import Placement
from mixer_jax.stacking import stack_blocks

# (params, images, train, rng) -> logits; rng drives dropout and stochastic depth when train is True.
ApplyFn = Callable[[Any, jax.Array, bool, Any], jax.Array]
TrainState = train_state.TrainState


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """What training needs of a model, whatever its API: two pure functions."""

    init: Callable[[jax.Array], Any]  # rng -> params (nested dict, the official names)
    apply: ApplyFn


def _linen_apply(model, params, images: jax.Array, train: bool, rng) -> jax.Array:
    return model.apply({"params": params}, images, train=train, rngs={"dropout": rng} if train else None)


def linen_fns(model) -> ModelFns:
    """The pure functions of a Flax linen module (``mixer_jax.model.MlpMixer``)."""
    return ModelFns(init=partial(init_params, model), apply=partial(_linen_apply, model))


def _official_init(cfg: MixerConfig, dtype: Any, scan: bool) -> Callable[[jax.Array], Any]:
    # The plain Linen model's initial weights for the seed, stacked for a scanned model: scan,
    # remat and the API change how a run computes, never where it starts.
    init = partial(init_params, MlpMixer(cfg, dtype=dtype))
    return (lambda rng: stack_blocks(init(rng))) if scan else init


def _linen_model(cfg: MixerConfig, dtype: Any, **scale) -> ModelFns:
    return ModelFns(init=_official_init(cfg, dtype, scale.get("scan", False)),
                    apply=partial(_linen_apply, MlpMixer(cfg, dtype=dtype, **scale)))


def _nnx_param_state(template, params):
    # The plain tree (what the optimizer and the checkpoints hold) as the nnx.State merge takes,
    # each array in its template's Variable (type and metadata kept).
    from flax import nnx

    def leaf(path):
        node = params
        for k in path:
            node = node[k]
        return node
    return nnx.from_flat_state([(path, var.replace(leaf(path))) for path, var in nnx.to_flat_state(template)])


def _nnx_apply(graphdef, template, rest, params, images: jax.Array, train: bool, rng) -> jax.Array:
    from flax import nnx

    model = nnx.merge(graphdef, _nnx_param_state(template, params), rest)
    # Call-time streams seeded by the step's rng (NNX's override of the modules' own), so the masks
    # are a function of (seed, step) as Linen's are; the modules' streams are never drawn from.
    return model(images, deterministic=not train, rngs=nnx.Rngs(dropout=rng) if train else None)


def nnx_fns(model, init: Callable[[jax.Array], Any]) -> ModelFns:
    """The pure functions of a Flax NNX module called as ``model(x, deterministic=..., rngs=...)``
    (``nnx.Dropout``'s convention, e.g. ``mixer_jax.nnx.MlpMixer``). Only its structure is used, so
    an abstract one (``nnx.eval_shape``) will do: ``apply`` merges the params, a plain nested dict
    of its ``nnx.Param`` paths, into it; ``init`` makes them."""
    from flax import nnx

    graphdef, template, rest = nnx.split(model, nnx.Param, ...)
    return ModelFns(init=init, apply=partial(_nnx_apply, graphdef, template, rest))


def _nnx_model(cfg: MixerConfig, dtype: Any, **scale) -> ModelFns:
    from mixer_jax.nnx import abstract_model

    # Linen's initial weights for the seed (the same initialisers, drawn the Linen way), so that
    # model.api changes nothing a run computes: the two models are the same function, bit for bit.
    return nnx_fns(abstract_model(cfg, dtype, **scale), init=_official_init(cfg, dtype, scale.get("scan", False)))


# model.api -> (architecture, compute dtype, scale) -> ModelFns; the names are configs.MODEL_API_NAMES.
MODEL_APIS: dict[str, Callable[..., ModelFns]] = {"linen": _linen_model, "nnx": _nnx_model}
_PLAIN = {"scan": False, "remat": "none", "placement": None}


def model_fns(cfg: MixerConfig, dtype: Any = jnp.float32, api: str = "linen", *, scan: bool = False,
              remat: str = "none", placement: Placement | None = None) -> ModelFns:
    """``scan``, ``remat`` and ``placement`` as the models take them (mixer_jax/model.py); with
    ``scan`` the params are stacked (:mod:`mixer_jax.stacking`)."""
    if api not in MODEL_APIS:
        raise ValueError(f"unknown model API {api!r}; expected one of {', '.join(MODEL_APIS)}")
    scale = {k: v for k, v in dict(scan=scan, remat=remat, placement=placement).items() if v != _PLAIN[k]}
    return MODEL_APIS[api](cfg, jnp.dtype(dtype), **scale)


def create_train_state(fns: ModelFns, tx: optax.GradientTransformation, rng: jax.Array,
                       params: Any | None = None) -> TrainState:
    """Fresh parameters from ``fns.init(rng)`` unless ``params`` are given (init_from)."""
    return TrainState.create(apply_fn=fns.apply, params=fns.init(rng) if params is None else params, tx=tx)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def loss_fn(params, apply_fn: ApplyFn, images: jax.Array, labels: jax.Array, rng: jax.Array, num_classes: int,
            label_smoothing: float, mixup_alpha: float) -> tuple[jax.Array, jax.Array]:
    """(mean loss, number correct) of one micro-batch of model inputs in [-1, 1]; mixup mixes the
    batch with its reverse (big_vision), accuracy is against the true labels."""
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    mix_rng, drop_rng = jax.random.split(rng)
    if mixup_alpha:
        lam = jax.random.beta(mix_rng, mixup_alpha, mixup_alpha)
        images = lam * images + (1 - lam) * images[::-1]
        targets = lam * targets + (1 - lam) * targets[::-1]
    logits = apply_fn(params, images, True, drop_rng)
    loss = cross_entropy(logits, targets).mean()
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return loss, correct


def _grads(params, images, labels, rng, loss_args: tuple):
    (loss, correct), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, loss_args[0], images, labels, rng,
                                                                      *loss_args[1:])
    return grads, loss, correct


def _add_micro_batch(params, rng, loss_args: tuple, carry, xs):
    i, images, labels = xs
    return jax.tree_util.tree_map(jnp.add, carry, _grads(params, images, labels, jax.random.fold_in(rng, i),
                                                         loss_args)), None


def accumulated_grads(params, images: jax.Array, labels: jax.Array, rng: jax.Array, loss_args: tuple):
    """(grads, loss, correct) averaged over the micro-batches of ``images`` (accum, micro, H, W, C);
    ``loss_args``: (apply_fn, num_classes, label_smoothing, mixup_alpha)."""
    accum = images.shape[0]
    if accum == 1:  # XLA optimises a loop body much less well: 3-4x slower on CPU even for one trip
        return _grads(params, images[0], labels[0], jax.random.fold_in(rng, 0), loss_args)
    # A rolled loop: ~3x slower per micro-batch on CPU, but memory stays one micro-batch's
    # (measured B/16, micro-batch 8: 1.25 GB temp for accum 2..8; unrolled it grows to 10 GB at 8).
    zeros = (jax.tree_util.tree_map(jnp.zeros_like, params), 0.0, 0)
    (grads, loss, correct), _ = jax.lax.scan(partial(_add_micro_batch, params, rng, loss_args), zeros,
                                             (jnp.arange(accum), images, labels))
    return jax.tree_util.tree_map(lambda g: g / accum, grads), loss / accum, correct


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, rng: jax.Array, *, num_classes: int,
               label_smoothing: float = 0.0, mixup_alpha: float = 0.0,
               schedule: Callable | None = None, grad_shardings: Any = None) -> tuple[TrainState, dict]:
    """One optimizer step over ``images`` of shape (accum, micro_batch, H, W, C): gradients of the
    micro-batches are averaged (lax.scan, so memory is one micro-batch's). uint8 images (the input
    pipeline's) are normalised here, on the device. ``grad_shardings`` (the params'): gradients are
    reduce-scattered to them as soon as they are made, never held whole (FSDP)."""
    rng = jax.random.fold_in(rng, state.step)
    grads, loss, correct = accumulated_grads(state.params, normalize(images), labels, rng,
                                             (state.apply_fn, num_classes, label_smoothing, mixup_alpha))
    if grad_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    metrics = {"loss": loss, "accuracy": correct / labels.size, "grad_norm": optax.tree.norm(grads)}
    if schedule is not None:
        metrics["lr"] = schedule(state.step)
    return state.apply_gradients(grads=grads), metrics


def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
    """Sums over the real rows (``mask``) of a batch: top-1 and top-5 correct, loss, count."""
    logits = state.apply_fn(state.params, normalize(images), False, None)
    loss = cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {"correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "correct5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
            "loss_sum": jnp.sum(loss * mask), "count": jnp.sum(mask)}
