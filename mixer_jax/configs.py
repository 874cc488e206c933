"""Named training configs: small typed dataclasses, no exec. ``get_config(name)``."""
from __future__ import annotations

import dataclasses

from mixer_convert.spec import MixerConfig, config_for
from mixer_jax.data import DataConfig
from mixer_jax.train import OptimConfig, TrainConfig


def digits() -> TrainConfig:
    """The embedded default: a small Mixer on scikit-learn's real handwritten digits (8x8,
    upsampled to 32x32, 4x4 patches), a few minutes on a 2-core CPU."""
    return TrainConfig(
        model=MixerConfig(patch_size=4, hidden_dim=128, num_blocks=4, tokens_mlp_dim=64, channels_mlp_dim=256,
                          image_size=32),
        data=DataConfig(name="digits", image_size=32, train_augment="inception_crop", crop_area=(0.5, 1.0)),
        optim=OptimConfig(name="adam", lr=2e-3, weight_decay=1e-4, schedule="cosine", warmup_steps=50,
                          grad_clip=1.0),
        batch_size=128, steps=500, label_smoothing=0.1, eval_every=100, log_every=10, checkpoint_every=100,
    )


def finetune(variant: str = "B/16", dataset: str = "cifar10", image_size: int = 224) -> TrainConfig:
    """vit_jax's fine-tuning recipe (configs/common.py): SGD momentum 0.9, lr 0.03, cosine,
    500 warmup steps, clip 1.0, batch 512, 10k steps, no weight decay. Set init_from."""
    return TrainConfig(model=config_for(variant), data=DataConfig(name=dataset, image_size=image_size),
                       optim=OptimConfig(), batch_size=512, steps=10_000, eval_every=1000)


def pretrain_i1k(variant: str = "B/16") -> TrainConfig:
    """The paper's ImageNet-1k pre-training (big_vision configs/mlp_mixer_i1k.py) without
    RandAugment: Adam (0.9, 0.999), lr 1e-3, decoupled wd 1e-4 on kernels, 10k linear warmup
    then linear decay, batch 4096, clip 1.0, mixup 0.5, stochastic depth 0.1."""
    return TrainConfig(model=config_for(variant, stoch_depth=0.1),
                       data=DataConfig(name="imagenet2012", eval_split="validation", image_size=224),
                       optim=OptimConfig(name="adam", lr=1e-3, weight_decay=1e-4, schedule="linear",
                                         warmup_steps=10_000),
                       batch_size=4096, steps=300 * 1251, mixup_alpha=0.5, eval_every=5000, checkpoint_every=5000)


CONFIGS = {"digits": digits, "finetune": finetune, "pretrain_i1k": pretrain_i1k}


def get_config(name: str) -> TrainConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; expected one of {', '.join(CONFIGS)}")
    return CONFIGS[name]()


def override(cfg, assignments: list[str]):
    """Apply 'a.b=value' strings to a (nested, frozen) dataclass config; values are parsed
    to the field's current type, so typos and bad values fail before anything runs."""
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        cfg = _set(cfg, key.strip().split("."), raw.strip(), key)
    return cfg


def _set(obj, path: list[str], raw: str, full: str):
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise ValueError(f"unknown config key {full!r}; {type(obj).__name__} has {', '.join(sorted(names))}")
    cur = getattr(obj, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(cur):
            raise ValueError(f"{full!r}: {path[0]} is not a section")
        return dataclasses.replace(obj, **{path[0]: _set(cur, path[1:], raw, full)})
    return dataclasses.replace(obj, **{path[0]: _parse(raw, cur, full)})


def _parse(raw: str, current, full: str):
    try:
        if raw.lower() in ("none", "null"):
            return None
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, tuple):
            parts = [p for p in raw.strip("()[] ").split(",") if p.strip()]
            conv = type(current[0]) if current else float
            # one value for a pair field (patch_size=4) stays a scalar; the config expands it
            return conv(parts[0]) if len(parts) == 1 else tuple(conv(p) for p in parts)
        if current is None:  # untyped optional: keep ints as ints
            for conv in (int, float):
                try:
                    return conv(raw)
                except ValueError:
                    pass
        return raw
    except ValueError:
        raise ValueError(f"bad value for {full!r}: {raw!r} (expected {type(current).__name__})") from None
