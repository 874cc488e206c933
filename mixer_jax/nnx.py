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
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixer_convert.params import check_params
from mixer_convert.spec import (LAYERNORM_EPS, MixerConfig, block_drop_rates, check_image_shape, config_for,
                                param_shapes)

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

    def _keep(self, x: Array, deterministic: bool, rngs: nnx.Rngs | None) -> Array | float:
        # big_vision stochastic depth: a per-sample mask on each residual branch, no 1/(1-p) rescale.
        if deterministic or not self.drop_p:
            return 1.0
        stream = rngs["dropout"] if rngs is not None else self.rngs
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return 1.0 - jax.random.bernoulli(stream(), self.drop_p, shape).astype(x.dtype)

    def __call__(self, x: Array, deterministic: bool | None = None, rngs: nnx.Rngs | None = None) -> Array:
        # A call-time ``deterministic`` goes down as given: with None each Dropout keeps its own.
        drop = self.deterministic if deterministic is None else deterministic
        y = self.LayerNorm_0(x)
        y = jnp.swapaxes(y, 1, 2)
        y = self.token_mixing(y, deterministic, rngs)
        y = jnp.swapaxes(y, 1, 2)
        x = x + y * self._keep(x, drop, rngs)
        y = self.LayerNorm_1(x)
        y = self.channel_mixing(y, deterministic, rngs)
        return x + y * self._keep(x, drop, rngs)


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
    """

    def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        self.config = cfg = config
        self.dtype = dtype
        self.stem = nnx.Conv(cfg.in_chans, cfg.hidden_dim, cfg.patch_size, strides=cfg.patch_size,
                             padding="VALID", dtype=dtype, rngs=rngs)
        for i, drop_p in enumerate(block_drop_rates(cfg)):
            setattr(self, f"MixerBlock_{i}", MixerBlock(cfg.num_tokens, cfg.hidden_dim, cfg.tokens_mlp_dim,
                                                        cfg.channels_mlp_dim, drop_p, cfg.dropout_rate, dtype,
                                                        rngs=rngs))
        self.pre_head_layer_norm = _layer_norm(cfg.hidden_dim, dtype, rngs)
        self.head = None if cfg.num_classes is None else nnx.Linear(
            cfg.hidden_dim, cfg.num_classes, kernel_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)

    @property
    def blocks(self) -> list[MixerBlock]:
        return [getattr(self, f"MixerBlock_{i}") for i in range(self.config.num_blocks)]

    def __call__(self, x: Array, *, deterministic: bool | None = None, rngs: nnx.Rngs | None = None,
                 return_intermediates: bool = False):
        """``deterministic`` overrides the modules' own for this call; ``rngs`` overrides their
        streams (both as ``nnx.Dropout`` takes them)."""
        cfg = self.config
        check_image_shape(x.shape, cfg, "NHWC")
        inter: dict[str, Array] = {}
        x = self.stem(x.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # raster (h, w) token order, as official
        inter["stem"] = x
        for i, block in enumerate(self.blocks):
            x = block(x, deterministic, rngs)
            inter[f"MixerBlock_{i}"] = x
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
                 dtype: Any = jnp.float32, **overrides) -> MlpMixer:
    """``create_model('B/16', num_classes=10, rngs=nnx.Rngs(0))``: fresh weights (the official
    initialisers: lecun_normal kernels, zero biases and head); overrides are MixerConfig fields
    and ``rngs`` may be an int seed. With ``pretrained`` (True, a tag such as ``'imagenet21k'``,
    or a checkpoint source) the published weights instead: see :func:`from_pretrained`."""
    if pretrained:
        if isinstance(variant, MixerConfig):
            raise ValueError("pretrained=... needs a variant name such as 'B/16', not a MixerConfig")
        return from_pretrained(variant, pretrained, dtype=dtype, rngs=rngs, **overrides)
    cfg = variant.replace(**overrides) if isinstance(variant, MixerConfig) else config_for(variant, **overrides)
    return MlpMixer(cfg, rngs=nnx.Rngs(rngs) if isinstance(rngs, int) else rngs, dtype=dtype)


# --------------------------------------------------------------------------------------
# Load helpers
# --------------------------------------------------------------------------------------


def state_to_flat(model: MlpMixer | nnx.State) -> dict[str, np.ndarray]:
    """A model's parameters (or an ``nnx.State`` of them, e.g. gradients) -> canonical flat numpy
    dict ('/'-joined official names; a model's in model order, as the Linen ``params_to_flat``).
    Non-parameter state (RNG streams) is not included."""
    state = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model
    flat = {"/".join(map(str, path)): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)
            if isinstance(var, nnx.Param)}
    rank = {k: i for i, k in enumerate(param_shapes(model.config))} if isinstance(model, MlpMixer) else {}
    return dict(sorted(flat.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def flat_to_state(flat: Mapping[str, Any], cfg: MixerConfig) -> nnx.State:
    """Canonical flat dict -> the ``nnx.State`` of ``nnx.Param`` that :func:`nnx.merge` takes,
    float32, strictly checked against ``cfg`` (``ParamMismatchError`` lists every bad key)."""
    check_params(flat, cfg)
    return nnx.from_flat_state({tuple(k.split("/")): nnx.Param(jnp.asarray(np.asarray(v), jnp.float32))
                                for k, v in flat.items()})


def abstract_model(cfg: MixerConfig, dtype: Any = jnp.float32) -> MlpMixer:
    """The module tree with shapes only (``nnx.eval_shape``): what loading merges a checkpoint into
    and what training merges its params into."""
    return nnx.eval_shape(lambda: MlpMixer(cfg, rngs=nnx.Rngs(params=0, dropout=0), dtype=dtype))


def from_flat(flat: Mapping[str, Any], cfg: MixerConfig, *, rngs: nnx.Rngs | int = 0,
              dtype: Any = jnp.float32) -> MlpMixer:
    """A model holding ``flat`` (strictly checked), built without random initialisation: the
    module tree comes from ``nnx.eval_shape`` (shapes only) and the checkpoint's arrays become
    its parameters. ``rngs`` seeds the dropout / stochastic-depth streams, if the config has any."""
    params = flat_to_state(flat, cfg)
    abstract = abstract_model(cfg, dtype)
    graphdef, _, rng_state = nnx.split(abstract, nnx.Param, nnx.RngState)
    model = nnx.merge(graphdef, params, rng_state)
    if nnx.to_flat_state(rng_state):  # abstract keys until reseeded: give them real ones
        nnx.reseed(model, dropout=rngs if isinstance(rngs, int) else rngs["dropout"]())
    return model


def from_checkpoint(path, num_classes: int | None | str = "keep", scale: int = 1, variant: str | None = None,
                    dtype: Any = jnp.float32, prefix: str | None = None, image_size=None, *,
                    rngs: nnx.Rngs | int = 0, **overrides) -> MlpMixer:
    """A model from any checkpoint the bridge reads (official .npz, Flax msgpack/orbax incl.
    ``nnx.state`` saves, PyTorch, timm, safetensors), a path or a published name/URL (``B/16-i21k``,
    ``gs://mixer_models/...``, ``hf-hub:timm/...``; downloaded into the cache): optionally a fresh
    head for ``num_classes`` and token-mixing resized for ``scale`` x larger images.
    ``image_size`` (H, W) is the file's, needed only for a non-square patch grid. ``overrides``
    (stoch_depth, dropout_rate) change non-shape fields, their masks seeded by ``rngs``;
    ``prefix`` picks the parameter tree of a file that holds several (e.g. 'params/')."""
    from mixer_convert.load import load_checkpoint, with_overrides

    flat, cfg = load_checkpoint(path, num_classes, scale, variant, image_size=image_size, prefix=prefix)
    return from_flat(flat, with_overrides(cfg, overrides), rngs=rngs, dtype=dtype)


def from_pretrained(model: str, pretrained: bool | str = True, num_classes: int | None | str = "keep",
                    scale: int = 1, dtype: Any = jnp.float32, **overrides) -> MlpMixer:
    """Published weights by name: ``from_pretrained('B/16-i21k')``, ``from_pretrained('B/16',
    'imagenet21k')``, ``from_pretrained('mixer_b16_224')`` (the variant's default file),
    ``from_pretrained('hf-hub:timm/...')``, or any path or URL.
    Tags and defaults: :func:`mixer_convert.catalogue.pretrained_source`."""
    from mixer_convert.catalogue import pretrained_source

    source, variant = pretrained_source(model, pretrained)
    return from_checkpoint(source, num_classes, scale, variant, dtype, **overrides)
