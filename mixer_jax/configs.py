"""Training configs: the typed dataclasses (TrainConfig, ModelConfig, OptimConfig, DataConfig),
their validation, the named recipes (``get_config(name)``), ``--set`` overrides, and
``architecture``: the one place where the model section, the data's image size and the data's
number of classes (or an ``init_from`` checkpoint) become the MixerConfig that is trained. No exec,
no framework imports: a config can be built and checked before anything is compiled."""
from __future__ import annotations

import dataclasses
import math
import os

from mixer_convert.hub import is_remote
from mixer_convert.images import WORKER_TYPES
from mixer_convert.spec import VARIANT_FIELDS, MixerConfig, image_hw, parse_variant, variant_dims, variant_name

AUGMENTS = ("inception_crop_flip", "inception_crop", "none")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # 'digits', 'imagefolder', or a tfds dataset name ('cifar10', 'imagenet2012', ...)
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int | tuple[int, int] = 224  # (H, W) or one side; the model's too (architecture)
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
    # 0: the data's own number of classes. --compile-only reads no data and needs it given; a run
    # that reads data checks it.
    num_classes: int = 0


# The fields a variant name fixes (the spec's); without a variant all of them are given.
DIMENSIONS = VARIANT_FIELDS
COMPUTE_DTYPES = ("float32", "bfloat16")
# model.remat: 'none', 'block' (recompute each block; saves only its input), or one of these
# jax.checkpoint_policies (those that take no arguments; tests/test_configs.py checks the names).
REMAT_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
REMAT_NAMES = ("none", "block", *REMAT_POLICIES)
MODEL_API_NAMES = ("linen", "nnx")  # Flax's two module APIs (mixer_jax.steps.MODEL_APIS); the same model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What the user chooses about the model: a published variant or its dimensions, the
    regularisation, the compute dtype and the Flax API. The number of classes comes from the data, the image
    size from ``data.image_size`` (:func:`architecture`). A variant fills in its dimensions, so
    they can always be read (``cfg.model.hidden_dim``); a dimension that contradicts it is an error.
    ``--set model.variant=S/16`` replaces the dimensions; ``--set model.hidden_dim=...`` keeps the
    others and drops the variant name (the model is no longer that variant)."""

    variant: str | None = "B/16"  # 'S/32' ... 'H/14', or None with every dimension given
    patch_size: int | tuple[int, int] | None = None
    hidden_dim: int | None = None
    num_blocks: int | None = None
    tokens_mlp_dim: int | None = None
    channels_mlp_dim: int | None = None
    stoch_depth: float = 0.0  # big_vision's rate for the last block (linear ramp from 0)
    dropout_rate: float = 0.0
    compute_dtype: str = "float32"  # or 'bfloat16' (params and optimizer stay float32)
    # 'linen' (mixer_jax.model) or 'nnx' (mixer_jax.nnx): bit-identical models, the same params
    # tree, initial weights and checkpoints; only the code that runs differs.
    api: str = "linen"
    # For scale (the same function, computed otherwise): recompute each block in the backward
    # pass ('block' or a policy of REMAT_POLICIES), and run the blocks as one scanned layer
    # (compiled once, not N times). Checkpoints keep the official per-block names either way.
    remat: str = "none"
    scan: bool = False

    def __post_init__(self) -> None:
        if self.patch_size is not None:
            object.__setattr__(self, "patch_size", image_hw(self.patch_size, "model.patch_size"))
        if self.variant is None:
            missing = [f"model.{d}" for d in DIMENSIONS if getattr(self, d) is None]
            if missing:
                raise ValueError(f"without model.variant, {', '.join(missing)} must be given (or set model.variant)")
            return
        try:
            size, patch = parse_variant(self.variant)
        except ValueError as e:
            raise ValueError(f"model.variant: {e}") from None
        object.__setattr__(self, "variant", f"{size}/{patch}")  # 'mixer_b16_224' is saved as 'B/16'
        wanted = variant_dims(self.variant)
        for d, value in wanted.items():
            if getattr(self, d) is None:
                object.__setattr__(self, d, value)
            elif getattr(self, d) != value:
                raise ValueError(f"model.{d}={getattr(self, d)!r} contradicts model.variant={self.variant!r} "
                                 f"({value!r}); give the variant or the dimensions")

    def with_field(self, name: str, value) -> "ModelConfig":
        """This config with one field set the way ``--set`` means it (see the class docstring)."""
        if name == "variant":
            return dataclasses.replace(self, variant=value, **dict.fromkeys(DIMENSIONS))
        if name in DIMENSIONS:
            return dataclasses.replace(self, variant=None, **{name: value})
        return dataclasses.replace(self, **{name: value})


def mesh_shape(data: int, fsdp: int, devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes of the mesh over ``devices``; -1 is the rest of them. Where both are -1
    (``--set mesh.fsdp=-1`` over the default data=-1) fsdp takes them all."""
    if data == -1 and fsdp == -1:
        data = 1
    known = (data if data != -1 else 1) * (fsdp if fsdp != -1 else 1)
    if devices % known:
        raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} does not divide the {devices} devices")
    data, fsdp = (devices // known if data == -1 else data), (devices // known if fsdp == -1 else fsdp)
    if data * fsdp != devices:
        raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} is {data * fsdp} devices; there are {devices} "
                         "(-1: the rest of them)")
    return data, fsdp


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The devices as a ``data`` x ``fsdp`` mesh (mixer_jax/sharding.py); -1 is the rest of them
    (``mesh.fsdp=-1`` alone: every device in fsdp).
    The batch is split over both; the parameters and optimizer state over ``fsdp`` (FSDP: each
    array of at least ``fsdp_min_mib`` split along its largest divisible dimension, gathered per
    block where used). The default is all data parallel, every device holding the whole state."""

    data: int = -1
    fsdp: int = 1
    fsdp_min_mib: float = 4.0  # big_vision's min_size_to_shard_mb: smaller arrays stay replicated


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
    # With init_from, the checkpoint's architecture wins; only the regularisation, the compute
    # dtype and the api of the model section apply.
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    batch_size: int = 512  # global, per optimizer step
    accum_steps: int = 1  # micro-batches per step (batch_size / accum_steps each)
    steps: int = 10_000
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # 0 disables; mixes each batch with its reverse (big_vision)
    seed: int = 0
    eval_every: int = 1000  # 0: only at the end
    log_every: int = 50
    checkpoint_every: int = 1000  # 0: only at the end
    keep_checkpoints: int = 2
    init_from: str | None = None  # any checkpoint the bridge reads (.npz, ..., or a name like B/16-i21k)
    # NaN/Inf in init_from's weights are refused at load (a run from them only trains to "loss is nan").
    init_allow_nonfinite: bool = False
    resize_scale: int = 1  # fine-tune at K x the checkpoint's resolution (paper appendix C)
    export_torch: bool = False  # write model.pt (our PyTorch naming) at the end; needs torch
    eval_batch_size: int = 0  # 0: batch_size / accum_steps


def architecture(cfg: TrainConfig, num_classes: int, checkpoint: MixerConfig | None = None) -> MixerConfig:
    """The MixerConfig to train, decided here only: the image size is ``data.image_size``, the
    head has the data's ``num_classes``; the rest is the model section's choice, or, with a
    ``checkpoint`` (init_from's, already resized and given its head), the checkpoint's, which must
    then be for ``data.image_size`` images. The model section's regularisation applies to both."""
    image_size = image_hw(cfg.data.image_size, "data.image_size")
    m = cfg.model
    regularisation = dict(stoch_depth=m.stoch_depth, dropout_rate=m.dropout_rate)
    if checkpoint is None:
        return MixerConfig(**{d: getattr(m, d) for d in DIMENSIONS}, num_classes=num_classes,
                           image_size=image_size, **regularisation)
    if checkpoint.image_size != image_size:
        raise ValueError(f"checkpoint {cfg.init_from} is for {checkpoint.image_size} images (after resize_scale "
                         f"{cfg.resize_scale}); data.image_size is {image_size}")
    if checkpoint.num_classes != num_classes:
        raise ValueError(f"checkpoint {cfg.init_from} has a head for {checkpoint.num_classes} classes; "
                         f"the data has {num_classes}")
    return checkpoint.replace(**regularisation)


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
    ("seed", _int_at_least(0), "an integer >= 0"),
    ("eval_every", _int_at_least(0), "an integer >= 0 (0: only at the end)"),
    ("log_every", _int_at_least(1), "an integer >= 1"),
    ("checkpoint_every", _int_at_least(0), "an integer >= 0 (0: only at the end)"),
    ("keep_checkpoints", _int_at_least(1), "an integer >= 1"),
    ("init_from", lambda x: x is None or (isinstance(x, str) and x != ""), "a checkpoint path or name, or none"),
    ("init_allow_nonfinite", lambda x: isinstance(x, bool), "true or false"),
    ("resize_scale", _int_at_least(1), "an integer >= 1"),
    ("export_torch", lambda x: isinstance(x, bool), "true or false"),
    ("eval_batch_size", _int_at_least(0), "an integer >= 0 (0: batch_size / accum_steps)"),
    *((f"model.{d}", _int_at_least(1), "an integer >= 1") for d in DIMENSIONS[1:]),
    ("model.stoch_depth", lambda x: _finite(x) and 0 <= x < 1, "a number in [0, 1)"),
    ("model.dropout_rate", lambda x: _finite(x) and 0 <= x < 1, "a number in [0, 1)"),
    ("model.compute_dtype", lambda x: x in COMPUTE_DTYPES, " or ".join(map(repr, COMPUTE_DTYPES))),
    ("model.api", lambda x: x in MODEL_API_NAMES, " or ".join(map(repr, MODEL_API_NAMES))),
    ("model.remat", lambda x: x in REMAT_NAMES, "'none', 'block' or a jax.checkpoint_policies name: "
     + ", ".join(REMAT_POLICIES)),
    ("model.scan", lambda x: isinstance(x, bool), "true or false"),
    ("mesh.data", lambda x: x == -1 or _int_at_least(1)(x), "an integer >= 1, or -1 (the rest of the devices)"),
    ("mesh.fsdp", lambda x: x == -1 or _int_at_least(1)(x), "an integer >= 1, or -1 (the rest of the devices)"),
    ("mesh.fsdp_min_mib", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
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
    ("data.worker_type", lambda x: x in WORKER_TYPES, " or ".join(map(repr, WORKER_TYPES))),
    ("data.jpeg_draft", lambda x: isinstance(x, bool), "true or false"),
    ("data.skip_bad", lambda x: isinstance(x, bool), "true or false"),
    ("data.num_classes", _int_at_least(0), "an integer >= 0 (0: the data's)"),
    ("data.crop_area", lambda x: isinstance(x, tuple) and len(x) == 2 and all(map(_finite, x))
     and 0 < x[0] <= x[1] <= 1, "two numbers lo,hi with 0 < lo <= hi <= 1"),
)
_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "mesh": MeshConfig}


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
    errors = _value_errors(cfg) + size_errors(cfg)
    if not _value_errors(cfg, "mesh."):
        try:
            mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, num_devices)
        except ValueError as e:
            errors.append(str(e))
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


def _value_errors(cfg: TrainConfig, prefix: str = "") -> list[str]:
    return [f"{key} must be {allowed}, got {_get(cfg, key)!r}" for key, ok, allowed in _CHECKS
            if key.startswith(prefix) and not ok(_get(cfg, key))]


def size_errors(cfg: TrainConfig) -> list[str]:
    try:
        image_hw(cfg.data.image_size, "data.image_size")
        # The patch size must divide the image size; with init_from the checkpoint's is checked at load.
        if not cfg.init_from and not _value_errors(cfg, "model."):
            architecture(cfg, num_classes=1)
    except ValueError as e:
        return [str(e)]
    return []


def current_layout(saved: dict) -> dict:
    """A config saved with a checkpoint by an earlier version, in today's layout, so that a resume
    compares like with like: ``compute_dtype`` in the model section, no ``num_classes``,
    ``image_size`` or ``in_chans`` there (the data decides them), the variant its dimensions are,
    and ``api`` 'linen' (the only model before there was a choice)."""
    model = saved.get("model")
    if not isinstance(model, dict):
        return saved
    if "variant" not in model:
        saved = _with_variant(saved, model)
    if "api" not in saved["model"]:
        saved = {**saved, "model": {**saved["model"], "api": "linen"}}
    return saved


def _with_variant(saved: dict, model: dict) -> dict:
    model = {k: v for k, v in model.items() if k not in ("num_classes", "image_size", "in_chans")}
    try:
        dims = {d: model[d] for d in DIMENSIONS}
        model["variant"] = variant_name(MixerConfig(**dims, image_size=dims["patch_size"]))
    except (KeyError, TypeError, ValueError):
        model["variant"] = None
    out = {k: v for k, v in saved.items() if k != "compute_dtype"}
    out["model"] = {**model, "compute_dtype": saved.get("compute_dtype", "float32")}
    return out


def expand_paths(cfg: TrainConfig) -> TrainConfig:
    """``~`` in any path the user gives is their home, as in a shell."""
    init = os.path.expanduser(cfg.init_from) if cfg.init_from else cfg.init_from
    data_dir = os.path.expanduser(cfg.data.data_dir) if cfg.data.data_dir else cfg.data.data_dir
    return dataclasses.replace(cfg, init_from=init, data=dataclasses.replace(cfg.data, data_dir=data_dir))


# ---- named recipes --------------------------------------------------------------------------


def digits() -> TrainConfig:
    """The embedded default: a small Mixer on scikit-learn's real handwritten digits (8x8,
    upsampled to 32x32, 4x4 patches), a few minutes on a 2-core CPU."""
    return TrainConfig(
        model=ModelConfig(variant=None, patch_size=4, hidden_dim=128, num_blocks=4, tokens_mlp_dim=64,
                          channels_mlp_dim=256),
        data=DataConfig(name="digits", image_size=32, train_augment="inception_crop", crop_area=(0.5, 1.0)),
        optim=OptimConfig(name="adam", lr=2e-3, weight_decay=1e-4, schedule="cosine", warmup_steps=50,
                          grad_clip=1.0),
        batch_size=128, steps=500, label_smoothing=0.1, eval_every=100, log_every=10, checkpoint_every=100,
    )


def finetune(variant: str = "B/16", dataset: str = "cifar10", image_size: int = 224) -> TrainConfig:
    """vit_jax's fine-tuning recipe (configs/common.py): SGD momentum 0.9, lr 0.03, cosine,
    500 warmup steps, clip 1.0, batch 512, 10k steps, no weight decay. Set init_from."""
    return TrainConfig(model=ModelConfig(variant), data=DataConfig(name=dataset, image_size=image_size),
                       optim=OptimConfig(), batch_size=512, steps=10_000, eval_every=1000)


def pretrain_i1k(variant: str = "B/16") -> TrainConfig:
    """The paper's ImageNet-1k pre-training (big_vision configs/mlp_mixer_i1k.py) without
    RandAugment: Adam (0.9, 0.999), lr 1e-3, decoupled wd 1e-4 on kernels, 10k linear warmup
    then linear decay, batch 4096, clip 1.0, mixup 0.5, stochastic depth 0.1."""
    return TrainConfig(model=ModelConfig(variant, stoch_depth=0.1),
                       data=DataConfig(name="imagenet2012", eval_split="validation", image_size=224),
                       optim=OptimConfig("adam", lr=1e-3, weight_decay=1e-4, schedule="linear", warmup_steps=10_000),
                       batch_size=4096, steps=300 * 1251, mixup_alpha=0.5, eval_every=5000, checkpoint_every=5000)


CONFIGS = {"digits": digits, "finetune": finetune, "pretrain_i1k": pretrain_i1k}


def get_config(name: str) -> TrainConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; expected one of {', '.join(CONFIGS)}")
    return CONFIGS[name]()
