"""Class names for the heads of the published checkpoints (package data in ``convert/data/``).

* 1000 classes: ImageNet-1k (ILSVRC-2012) in the standard order (sorted WordNet synset ids).
* 21843 classes: ImageNet-21k in the order of Google's imagenet21k checkpoints.

Both files were written from timm 1.0.31 (Apache-2.0; ``timm/data/_info/imagenet_synsets.txt``,
``imagenet21k_goog_synsets.txt`` and ``imagenet_synset_to_lemma.txt``): one line per class,
``<synset id> TAB <WordNet lemmas>``. Other head sizes have no shipped names.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from importlib import resources

_FILES = {1000: "imagenet1k_classes.txt", 21843: "imagenet21k_classes.txt"}
SYNSET_RE = re.compile(r"n\d{8}")


@dataclasses.dataclass(frozen=True)
class ClassNames:
    names: tuple[str, ...]  # human-readable, one per class index
    synsets: tuple[str, ...] | None  # WordNet ids (ImageNet heads only)
    source: str

    def __len__(self) -> int:
        return len(self.names)


@functools.lru_cache(maxsize=None)
def imagenet_classes(num_classes: int) -> ClassNames | None:
    """The shipped names for a 1000- or 21843-class head, else None."""
    fname = _FILES.get(num_classes)
    if fname is None:
        return None
    text = resources.files("mixer_convert").joinpath("data", fname).read_text(encoding="utf-8")
    rows = [line.split("\t", 1) for line in text.splitlines() if line and not line.startswith("#")]
    if len(rows) != num_classes:
        raise RuntimeError(f"package data {fname} has {len(rows)} classes, expected {num_classes}")
    return ClassNames(tuple(r[1] for r in rows), tuple(r[0] for r in rows), f"mixer_convert/data/{fname}")


def read_class_names(path: str | os.PathLike) -> ClassNames:
    """One class name per line (blank lines and '#' comments skipped), line i = class i."""
    with open(path, encoding="utf-8") as f:
        names = tuple(line.strip() for line in f if line.strip() and not line.lstrip().startswith("#"))
    if not names:
        raise ValueError(f"{path}: no class names in the file")
    return ClassNames(names, None, str(path))


def head_class_names(num_classes: int, labels_file: str | os.PathLike | None = None) -> ClassNames | None:
    """The names for a model head: ``labels_file`` if given (one name per class of the head), else
    the shipped ImageNet names for a 1000- or 21843-class head, else None (callers show indices)."""
    if labels_file is None:
        return imagenet_classes(num_classes)
    names = read_class_names(labels_file)
    if len(names) != num_classes:
        raise ValueError(f"{labels_file}: {len(names)} class names for a {num_classes}-class head")
    return names
