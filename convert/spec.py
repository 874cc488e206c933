"""Framework-free description of MLP-Mixer: variants, config, canonical parameter names.

The canonical parameter tree is the official Flax one (vit_jax ``models_mixer.py``,
big_vision ``models/mlp_mixer.py``), '/'-joined exactly as in Google's ``.npz`` files.
Both model definitions and every converter are derived from :func:`param_shapes`, so
a name or shape can only be wrong in one place.
"""
from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Any, Iterator

# size -> (hidden C, num_blocks, tokens_mlp_dim D_S, channels_mlp_dim D_C); paper Table 1.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "S": (512, 8, 256, 2048),
    "B": (768, 12, 384, 3072),
    "L": (1024, 24, 512, 4096),
    "H": (1280, 32, 640, 5120),
}
# The published patch sizes; other sizes still build (e.g. tests), but names must be real.
VARIANTS: tuple[str, ...] = ("S/32", "S/16", "S/8", "B/32", "B/16", "L/32", "L/16", "H/14")
# The config fields a variant name fixes (its patch size, then its size's four SIZES).
VARIANT_FIELDS = ("patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim")

LAYERNORM_EPS = 1e-6  # flax.linen.LayerNorm default; the official checkpoints were trained with it.

# 'B/16', 'Mixer-B_16', timm's 'mixer_b16_224' (timm's Mixer models are all 224).
_NAME_RE = re.compile(r"^(?:mixer[-_])?([SBLH])[/_-]?(\d+)(?:_224)?$", re.IGNORECASE)

# timm's names for the variants it has (no S/8, no H/14).
TIMM_NAMES = {"S/32": "mixer_s32_224", "S/16": "mixer_s16_224", "B/32": "mixer_b32_224", "B/16": "mixer_b16_224",
              "L/32": "mixer_l32_224", "L/16": "mixer_l16_224"}


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Everything that fixes the architecture (and so the parameter shapes).

    ``image_size`` is part of the config because the token-mixing weights depend on the
    number of patches S = (H/ph)(W/pw). ``num_classes=None`` means no head (pre-logits).
    ``dropout_rate`` (not in the official model) drops after the GELU and after ``Dense_1``
    of every MLP, with the usual 1/(1-p) rescaling, as the original PyTorch port did.
    ``stoch_depth`` is the big_vision rate: block i drops each residual branch per sample
    with probability ``i/(num_blocks-1) * stoch_depth``, without rescaling.
    """

    patch_size: tuple[int, int] = (16, 16)
    hidden_dim: int = 768
    num_blocks: int = 12
    tokens_mlp_dim: int = 384
    channels_mlp_dim: int = 3072
    num_classes: int | None = 1000
    image_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    stoch_depth: float = 0.0
    dropout_rate: float = 0.0  # not in the official model; the original PyTorch port's `dropout`

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", image_hw(self.patch_size, "patch_size"))
        object.__setattr__(self, "image_size", image_hw(self.image_size, "image_size"))
        for field in ("hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim", "in_chans"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MixerConfig.{field} must be a positive int, got {value!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ValueError(f"MixerConfig.num_classes must be a positive int or None, got {self.num_classes!r}")
        if not 0.0 <= self.stoch_depth < 1.0:
            raise ValueError(f"MixerConfig.stoch_depth must be in [0, 1), got {self.stoch_depth!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"MixerConfig.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        (h, w), (ph, pw) = self.image_size, self.patch_size
        if h % ph or w % pw:
            raise ValueError(
                f"image_size {h}x{w} is not divisible by patch_size {ph}x{pw}; "
                f"use a multiple of the patch size (e.g. {h - h % ph or ph}x{w - w % pw or pw})")

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along (height, width)."""
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def num_tokens(self) -> int:
        gh, gw = self.grid
        return gh * gw

    def replace(self, **changes) -> "MixerConfig":
        return dataclasses.replace(self, **changes)


def image_hw(size, what: str = "image_size") -> tuple[int, int]:
    """An image (or patch) size as ``(height, width)``: an int ``n`` is ``(n, n)``, a pair is
    ``(h, w)``. The one normaliser of sizes in the package; anything else is one error naming ``what``."""
    try:
        h, w = (size, size) if isinstance(size, numbers.Integral) else size
    except (TypeError, ValueError):
        h = w = None
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise ValueError(f"{what} must be a positive int or a pair of positive ints (height, width), got {size!r}")
    return int(h), int(w)


def parse_variant(name: str) -> tuple[str, int]:
    """'B/16', 'Mixer-B_16', timm's 'mixer_b16_224' -> ('B', 16). Unknown names raise ValueError."""
    m = _NAME_RE.match(name.strip()) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"unknown Mixer variant {name!r}; expected one of {', '.join(VARIANTS)} "
                         "(also written like 'Mixer-B_16' or 'mixer_b16_224')")
    size, patch = m.group(1).upper(), int(m.group(2))
    if f"{size}/{patch}" not in VARIANTS:
        raise ValueError(f"unknown Mixer variant {name!r} ({size}/{patch}); expected one of {', '.join(VARIANTS)}")
    return size, patch


def variant_dims(variant: str) -> dict[str, Any]:
    """The config fields (:data:`VARIANT_FIELDS`) a variant name fixes, e.g. 'B/16' ->
    ``{'patch_size': (16, 16), 'hidden_dim': 768, 'num_blocks': 12, ...}``."""
    size, patch = parse_variant(variant)
    return dict(zip(VARIANT_FIELDS, ((patch, patch), *SIZES[size])))


def config_for(variant: str, **overrides) -> MixerConfig:
    """The config of a named variant, e.g. ``config_for('B/16', num_classes=10, image_size=384)``."""
    return MixerConfig(**{**variant_dims(variant), **overrides})


def variant_name(cfg: MixerConfig) -> str | None:
    """The published variant a config matches (size and patch), or None."""
    for name in VARIANTS:
        if all(getattr(cfg, field) == value for field, value in variant_dims(name).items()):
            return name
    return None


def check_image_shape(shape: tuple[int, ...], cfg: MixerConfig, layout: str) -> None:
    """Clear errors for images the model cannot take; both models call this (layout NHWC or NCHW)."""
    if len(shape) != 4:
        raise ValueError(f"expected a batch of images with 4 dims ({layout}), got shape {tuple(shape)}")
    h, w, c = (shape[1], shape[2], shape[3]) if layout == "NHWC" else (shape[2], shape[3], shape[1])
    if c != cfg.in_chans:
        raise ValueError(f"expected {cfg.in_chans} input channels ({layout}), got {c} in shape {tuple(shape)}")
    ph, pw = cfg.patch_size
    if h % ph or w % pw:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
    if (h, w) != cfg.image_size:
        raise ValueError(f"image size {h}x{w} does not match the model's {cfg.image_size[0]}x{cfg.image_size[1]}: "
                         "token-mixing weights fix the number of patches; resize the images, or build the "
                         "model for this size (mixer_convert.resize for integer scales)")


# --------------------------------------------------------------------------------------
# Canonical parameter tree
# --------------------------------------------------------------------------------------

def _mlp(prefix: str, dim: int, hidden: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{prefix}/Dense_0/kernel", (dim, hidden)
    yield f"{prefix}/Dense_0/bias", (hidden,)
    yield f"{prefix}/Dense_1/kernel", (hidden, dim)
    yield f"{prefix}/Dense_1/bias", (dim,)


def _layernorm(prefix: str, dim: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{prefix}/scale", (dim,)
    yield f"{prefix}/bias", (dim,)


def param_shapes(cfg: MixerConfig) -> dict[str, tuple[int, ...]]:
    """Official '/'-joined parameter names -> shapes, in model order."""
    (ph, pw), c, s = cfg.patch_size, cfg.hidden_dim, cfg.num_tokens
    out: dict[str, tuple[int, ...]] = {
        "stem/kernel": (ph, pw, cfg.in_chans, c),  # HWIO
        "stem/bias": (c,),
    }
    for i in range(cfg.num_blocks):
        b = f"MixerBlock_{i}"
        out.update(_layernorm(f"{b}/LayerNorm_0", c))
        out.update(_mlp(f"{b}/token_mixing", s, cfg.tokens_mlp_dim))
        out.update(_layernorm(f"{b}/LayerNorm_1", c))
        out.update(_mlp(f"{b}/channel_mixing", c, cfg.channels_mlp_dim))
    out.update(_layernorm("pre_head_layer_norm", c))
    if cfg.num_classes is not None:
        out["head/kernel"] = (c, cfg.num_classes)
        out["head/bias"] = (cfg.num_classes,)
    return out


_CANONICAL_RE = re.compile(
    r"(?:stem/(?:kernel|bias)|head/(?:kernel|bias)|pre_head_layer_norm/(?:scale|bias)"
    r"|MixerBlock_\d+/(?:LayerNorm_[01]/(?:scale|bias)|(?:token|channel)_mixing/Dense_[01]/(?:kernel|bias)))")


def is_canonical_name(key: str) -> bool:
    """Whether ``key`` names a parameter of some Mixer (any config)."""
    return _CANONICAL_RE.fullmatch(key) is not None


def num_params(cfg: MixerConfig) -> int:
    total = 0
    for shape in param_shapes(cfg).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def forward_flops(cfg: MixerConfig) -> int:
    """Multiply-adds x 2 of one image's forward pass (matmuls only; norms and GELU are O(S*C)).
    A training step computes about 3x this per image (the backward pass is two matmuls per one)."""
    (ph, pw), c, s = cfg.patch_size, cfg.hidden_dim, cfg.num_tokens
    stem = s * ph * pw * cfg.in_chans * c
    block = c * (2 * s * cfg.tokens_mlp_dim) + s * (2 * c * cfg.channels_mlp_dim)
    head = c * (cfg.num_classes or 0)
    return 2 * (stem + cfg.num_blocks * block + head)


# Names of the per-block outputs both models can return, in order; parity reports use them.
def intermediate_names(cfg: MixerConfig) -> list[str]:
    return ["stem"] + [f"MixerBlock_{i}" for i in range(cfg.num_blocks)] + ["pre_logits"] + (
        ["logits"] if cfg.num_classes is not None else [])


def block_drop_rates(cfg: MixerConfig) -> list[float]:
    """big_vision's linear stochastic-depth ramp: 0 for the first block, ``stoch_depth`` for the last."""
    return [i / max(cfg.num_blocks - 1, 1) * cfg.stoch_depth for i in range(cfg.num_blocks)]
