"""Shared by ``mixer-predict`` and ``mixer-eval``: load a checkpoint once through the one loading
path, build a classifier in either framework from it, and feed it batches that worker threads
(or processes) decode and preprocess while the model runs.

The PyTorch side imports only torch, the Flax side only jax/flax.
"""
from __future__ import annotations

import collections
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from mixer_convert.images import WORKER_TYPES, default_workers
from mixer_convert.preprocess import load_image
from mixer_convert.spec import MixerConfig, variant_name
from mixer_convert.errors import MissingExtraError
from mixer_convert.extras import has_extra, require

FRAMEWORKS = ("torch", "flax")
FRAMEWORK_EXTRA = {"torch": "torch", "flax": "jax"}
Classifier = Callable[[np.ndarray], np.ndarray]  # (B, H, W, 3) float32 in [-1, 1] -> (B, classes) float32 logits


def available_frameworks() -> list[str]:
    return [fw for fw in FRAMEWORKS if has_extra(FRAMEWORK_EXTRA[fw])]


def parse_frameworks(spec: str | None, single: bool = False) -> list[str]:
    """'torch', 'flax', 'torch,flax' or None (every installed one; the first when ``single``).
    Raises ValueError for unknown names and MissingExtraError for frameworks not installed."""
    if spec is None:
        found = available_frameworks()
        if not found:
            raise MissingExtraError([FRAMEWORK_EXTRA[fw] for fw in FRAMEWORKS], any_of=True)
        return found[:1] if single else found
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in FRAMEWORKS]
    if bad or not names or (single and len(names) != 1):
        want = "torch or flax" if single else "torch, flax or torch,flax"
        raise ValueError(f"--framework must be {want}, got {spec!r}")
    require(*(FRAMEWORK_EXTRA[n] for n in names))
    return list(dict.fromkeys(names))


def load_weights(weights: str, image_size: Sequence[int] | None = None) -> tuple[dict[str, np.ndarray], MixerConfig]:
    """Canonical float32 params and config of a checkpoint (any format the bridge reads; names once
    the catalogue knows them), through :func:`mixer_convert.load.load_checkpoint`. Needs a head."""
    from mixer_convert import kernels
    from mixer_convert.load import load_checkpoint

    kernels.start()  # the compiled preprocessing (where numba is installed) loads while the weights do
    flat, cfg = load_checkpoint(weights, image_size=tuple(image_size) if image_size else None)
    if cfg.num_classes is None:
        raise ValueError(f"{weights}: the checkpoint has no classification head (pre-logits only)")
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}, cfg


def describe(cfg: MixerConfig) -> str:
    name = variant_name(cfg) or f"custom Mixer (patch {cfg.patch_size[0]}x{cfg.patch_size[1]}, " \
                                  f"width {cfg.hidden_dim}, {cfg.num_blocks} blocks)"
    return f"{name} at {cfg.image_size[0]}x{cfg.image_size[1]}, {cfg.num_classes} classes"


def make_classifier(framework: str, flat: dict[str, np.ndarray], cfg: MixerConfig,
                    device: str | None = None) -> Classifier:
    if framework == "torch":
        return _torch_classifier(flat, cfg, device)
    if framework == "flax":
        return _flax_classifier(flat, cfg)
    raise ValueError(f"unknown framework {framework!r}")


def _torch_classifier(flat, cfg, device) -> Classifier:
    import torch

    from mixer_convert.tools.parity import torch_device
    from mixer_torch.model import MlpMixer, load_flat

    dev = torch_device(device)
    model = load_flat(MlpMixer(cfg), flat).eval().to(dev)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dev)
            return model(t).float().cpu().numpy()
    return run


def _flax_classifier(flat, cfg) -> Classifier:
    import jax

    from mixer_jax.model import MlpMixer, params_from_flat

    model, params = MlpMixer(cfg), params_from_flat(flat, cfg)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    compiled_for: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        # Pad a short last batch to the first batch's size: one compilation instead of two.
        n = len(x)
        if not compiled_for:
            compiled_for.append(n)
        if n < compiled_for[0]:
            x = np.concatenate([x, np.zeros((compiled_for[0] - n, *x.shape[1:]), x.dtype)])
        return np.asarray(apply(params, x), np.float32)[:n]
    return run


class Files:
    """Image files as a data source (mixer-predict): record i is (path, -1), named by its path."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.paths[index], -1

    def name(self, index: int) -> str:
        return self.paths[index]


def load_batches(source: Any, count: int, batch: int, pipeline: str, image_size: Sequence[int], *,
                 exif_orientation: bool = True, workers: int | None = None, worker_type: str = "thread"
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images (b, H, W, 3) float32, labels (b,)) for records 0..count-1 of ``source``, batch by
    batch in order, read and preprocessed by ``workers`` threads or processes, each preparing a
    whole batch while the caller uses the previous one. With threads a batch's array is reused
    once the next batch is asked for (the model has copied it by then)."""
    workers = default_workers() if workers is None else workers
    if workers < 1 or worker_type not in WORKER_TYPES:
        raise ValueError(f"workers must be >= 1 and the worker type one of {WORKER_TYPES}, got {workers}, {worker_type!r}")
    chunks = [range(i, min(i + batch, count)) for i in range(0, count, batch)]
    shape = (batch, *tuple(image_size), 3)
    args = (source, pipeline, tuple(image_size), exif_orientation)
    if worker_type == "thread":
        with ThreadPoolExecutor(workers) as pool:
            buffers = [np.empty(shape, np.float32) for _ in range(workers + 1)]  # in flight + the caller's
            yield from _in_order(pool, chunks, workers, lambda c: (_load_chunk, *args, c, buffers.pop()),
                                 lambda x: buffers.append(x.base if x.base is not None else x))
    else:
        import multiprocessing

        # spawn: the parent may hold torch's or XLA's threads, which fork would copy in a broken state.
        # The source goes to each process once (initializer), each task only its record indices.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_set_reader,
                                 initargs=args) as pool:
            yield from _in_order(pool, chunks, workers, lambda c: (_load_chunk_in_reader, c), lambda x: None)


def _in_order(pool: Executor, chunks: list, depth: int, task: Callable, done: Callable
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    pending: collections.deque = collections.deque()
    todo = iter(chunks)

    def submit() -> None:
        chunk = next(todo, None)
        if chunk is not None:
            fn, *args = task(chunk)
            pending.append(pool.submit(fn, *args))

    try:
        for _ in range(depth):
            submit()
        while pending:
            x, y = pending.popleft().result()
            submit()  # keeps `depth` batches in the workers while the caller has this one
            yield x, y
            done(x)
    finally:
        for f in pending:
            f.cancel()


_reader: tuple = ()  # in a reader process: (source, pipeline, image_size, exif_orientation)


def _set_reader(*args: Any) -> None:
    global _reader
    _reader = args


def _load_chunk_in_reader(indices: range) -> tuple[np.ndarray, np.ndarray]:
    return _load_chunk(*_reader, indices, None)


def _load_chunk(source: Any, pipeline: str, image_size: tuple[int, int], exif_orientation: bool,
                indices: range, out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One batch, in a worker; ``out``: the array to fill (threads) or None (processes)."""
    x = np.empty((len(indices), *image_size, 3), np.float32) if out is None else out[:len(indices)]
    labels = np.empty(len(indices), np.int64)
    for j, i in enumerate(indices):
        payload, labels[j] = source[i]
        load_image(payload, pipeline, image_size, exif_orientation, name=source.name(i), out=x[j])
    return x, labels


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def topk(logits: np.ndarray, k: int) -> np.ndarray:
    """(B, k) class indices, best first (ties broken by the lower index, the same in every framework)."""
    k = min(k, logits.shape[-1])
    return np.argsort(-logits, axis=-1, kind="stable")[:, :k]

