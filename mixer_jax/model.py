"""MLP-Mixer in Flax linen, parameter tree identical to Google's official checkpoints.

Sections: blocks, model, variant factory, load helpers (same order as mixer_torch/model.py).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from mixer_convert.params import check_params
from mixer_convert.spec import LAYERNORM_EPS, MixerConfig, block_drop_rates, check_image_shape, config_for
from mixer_jax.stacking import STACKED

Array = jax.Array

# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------


class MlpBlock(nn.Module):
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        y = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
        y = nn.gelu(y, approximate=True)  # the official checkpoints were trained with tanh GELU
        y = nn.Dropout(self.dropout_rate)(y, deterministic)
        y = nn.Dense(x.shape[-1], dtype=self.dtype)(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic)


class MixerBlock(nn.Module):
    tokens_mlp_dim: int
    channels_mlp_dim: int
    drop_p: float = 0.0
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    def _keep(self, x: Array, deterministic: bool, drop_p) -> Array | float:
        # big_vision stochastic depth: a per-sample mask on each residual branch, no 1/(1-p) rescale.
        if deterministic or not self.drop_p:
            return 1.0
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return 1.0 - jax.random.bernoulli(self.make_rng("dropout"), drop_p, shape).astype(x.dtype)

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True, drop_p: Array | None = None) -> Array:
        """``drop_p`` (a scanned model's: each block's rate as data) replaces ``self.drop_p``,
        which then only says whether there is stochastic depth at all."""
        drop_p = self.drop_p if drop_p is None else drop_p
        y = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=self.dtype)(x)
        y = jnp.swapaxes(y, 1, 2)
        y = MlpBlock(self.tokens_mlp_dim, self.dropout_rate, self.dtype, name="token_mixing")(y, deterministic)
        y = jnp.swapaxes(y, 1, 2)
        x = x + y * self._keep(x, deterministic, drop_p)
        y = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=self.dtype)(x)
        y = MlpBlock(self.channels_mlp_dim, self.dropout_rate, self.dtype, name="channel_mixing")(y, deterministic)
        return x + y * self._keep(x, deterministic, drop_p)


def remat_policy(name: str) -> Callable | None:
    """``model.remat``'s policy: 'block' saves nothing inside a block (only its input), any other
    name is one of ``jax.checkpoint_policies``."""
    return jax.checkpoint_policies.nothing_saveable if name == "block" else getattr(jax.checkpoint_policies, name)


def _scan_body(block: MixerBlock, x: Array, drop_p: Array, deterministic: bool, keep: bool):
    x = block(x, deterministic, drop_p)
    return x, (x if keep else None)  # every block's output only when asked for: N activations


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class MlpMixer(nn.Module):
    """Input NHWC images of ``config.image_size``; output logits (or pre-logits when
    ``num_classes`` is None). ``dtype`` is the compute dtype; parameters stay float32.

    With ``return_intermediates=True`` returns ``(out, {name: array})`` where the names are
    ``mixer_convert.spec.intermediate_names(config)`` (stem tokens, every block's output,
    pre-logits, logits), the same as the PyTorch model returns.

    For scale (training; each changes how the function is computed, not the function):
    ``scan`` runs the blocks as one ``nn.scan`` over parameters stacked under ``MixerBlock``
    (:mod:`mixer_jax.stacking` converts to and from the official layout); ``remat`` recomputes
    each block in the backward pass ('block', or a ``jax.checkpoint_policies`` name; 'none'
    keeps everything); ``placement`` keeps the batch split over the mesh between blocks and
    gathers each block's weights where used (:class:`mixer_jax.sharding.Placement`, FSDP).
    """

    config: MixerConfig
    dtype: Any = jnp.float32
    scan: bool = False
    remat: str = "none"
    # A mixer_jax.sharding.Placement (training's; any object with batch(x) and gathered(tree)).
    placement: Any = None

    def _block_type(self) -> type:
        block = MixerBlock
        if self.placement is not None and not self.is_initializing():
            block = nn.map_variables(block, "params", trans_in_fn=self.placement.gathered)
        if self.remat != "none":
            # deterministic (argument 2, counting the module) is a Python bool; the scan's
            # loop already keeps XLA from merging recomputations across blocks.
            block = nn.remat(block, policy=remat_policy(self.remat), static_argnums=(2,), prevent_cse=not self.scan)
        return block

    def _blocks(self, x: Array, train: bool, inter: dict[str, Array] | None) -> Array:
        cfg, block = self.config, self._block_type()
        rates = block_drop_rates(cfg)
        dims = (cfg.tokens_mlp_dim, cfg.channels_mlp_dim)
        if not self.scan:
            for i, drop_p in enumerate(rates):
                x = block(*dims, drop_p, cfg.dropout_rate, self.dtype, name=f"MixerBlock_{i}")(x, not train)
                x = self._placed(x)
                if inter is not None:
                    inter[f"MixerBlock_{i}"] = x
            return x
        scanned = nn.scan(_scan_body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                          in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.num_blocks)
        # drop_p: only whether there is stochastic depth; each block's rate comes in as data.
        x, ys = scanned(block(*dims, max(rates, default=0.0), cfg.dropout_rate, self.dtype, name=STACKED), x,
                        jnp.asarray(rates, jnp.float32), not train, inter is not None)
        if inter is not None:
            inter.update({f"MixerBlock_{i}": ys[i] for i in range(cfg.num_blocks)})
        return self._placed(x)

    def _placed(self, x: Array) -> Array:
        return x if self.placement is None else self.placement.batch(x)

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False, return_intermediates: bool = False):
        cfg = self.config
        check_image_shape(x.shape, cfg, "NHWC")
        inter: dict[str, Array] = {}
        x = nn.Conv(cfg.hidden_dim, cfg.patch_size, strides=cfg.patch_size, padding="VALID",
                    dtype=self.dtype, name="stem")(x.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # raster (h, w) token order, as official
        inter["stem"] = x = self._placed(x)
        x = self._blocks(x, train, inter if return_intermediates else None)
        x = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=self.dtype, name="pre_head_layer_norm")(x)
        x = jnp.mean(x, axis=1)
        inter["pre_logits"] = x
        if cfg.num_classes is not None:
            x = nn.Dense(cfg.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head")(x)
            inter["logits"] = x
        return (x, inter) if return_intermediates else x


# --------------------------------------------------------------------------------------
# Variant factory
# --------------------------------------------------------------------------------------


def create_model(variant: str | MixerConfig = "B/16", dtype: Any = jnp.float32, **overrides) -> MlpMixer:
    """``create_model('B/16', num_classes=10)``; overrides are MixerConfig fields. A Flax module
    holds no weights: published ones come with it from :func:`from_pretrained`."""
    if "pretrained" in overrides:
        raise TypeError("a Flax module holds no weights; use mixer_jax.from_pretrained(variant, tag) "
                        "-> (model, params)")
    cfg = variant.replace(**overrides) if isinstance(variant, MixerConfig) else config_for(variant, **overrides)
    return MlpMixer(cfg, dtype=dtype)


def init_params(model: MlpMixer, rng: Array | int = 0) -> dict:
    """Fresh parameters (official initialisers: lecun_normal kernels, zero biases and head)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    cfg = model.config
    dummy = jnp.zeros((1, *cfg.image_size, cfg.in_chans), jnp.float32)
    return jax.jit(model.init)(rng, dummy)["params"]


# --------------------------------------------------------------------------------------
# Load helpers
# --------------------------------------------------------------------------------------


def params_from_flat(flat: Mapping[str, Any], cfg: MixerConfig, dtype: Any = jnp.float32) -> dict:
    """Canonical flat dict ('/'-joined keys) -> nested Flax params, strictly checked."""
    check_params(flat, cfg)
    return unflatten_dict({tuple(k.split("/")): jnp.asarray(np.asarray(v), dtype) for k, v in flat.items()})


def params_to_flat(params: Mapping) -> dict[str, np.ndarray]:
    """Nested Flax params -> canonical flat numpy dict (accepts a ``{'params': ...}`` wrapper)."""
    if set(params) == {"params"}:
        params = params["params"]
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(dict(params)).items()}


def from_checkpoint(path, num_classes: int | None | str = "keep", scale: int = 1, variant: str | None = None,
                    dtype: Any = jnp.float32, prefix: str | None = None, image_size=None,
                    **overrides) -> tuple[MlpMixer, dict]:
    """(model, params) from any checkpoint the bridge reads (official .npz, Flax, PyTorch,
    timm, safetensors), a path or a published name/URL (``B/16-i21k``, ``gs://mixer_models/...``,
    ``hf-hub:timm/...``; downloaded into the cache): optionally a fresh head for ``num_classes``
    and token-mixing resized for ``scale`` x larger images. The params are built straight from
    the checkpoint (no ``model.init``). ``image_size`` (H, W) is the file's, needed only for a
    non-square patch grid. ``overrides`` (stoch_depth, dropout_rate) change non-shape fields;
    ``prefix`` picks the parameter tree of a file that holds several (e.g. 'params/')."""
    from mixer_convert.load import load_checkpoint, with_overrides

    flat, cfg = load_checkpoint(path, num_classes, scale, variant, image_size=image_size, prefix=prefix)
    cfg = with_overrides(cfg, overrides)
    return MlpMixer(cfg, dtype=dtype), params_from_flat(flat, cfg)


def from_pretrained(model: str, pretrained: bool | str = True, num_classes: int | None | str = "keep",
                    scale: int = 1, dtype: Any = jnp.float32, **overrides) -> tuple[MlpMixer, dict]:
    """(model, params) for published weights by name: ``from_pretrained('B/16-i21k')``,
    ``from_pretrained('B/16', 'imagenet21k')``, ``from_pretrained('mixer_b16_224')`` (the
    variant's default file), ``from_pretrained('hf-hub:timm/...')``, or any path or URL.
    Tags and defaults: :func:`mixer_convert.catalogue.pretrained_source`."""
    from mixer_convert.catalogue import pretrained_source

    source, variant = pretrained_source(model, pretrained)
    return from_checkpoint(source, num_classes, scale, variant, dtype, **overrides)
