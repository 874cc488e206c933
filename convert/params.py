"""Framework-free checks on flat canonical parameter dicts ('/'-joined official names).

Everything here works on anything with a ``.shape`` (numpy arrays, lazily read tensors,
``jax.ShapeDtypeStruct``), so both models' loaders and every converter share one strict
check and one shape-based config inference.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from mixer_convert.spec import MixerConfig, config_for, param_shapes, variant_name


class ParamMismatchError(ValueError):
    """Parameters do not fit the model; lists every missing, unexpected, mis-shaped and duplicated
    key (``duplicated``: canonical name -> the source keys that all claim it)."""

    def __init__(self, missing: list[str], unexpected: list[str],
                 misshaped: list[tuple[str, tuple, tuple]], what: str = "checkpoint",
                 duplicated: list[tuple[str, list[str]]] | None = None) -> None:
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
        self.duplicated = duplicated or []
        lines = [f"{what} does not match the model:"]
        for key, names in self.duplicated:
            lines.append(f"  duplicated: {key} is given {len(names)} times, as " + ", ".join(map(repr, names)))
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
        for key, got, want in misshaped:
            lines.append(f"  mis-shaped: {key} has {got}, model needs {want}")
        super().__init__("\n".join(lines))


def check_params(flat: Mapping[str, Any], cfg: MixerConfig, what: str = "checkpoint") -> None:
    """Raise :class:`ParamMismatchError` unless ``flat`` has exactly the names and shapes of ``cfg``."""
    want = param_shapes(cfg)
    missing = [k for k in want if k not in flat]
    unexpected = sorted(k for k in flat if k not in want)
    misshaped = [(k, tuple(flat[k].shape), want[k]) for k in want
                 if k in flat and tuple(flat[k].shape) != want[k]]
    if missing or unexpected or misshaped:
        raise ParamMismatchError(missing, unexpected, misshaped, what)


def infer_config(shapes: Mapping[str, Any], image_size: int | tuple[int, int] | None = None,
                 **overrides) -> MixerConfig:
    """Architecture from parameter shapes alone (values may be shapes or arrays).

    The token count S fixes the image size only up to its aspect ratio: a square grid is
    assumed unless ``image_size`` is given, which must give S patches. Raises ValueError naming
    what is missing, or both sizes when ``image_size`` contradicts the weights.
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"not an MLP-Mixer checkpoint: no {key!r} "
                             f"(found {len(shapes)} tensors, e.g. {sorted(shapes)[:5]})")
        v = shapes[key]
        return tuple(v) if isinstance(v, (tuple, list)) else tuple(v.shape)

    ph, pw, in_chans, hidden = shape("stem/kernel")
    blocks = 0
    while f"MixerBlock_{blocks}/LayerNorm_0/scale" in shapes:
        blocks += 1
    if blocks == 0:
        raise ValueError("not an MLP-Mixer checkpoint: no MixerBlock_0 parameters")
    tokens, d_s = shape("MixerBlock_0/token_mixing/Dense_0/kernel")
    _, d_c = shape("MixerBlock_0/channel_mixing/Dense_0/kernel")
    num_classes = shape("head/kernel")[1] if "head/kernel" in shapes else None
    side = math.isqrt(tokens)
    square = side * side == tokens
    if image_size is None:
        if not square:
            raise ValueError(f"checkpoint has {tokens} tokens, not a square grid; pass image_size=(H, W)")
        image_size = (side * ph, side * pw)
    kw = dict(patch_size=(ph, pw), hidden_dim=hidden, num_blocks=blocks, tokens_mlp_dim=d_s,
              channels_mlp_dim=d_c, num_classes=num_classes, image_size=image_size, in_chans=in_chans)
    kw.update(overrides)
    cfg = MixerConfig(**kw)
    if cfg.num_tokens != tokens:
        (h, w), (gh, gw) = cfg.image_size, cfg.grid
        found = f" ({side}x{side} patches: {side * ph}x{side * pw} images)" if square else ""
        k = gh // side if square and gh == gw and gh % side == 0 else 0
        hint = f"; for {h}x{w} images load it with scale={k} (image_size is the checkpoint's own)" if k > 1 else ""
        raise ValueError(f"image_size {h}x{w} does not fit the checkpoint: it gives {gh}x{gw} = {cfg.num_tokens} "
                         f"patches of {ph}x{pw}, the checkpoint has {tokens} tokens{found}{hint}")
    return cfg


def check_variant(inferred: MixerConfig, variant: str) -> None:
    """A user-named variant must agree with what the weights say; otherwise say how they differ."""
    want = config_for(variant)
    diffs = [f"{f}: weights have {getattr(inferred, f)}, {variant} has {getattr(want, f)}"
             for f in ("patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim")
             if getattr(inferred, f) != getattr(want, f)]
    if diffs:
        found = variant_name(inferred) or "a non-standard Mixer"
        raise ValueError(f"checkpoint is {found}, not {variant}: " + "; ".join(diffs))


def random_params(cfg: MixerConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights with O(1) activations everywhere, head included (the official head
    is zero-initialised, which would make any logit comparison vacuous)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shp in param_shapes(cfg).items():
        leaf = key.rsplit("/", 1)[1]
        if leaf == "kernel":
            fan_in = int(np.prod(shp[:-1]))
            arr = rng.standard_normal(shp, dtype=np.float32) * np.float32(1.0 / math.sqrt(fan_in))
        elif leaf == "scale":
            arr = 1.0 + 0.1 * rng.standard_normal(shp, dtype=np.float32)
        else:
            arr = 0.05 * rng.standard_normal(shp, dtype=np.float32)
        out[key] = arr.astype(dtype)
    return out
