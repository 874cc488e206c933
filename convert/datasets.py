"""Labelled images for training (mixer-train) and evaluation (mixer-eval): random-access sources
of ``(payload, label)`` records, a name for every record, and the class names.

A source has ``len(src)``, ``src[i] -> (payload, label)`` (the payload a file path, encoded
bytes or a decoded uint8 array, any of which :func:`mixer_convert.images.read_image` reads),
``src.name(i)`` (what error messages call record i), ``src.num_classes`` and ``src.classes``
(the label names in label order, or None). Grain reads them as random-access data sources;
sources are picklable, so worker processes can use them.

* :func:`digits`: scikit-learn's 1797 handwritten digits (embedded: works offline).
* :class:`ImageFolder`: ``ROOT/<class>/...`` image files, the class folder's own files
  (mixer-train: ``DIR/<split>/<class>/*.jpg``) or every sub-folder's too (mixer-eval).
* :class:`TfdsSource`: a tfds dataset prepared in array_record format, read with
  ``tfds.data_source`` (no TensorFlow), its images as the stored encoded bytes.
* :func:`synset_labels`: folders named by ImageNet synset ids -> their index in a 1k/21k head.

scikit-learn and tensorflow-datasets (the ``train`` extra) are imported only by the sources that need them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mixer_convert.classes import SYNSET_RE, imagenet_classes
from mixer_convert.images import ImageError

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


class ArraySource:
    """Decoded images in one array (digits; tests)."""

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


def digits(split: str) -> ArraySource:
    """scikit-learn's handwritten digits (8x8, 16 grey levels) as RGB uint8; a fixed stratified
    80/20 split, the same on every machine."""
    if split not in ("train", "test"):
        raise ValueError(f"digits has splits 'train' and 'test', not {split!r}")
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.repeat((d.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None], 3, axis=-1)
    order = np.random.default_rng(0).permutation(len(d.target))
    test_mask = np.zeros(len(order), bool)
    for c in range(10):  # stratified: every 5th example of each class goes to test
        idx = order[d.target[order] == c]
        test_mask[idx[::5]] = True
    keep = test_mask if split == "test" else ~test_mask
    return ArraySource(imgs[keep], d.target[keep], 10, f"digits/{split}", [str(c) for c in range(10)])


# ---- image folders ------------------------------------------------------------------------------


def folder_classes(root: str | os.PathLike, expected: str = "DIR/<class>/*.jpg", *,
                   at_least_one: bool = True) -> list[str]:
    """The class folders of ``root``: its sub-folders, sorted, hidden ones (``.name``) left out; none
    is an error unless not ``at_least_one``. ``expected``: the layout the errors name."""
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"imagefolder: no directory {str(base)!r} (expected {expected})")
    found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if at_least_one and not found:
        raise ValueError(f"imagefolder: {str(base)!r} has no class folders (expected {expected})")
    return found


class ImageFolder:
    """``root/<class>/<image>``, listed once, up front, in sorted order (the same indices on every
    host). ``classes``: the class folders to read (default: all of them, sorted) -- a class
    missing here has no images; ``labels``: class -> label (default: its index in ``classes``);
    ``nested``: images in sub-folders of a class folder count too.

    Hidden files and folders are left out. An entry named like an image that is not a regular
    file (a directory, in a flat class folder; a FIFO, a dangling link) is an error found here,
    before any image is read, unless ``skip_bad``: then it is left out (``not_files``, ``left_out``).
    Unreadable files are found when they are read (:class:`mixer_convert.images.ImageError`).
    """

    def __init__(self, root: str | os.PathLike, classes: Sequence[str] | None = None, *,
                 labels: Mapping[str, int] | None = None, nested: bool = False, skip_bad: bool = False,
                 expected: str = "DIR/<class>/*.jpg") -> None:
        self.root = Path(root)
        found = folder_classes(self.root, expected, at_least_one=not classes)  # given classes may be absent
        self.classes = list(classes) if classes else found
        label_of = dict(labels) if labels is not None else {c: i for i, c in enumerate(self.classes)}
        files, targets, not_files = [], [], []
        for cname in self.classes:
            if (self.root / cname).is_dir():
                good, bad = _list_images(self.root, cname, nested)
                files += good
                targets += [label_of[cname]] * len(good)
                not_files += bad
        if not_files and not skip_bad:
            raise ImageError(str(self.root / not_files[0]), f"is not a regular file (a directory?), not an image; "
                                                            f"{len(not_files)} such entries under {str(self.root)!r}")
        if not files:
            raise ValueError(f"imagefolder: no image files under {str(self.root)!r} ({', '.join(IMAGE_SUFFIXES)})")
        # One bytes array, not a list of Paths: cheap to pickle into worker processes (ImageNet: 1.28M).
        self.files = np.array([os.fsencode(f) for f in files])
        self.labels = np.asarray(targets, np.int32)
        self.num_classes = len(self.classes)  # classes the data has (labels may number a larger head)
        self.not_files = not_files  # entries named like images that are not files, left out (skip_bad)

    @property
    def left_out(self) -> int:
        """How many entries were left out (:attr:`not_files`)."""
        return len(self.not_files)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[index]))

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.path(index), int(self.labels[index])

    def name(self, index: int) -> str:
        return self.path(index)


def _list_images(root: Path, cname: str, nested: bool) -> tuple[list[str], list[str]]:
    """(image files, entries named like images that are not regular files) of one class folder,
    as paths relative to ``root``, sorted by path component."""
    good, bad = [], []
    for rel, is_file in _entries(root, cname, nested):
        if os.path.splitext(rel)[1].lower() in IMAGE_SUFFIXES:
            (good if is_file else bad).append(rel)
    key = lambda p: Path(p).parts  # noqa: E731  (pathlib's order: component by component)
    return sorted(good, key=key), sorted(bad, key=key)


def _entries(root: Path, folder: str, nested: bool):
    """(relative path, is a regular file) of each non-hidden entry; sub-folders searched when ``nested``."""
    with os.scandir(root / folder) as it:
        entries = list(it)
    for e in entries:
        if e.name.startswith("."):
            continue
        rel = os.path.join(folder, e.name)
        if nested and e.is_dir(follow_symlinks=False):
            yield from _entries(root, rel, nested)
            continue
        yield rel, e.is_file()  # a regular file or a link to one; False for FIFOs, dangling links, folders


def synset_labels(classes: Sequence[str], num_classes: int) -> dict[str, int] | None:
    """When every class is an ImageNet synset id (``n01440764``) and the head has 1000 or 21843
    classes: each synset's index in that head (so a folder holding a few ImageNet classes is
    labelled as the model numbers them); else None."""
    known = imagenet_classes(num_classes)
    if known is None or not classes or not all(SYNSET_RE.fullmatch(c) for c in classes):
        return None
    index = {s: i for i, s in enumerate(known.synsets)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise ValueError(f"imagefolder: synset folders not in the model's {num_classes}-class head: "
                         + ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
    return {c: index[c] for c in classes}


# ---- tfds ---------------------------------------------------------------------------------------


class TfdsSource:
    """A tfds dataset prepared in array_record format (``tfds build --file_format=array_record``),
    read by random access without TensorFlow; features ``image`` and ``label``. Default split:
    ``validation`` if the dataset has one, else ``test``."""

    def __init__(self, name: str, split: str | None = None, data_dir: str | None = None) -> None:
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # DatasetNotFoundError lists every registered name; keep the first line
            raise ValueError(f"tfds: unknown dataset {name!r}: {str(e).splitlines()[0]}") from None
        info = builder.info
        if "image" not in info.features or "label" not in info.features:
            raise ValueError(f"tfds: {name} has no 'image' and 'label' features ({', '.join(info.features)})")
        self.split = split or ("validation" if "validation" in info.splits else "test")
        self._src = _data_source(tfds, name, self.split, data_dir, builder.data_dir)
        self._title = f"{name}/{self.split}"
        label = info.features["label"]
        self.num_classes = label.num_classes
        self.classes = list(label.names) if getattr(label, "names", None) else None

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        ex = self._src[int(index)]
        return ex["image"], int(ex["label"])

    def name(self, index: int) -> str:
        return f"{self._title}[{index}]"


def _data_source(tfds, name: str, split: str, data_dir: str | None, prepared_in: str):
    try:
        src = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                               decoders={"image": tfds.decode.SkipDecoding()})  # bytes: decoded by our reader
        try:
            src[0]
        except Exception:  # tfds's test mocks cannot serve encoded images without TensorFlow
            src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        return src
    except Exception as e:
        raise ValueError(f"tfds: {name} split {split!r} cannot be read from {prepared_in!r}: "
                         f"{str(e).splitlines()[0]} (prepare it with `tfds build {name} --file_format=array_record`, "
                         "or convert a TFRecord copy with `tfds convert_format --out_file_format=array_record`; both "
                         "need TensorFlow once, reading does not; or give the directory it was prepared in)") from None


# ---- class names --------------------------------------------------------------------------------


def class_names(source: Any) -> list[str] | None:
    """The name of each label, in label order, where the source knows them."""
    names = getattr(source, "classes", None)
    return list(names) if names else None


def save_class_names(source: Any, workdir: str | os.PathLike) -> Path | None:
    """``workdir/classes.json`` (a JSON list, label i -> name), written atomically; None when the
    source has no names."""
    from mixer_convert.atomic import atomic_path

    names = class_names(source)
    if names is None:
        return None
    dst = Path(workdir) / "classes.json"
    with atomic_path(dst, force=True) as tmp:
        tmp.write_text(json.dumps(names, indent=0, ensure_ascii=False) + "\n")
    return dst
