"""Parameter layouts: how each foreign format names and shapes the canonical tensors.

Canonical = the official Flax tree, '/'-joined ('MixerBlock_0/token_mixing/Dense_0/kernel').
A layout is a key map plus a value map, applied one tensor at a time so converters can
stream. Pure numpy; no framework is imported here.

- ``flax``: canonical itself (also what .npz, Flax msgpack and orbax hold).
- ``torch`` (our PyTorch model), one generic rule: '/' -> '.', leaf kernel|scale -> weight;
  Dense kernel (in, out) -> Linear weight (out, in); Conv kernel HWIO -> OIHW.
- ``timm``: the torch rule, then one explicit table of module renames.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import numpy as np

from convert.params import ParamMismatchError, check_params
from convert.spec import MixerConfig

# ---- the torch rule -----------------------------------------------------------------------


def torch_key(key: str) -> str:
    path, leaf = key.rsplit("/", 1)
    return path.replace("/", ".") + "." + ("weight" if leaf in ("kernel", "scale") else leaf)


def torch_key_to_canonical(key: str, ndim: int) -> str:
    # A 1-D 'weight' can only be a LayerNorm scale; any other 'weight' is a Dense/Conv kernel.
    path, leaf = key.rsplit(".", 1)
    if leaf == "weight":
        leaf = "scale" if ndim == 1 else "kernel"
    return path.replace(".", "/") + "/" + leaf


def kernel_to_torch(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 4:  # Conv HWIO -> OIHW
        return arr.transpose(3, 2, 0, 1)
    return arr.T if arr.ndim == 2 else arr


def kernel_from_torch(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 4:  # OIHW -> HWIO
        return arr.transpose(2, 3, 1, 0)
    return arr.T if arr.ndim == 2 else arr


# ---- the timm table ------------------------------------------------------------------------

# (our torch module path, timm module path); block index captured as \1.
TIMM_MODULES: tuple[tuple[str, str], ...] = (
    (r"stem", r"stem.proj"),
    (r"MixerBlock_(\d+)\.LayerNorm_0", r"blocks.\1.norm1"),
    (r"MixerBlock_(\d+)\.token_mixing\.Dense_0", r"blocks.\1.mlp_tokens.fc1"),
    (r"MixerBlock_(\d+)\.token_mixing\.Dense_1", r"blocks.\1.mlp_tokens.fc2"),
    (r"MixerBlock_(\d+)\.LayerNorm_1", r"blocks.\1.norm2"),
    (r"MixerBlock_(\d+)\.channel_mixing\.Dense_0", r"blocks.\1.mlp_channels.fc1"),
    (r"MixerBlock_(\d+)\.channel_mixing\.Dense_1", r"blocks.\1.mlp_channels.fc2"),
    (r"pre_head_layer_norm", r"norm"),
    (r"head", r"head"),
)


def _pattern_to_template(pattern: str) -> str:
    return pattern.replace(r"(\d+)", r"\1").replace("\\.", ".")


def _template_to_pattern(template: str) -> str:
    return re.escape(template).replace(re.escape(r"\1"), r"(\d+)")


def _rename(path: str, table: Iterable[tuple[str, str]]) -> str:
    for pattern, template in table:
        m = re.fullmatch(pattern, path)
        if m:
            return m.expand(template)
    raise KeyError(path)


_FROM_TIMM = tuple((_template_to_pattern(t), _pattern_to_template(p)) for p, t in TIMM_MODULES)


def timm_key(key: str) -> str:
    path, leaf = torch_key(key).rsplit(".", 1)
    return _rename(path, TIMM_MODULES) + "." + leaf


def timm_key_to_canonical(key: str, ndim: int) -> str:
    path, leaf = key.rsplit(".", 1)
    return torch_key_to_canonical(_rename(path, _FROM_TIMM) + "." + leaf, ndim)


# ---- layouts -------------------------------------------------------------------------------


class Layout:
    """Per-tensor maps between canonical and one foreign naming."""

    def __init__(self, name: str, key_to: Callable[[str], str], key_from: Callable[[str, int], str],
                 value_to: Callable[[np.ndarray], np.ndarray], value_from: Callable[[np.ndarray], np.ndarray]):
        self.name, self._key_to, self._key_from = name, key_to, key_from
        self._value_to, self._value_from = value_to, value_from

    def key_to(self, key: str) -> str:
        return self._key_to(key)

    def key_from(self, key: str, ndim: int) -> str:
        """Foreign key -> canonical; KeyError for names this layout does not have."""
        return self._key_from(key, ndim)

    def value_to(self, key: str, arr):
        return self._value_to(arr) if key.endswith("/kernel") else arr

    def value_from(self, canonical_key: str, arr):
        return self._value_from(arr) if canonical_key.endswith("/kernel") else arr

    # Zero-stride views: the shape of a mapped value without allocating it.
    def shape_to(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.value_to(key, np.broadcast_to(np.uint8(0), shape)).shape)

    def shape_from(self, canonical_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.value_from(canonical_key, np.broadcast_to(np.uint8(0), shape)).shape)


def _identity(x):
    return x


LAYOUTS: dict[str, Layout] = {
    "flax": Layout("flax", _identity, lambda k, ndim: k, _identity, _identity),
    "torch": Layout("torch", torch_key, torch_key_to_canonical, kernel_to_torch, kernel_from_torch),
    "timm": Layout("timm", timm_key, timm_key_to_canonical, kernel_to_torch, kernel_from_torch),
}


def canonical_to_torch(flat: Mapping[str, np.ndarray], cfg: MixerConfig, layout: str = "torch") -> dict[str, np.ndarray]:
    """Strictly checked canonical dict -> foreign-layout dict (numpy, possibly non-contiguous views)."""
    check_params(flat, cfg)
    lay = LAYOUTS[layout]
    return {lay.key_to(k): lay.value_to(k, v) for k, v in flat.items()}


def torch_to_canonical(sd: Mapping[str, np.ndarray], cfg: MixerConfig | None = None,
                       layout: str = "torch") -> dict[str, np.ndarray]:
    """Foreign-layout dict -> canonical dict; checked against ``cfg`` when given."""
    lay = LAYOUTS[layout]
    out, unknown = {}, []
    for k, v in sd.items():
        try:
            ck = lay.key_from(k, np.ndim(v))
        except KeyError:
            unknown.append(k)
            continue
        out[ck] = lay.value_from(ck, v)
    if unknown:
        raise ParamMismatchError([], sorted(unknown), [], what=f"{layout}-layout state dict")
    if cfg is not None:
        check_params(out, cfg)
    return out
