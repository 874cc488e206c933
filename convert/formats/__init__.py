"""Checkpoint file formats: which one a file is, and the one module per format that turns a file
into entries and entries into a file.

An entry is ``(shape, dtype, load)``: shape and dtype come from the file's headers, ``load()``
reads the tensor only when asked, so names and shapes are checked before any data is read.
Each format module has ``read(src) -> (entries, close or None)`` (``src``: a checked
:class:`~mixer_convert.source.Source`, to which it declares every tensor) and
``write(path, items, specs)`` (``items``: (name, array) pairs in order; ``specs``: (name, shape,
dtype) of the same, known before the first array is read, for formats whose header comes
first; a format may take keyword options, e.g. timm-hub's ``preprocess``). Folders (orbax, a
timm / Hugging Face model folder) are told apart by their marker files. What the names mean is not a format's business (:mod:`mixer_convert.layouts`); where a
file may come from and how much it may declare is :mod:`mixer_convert.source`'s.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from mixer_convert.errors import CheckpointError, why
from mixer_convert.source import Entry, Source

FORMATS = ("npz", "msgpack", "orbax", "torch", "safetensors", "timm-hub")
FOLDER_FORMATS = ("orbax", "timm-hub")  # written as a folder, renamed into place whole
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")
SUFFIX_FORMAT = {".npz": "npz", ".msgpack": "msgpack", ".flax": "msgpack", ".pt": "torch", ".pth": "torch",
                 ".bin": "torch", ".safetensors": "safetensors"}
OUTPUT_KINDS = ("torch", "timm", "flax", "nnx", "npz", "msgpack", "orbax", "timm-hub")
# The namings (mixer_convert.layouts) each format may be written in, its default first.
NAMINGS: dict[str, tuple[str, ...]] = {
    "npz": ("flax",), "msgpack": ("flax",), "orbax": ("flax", "nnx"), "timm-hub": ("timm",),
    "torch": ("torch", "timm", "flax", "nnx"), "safetensors": ("torch", "timm", "flax", "nnx"),
}
_HOLDS = {"flax": "the Flax (official) naming", "timm": "timm's naming"}  # the defaults of formats with few namings
_CALLED = {"timm-hub": "timm model folders"}  # in messages; the others are '<format> files'
Spec = tuple[str, tuple[int, ...], np.dtype]


def module(fmt: str):
    """The module that reads and writes ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return importlib.import_module(f"mixer_convert.formats.{fmt.replace('-', '_')}")


def detect(src: Source) -> str:
    """By content where possible (a .bin may be anything), else by suffix."""
    path = src.path
    if src.is_dir:
        return _folder_kind(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({why(e)})") from None
    if head[:4] == b"PK\x03\x04":
        return _zip_kind(path)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    fmt = SUFFIX_FORMAT.get(path.suffix.lower())
    if fmt is None:
        raise CheckpointError(f"{path}: cannot tell the format from content or suffix; expected one of "
                              f"{', '.join(sorted(SUFFIX_FORMAT))} or an orbax directory")
    if fmt == "npz":  # always a zip archive; anything else is damaged (torch also has a legacy non-zip format)
        raise CheckpointError(f"{path}: not a valid npz file (no zip header; truncated or corrupt?)")
    return fmt


def _folder_kind(path: Path) -> str:
    from mixer_convert.formats.timm_hub import CONFIG, WEIGHT_FILES

    # Links count even if broken, so that the format's reader refuses them by name.
    orbax = any(os.path.lexists(path / m) for m in ORBAX_MARKERS)
    hub = os.path.lexists(path / CONFIG) and any(os.path.lexists(path / w) for w in WEIGHT_FILES)
    if orbax and hub:
        raise CheckpointError(f"{path}: holds both an orbax checkpoint and a timm model folder; refusing to guess")
    if orbax or hub:
        return "orbax" if orbax else "timm-hub"
    raise CheckpointError(f"{path}: a folder, but not an orbax checkpoint (no {' or '.join(ORBAX_MARKERS[:3])}) "
                          f"nor a timm model folder ({CONFIG} beside {' or '.join(WEIGHT_FILES[:2])})")


def _zip_kind(path: Path) -> str:
    from mixer_convert.formats.archive import Zip

    with Zip(path) as z:
        names = [i.filename for i in z.members]
    if any(n.endswith("data.pkl") for n in names):
        return "torch"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise CheckpointError(f"{path}: a zip archive that is neither .npz nor a PyTorch checkpoint")


def format_of(path: str | os.PathLike) -> str:
    """The format of the checkpoint at ``path`` (its source checked)."""
    return detect(Source.open(path))


def output_format(path: str | os.PathLike, to: str | None) -> tuple[str, str]:
    """(file format, naming layout) for an output path and a ``--to`` choice. ``nnx``: an orbax
    folder of ``nnx.state(model, nnx.Param)`` (each array under 'value'), or a .msgpack of its pure
    dict, which is byte-identical to Linen's (``flax``)."""
    suffix = Path(path).suffix.lower()
    if to in (None, "auto"):
        if suffix in SUFFIX_FORMAT:
            fmt = SUFFIX_FORMAT[suffix]
            return fmt, NAMINGS[fmt][0]
        raise ValueError(f"cannot tell the output format of {str(path)!r} from its suffix; pass --to")
    if to in ("timm", "torch"):
        return ("safetensors" if suffix == ".safetensors" else "torch"), to
    if to == "flax":
        return ("npz" if suffix == ".npz" else "orbax" if suffix == "" else "msgpack"), "flax"
    if to == "nnx":
        # NNX's msgpack convention is the state's pure dict (nnx.to_pure_dict): the same bytes as
        # Linen's params, so a .msgpack is written as for flax; an orbax folder holds the state itself.
        if suffix in (".msgpack", ".flax"):
            return "msgpack", "flax"
        if suffix in SUFFIX_FORMAT:
            raise ValueError(f"--to nnx writes an orbax folder or a .msgpack file, not a {suffix} file")
        return "orbax", "nnx"
    if to in ("npz", "msgpack", "orbax"):
        return to, "flax"
    if to == "timm-hub":
        return to, "timm"
    raise ValueError(f"unknown output kind {to!r}; expected one of {', '.join(OUTPUT_KINDS)}")


def naming(fmt: str, layout: str | None) -> str:
    """``layout``, or ``fmt``'s default naming; a naming ``fmt`` cannot hold is a ValueError."""
    namings = NAMINGS[fmt]
    layout = layout or namings[0]
    if layout not in namings:
        raise ValueError(f"{_CALLED.get(fmt, fmt + ' files')} hold {_HOLDS[namings[0]]}, not {layout!r}")
    return layout


def read(src: Source, fmt: str | None = None) -> tuple[str, dict[str, Entry], Callable[[], None] | None]:
    """(format, entries, close) of a checked source; nothing but headers is read, and every tensor
    was declared to ``src`` (shape checked, total within its budget)."""
    fmt = fmt or detect(src)
    try:
        entries, close = module(fmt).read(src)
    except OSError as e:
        raise CheckpointError(f"{src.path}: cannot read ({why(e)})") from None
    return fmt, entries, close


def write(fmt: str, path: Path, items: Iterator[tuple[str, np.ndarray]], specs: Iterable[Spec],
          **options) -> None:
    """``items`` into a new file (or folder: :data:`FOLDER_FORMATS`) at ``path`` in ``fmt``;
    ``options`` go to the format's writer (timm-hub: ``preprocess``)."""
    module(fmt).write(path, items, list(specs), **options)
