"""Data sources: random access to (image, label) pairs, and the class names that go with them.

A source is what Grain calls a random-access data source (``len(src)``, ``src[i]``); its
records are ``(payload, label)`` where the payload is a file path, encoded bytes or a decoded
uint8 array (``mixer_jax.images`` turns any of them into pixels). ``src.name(i)`` says which
file or record ``i`` is, for error messages.

* ``digits``: scikit-learn's 1797 real handwritten digits (embedded, works offline).
* ``imagefolder``: ``DIR/<split>/<class>/*.jpg|png|...``; listed once, up front.
* any tfds dataset already prepared in array_record format (``tfds.data_source``, no TensorFlow),
  its images read as encoded bytes and decoded by us (draft decoding, the same mode conversions).

The batching, augmentation and parallel workers are in ``mixer_jax.input_pipeline``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from mixer_jax.configs import AUGMENTS, DataConfig
from mixer_jax.images import BadImageError, Payload


class Source(Protocol):
    num_classes: int

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[Payload, int]: ...
    def name(self, index: int) -> str: ...


# ---- sources --------------------------------------------------------------------------------


class ArraySource:
    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, title: str = "array",
                 classes: Sequence[str] | None = None) -> None:
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.title, self.classes = title, list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    def name(self, index: int) -> str:
        return f"{self.title}[{index}]"


def digits_source(split: str) -> ArraySource:
    """scikit-learn's handwritten digits (8x8, 16 grey levels) as RGB uint8; a fixed
    stratified 80/20 split, the same on every machine."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.repeat((d.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None], 3, axis=-1)
    order = np.random.default_rng(0).permutation(len(d.target))
    test_mask = np.zeros(len(order), bool)
    for c in range(10):  # stratified: every 5th example of each class goes to test
        idx = order[d.target[order] == c]
        test_mask[idx[::5]] = True
    if split not in ("train", "test"):
        raise ValueError(f"digits has splits 'train' and 'test', not {split!r}")
    keep = test_mask if split == "test" else ~test_mask
    return ArraySource(imgs[keep], d.target[keep], 10, f"digits/{split}", [str(c) for c in range(10)])


class TfdsSource:
    """A tfds dataset prepared in array_record format (``tfds build --file_format=array_record``),
    read by random access without TensorFlow. Images come as the stored (encoded) bytes."""

    def __init__(self, name: str, split: str, data_dir: str | None) -> None:
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # DatasetNotFoundError lists every registered name; keep the first line
            raise ValueError(f"unknown dataset {name!r}: {str(e).splitlines()[0]}") from None
        try:
            src = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                   decoders={"image": tfds.decode.SkipDecoding()})
            try:
                src[0]
            except Exception:  # tfds's test mocks cannot serve encoded images without TensorFlow
                src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            raise ValueError(f"dataset {name!r} split {split!r} cannot be read from {builder.data_dir!r}: "
                             f"{str(e).splitlines()[0]} (prepare it with `tfds build {name} "
                             "--file_format=array_record`, or convert a TFRecord copy with `tfds convert_format "
                             "--out_file_format=array_record`; both need TensorFlow once, training does not; "
                             "or set data.data_dir)") from None
        self._src, self._title = src, f"{name}/{split}"
        label = builder.info.features["label"]
        self.num_classes = label.num_classes
        self.classes = list(label.names) if getattr(label, "names", None) else None

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, index: int) -> tuple[Payload, int]:
        ex = self._src[index]
        return ex["image"], int(ex["label"])

    def name(self, index: int) -> str:
        return f"{self._title}[{index}]"


class ImageFolderSource:
    """``root/<split>/<class>/<image>``, listed once (sorted, so indices are the same on every
    host). A directory named like an image is an error found here, before any training
    (``skip_bad``: left out, and said so); unreadable files are found when they are read."""

    EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

    def __init__(self, root: str, split: str, classes: Sequence[str] | None = None, skip_bad: bool = False) -> None:
        base = Path(root) / split
        if not base.is_dir():
            raise ValueError(f"imagefolder: no directory {str(base)!r} (expected DIR/{split}/<class>/*.jpg)")
        self.root = base
        self.classes = list(classes) if classes else sorted(p.name for p in base.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"imagefolder: {str(base)!r} has no class folders")
        files, labels, not_files = [], [], []
        for c, cname in enumerate(self.classes):
            if not (base / cname).is_dir():
                continue
            with os.scandir(base / cname) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                if os.path.splitext(e.name)[1].lower() not in self.EXTS:
                    continue
                if not e.is_file():
                    not_files.append(os.path.join(cname, e.name))
                    continue
                files.append(os.path.join(cname, e.name))
                labels.append(c)
        if not_files:
            first = str(base / not_files[0])
            if not skip_bad:
                raise BadImageError(repr(first), f"is a directory (or not a regular file), not an image; "
                                                 f"{len(not_files)} such entries under {str(base)!r} "
                                                 "(data.skip_bad=true leaves them out)")
            print(f"imagefolder: left out {len(not_files)} {'entry' if len(not_files) == 1 else 'entries'} named "
                  f"like images that are not files, e.g. {first!r}", file=sys.stderr)
        if not files:
            raise ValueError(f"imagefolder: no images under {str(base)!r}")
        # One bytes array, not a list of Paths: cheap to pickle into worker processes (ImageNet: 1.28M).
        self.files = np.array([os.fsencode(f) for f in files])
        self.labels = np.asarray(labels, np.int32)
        self.num_classes = len(self.classes)
        self.left_out = len(not_files)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[index]))

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.path(index), int(self.labels[index])

    def name(self, index: int) -> str:
        return repr(self.path(index))


def make_source(cfg: DataConfig, split: str) -> Source:
    """Fails before any compute on an unknown dataset or a missing data dir."""
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise ValueError(f"data_dir {cfg.data_dir!r} does not exist")
    if cfg.train_augment not in AUGMENTS:
        raise ValueError(f"train_augment must be one of {AUGMENTS}, got {cfg.train_augment!r}")
    if cfg.name == "digits":
        return digits_source(split)
    if cfg.name == "imagefolder":
        if cfg.data_dir is None:
            raise ValueError("imagefolder needs data_dir (DIR/<split>/<class>/*.jpg)")
        # every split takes its class list (and so its label numbers) from the train split
        classes = None if split == cfg.train_split else _folder_classes(cfg.data_dir, cfg.train_split)
        return ImageFolderSource(cfg.data_dir, split, classes, cfg.skip_bad)
    return TfdsSource(cfg.name, split, cfg.data_dir)


def _folder_classes(root: str, split: str) -> list[str]:
    base = Path(root) / split
    if not base.is_dir():
        raise ValueError(f"imagefolder: no directory {str(base)!r} (the train split names the classes)")
    return sorted(p.name for p in base.iterdir() if p.is_dir())


# ---- class names ------------------------------------------------------------------------------


def class_names(source: Any) -> list[str] | None:
    """The name of each label, in label order, where the source knows them."""
    names = getattr(source, "classes", None)
    return list(names) if names else None


def save_class_names(source: Any, workdir: str | os.PathLike) -> Path | None:
    """``workdir/classes.json`` (a JSON list, label i -> name), written atomically; None when
    the source has no names."""
    from mixer_convert.atomic import atomic_path

    names = class_names(source)
    if names is None:
        return None
    dst = Path(workdir) / "classes.json"
    with atomic_path(dst, force=True) as tmp:
        tmp.write_text(json.dumps(names, indent=0, ensure_ascii=False) + "\n")
    return dst
