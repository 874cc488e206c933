"""Input pipelines: random-access sources + official preprocessing, deterministic per seed.

Order and augmentation are pure functions of (seed, step), so a resumed run sees exactly
the batches an uninterrupted one would, and every process of a multi-host run can take its
own slice of each global batch without talking to the others.

Sources: ``digits`` (scikit-learn's 1797 real handwritten digits, embedded, works offline),
any tfds dataset already prepared in a data dir (``tfds.data_source``, no TensorFlow
needed), and ``imagefolder`` (``DIR/<split>/<class>/*.jpg|png``, read with Pillow).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from mixer_jax.configs import AUGMENTS, DataConfig


class Source(Protocol):
    num_classes: int

    def __len__(self) -> int: ...
    def get(self, index: int) -> tuple[np.ndarray, int]: ...  # (H, W, 3) uint8, label


# ---- sources --------------------------------------------------------------------------------


class ArraySource:
    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        self.images, self.labels, self.num_classes = images, labels, num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


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
    return ArraySource(imgs[keep], d.target[keep], 10)


class TfdsSource:
    """A tfds dataset prepared in array_record format (``tfds build --file_format=array_record``),
    read by random access without TensorFlow."""

    def __init__(self, name: str, split: str, data_dir: str | None) -> None:
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # DatasetNotFoundError lists every registered name; keep the first line
            raise ValueError(f"unknown dataset {name!r}: {str(e).splitlines()[0]}") from None
        try:
            self._src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            raise ValueError(f"dataset {name!r} split {split!r} cannot be read from {builder.data_dir!r}: "
                             f"{str(e).splitlines()[0]} (prepare it with `tfds build {name} "
                             "--file_format=array_record`, or convert a TFRecord copy with `tfds convert_format "
                             "--out_file_format=array_record`; both need TensorFlow once, training does not; "
                             "or set data.data_dir)") from None
        self.num_classes = builder.info.features["label"].num_classes

    def __len__(self) -> int:
        return len(self._src)

    def get(self, index: int) -> tuple[np.ndarray, int]:
        ex = self._src[index]
        img = np.asarray(ex["image"])
        if img.ndim == 2 or img.shape[-1] == 1:
            img = np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=-1)
        return img, int(ex["label"])


class ImageFolderSource:
    EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

    def __init__(self, root: str, split: str, classes: Sequence[str] | None = None) -> None:
        base = Path(root) / split
        if not base.is_dir():
            raise ValueError(f"imagefolder: no directory {str(base)!r} (expected DIR/{split}/<class>/*.jpg)")
        self.classes = list(classes) if classes else sorted(p.name for p in base.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"imagefolder: {str(base)!r} has no class folders")
        self.files, labels = [], []
        for c, name in enumerate(self.classes):
            for f in sorted((base / name).iterdir()) if (base / name).is_dir() else ():
                if f.suffix.lower() in self.EXTS:
                    self.files.append(f)
                    labels.append(c)
        if not self.files:
            raise ValueError(f"imagefolder: no images under {str(base)!r}")
        self.labels = np.asarray(labels)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def get(self, index: int) -> tuple[np.ndarray, int]:
        with Image.open(self.files[index]) as im:
            return np.asarray(im.convert("RGB")), int(self.labels[index])


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
        classes = None if split == cfg.train_split else ImageFolderSource(cfg.data_dir, cfg.train_split).classes
        return ImageFolderSource(cfg.data_dir, split, classes)
    return TfdsSource(cfg.name, split, cfg.data_dir)


# ---- preprocessing ----------------------------------------------------------------------------


def _size(image_size) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], the official (x - 127.5) / 127.5."""
    return (img.astype(np.float32) - 127.5) / 127.5


def eval_preprocess(img: np.ndarray, image_size) -> np.ndarray:
    """Official eval: bilinear resize to the model size (no crop), then [-1, 1]."""
    h, w = _size(image_size)
    if img.shape[:2] != (h, w):
        img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    return normalize(img)


def train_preprocess(img: np.ndarray, image_size, rng: np.random.Generator, augment: str,
                     area: tuple[float, float] = (0.05, 1.0)) -> np.ndarray:
    """Inception crop (random area and aspect 3/4..4/3, as tf.image.sample_distorted_bounding_box)
    resized bilinearly, optional horizontal flip, then [-1, 1]."""
    if augment == "none":
        return eval_preprocess(img, image_size)
    h, w = _size(image_size)
    H, W = img.shape[:2]
    box = (0.0, 0.0, float(W), float(H))
    for _ in range(10):
        target = rng.uniform(*area) * H * W
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = np.sqrt(target * aspect), np.sqrt(target / aspect)
        if cw <= W and ch <= H:
            x0, y0 = rng.uniform(0, W - cw), rng.uniform(0, H - ch)
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    out = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR, box=box))
    if augment == "inception_crop_flip" and rng.random() < 0.5:
        out = out[:, ::-1]
    return normalize(out)


# ---- deterministic batching -------------------------------------------------------------------


class Batches:
    """Global batch ``step`` of a training run, as this process's slice. Epoch e uses the
    permutation drawn from (seed, e); example augmentation uses (seed, e, position)."""

    def __init__(self, source: Source, cfg: DataConfig, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1) -> None:
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        if global_batch > len(source):
            raise ValueError(f"batch size {global_batch} is larger than the dataset ({len(source)} examples)")
        self.source, self.cfg, self.seed = source, cfg, seed
        self.global_batch, self.local_batch = global_batch, global_batch // process_count
        self.offset = process_index * self.local_batch
        self.steps_per_epoch = len(source) // global_batch  # drop the remainder: every batch is full
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm_epoch = epoch
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(len(self.source))
        return self._perm

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, first example index within the epoch) of global batch ``step``."""
        return divmod(step, self.steps_per_epoch)[0], (step % self.steps_per_epoch) * self.global_batch

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, start = self.position(step)
        perm = self._permutation(epoch)
        images, labels = [], []
        for j in range(self.offset, self.offset + self.local_batch):
            img, label = self.source.get(int(perm[start + j]))
            rng = np.random.default_rng((self.seed, epoch, start + j))
            images.append(train_preprocess(img, self.cfg.image_size, rng, self.cfg.train_augment,
                                           self.cfg.crop_area))
            labels.append(label)
        return np.stack(images), np.asarray(labels, np.int32)


def eval_batches(source: Source, cfg: DataConfig, batch: int, process_index: int = 0, process_count: int = 1):
    """The whole split in order, in global batches of ``batch`` (the last one padded); yields
    this process's slice of each as (images, labels, mask), the mask saying what is real."""
    local = batch // process_count
    for start in range(0, len(source), batch):
        lo = start + process_index * local
        idx = range(lo, min(lo + local, len(source)))
        pairs = [source.get(i) for i in idx]
        x = np.zeros((local, *_size(cfg.image_size), 3), np.float32)
        y = np.zeros(local, np.int32)
        mask = np.zeros(local, bool)
        for j, (img, label) in enumerate(pairs):
            x[j], y[j], mask[j] = eval_preprocess(img, cfg.image_size), label, True
        yield x, y, mask
