"""Training and evaluation batches on Grain: parallel, deterministic, resumable.

The unit of work is one batch. Batch ``step`` is computed by ``TrainBatches(step)``, a pure
function of (seed, step): epoch e visits the examples in the order of Grain's ``index_shuffle``
seeded by (seed, e) (every batch full, the remainder of each epoch dropped), and example k of
the epoch is augmented with the generator ``(seed, e, k)``. Grain runs it over
``MapDataset.range(start_step, steps)`` in ``data.workers`` threads or processes (each worker
takes every workers-th step; Grain hands results back in step order), so the stream is the same
for any number or kind of workers, resuming is starting the range at the checkpoint's step,
and nothing about the data needs saving but the step.

Several processes (multi-host): process p computes only rows [p*B/P, (p+1)*B/P) of each global
batch B, so the global batch is the same whatever the process count. (Grain's ShardOptions
shard the *records* instead: each process would see a fixed part of the dataset, and the global
batch would change with the number of processes.)

Images leave the pipeline as uint8 (4x less host->device traffic than float32); the model's
(x - 127.5) / 127.5 runs on the device, inside the jitted step (``normalize``).

The data sources (``make_source``: digits, imagefolder, tfds) and everything about one image
(reading, mode conversion, the crops and the resize) are the core's, shared with mixer-eval and
mixer-predict: :mod:`mixer_convert.datasets` and :mod:`mixer_convert.images`.

Bad data: an unreadable example stops the pipeline with ``ImageError`` naming it. With
``data.skip_bad`` a training example that cannot be read is replaced by the next readable
example of the dataset (index + 1, + 2, ...) with that example's own label, augmented with the
same generator, so every other example and label stays where it was and a rerun makes the
same replacement; in evaluation it is masked out. Replacements are reported and counted.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from mixer_convert.datasets import ImageFolder, TfdsSource, digits, folder_classes
from mixer_convert.images import (WORKER_TYPES, ImageError, crop_resize, default_workers, inception_box, opencv,
                                  read_crop)
from mixer_convert.preprocess import value_range
from mixer_convert.spec import image_hw
from mixer_jax.configs import AUGMENTS, DataConfig

MAX_CONSECUTIVE_BAD = 100  # skip_bad gives up (an error) after this many unreadable examples in a row


# ---- the data ---------------------------------------------------------------------------------


def make_source(cfg: DataConfig, split: str):
    """The config's dataset split as a core data source. Fails before any compute on an unknown
    dataset or a missing data dir; every split of an image folder takes its class list (and so
    its label numbers) from the train split."""
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise ValueError(f"data_dir {cfg.data_dir!r} does not exist")
    if cfg.train_augment not in AUGMENTS:
        raise ValueError(f"train_augment must be one of {AUGMENTS}, got {cfg.train_augment!r}")
    if cfg.name == "digits":
        return digits(split)
    if cfg.name != "imagefolder":
        return TfdsSource(cfg.name, split, cfg.data_dir)
    if cfg.data_dir is None:
        raise ValueError("imagefolder needs data_dir (DIR/<split>/<class>/*.jpg)")
    classes = None if split == cfg.train_split else folder_classes(
        Path(cfg.data_dir) / cfg.train_split, f"DIR/{cfg.train_split}/<class>/*.jpg: the train split names the classes")
    try:
        src = ImageFolder(Path(cfg.data_dir) / split, classes, skip_bad=cfg.skip_bad,
                          expected=f"DIR/{split}/<class>/*.jpg")
    except ImageError as e:
        raise ImageError(e.name, f"{e.reason} (data.skip_bad=true leaves them out)") from None
    if src.left_out:
        print(f"imagefolder: left out {src.left_out} {'entry' if src.left_out == 1 else 'entries'} named like images "
              f"that are not files, e.g. {str(src.root / src.not_files[0])!r}", file=sys.stderr)
    return src


# ---- one example ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Everything a worker needs to turn a record into pixels (picklable, for worker processes)."""

    out_hw: tuple[int, int]
    augment: str = "inception_crop_flip"
    crop_area: tuple[float, float] = (0.05, 1.0)
    draft: bool = True

    def __post_init__(self) -> None:
        opencv()  # a missing or too old OpenCV is one line before training starts, not in a worker

    @classmethod
    def from_config(cls, d: DataConfig) -> "Preprocess":
        return cls(image_hw(d.image_size, "data.image_size"), d.train_augment, tuple(d.crop_area), d.jpeg_draft)

    def train(self, payload, rng: np.random.Generator, name: str | None = None) -> np.ndarray:
        """Official train preprocessing: inception crop, resized (bilinear, no antialias), optional
        flip. ``augment='none'`` is the eval preprocessing."""
        if self.augment == "none":
            return self.eval(payload, name)
        im, box = read_crop(payload, lambda w, h: inception_box(w, h, rng, self.crop_area), self.out_hw,
                            draft=self.draft, name=name)
        flip = self.augment == "inception_crop_flip" and rng.random() < 0.5
        return crop_resize(im, box, self.out_hw, flip)

    def eval(self, payload, name: str | None = None) -> np.ndarray:
        """vit_jax's eval preprocessing: the whole image resized to the model size (bilinear, no
        antialias), here rounded to uint8."""
        im, box = read_crop(payload, None, self.out_hw, draft=self.draft, name=name)
        return crop_resize(im, box, self.out_hw)


def _safe_name(source, index: int) -> str | None:
    name = getattr(source, "name", None)
    return name(index) if name is not None else None


# ---- training batches -------------------------------------------------------------------------


class Batch(NamedTuple):
    images: np.ndarray  # (local_batch, H, W, 3) uint8
    labels: np.ndarray  # (local_batch,) int32
    bad: tuple[str, ...] = ()  # training: what was replaced; eval: what was masked out ("name: reason")
    mask: np.ndarray | None = None  # eval only: which rows are real examples


class TrainBatches:
    """``self(step)``: this process's rows of global batch ``step``, a pure function of (seed, step)."""

    def __init__(self, source, cfg: DataConfig, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> None:
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        if global_batch > len(source):
            raise ValueError(f"batch size {global_batch} is larger than the dataset ({len(source)} examples)")
        self.source, self.pre, self.seed, self.skip_bad = source, Preprocess.from_config(cfg), seed, cfg.skip_bad
        self.global_batch, self.local_batch = global_batch, global_batch // process_count
        self.offset = process_index * self.local_batch
        self.steps_per_epoch = len(source) // global_batch  # drop the remainder: every batch is full

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, first example index within the epoch) of global batch ``step``."""
        return step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.global_batch

    def epoch_order(self, epoch: int) -> Callable[[int], int]:
        """k -> the dataset index of example k of ``epoch``: a permutation of the dataset drawn
        from (seed, epoch), computed per index (Grain's ``index_shuffle``), never materialised."""
        from grain.experimental import index_shuffle

        epoch_seed = int(np.random.SeedSequence((self.seed, epoch)).generate_state(1)[0] >> 1)
        max_index = len(self.source) - 1
        return lambda k: index_shuffle(k, max_index=max_index, seed=epoch_seed, rounds=4)

    def __call__(self, step: int) -> Batch:
        epoch, start = self.position(int(step))
        order = self.epoch_order(epoch)
        images = np.empty((self.local_batch, *self.pre.out_hw, 3), np.uint8)
        labels = np.empty(self.local_batch, np.int32)
        bad: list[str] = []
        for j in range(self.local_batch):
            k = start + self.offset + j
            images[j], labels[j] = self._example(order(k), (self.seed, epoch, k), bad)
        return Batch(images, labels, tuple(bad))

    def _example(self, index: int, key: tuple[int, ...], bad: list[str]) -> tuple[np.ndarray, int]:
        n = len(self.source)
        for attempt in range(MAX_CONSECUTIVE_BAD):
            i = (index + attempt) % n
            name = _safe_name(self.source, i)
            try:
                payload, label = self.source[i]
                # a fresh generator per attempt: the replacement's crop does not depend on the failure
                return self.pre.train(payload, np.random.default_rng(key), name), label
            except ImageError as e:
                if not self.skip_bad:
                    raise ImageError(e.name, f"{e.reason} (data.skip_bad=true replaces unreadable examples)") \
                        from None
                bad.append(str(e))
        raise ImageError(_safe_name(self.source, index) or str(index),
                            f"and the {MAX_CONSECUTIVE_BAD - 1} examples after it cannot be read")


# ---- evaluation batches -----------------------------------------------------------------------


class EvalBatches:
    """``self(b)``: this process's rows of eval batch ``b`` (examples b*B .. b*B+B-1 in dataset
    order, the last batch padded); the mask says which rows are real."""

    def __init__(self, source, cfg: DataConfig, batch: int, process_index: int = 0, process_count: int = 1) -> None:
        if batch % process_count:
            raise ValueError(f"eval batch {batch} is not divisible by {process_count} processes")
        self.source, self.pre, self.skip_bad = source, Preprocess.from_config(cfg), cfg.skip_bad
        self.batch, self.local_batch = batch, batch // process_count
        self.offset = process_index * self.local_batch

    def __len__(self) -> int:
        return -(-len(self.source) // self.batch)

    def __call__(self, b: int) -> Batch:
        images = np.zeros((self.local_batch, *self.pre.out_hw, 3), np.uint8)
        labels = np.zeros(self.local_batch, np.int32)
        mask = np.zeros(self.local_batch, bool)
        bad: list[str] = []
        lo = int(b) * self.batch + self.offset
        for j, i in enumerate(range(lo, min(lo + self.local_batch, len(self.source)))):
            name = _safe_name(self.source, i)
            try:
                payload, labels[j] = self.source[i]
                images[j], mask[j] = self.pre.eval(payload, name), True
            except ImageError as e:
                if not self.skip_bad:
                    raise ImageError(e.name, f"{e.reason} (data.skip_bad=true leaves unreadable examples out)") \
                        from None
                labels[j] = 0
                bad.append(str(e))
        return Batch(images, labels, tuple(bad), mask)


# ---- running them on Grain --------------------------------------------------------------------


def _grain_iter(fn: Callable[[int], Batch], start: int, stop: int, workers: int, worker_type: str):
    import grain

    ds = grain.MapDataset.range(start, stop).map(fn)
    if workers == 0:  # in the calling thread: simplest to debug
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    if worker_type == "thread":  # each thread computes whole batches; Grain hands them back in order
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=workers, prefetch_buffer_size=2 * workers)))
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags when it starts processes; we define none
        flags.FLAGS.mark_as_parsed()
    # process w computes steps start+w, start+w+workers, ...; Grain interleaves them back in order
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return iter(it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)))


def _report_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BatchIterator:
    """Batches in order from Grain; counts (and reports once per example) what was skipped.
    A bad example in a worker comes out here as ``ImageError`` (one line, names the file).
    Workers start at the first ``next``, so building one is cheap and checks the config only."""

    def __init__(self, fn: Callable[[int], Batch], start: int, stop: int, cfg: DataConfig,
                 report: Callable[[str], None] = _report_stderr, what: str = "replaced") -> None:
        self.workers = default_workers() if cfg.workers is None else cfg.workers
        if self.workers < 0 or cfg.worker_type not in WORKER_TYPES:
            raise ValueError(f"data.workers must be >= 0 and data.worker_type one of {WORKER_TYPES}, got "
                             f"{cfg.workers} and {cfg.worker_type!r}")
        self._args = (fn, start, stop, self.workers, cfg.worker_type)
        self._it = None
        self._report, self._what = report, what
        self.skipped = 0  # examples replaced (train) or left out (eval) so far in this process
        self._seen: set[str] = set()

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = _grain_iter(*self._args)
        try:
            batch = next(self._it)
        except Exception as e:  # a worker's error may come back wrapped; find the bad image in it
            cause = _find_bad_image(e)
            if cause is None or cause is e:
                raise
            raise cause from None
        for b in batch.bad:
            self.skipped += 1
            if b not in self._seen:
                self._seen.add(b)
                self._report(f"data: {self._what} unreadable example, {b} ({self.skipped} so far)")
        return batch

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = None


def _find_bad_image(e: BaseException) -> ImageError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, ImageError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class TrainIterator(BatchIterator):
    """``next(it)`` is this process's (images uint8, labels) of the next global batch, starting at
    ``start_step``; ``it.position(step)`` is the (epoch, index) to record with a checkpoint."""

    def __init__(self, batches: TrainBatches, start_step: int, steps: int, cfg: DataConfig, **kw) -> None:
        super().__init__(batches, start_step, steps, cfg, **kw)
        self.batches = batches
        self.steps_per_epoch = batches.steps_per_epoch

    def position(self, step: int) -> dict[str, int]:
        epoch, index = self.batches.position(step)
        return {"epoch": epoch, "index": index}

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        b = super().__next__()
        return b.images, b.labels


def make_train_iterator(cfg, source, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                        **kw) -> TrainIterator:
    """``cfg``: a TrainConfig (its data, batch_size, seed and steps are used)."""
    batches = TrainBatches(source, cfg.data, cfg.batch_size, cfg.seed, process_index, process_count)
    return TrainIterator(batches, start_step, cfg.steps, cfg.data, **kw)


def eval_iterator(cfg: DataConfig, source, batch: int, process_index: int = 0, process_count: int = 1,
                  **kw) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The whole split once, in order: this process's (images uint8, labels, mask) of each
    global batch of ``batch`` examples (the last one padded; the mask says what is real)."""
    batches = EvalBatches(source, cfg, batch, process_index, process_count)
    it = BatchIterator(batches, 0, len(batches), cfg, what="left out", **kw)
    try:
        for b in it:
            yield b.images, b.labels, b.mask
    finally:
        it.close()


def normalize(images):
    """uint8 [0, 255] -> [-1, 1] by the core's ``value_range`` (vit_jax's (x - 127.5) / 127.5), in
    ``images``' framework (jax inside a jitted step, numpy on the host). Float images are taken
    as already in [-1, 1]."""
    if images.dtype != np.uint8:
        return images
    return value_range(images)
