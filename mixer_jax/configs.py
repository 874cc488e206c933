"""Training configs: the typed dataclasses (TrainConfig, OptimConfig, DataConfig), their
validation, the named recipes (``get_config(name)``) and ``--set`` overrides. No exec, no
framework imports: a config can be built and checked before anything is compiled."""
from __future__ import annotations

import dataclasses
import math
import os

from mixer_convert.hub import is_remote
from mixer_convert.spec import MixerConfig, config_for

AUGMENTS = ("inception_crop_flip", "inception_crop", "none")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # 'digits', 'imagefolder', or a tfds dataset name ('cifar10', 'imagenet2012', ...)
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int | tuple[int, int] = 224
    # 'inception_crop_flip' is the official train preprocessing; flips are wrong for digits.
    train_augment: str = "inception_crop_flip"
    crop_area: tuple[float, float] = (0.05, 1.0)
    # Input workers (mixer_jax/input_pipeline.py): None = one per core; 0 = in the training
    # thread (for debugging). Threads: Pillow and OpenCV release the GIL while decoding and
    # resizing, and threads cost no start-up or copies (benchmarks/RESULTS.md, "Input pipeline").
    workers: int | None = None
    worker_type: str = "thread"  # 'thread' | 'process'
    # Decode a JPEG at 1/2, 1/4 or 1/8 scale when the kept region is downscaled at least that much.
    jpeg_draft: bool = True
    # Unreadable examples: False stops the run naming the file; True replaces each (training) by
    # the next readable example, or leaves it out (eval), and reports and counts it.
    skip_bad: bool = False


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Defaults: vit_jax's fine-tuning recipe (SGD momentum 0.9, lr 0.03, cosine, 500 warmup, clip 1)."""

    name: str = "sgd"  # 'sgd' | 'adam'
    lr: float = 0.03
    momentum: float = 0.9
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0  # decoupled (multiplied by the lr schedule), kernels only
    schedule: str = "cosine"  # 'cosine' | 'linear' (decay to 0 after warmup)
    warmup_steps: int = 500
    grad_clip: float = 1.0  # global norm; 0 disables


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # The architecture; its num_classes and image_size are replaced by the data's. With
    # init_from, the checkpoint's architecture wins and only stoch_depth/dropout_rate are used.
    model: MixerConfig = dataclasses.field(default_factory=lambda: config_for("B/16"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    batch_size: int = 512  # global, per optimizer step
    accum_steps: int = 1  # micro-batches per step (batch_size / accum_steps each)
    steps: int = 10_000
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # 0 disables; mixes each batch with its reverse (big_vision)
    compute_dtype: str = "float32"  # or 'bfloat16' (params and optimizer stay float32)
    seed: int = 0
    eval_every: int = 1000  # 0: only at the end
    log_every: int = 50
    checkpoint_every: int = 1000  # 0: only at the end
    keep_checkpoints: int = 2
    init_from: str | None = None  # any checkpoint the bridge reads (.npz, ..., or a name like B/16-i21k)
    resize_scale: int = 1  # fine-tune at K x the checkpoint's resolution (paper appendix C)
    export_torch: bool = False  # write model.pt (our PyTorch naming) at the end; needs torch
    eval_batch_size: int = 0  # 0: batch_size / accum_steps


# ---- validation -------------------------------------------------------------------------------

# (key, test, allowed range as shown to the user). Every value a user can set is covered, so a bad
# one fails here, naming the key, before any data is read or anything is compiled.
def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int_at_least(lo: int):
    return lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= lo


_CHECKS: tuple[tuple[str, object, str], ...] = (
    ("batch_size", _int_at_least(1), "an integer >= 1"),
    ("accum_steps", _int_at_least(1), "an integer >= 1"),
    ("steps", _int_at_least(0), "an integer >= 0 (0: evaluate init_from or the latest checkpoint)"),
    ("label_smoothing", lambda x: _finite(x) and 0 <= x < 1, "a number in [0, 1)"),
    ("mixup_alpha", lambda x: _finite(x) and x >= 0, "a finite number >= 0 (0 disables)"),
    ("compute_dtype", lambda x: x in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
    ("seed", _int_at_least(0), "an integer >= 0"),
    ("eval_every", _int_at_least(0), "an integer >= 0 (0: only at the end)"),
    ("log_every", _int_at_least(1), "an integer >= 1"),
    ("checkpoint_every", _int_at_least(0), "an integer >= 0 (0: only at the end)"),
    ("keep_checkpoints", _int_at_least(1), "an integer >= 1"),
    ("init_from", lambda x: x is None or (isinstance(x, str) and x != ""), "a checkpoint path or name, or none"),
    ("resize_scale", _int_at_least(1), "an integer >= 1"),
    ("export_torch", lambda x: isinstance(x, bool), "true or false"),
    ("eval_batch_size", _int_at_least(0), "an integer >= 0 (0: batch_size / accum_steps)"),
    ("optim.name", lambda x: x in ("sgd", "adam"), "'sgd' or 'adam'"),
    ("optim.lr", lambda x: _finite(x) and x > 0, "a finite number > 0"),
    ("optim.momentum", lambda x: _finite(x) and 0 <= x < 1, "a number in [0, 1) (0: plain SGD)"),
    ("optim.b1", lambda x: _finite(x) and 0 <= x < 1, "a number in [0, 1)"),
    ("optim.b2", lambda x: _finite(x) and 0 <= x < 1, "a number in [0, 1)"),
    ("optim.weight_decay", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("optim.schedule", lambda x: x in ("cosine", "linear"), "'cosine' or 'linear'"),
    ("optim.warmup_steps", _int_at_least(0), "an integer >= 0"),
    ("optim.grad_clip", lambda x: _finite(x) and x >= 0, "a finite number >= 0 (0 disables)"),
    ("data.name", lambda x: isinstance(x, str) and x != "", "'digits', 'imagefolder' or a tfds dataset name"),
    ("data.train_augment", lambda x: x in AUGMENTS, " or ".join(map(repr, AUGMENTS))),
    ("data.workers", lambda x: x is None or _int_at_least(0)(x), "an integer >= 0 (0: in-process) or none (one per core)"),
    ("data.worker_type", lambda x: x in ("thread", "process"), "'thread' or 'process'"),
    ("data.jpeg_draft", lambda x: isinstance(x, bool), "true or false"),
    ("data.skip_bad", lambda x: isinstance(x, bool), "true or false"),
    ("data.crop_area", lambda x: isinstance(x, tuple) and len(x) == 2 and all(map(_finite, x))
     and 0 < x[0] <= x[1] <= 1, "two numbers lo,hi with 0 < lo <= hi <= 1"),
    ("data.image_size", lambda x: _int_at_least(1)(x) or (isinstance(x, tuple) and len(x) == 2
                                                        and all(map(_int_at_least(1), x))),
     "a positive integer or H,W"),
)
_SECTIONS = {"model": MixerConfig, "data": DataConfig, "optim": OptimConfig}


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: TrainConfig, num_devices: int, process_count: int = 1) -> None:
    """Every config error we can find, each naming its key and the allowed range, before any
    data is read or anything is compiled."""
    errors = [f"{name} must be a section ({cls.__name__}); set its fields, e.g. {name}.{dataclasses.fields(cls)[0].name}=..."
              for name, cls in _SECTIONS.items() if not isinstance(getattr(cfg, name), cls)]
    if errors:
        raise ValueError("bad training config: " + "; ".join(errors))
    for key, ok, allowed in _CHECKS:
        value = _get(cfg, key)
        if not ok(value):
            errors.append(f"{key} must be {allowed}, got {value!r}")
    if isinstance(cfg.init_from, str) and cfg.init_from and not is_remote(cfg.init_from) \
            and not os.path.exists(os.path.expanduser(cfg.init_from)):
        errors.append(f"init_from {cfg.init_from!r} does not exist (a checkpoint file, or a published name such as "
                      "B/16-i21k: mixer-convert --list)")
    if not errors:
        micro = cfg.batch_size // cfg.accum_steps
        if cfg.batch_size % cfg.accum_steps:
            errors.append(f"batch_size {cfg.batch_size} is not divisible by accum_steps {cfg.accum_steps}")
        elif micro % num_devices:
            errors.append(f"micro-batch {micro} (batch_size/accum_steps) is not divisible by the {num_devices} devices")
        eb = cfg.eval_batch_size or micro
        if eb % num_devices or eb % process_count:
            errors.append(f"eval batch {eb} is not divisible by the {num_devices} devices")
    if errors:
        raise ValueError("bad training config: " + "; ".join(errors))


def expand_paths(cfg: TrainConfig) -> TrainConfig:
    """``~`` in any path the user gives is their home, as in a shell."""
    init = os.path.expanduser(cfg.init_from) if cfg.init_from else cfg.init_from
    data_dir = os.path.expanduser(cfg.data.data_dir) if cfg.data.data_dir else cfg.data.data_dir
    return dataclasses.replace(cfg, init_from=init, data=dataclasses.replace(cfg.data, data_dir=data_dir))


def data_errors(d: DataConfig) -> list[str]:
    errors = []
    if d.workers is not None and d.workers < 0:
        errors.append(f"data.workers must be >= 0 (0: in the training thread) or none (one per core), got {d.workers}")
    if d.worker_type not in ("thread", "process"):
        errors.append(f"data.worker_type must be 'thread' or 'process', got {d.worker_type!r}")
    if d.train_augment not in AUGMENTS:
        errors.append(f"data.train_augment must be one of {AUGMENTS}, got {d.train_augment!r}")
    lo, hi = d.crop_area
    if not 0 < lo <= hi <= 1:
        errors.append(f"data.crop_area must satisfy 0 < min <= max <= 1, got {d.crop_area}")
    return errors


# ---- named recipes --------------------------------------------------------------------------


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


# Model fields that another source decides: a --set of one would be silently overwritten.
_DECIDED_BY_DATA = {"model.num_classes": "the dataset's number of classes",
                    "model.image_size": "data.image_size (set that instead)"}
_KEPT_WITH_INIT_FROM = {"model.stoch_depth", "model.dropout_rate"}


def override(cfg, assignments: list[str]):
    """Apply 'a.b=value' strings to a (nested, frozen) dataclass config; values are parsed
    to the field's current type, so typos and bad values fail before anything runs. A key whose
    value another source decides (the data, or ``init_from``'s checkpoint) is refused, saying
    which source wins."""
    keys = []
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        cfg = _set(cfg, key.split("."), raw.strip(), key)
        keys.append(key)
    _check_decided(cfg, keys)
    return cfg


def _check_decided(cfg, keys: list[str]) -> None:
    for key in keys:
        if key in _DECIDED_BY_DATA:
            raise ValueError(f"{key} cannot be set: it is decided by {_DECIDED_BY_DATA[key]}")
        if key.startswith("model.") and key not in _KEPT_WITH_INIT_FROM and getattr(cfg, "init_from", None):
            raise ValueError(f"{key} cannot be set together with init_from: the checkpoint decides the "
                             f"architecture; only {', '.join(sorted(_KEPT_WITH_INIT_FROM))} apply")


def _set(obj, path: list[str], raw: str, full: str):
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise ValueError(f"unknown config key {full!r}; {type(obj).__name__} has {', '.join(sorted(names))}")
    cur = getattr(obj, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(cur):
            raise ValueError(f"{full!r}: {path[0]} is not a section")
        return dataclasses.replace(obj, **{path[0]: _set(cur, path[1:], raw, full)})
    if dataclasses.is_dataclass(cur):
        first = dataclasses.fields(cur)[0].name
        raise ValueError(f"{full!r} is a section, not a value; set its fields, e.g. {full}.{first}=...")
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
