"""A timm / Hugging Face model folder: what timm's ``save_for_hf`` writes and the Hugging Face hub
serves, and what ``timm.create_model("local-dir:DIR", pretrained=True)`` reads.

``config.json`` names the model (``architecture``: timm's name, ``num_classes``, ``num_features``,
``model_args``) and its eval preprocessing (``pretrained_cfg``); the weights, in timm's naming,
are the first of :data:`WEIGHT_FILES` present (timm's own order: ``model.safetensors`` wins over
``pytorch_model.bin``). We write ``config.json`` and ``model.safetensors`` (the model card is the
converter's: :mod:`mixer_convert.tools.model_card`).

Reading trusts nothing in the folder: every entry must be a regular file (the source check of
a folder), ``config.json`` is size-bounded, UTF-8 JSON with no key given twice, and what it says
(architecture, head size, image size, channels) must agree with the weights' shapes -- a
contradiction is one line naming both. timm has Mixers only for S/32, S/16, B/32, B/16, L/32 and
L/16 at 224x224 (:data:`mixer_convert.spec.TIMM_NAMES`); anything else is refused when writing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mixer_convert.errors import CheckpointError, why
from mixer_convert.formats.safetensors import read as read_safetensors, write as write_safetensors
from mixer_convert.layouts import canonicalize, detect_layout
from mixer_convert.params import infer_config
from mixer_convert.source import Entry, MAX_METADATA_BYTES, Source, no_duplicate_keys
from mixer_convert.spec import TIMM_NAMES, MixerConfig, image_hw, variant_name

CONFIG = "config.json"
WEIGHTS = "model.safetensors"  # what we write
# What timm's local-dir loader looks for, in its order (timm.models._hub._PREFERRED_FILES).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
TIMM_SIZE = (224, 224)  # every Mixer timm has takes 224x224 images

# The two official eval pipelines as timm's eval transforms (timm.data.create_transform): both end
# in (x - 127.5) / 127.5, i.e. ToTensor then mean = std = 0.5. Resampling differs from the official
# (TensorFlow) functions: see mixer_convert.tools.model_card and README.
PREPROCESSING: dict[str, dict[str, Any]] = {
    # vision_transformer's eval: the whole image resized to 224x224 (aspect not kept), bilinear.
    "vit_jax": {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"},
    # big_vision's: shorter side to 256 (area resampling, which timm lacks; bicubic came closest
    # in our comparison), central 224 crop: crop_pct 224/256. Also timm's own Mixer default.
    "big_vision": {"interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"},
}


# ---- naming the model --------------------------------------------------------------------------


def _timm_has() -> str:
    return ", ".join(f"{name} ({v})" for v, name in TIMM_NAMES.items())


def timm_name(cfg: MixerConfig) -> str:
    """timm's name for the model ``cfg`` describes; a ValueError naming the ones timm has if none."""
    variant = variant_name(cfg)
    if variant not in TIMM_NAMES:
        what = f"{variant} Mixer" if variant else "Mixer of this (non-standard) shape"
        raise ValueError(f"timm has no {what}; its Mixers are {_timm_has()} at 224x224")
    if cfg.image_size != TIMM_SIZE:
        (h, w), (gh, gw) = cfg.image_size, cfg.grid
        raise ValueError(f"timm's {TIMM_NAMES[variant]} takes 224x224 images; these {variant} weights are for "
                         f"{h}x{w} ({gh}x{gw} patches); timm's Mixers are {_timm_has()} at 224x224")
    if cfg.in_chans != 3:
        raise ValueError(f"timm's Mixers take RGB images; these weights have {cfg.in_chans} input channels")
    return TIMM_NAMES[variant]


def hub_config(cfg: MixerConfig, preprocess: str = "vit_jax") -> dict[str, Any]:
    """config.json as timm's ``save_for_hf`` writes it for this model (timm 1.0's fields and
    order; no ``tag``, which would claim one of timm's own weight sets), with the eval
    preprocessing of the official pipeline ``preprocess`` (:data:`PREPROCESSING`)."""
    if preprocess not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {preprocess!r}; expected one of {', '.join(PREPROCESSING)}")
    name, classes = timm_name(cfg), cfg.num_classes or 0  # timm: num_classes=0 is a model without a head
    return {
        "architecture": name,
        "num_classes": classes,
        "num_features": cfg.hidden_dim,
        "global_pool": "avg",
        "model_args": {"in_chans": cfg.in_chans, "num_classes": classes, "global_pool": "avg",
                       "img_size": list(cfg.image_size)},
        "pretrained_cfg": {
            "custom_load": False,
            "input_size": [cfg.in_chans, *cfg.image_size],
            "fixed_input_size": True,
            **PREPROCESSING[preprocess],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "num_classes": classes,
            "pool_size": None,
            "first_conv": "stem.proj",
            "classifier": "head",
            "license": "apache-2.0",
        },
    }


# ---- writing -----------------------------------------------------------------------------------


def config_of_specs(specs: list[tuple[str, tuple, np.dtype]]) -> MixerConfig:
    """The architecture timm-named tensor specs describe (shapes only)."""
    _, canon = canonicalize({k: (tuple(s), d, None) for k, s, d in specs}, "timm")
    return infer_config({k: e[0] for k, e in canon.items()})


def write(path: Path, items: Iterator[tuple[str, np.ndarray]], specs: list[tuple[str, tuple, np.dtype]],
          preprocess: str = "vit_jax") -> None:
    """A new folder at ``path``: model.safetensors (timm's naming, streamed) and config.json.
    A model timm does not have is refused before anything is written."""
    doc = hub_config(config_of_specs(specs), preprocess)
    path.mkdir()
    write_safetensors(path / WEIGHTS, items, specs)
    (path / CONFIG).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


# ---- reading -----------------------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any]:
    """config.json: at most :data:`MAX_METADATA_BYTES`, UTF-8, a JSON object with no key twice."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_METADATA_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({why(e)})") from None
    if len(raw) > MAX_METADATA_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_METADATA_BYTES // 2**20} MiB; not a timm model config")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys(str(path)))
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: not a valid JSON config ({why(e)})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: a JSON {type(doc).__name__}, not an object")
    return doc


def _count(where: str, field: str, value: Any, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise CheckpointError(f"{where}: {field} must be an integer >= {least}, got {value!r}")
    return value


def _image_size(where: str, value: Any) -> tuple[int, int]:
    try:
        return image_hw(value, "model_args.img_size")
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def config_fields(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """What config.json says the weights are: architecture, num_classes, image_size, in_chans.
    timm's current layout and its legacy single-dict one; the head size may be given up to three
    times (top level, pretrained_cfg, model_args) and all must agree."""
    arch = doc.get("architecture")
    if arch not in TIMM_NAMES.values():
        raise CheckpointError(f"{where}: architecture {arch!r} is not one of timm's MLP-Mixers "
                              f"({', '.join(TIMM_NAMES.values())})")
    pre, args = doc.get("pretrained_cfg", doc), doc.get("model_args", {})
    if not isinstance(pre, dict) or not isinstance(args, dict):
        raise CheckpointError(f"{where}: pretrained_cfg and model_args must be JSON objects")
    given = {f: v for f, v in (("num_classes", doc.get("num_classes")), ("pretrained_cfg.num_classes",
             pre.get("num_classes")), ("model_args.num_classes", args.get("num_classes"))) if v is not None}
    if not given:
        raise CheckpointError(f"{where}: gives no num_classes")
    counts = {f: _count(where, f, v, 0) for f, v in given.items()}
    if len(set(counts.values())) > 1:
        raise CheckpointError(f"{where}: contradicts itself: " + ", ".join(f"{f} {v}" for f, v in counts.items()))
    return {"architecture": arch, "num_classes": next(iter(counts.values())),
            "image_size": _image_size(where, args["img_size"]) if args.get("img_size") is not None else TIMM_SIZE,
            "in_chans": _count(where, "model_args.in_chans", args.get("in_chans", 3), 1)}


def weights_file(folder: Path) -> Path:
    """The weights timm would load from ``folder``: the first of :data:`WEIGHT_FILES` present."""
    for name in WEIGHT_FILES:
        if os.path.lexists(folder / name):
            return folder / name
    raise CheckpointError(f"{folder}: a timm model folder without weights (none of {', '.join(WEIGHT_FILES)})")


def check_agreement(said: dict[str, Any], entries: dict[str, Entry], config: Path, weights: Path) -> None:
    """config.json and the weights describe the same model, or one line naming both."""
    layout = detect_layout(entries)
    if layout != "timm":
        raise CheckpointError(f"{weights}: tensors in {layout} naming, not timm's; timm cannot load this folder")
    _, canon = canonicalize(entries, "timm")
    shapes = {k: e[0] for k, e in canon.items()}
    (h, w) = said["image_size"]
    try:  # the weights' token count must be config.json's image size in patches
        cfg = infer_config(shapes, image_size=(h, w))
        differ = []
    except ValueError:
        cfg = infer_config(shapes, image_size=_any_grid(shapes))
        tokens, (ph, pw) = cfg.num_tokens, cfg.patch_size
        differ = [("image size", f"{h}x{w}", f"{tokens} patches of {ph}x{pw}")]
    variant = variant_name(cfg)
    differ += [(field, said[field], have) for field, have in (
        ("architecture", TIMM_NAMES.get(variant or "", f"{variant or 'a non-standard'} Mixer (not in timm)")),
        ("num_classes", cfg.num_classes or 0), ("in_chans", cfg.in_chans)) if said[field] != have]
    if differ:
        raise CheckpointError(f"{config.parent}: {config.name} and {weights.name} disagree: " + "; ".join(
            f"{field} {a} in {config.name}, {b} in {weights.name}" for field, a, b in differ))


def _any_grid(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """An image size that gives the weights' token count (a 1-high grid): enough to read the rest."""
    ph, pw = shapes["stem/kernel"][:2]
    return ph, pw * shapes["MixerBlock_0/token_mixing/Dense_0/kernel"][0]


def read(src: Source) -> tuple[dict[str, Entry], Callable[[], None] | None]:
    src.check_tree()
    config = src.path / CONFIG
    said = config_fields(read_config(config), str(config))
    weights = weights_file(src.path)
    inner = Source.open(weights, src.max_bytes)
    if weights.suffix == ".safetensors":
        entries, close = read_safetensors(inner)
    else:
        from mixer_convert.formats.torch import read as read_torch
        entries, close = read_torch(inner)
    try:
        check_agreement(said, entries, config, weights)
    except BaseException:
        if close:
            close()
        raise
    return entries, close
