"""Parameter layouts: how each foreign naming names and shapes the canonical tensors, and the
one map (:func:`canonicalize`) from any of them to canonical names.

Canonical = the official Flax tree, '/'-joined ('MixerBlock_0/token_mixing/Dense_0/kernel').
A layout is a key map plus a value map, applied one tensor at a time so converters can
stream. Pure numpy; no framework is imported here.

- ``flax``: canonical itself (what .npz, Flax msgpack and orbax hold), possibly under a prefix
  (``params/``, ``opt/target/``, a training state's ``state/params/``), in big_vision's
  legacy layout (``Mixer/encoderblock_N/...``), or as a saved Flax NNX state (each array under a
  trailing ``value``, RNG stream state beside the weights: :func:`from_nnx_state`).
- ``nnx``: canonical with each array under a trailing ``value`` ('stem/kernel/value'): how orbax
  stores ``nnx.state(model, nnx.Param)``, so such a folder restores straight into an NNX model
  (written by ``mixer-convert --to nnx``; read through ``flax`` like any saved NNX state).
- ``torch`` (our PyTorch model), one generic rule: '/' -> '.', leaf kernel|scale -> weight;
  Dense kernel (in, out) -> Linear weight (out, in); Conv kernel HWIO -> OIHW. A DataParallel
  ``module.`` prefix is accepted.
- ``timm``: the torch rule, then one explicit table of module renames.

Every layout is strict in the same way: a key that is not a Mixer parameter, or two keys that
name the same canonical tensor, is a :class:`ParamMismatchError` listing all of them.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from mixer_convert.params import ParamMismatchError, check_params
from mixer_convert.source import Entry
from mixer_convert.spec import MixerConfig, is_canonical_name


# ---- the torch rule -----------------------------------------------------------------------


def torch_key(key: str) -> str:
    path, leaf = key.rsplit("/", 1)
    return path.replace("/", ".") + "." + ("weight" if leaf in ("kernel", "scale") else leaf)


def torch_key_to_canonical(key: str, ndim: int) -> str:
    # A 1-D 'weight' can only be a LayerNorm scale; any other 'weight' is a Dense/Conv kernel.
    if key.startswith("module."):  # saved from a DataParallel / DDP wrapper
        key = key[len("module."):]
    if "." not in key:
        raise KeyError(key)
    path, leaf = key.rsplit(".", 1)
    if leaf == "weight":
        leaf = "scale" if ndim == 1 else "kernel"
    return path.replace(".", "/") + "/" + leaf


# A kernel's axes in torch's order, by rank: Conv HWIO -> OIHW, Dense (in, out) -> Linear (out, in).
# The one table: both directions, of values and of shapes, are derived from it.
TORCH_KERNEL_AXES: dict[int, tuple[int, ...]] = {4: (3, 2, 0, 1), 2: (1, 0)}


def _inverse(axes: Mapping[int, tuple[int, ...]]) -> dict[int, tuple[int, ...]]:
    return {n: tuple(sorted(range(n), key=p.__getitem__)) for n, p in axes.items()}


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
    if key.startswith("module."):
        key = key[len("module."):]
    if "." not in key:
        raise KeyError(key)
    path, leaf = key.rsplit(".", 1)
    return torch_key_to_canonical(_rename(path, _FROM_TIMM) + "." + leaf, ndim)


# ---- layouts -------------------------------------------------------------------------------


class Layout:
    """Per-tensor maps between canonical and one foreign naming; ``kernel_axes``: the foreign
    order of a kernel's axes by rank (a rank not listed, or no table, keeps the canonical order)."""

    def __init__(self, name: str, key_to: Callable[[str], str], key_from: Callable[[str, int], str],
                 kernel_axes: Mapping[int, tuple[int, ...]] | None = None):
        self.name, self._key_to, self._key_from = name, key_to, key_from
        self._axes_to, self._axes_from = dict(kernel_axes or {}), _inverse(kernel_axes or {})

    def key_to(self, key: str) -> str:
        return self._key_to(key)

    def key_from(self, key: str, ndim: int) -> str:
        """Foreign key -> canonical; KeyError for names this layout does not have."""
        return self._key_from(key, ndim)

    def value_to(self, key: str, arr):
        """A view (no copy) in the foreign layout."""
        return _permuted(arr, self._axes_to, key)

    def value_from(self, canonical_key: str, arr):
        return _permuted(arr, self._axes_from, canonical_key)

    def shape_to(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return _permuted_shape(tuple(shape), self._axes_to, key)

    def shape_from(self, canonical_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return _permuted_shape(tuple(shape), self._axes_from, canonical_key)


def _permuted(arr, axes: Mapping[int, tuple[int, ...]], key: str):
    order = axes.get(arr.ndim) if key.endswith("/kernel") else None
    return arr if order is None else arr.transpose(order)


def _permuted_shape(shape: tuple[int, ...], axes: Mapping[int, tuple[int, ...]], key: str) -> tuple[int, ...]:
    order = axes.get(len(shape)) if key.endswith("/kernel") else None
    return shape if order is None else tuple(shape[i] for i in order)


def _identity(x):
    return x


def _flax_key(key: str, ndim: int) -> str:
    if not is_canonical_name(key):
        raise KeyError(key)
    return key


def _nnx_key(key: str) -> str:
    return key + "/value"


def _nnx_key_from(key: str, ndim: int) -> str:
    if not key.endswith("/value"):
        raise KeyError(key)
    return _flax_key(key[: -len("/value")], ndim)


LAYOUTS: dict[str, Layout] = {
    "flax": Layout("flax", _identity, _flax_key),
    "nnx": Layout("nnx", _nnx_key, _nnx_key_from),
    "torch": Layout("torch", torch_key, torch_key_to_canonical, TORCH_KERNEL_AXES),
    "timm": Layout("timm", timm_key, timm_key_to_canonical, TORCH_KERNEL_AXES),
}


def detect_layout(keys: Iterable[str]) -> str:
    """'timm', 'torch' or 'flax' from the key names alone."""
    keys = list(keys)
    if any(k.split(".")[0] in ("blocks", "stem") and k.startswith(("blocks.", "stem.proj.", "module.blocks.",
                                                                    "module.stem.proj.")) for k in keys):
        return "timm"
    if any("." in k for k in keys) and not any("/" in k for k in keys):
        return "torch"
    return "flax"


# ---- the flax side: where the tree sits, and big_vision's legacy names ----------------------

# A parameter tree is found by its stem; these parents name a tree of weights (as opposed to an
# optimizer slot such as opt_state/0/mu/ or an un-chained optax state's opt/1/).
_STEMS = ("stem/kernel", "embedding/kernel")
_WEIGHT_PARENTS = ("params/", "opt/target/", "target/")


def param_roots(keys: Iterable[str]) -> list[str]:
    """Every prefix under which a Mixer parameter tree (its stem kernel) sits, e.g. ['', 'params/']."""
    roots = {k[: -len(s)] for k in keys for s in _STEMS if k.endswith(s)}
    return sorted(r for r in roots if r == "" or r.endswith("/"))


def select_root(entries: Mapping[str, Entry], prefix: str | None = None) -> dict[str, Entry]:
    """The parameter tree wherever it sits, chosen by name, never by shortest path.

    One tree: taken. Several: the one at the top level or under a weights name (``params/``,
    ``opt/target/``) wins over optimizer slots; two such trees are ambiguous and refused with
    the candidates listed, unless ``prefix`` names one.
    """
    roots = param_roots(entries)
    if prefix is not None:
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if prefix not in roots:
            raise ValueError(f"no parameter tree under prefix {prefix!r}; the file has {_listing(roots)}")
        root = prefix
    elif len(roots) <= 1:
        root = roots[0] if roots else ""
    else:
        named = [r for r in roots if r == "" or r.endswith(_WEIGHT_PARENTS)]
        if len(named) != 1:
            raise AmbiguousParamsError(named or roots)
        root = named[0]
    return {k[len(root):]: v for k, v in entries.items() if k.startswith(root)}


def _listing(roots: list[str]) -> str:
    return ", ".join(repr(r or "(top level)") for r in roots) if roots else "no Mixer stem kernel"


class AmbiguousParamsError(ValueError):
    """More than one parameter tree, none preferred by name."""

    def __init__(self, roots: list[str]) -> None:
        self.roots = roots
        super().__init__(f"the file holds {len(roots)} parameter trees, under {_listing(roots)}; "
                         "pick one with --prefix (prefix=...)")


def _renumber_pre_linen(names: list[str]) -> dict[str, str]:
    """flax.training.checkpoints.convert_pre_linen on '/'-joined names: pre-Linen numbered
    submodules with one counter per parent, Linen with one counter per class."""
    tree: dict = {}
    for n in names:
        node = tree
        for part in n.split("/"):
            node = node.setdefault(part, {})
    mapping: dict[str, str] = {}

    def walk(node: dict, old: str, new: str) -> None:
        if not node:
            mapping[old] = new
            return
        groups: dict[str, list[tuple[int, str]]] = {}
        for k in node:
            m = re.fullmatch(r"(.+)_(\d+)", k)
            if m and not k.startswith("encoderblock_"):
                groups.setdefault(m.group(1), []).append((int(m.group(2)), k))
        rename = {k: f"{base}_{i}" for base, items in groups.items() for i, (_, k) in enumerate(sorted(items))}
        for k, child in node.items():
            walk(child, f"{old}/{k}" if old else k, f"{new}/{rename.get(k, k)}" if new else rename.get(k, k))

    walk(tree, "", "")
    return mapping


_LEGACY_DENSE = {"kernel1": "Dense_0/kernel", "bias1": "Dense_0/bias", "kernel2": "Dense_1/kernel",
                 "bias2": "Dense_1/bias"}


def _legacy_key(key: str) -> str:
    k = re.sub(r"^embedding/", "stem/", key)
    k = re.sub(r"^Mixer/encoder_norm/", "pre_head_layer_norm/", k)
    k = re.sub(r"^Mixer/encoderblock_(\d+)/", r"MixerBlock_\1/", k)
    m = re.fullmatch(r"(MixerBlock_\d+/(?:token|channel)_mixing)_phase_0/(kernel1|bias1|kernel2|bias2)", k)
    return f"{m.group(1)}/{_LEGACY_DENSE[m.group(2)]}" if m else k


def from_legacy(entries: Mapping[str, Entry]) -> list[tuple[str, str, Entry]]:
    """big_vision's legacy layout (Mixer/encoderblock_N/..._mixing_phase_0/kernel1, embedding,
    Mixer/encoder_norm) -> (old name, canonical name, entry), squeezing the extra unit dims it
    carried. Names already canonical pass through (and so collide if both spellings are present)."""
    renames = _renumber_pre_linen(list(entries))
    out = []
    for old, (shape, dtype, load) in entries.items():
        if "_phase_0/" in renames[old]:
            shape = tuple(d for d in shape if d != 1) or (1,)
            load = (lambda load=load, shape=shape: load().reshape(shape))
        out.append((old, _legacy_key(renames[old]), (shape, dtype, load)))
    return out


# ---- the flax side: a Flax NNX state (nnx.state(model)) saved as a tree ----------------------

# An nnx.RngStream's state, wherever NNX keeps one: a module's own stream (nnx.Dropout's:
# '.../rngs/key', '.../rngs/count') or a stored nnx.Rngs ('.../rngs/<stream>/key').
_RNG_STATE_RE = re.compile(r"(?:.*/)?rngs/(?:[^/]+/)?(?:key|count)")


def is_rng_state(name: str, dtype: Any) -> bool:
    """Whether an entry is NNX random-number state (a stream's key data or counter, both integer
    arrays), as opposed to a weight. Decided by name *and* dtype: a float array is never RNG state."""
    return _RNG_STATE_RE.fullmatch(name) is not None and dtype is not None and np.dtype(dtype).kind in "ui"


def from_nnx_state(entries: Mapping[str, Entry]) -> dict[str, Entry]:
    """A saved ``nnx.state(model)`` -> the weights' own names. Orbax stores each nnx.Variable's
    array under a trailing ``value`` ('stem/kernel/value'), which is removed; RNG streams' keys and
    counters (:func:`is_rng_state`) are left out: they are no weights, and a model built from the
    file gets fresh ones. Everything else passes unchanged, so anything that is not a Mixer
    parameter is still reported as unexpected. Two entries for one name are refused, naming both."""
    out: dict[str, Entry] = {}
    source: dict[str, list[str]] = {}
    for key, entry in entries.items():
        name = key[: -len("/value")] if key.endswith("/value") else key
        if is_rng_state(name, entry[1]):
            continue
        source.setdefault(name, []).append(key)
        out[name] = entry
    duplicated = [(name, keys) for name, keys in source.items() if len(keys) > 1]
    if duplicated:
        raise ParamMismatchError([], [], [], what="flax-layout checkpoint", duplicated=duplicated)
    return out


# ---- the one map ------------------------------------------------------------------------------


def canonicalize(entries: Mapping[str, Entry], layout: str | None = None,
                 prefix: str | None = None) -> tuple[str, dict[str, Entry]]:
    """Any naming -> (layout name, canonical entries), values mapped lazily.

    The same for every layout: two keys for one canonical tensor raise :class:`ParamMismatchError`
    naming both; a key that names no Mixer parameter is kept under its own name, so the strict
    check that every loader runs next (:func:`check_params`) lists it as unexpected together with
    anything missing or mis-shaped. Nothing is silently dropped or overwritten.
    """
    layout = layout or detect_layout(entries)
    lay = LAYOUTS[layout]
    named = [(k, k, e) for k, e in entries.items()]
    if layout == "flax":
        entries = select_root(from_nnx_state(entries), prefix)
        legacy = any(k.startswith("Mixer/") for k in entries)
        named = from_legacy(entries) if legacy else [(k, k, e) for k, e in entries.items()]
    out: dict[str, Entry] = {}
    source: dict[str, list[str]] = {}
    for shown, key, (shape, dtype, load) in named:
        try:
            ck = lay.key_from(key, len(shape))
        except KeyError:  # not a Mixer parameter: reported as unexpected by check_params
            source.setdefault(shown, []).append(shown)
            out[shown] = (shape, dtype, load)
            continue
        source.setdefault(ck, []).append(shown)
        out[ck] = (lay.shape_from(ck, shape), dtype, (lambda ck=ck, load=load: lay.value_from(ck, load())))
    if "stem/kernel" not in out:
        shown = sorted(n for n, _, _ in named)
        raise ValueError(f"not an MLP-Mixer checkpoint: no stem kernel (found {len(shown)} tensors, "
                         f"e.g. {shown[:5]})")
    duplicated = [(ck, names) for ck, names in source.items() if len(names) > 1]
    if duplicated:
        raise ParamMismatchError([], [], [], what=f"{layout}-layout checkpoint", duplicated=duplicated)
    return layout, out


def entries_of(flat: Mapping[str, Any]) -> dict[str, Entry]:
    """In-memory arrays as entries (for :func:`canonicalize`)."""
    return {k: (tuple(np.shape(v)), getattr(v, "dtype", None), (lambda v=v: v)) for k, v in flat.items()}


def canonical_to_torch(flat: Mapping[str, np.ndarray], cfg: MixerConfig, layout: str = "torch") -> dict[str, np.ndarray]:
    """Strictly checked canonical dict -> foreign-layout dict (numpy, possibly non-contiguous views)."""
    check_params(flat, cfg)
    lay = LAYOUTS[layout]
    return {lay.key_to(k): lay.value_to(k, v) for k, v in flat.items()}


def torch_to_canonical(sd: Mapping[str, np.ndarray], cfg: MixerConfig, layout: str = "torch") -> dict[str, np.ndarray]:
    """Foreign-layout dict -> canonical dict through :func:`canonicalize`, strictly checked against ``cfg``."""
    _, entries = canonicalize(entries_of(sd), layout)
    out = {k: load() for k, (_, _, load) in entries.items()}
    check_params(out, cfg)
    return out
