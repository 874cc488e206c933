"""MLP-Mixer in Flax NNX: the same function as the Linen model (mixer_jax.model), bit for bit, and
``nnx.state(model, nnx.Param)`` has exactly the official parameter paths.

Sections: blocks, model, variant factory, load helpers (same order as mixer_jax/model.py).

Train and eval follow NNX's convention (that of ``nnx.Dropout``): every module with randomness has a
``deterministic`` attribute, False when built (training behaviour, as in PyTorch);
``model.eval()`` / ``model.train()`` set it everywhere, ``nnx.view(model, deterministic=True)``
gives an eval view sharing the weights, and ``model(x, deterministic=True)`` overrides it for one
call. With ``stoch_depth`` and ``dropout_rate`` at 0 (every published checkpoint) there is nothing
random and the mode changes nothing. The masks draw from the model's own ``dropout`` RNG streams
(or ``rngs=`` at call time): the same rules and rates as the Linen model, other random numbers.

For scale, the Linen model's three fields (each changes how the function is computed, not the
function): ``scan=True`` holds the blocks as ONE module, ``MixerBlock``, whose parameters are stacked
along a leading block axis (built by ``nnx.vmap``: the paths and shapes of Linen's ``nn.scan``) and
runs them as one ``jax.lax.scan``, each block's stochastic-depth rate coming in as data;
``remat`` recomputes each block in the backward pass (``jax.checkpoint``, 'block' or a
``jax.checkpoint_policies`` name, as :func:`mixer_jax.model.remat_policy`); ``placement``
(:class:`mixer_jax.sharding.Placement`) keeps the activations split along the batch between blocks
and all-gathers each block's weights inside the block (inside the remat: recomputed, not saved).
Every block runs as a pure function of its ``nnx.split`` state: it computes with the gathered
weights, and only the RNG state it drew from is written back. A scanned model's own streams are
one per block (``nnx.split_rngs``) and every block draws, so its masks are other random numbers
than the unscanned model's (the same rates); remat and placement change no random number. The
load helpers take and give the official layout whatever the model holds
(:mod:`mixer_jax.stacking` converts).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from mixer_convert.params import check_params
from mixer_convert.spec import (LAYERNORM_EPS, MixerConfig, block_drop_rates, check_image_shape, config_for,
                                param_shapes)
from mixer_jax.model import remat_policy
from mixer_jax.stacking import STACKED, stack_blocks, unstack_blocks

Array = jax.Array

# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------


def _stream(rngs: nnx.Rngs, rate: float) -> nnx.RngStream | None:
    # Only a module that draws random numbers holds a stream, so a model without regularisation
    # has no RNG state at all (nnx.state(model) == its parameters).
    return rngs["dropout"].fork() if rate else None


def _promote_input_only(args: tuple, /, *, dtype: Any = None, inexact: bool = True) -> tuple:
    # Linen's LayerNorm applies its float32 scale and bias without rounding them to the compute
    # dtype; nnx.LayerNorm's default promotion rounds them first, so bf16 results would differ.
    x, *rest = args
    return (x if dtype is None else jnp.asarray(x, dtype), *rest)


def _layer_norm(dim: int, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=LAYERNORM_EPS, dtype=dtype, promote_dtype=_promote_input_only, rngs=rngs)


class MlpBlock(nnx.Module):
    def __init__(self, dim: int, mlp_dim: int, dropout_rate: float = 0.0, dtype: Any = jnp.float32, *,
                 rngs: nnx.Rngs) -> None:
        self.Dense_0 = nnx.Linear(dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.Dense_1 = nnx.Linear(mlp_dim, dim, dtype=dtype, rngs=rngs)
        # deterministic given explicitly: newer Flax versions have no default for it.
        self.Dropout_0 = nnx.Dropout(dropout_rate, deterministic=False, rngs=_stream(rngs, dropout_rate))
        self.Dropout_1 = nnx.Dropout(dropout_rate, deterministic=False, rngs=_stream(rngs, dropout_rate))

    def __call__(self, x: Array, deterministic: bool | None = None, rngs: nnx.Rngs | None = None) -> Array:
        y = self.Dense_0(x)
        y = nnx.gelu(y, approximate=True)  # the official checkpoints were trained with tanh GELU
        y = self.Dropout_0(y, deterministic=deterministic, rngs=rngs)
        y = self.Dense_1(y)
        return self.Dropout_1(y, deterministic=deterministic, rngs=rngs)


class MixerBlock(nnx.Module):
    def __init__(self, num_tokens: int, dim: int, tokens_mlp_dim: int, channels_mlp_dim: int,
                 drop_p: float = 0.0, dropout_rate: float = 0.0, dtype: Any = jnp.float32, *,
                 rngs: nnx.Rngs) -> None:
        self.LayerNorm_0 = _layer_norm(dim, dtype, rngs)
        self.token_mixing = MlpBlock(num_tokens, tokens_mlp_dim, dropout_rate, dtype, rngs=rngs)
        self.LayerNorm_1 = _layer_norm(dim, dtype, rngs)
        self.channel_mixing = MlpBlock(dim, channels_mlp_dim, dropout_rate, dtype, rngs=rngs)
        self.drop_p = drop_p
        self.deterministic = False
        self.rngs = nnx.data(_stream(rngs, drop_p))

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view`` (its docstring format is what ``nnx.view_info`` reads).

        Args:
          deterministic: if True, no stochastic depth (the residual branches are always kept).
        """
        if deterministic is not None:
            self.deterministic = deterministic

    def _keep(self, x: Array, deterministic: bool, rngs: nnx.Rngs | None, drop_p) -> Array | float:
        # big_vision stochastic depth: a per-sample mask on each residual branch, no 1/(1-p) rescale.
        if deterministic or not self.drop_p:
            return 1.0
        stream = rngs["dropout"] if rngs is not None else self.rngs
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return 1.0 - jax.random.bernoulli(stream(), drop_p, shape).astype(x.dtype)

    def __call__(self, x: Array, deterministic: bool | None = None, rngs: nnx.Rngs | None = None,
                 drop_p: Array | None = None) -> Array:
        """``drop_p`` (a scanned model's: each block's rate as data) replaces ``self.drop_p``,
        which then only says whether there is stochastic depth at all."""
        # A call-time ``deterministic`` goes down as given: with None each Dropout keeps its own.
        drop = self.deterministic if deterministic is None else deterministic
        drop_p = self.drop_p if drop_p is None else drop_p
        y = self.LayerNorm_0(x)
        y = jnp.swapaxes(y, 1, 2)
        y = self.token_mixing(y, deterministic, rngs)
        y = jnp.swapaxes(y, 1, 2)
        x = x + y * self._keep(x, drop, rngs, drop_p)
        y = self.LayerNorm_1(x)
        y = self.channel_mixing(y, deterministic, rngs)
        return x + y * self._keep(x, drop, rngs, drop_p)


def _stacked_blocks(cfg: MixerConfig, dtype: Any, rngs: nnx.Rngs) -> MixerBlock:
    """The scanned model's one block module, its state stacked along a leading block axis (each
    block's own initial weights and RNG streams: ``nnx.split_rngs``). Its ``drop_p`` only says
    whether there is stochastic depth; the rates come in as data."""
    rate = max(block_drop_rates(cfg), default=0.0)

    @nnx.split_rngs(splits=cfg.num_blocks)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> MixerBlock:
        return MixerBlock(cfg.num_tokens, cfg.hidden_dim, cfg.tokens_mlp_dim, cfg.channels_mlp_dim, rate,
                          cfg.dropout_rate, dtype, rngs=rngs)
    return make(rngs)


def _block_step(graphdef: nnx.GraphDef, call_def: nnx.GraphDef | None, deterministic: bool | None,
                placement: Any, remat: str, prevent_cse: bool) -> Callable:
    """One block as a pure function of its ``nnx.split`` state, the form ``jax.lax.scan`` and
    ``jax.checkpoint`` take: ``((x, call_rngs), (params, rest, drop_p)) -> ((x, call_rngs), rest)``
    where ``rest`` is the block's RNG state and ``call_rngs`` the call-time ``rngs``' (None
    without). The weights it computes with (all-gathered under a placement, inside the remat so
    that they are recomputed, not saved) are never written back: only the RNG state comes out,
    and the block's own only where it may have drawn from it (None with call-time ``rngs`` or
    ``deterministic=True``: a module merged from state held outside a ``jax.jit`` stays untouched)."""
    own = call_def is None and deterministic is not True

    def step(carry, xs):
        x, call_state = carry
        params, rest, drop_p = xs
        block = nnx.merge(graphdef, params if placement is None else placement.gathered(params), rest)
        rngs = None if call_def is None else nnx.merge(call_def, call_state)
        x = block(x, deterministic, rngs, drop_p)
        rest = nnx.state(block, nnx.Not(nnx.Param)) if own else None
        return (x, None if rngs is None else nnx.state(rngs)), rest
    if remat == "none":
        return step
    return jax.checkpoint(step, policy=remat_policy(remat), prevent_cse=prevent_cse)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class MlpMixer(nnx.Module):
    """Input NHWC images of ``config.image_size``; output logits (or pre-logits when
    ``num_classes`` is None). ``dtype`` is the compute dtype; parameters stay float32.
    ``rngs`` initialises the parameters (its ``params`` stream) and, where ``stoch_depth`` or
    ``dropout_rate`` is set, seeds the masks (its ``dropout`` stream; ``default`` for both if
    those are absent).

    ``model(x, return_intermediates=True)`` returns ``(out, {name: array})`` with the names of
    ``mixer_convert.spec.intermediate_names(config)``, as the Linen and PyTorch models do.

    ``scan``, ``remat`` and ``placement``: those of the Linen model (module docstring). A scanned
    model holds its blocks as one module ``MixerBlock`` (parameters stacked along a leading block
    axis) instead of ``MixerBlock_0`` ... ``MixerBlock_{N-1}``.
    """

    def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, scan: bool = False,
                 remat: str = "none", placement: Any = None) -> None:
        if remat not in ("none", "block") and not callable(getattr(jax.checkpoint_policies, remat, None)):
            raise ValueError(f"remat={remat!r}: expected 'none', 'block' or a jax.checkpoint_policies name")
        self.config = cfg = config
        self.dtype, self.scan, self.remat, self.placement = dtype, scan, remat, placement
        self.stem = nnx.Conv(cfg.in_chans, cfg.hidden_dim, cfg.patch_size, strides=cfg.patch_size,
                             padding="VALID", dtype=dtype, rngs=rngs)
        if scan:
            setattr(self, STACKED, _stacked_blocks(cfg, dtype, rngs))
        for i, drop_p in enumerate([] if scan else block_drop_rates(cfg)):
            setattr(self, f"MixerBlock_{i}", MixerBlock(cfg.num_tokens, cfg.hidden_dim, cfg.tokens_mlp_dim,
                                                        cfg.channels_mlp_dim, drop_p, cfg.dropout_rate, dtype,
                                                        rngs=rngs))
        self.pre_head_layer_norm = _layer_norm(cfg.hidden_dim, dtype, rngs)
        self.head = None if cfg.num_classes is None else nnx.Linear(
            cfg.hidden_dim, cfg.num_classes, kernel_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)

    @property
    def blocks(self) -> list[MixerBlock]:
        """The unscanned model's blocks, in order."""
        return [getattr(self, f"MixerBlock_{i}") for i in range(self.config.num_blocks)]

    def _placed(self, x: Array) -> Array:
        return x if self.placement is None else self.placement.batch(x)

    def _blocks(self, x: Array, deterministic: bool | None, rngs: nnx.Rngs | None,
                inter: dict[str, Array] | None) -> Array:
        """The blocks, one after another or as one scan; ``inter`` (if given) gets every block's
        output. The call-time ``rngs`` go through them as state, updated after."""
        call_def, call_state = (None, None) if rngs is None else nnx.split(rngs)
        run = self._scanned if self.scan else self._one_by_one
        x, call_state = run((x, call_state), call_def, deterministic, inter)
        if rngs is not None:
            nnx.update(rngs, call_state)
        return x

    def _one_by_one(self, carry: tuple, call_def, deterministic: bool | None, inter: dict | None) -> tuple:
        for i, block in enumerate(self.blocks):
            graphdef, params, rest = nnx.split(block, nnx.Param, ...)
            step = _block_step(graphdef, call_def, deterministic, self.placement, self.remat, prevent_cse=True)
            (x, call_state), rest = step(carry, (params, rest, None))  # drop_p: the block's own
            if rest is not None:
                nnx.update(block, rest)
            carry = (self._placed(x), call_state)
            if inter is not None:
                inter[f"MixerBlock_{i}"] = carry[0]
        return carry

    def _scanned(self, carry: tuple, call_def, deterministic: bool | None, inter: dict | None) -> tuple:
        stacked = getattr(self, STACKED)
        graphdef, params, rest = nnx.split(stacked, nnx.Param, ...)
        # prevent_cse=False: the scan's loop already keeps XLA from merging recomputations.
        step = _block_step(graphdef, call_def, deterministic, self.placement, self.remat, prevent_cse=False)

        def body(carry, xs):
            (x, call_state), rest = step(carry, xs)
            x = self._placed(x)
            return (x, call_state), (rest, x if inter is not None else None)  # N activations only if asked
        rates = jnp.asarray(block_drop_rates(self.config), jnp.float32)  # each block's, as data
        carry, (rest, ys) = jax.lax.scan(body, carry, (params, rest, rates))
        if rest is not None:
            nnx.update(stacked, rest)
        if inter is not None:
            inter.update({f"MixerBlock_{i}": ys[i] for i in range(self.config.num_blocks)})
        return carry

    def __call__(self, x: Array, *, deterministic: bool | None = None, rngs: nnx.Rngs | None = None,
                 return_intermediates: bool = False):
        """``deterministic`` overrides the modules' own for this call; ``rngs`` overrides their
        streams (both as ``nnx.Dropout`` takes them)."""
        cfg = self.config
        check_image_shape(x.shape, cfg, "NHWC")
        inter: dict[str, Array] = {}
        x = self.stem(x.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # raster (h, w) token order, as official
        inter["stem"] = x = self._placed(x)
        x = self._blocks(x, deterministic, rngs, inter if return_intermediates else None)
        x = self.pre_head_layer_norm(x)
        x = jnp.mean(x, axis=1)
        inter["pre_logits"] = x
        if self.head is not None:
            x = self.head(x)
            inter["logits"] = x
        return (x, inter) if return_intermediates else x


# --------------------------------------------------------------------------------------
# Variant factory
# --------------------------------------------------------------------------------------


def create_model(variant: str | MixerConfig = "B/16", *, rngs: nnx.Rngs | int = 0, pretrained: bool | str = False,
                 dtype: Any = jnp.float32, scan: bool = False, remat: str = "none",
                 placement: Any = None, **overrides) -> MlpMixer:
    """``create_model('B/16', num_classes=10, rngs=nnx.Rngs(0))``: fresh weights (the official
    initialisers: lecun_normal kernels, zero biases and head); overrides are MixerConfig fields
    and ``rngs`` may be an int seed. With ``pretrained`` (True, a tag such as ``'imagenet21k'``,
    or a checkpoint source) the published weights instead: see :func:`from_pretrained`.
    ``scan``, ``remat``, ``placement``: :class:`MlpMixer`'s."""
    fields = dict(scan=scan, remat=remat, placement=placement)
    if pretrained:
        if isinstance(variant, MixerConfig):
            raise ValueError("pretrained=... needs a variant name such as 'B/16', not a MixerConfig")
        return from_pretrained(variant, pretrained, dtype=dtype, rngs=rngs, **fields, **overrides)
    cfg = variant.replace(**overrides) if isinstance(variant, MixerConfig) else config_for(variant, **overrides)
    return MlpMixer(cfg, rngs=nnx.Rngs(rngs) if isinstance(rngs, int) else rngs, dtype=dtype, **fields)


# --------------------------------------------------------------------------------------
# Load helpers
# --------------------------------------------------------------------------------------


def state_to_flat(model: MlpMixer | nnx.State) -> dict[str, np.ndarray]:
    """A model's parameters (or an ``nnx.State`` of them, e.g. gradients) -> canonical flat numpy
    dict ('/'-joined official names; a model's in model order, as the Linen ``params_to_flat``).
    A scanned model's stacked blocks come out one per block, under the official names.
    Non-parameter state (RNG streams) is not included."""
    state = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model
    tree = {tuple(map(str, path)): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)
            if isinstance(var, nnx.Param)}
    flat = {"/".join(k): v for k, v in flatten_dict(unstack_blocks(unflatten_dict(tree))).items()}
    rank = {k: i for i, k in enumerate(param_shapes(model.config))} if isinstance(model, MlpMixer) else {}
    return dict(sorted(flat.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def flat_to_state(flat: Mapping[str, Any], cfg: MixerConfig, *, scan: bool = False) -> nnx.State:
    """Canonical flat dict -> the ``nnx.State`` of ``nnx.Param`` that :func:`nnx.merge` takes,
    float32, strictly checked against ``cfg`` (``ParamMismatchError`` lists every bad key);
    with ``scan`` the blocks stacked, as a scanned model holds them."""
    check_params(flat, cfg)
    tree = unflatten_dict({tuple(k.split("/")): np.asarray(v) for k, v in flat.items()})
    tree = stack_blocks(tree) if scan else tree
    return nnx.from_flat_state({k: nnx.Param(jnp.asarray(v, jnp.float32)) for k, v in flatten_dict(tree).items()})


def abstract_model(cfg: MixerConfig, dtype: Any = jnp.float32, *, scan: bool = False, remat: str = "none",
                   placement: Any = None) -> MlpMixer:
    """The module tree with shapes only (``nnx.eval_shape``): what loading merges a checkpoint into
    and what training merges its params into."""
    return nnx.eval_shape(lambda: MlpMixer(cfg, rngs=nnx.Rngs(params=0, dropout=0), dtype=dtype, scan=scan,
                                           remat=remat, placement=placement))


def from_flat(flat: Mapping[str, Any], cfg: MixerConfig, *, rngs: nnx.Rngs | int = 0, dtype: Any = jnp.float32,
              scan: bool = False, remat: str = "none", placement: Any = None) -> MlpMixer:
    """A model holding ``flat`` (official names, strictly checked; stacked for a ``scan`` model),
    built without random initialisation: the module tree comes from ``nnx.eval_shape`` (shapes
    only) and the checkpoint's arrays become its parameters. ``rngs`` seeds the dropout /
    stochastic-depth streams, if the config has any (a scanned model's: one key per block)."""
    params = flat_to_state(flat, cfg, scan=scan)
    abstract = abstract_model(cfg, dtype, scan=scan, remat=remat, placement=placement)
    graphdef, _, rng_state = nnx.split(abstract, nnx.Param, nnx.RngState)
    model = nnx.merge(graphdef, params, rng_state)
    if nnx.to_flat_state(rng_state):  # abstract keys until reseeded: give them real ones
        nnx.reseed(model, policy="match_shape", dropout=rngs if isinstance(rngs, int) else rngs["dropout"]())
    return model


def from_checkpoint(path, num_classes: int | None | str = "keep", scale: int = 1, variant: str | None = None,
                    dtype: Any = jnp.float32, prefix: str | None = None, image_size=None, *,
                    rngs: nnx.Rngs | int = 0, scan: bool = False, remat: str = "none",
                    placement: Any = None, **overrides) -> MlpMixer:
    """A model from any checkpoint the bridge reads (official .npz, Flax msgpack/orbax incl.
    ``nnx.state`` saves, PyTorch, timm, safetensors), a path or a published name/URL (``B/16-i21k``,
    ``gs://mixer_models/...``, ``hf-hub:timm/...``; downloaded into the cache): optionally a fresh
    head for ``num_classes`` and token-mixing resized for ``scale`` x larger images.
    ``image_size`` (H, W) is the file's, needed only for a non-square patch grid. ``overrides``
    (stoch_depth, dropout_rate) change non-shape fields, their masks seeded by ``rngs``;
    ``prefix`` picks the parameter tree of a file that holds several (e.g. 'params/'); ``scan``,
    ``remat``, ``placement``: :class:`MlpMixer`'s (the file's official layout stacked for ``scan``)."""
    from mixer_convert.load import load_checkpoint, with_overrides

    flat, cfg = load_checkpoint(path, num_classes, scale, variant, image_size=image_size, prefix=prefix)
    return from_flat(flat, with_overrides(cfg, overrides), rngs=rngs, dtype=dtype, scan=scan, remat=remat,
                     placement=placement)


def from_pretrained(model: str, pretrained: bool | str = True, num_classes: int | None | str = "keep",
                    scale: int = 1, dtype: Any = jnp.float32, **overrides) -> MlpMixer:
    """Published weights by name: ``from_pretrained('B/16-i21k')``, ``from_pretrained('B/16',
    'imagenet21k')``, ``from_pretrained('mixer_b16_224')`` (the variant's default file),
    ``from_pretrained('hf-hub:timm/...')``, or any path or URL.
    Tags and defaults: :func:`mixer_convert.catalogue.pretrained_source`."""
    from mixer_convert.catalogue import pretrained_source

    source, variant = pretrained_source(model, pretrained)
    return from_checkpoint(source, num_classes, scale, variant, dtype, **overrides)
