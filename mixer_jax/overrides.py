"""``--set a.b=value``: strings applied to a (nested, frozen) dataclass training config, each value
parsed to its field's type, so a typo or a bad value fails before anything runs; a key another
source decides (the data, ``init_from``'s checkpoint) is refused, saying which source wins."""
from __future__ import annotations

import dataclasses

from mixer_jax.configs import ModelConfig, TrainConfig, size_errors


# Keys that another source decides, or that moved: a --set of one is refused, saying what wins.
_NOT_SETTABLE = {"model.num_classes": "it is decided by the dataset's number of classes",
                 "model.image_size": "it is decided by data.image_size (set that instead)",
                 "compute_dtype": "it moved into the model section: --set model.compute_dtype=..."}
_KEPT_WITH_INIT_FROM = {"model.stoch_depth", "model.dropout_rate", "model.compute_dtype", "model.api", "model.remat",
                        "model.scan"}


def override(cfg, assignments: list[str]):
    """Apply 'a.b=value' strings to a (nested, frozen) dataclass config; values are parsed
    to the field's current type, so typos and bad values fail before anything runs. A key whose
    value another source decides (the data, or ``init_from``'s checkpoint) is refused, saying
    which source wins."""
    keys = []
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        if key in _NOT_SETTABLE:
            raise ValueError(f"{key} cannot be set: {_NOT_SETTABLE[key]}")
        cfg = _set(cfg, key.split("."), raw, key)
        keys.append(key)
    _check_init_from(cfg, keys)
    errors = size_errors(cfg) if isinstance(cfg, TrainConfig) else []  # e.g. a patch not dividing the images
    if errors:
        raise ValueError(errors[0])
    return cfg


def _check_init_from(cfg, keys: list[str]) -> None:
    if not getattr(cfg, "init_from", None):
        return
    for key in keys:
        if key.startswith("model.") and key not in _KEPT_WITH_INIT_FROM:
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
    value = _parse(raw, cur, full)
    if isinstance(obj, ModelConfig):
        return obj.with_field(path[0], value)
    return dataclasses.replace(obj, **{path[0]: value})


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
