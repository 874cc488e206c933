"""Shared by ``mixer-predict`` and ``mixer-eval``: load a checkpoint once through the one loading
path, build a classifier in either framework from it, read and preprocess images in parallel.

The PyTorch side imports only torch, the Flax side only jax/flax.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

from mixer_convert.classes import ClassNames, imagenet_classes, read_class_names
from mixer_convert.preprocess import load_image
from mixer_convert.spec import MixerConfig, variant_name
from mixer_convert.errors import MissingExtraError
from mixer_convert.tools.extras import has_extra, require

FRAMEWORKS = ("torch", "flax")
FRAMEWORK_EXTRA = {"torch": "torch", "flax": "jax"}
Classifier = Callable[[np.ndarray], np.ndarray]  # (B, H, W, 3) float32 in [-1, 1] -> (B, classes) float32 logits
T, R = TypeVar("T"), TypeVar("R")


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
    from mixer_convert.load import load_checkpoint

    flat, cfg = load_checkpoint(weights, image_size=tuple(image_size) if image_size else None)
    if cfg.num_classes is None:
        raise ValueError(f"{weights}: the checkpoint has no classification head (pre-logits only)")
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}, cfg


def describe(cfg: MixerConfig) -> str:
    name = variant_name(cfg) or f"custom Mixer (patch {cfg.patch_size[0]}x{cfg.patch_size[1]}, " \
                                  f"width {cfg.hidden_dim}, {cfg.num_blocks} blocks)"
    return f"{name} at {cfg.image_size[0]}x{cfg.image_size[1]}, {cfg.num_classes} classes"


def class_names(cfg: MixerConfig, labels_file: str | None = None) -> ClassNames | None:
    """``--labels FILE`` if given (must have one name per class), else the shipped ImageNet names
    for a 1000- or 21843-class head, else None (callers print class indices)."""
    if labels_file is None:
        return imagenet_classes(cfg.num_classes)
    names = read_class_names(labels_file)
    if len(names) != cfg.num_classes:
        raise ValueError(f"{labels_file}: {len(names)} class names for a {cfg.num_classes}-class head")
    return names


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


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def load_batches(items: Sequence[T], load_one: Callable[[T], R], batch: int, workers: int | None = None
                 ) -> Iterator[list[R]]:
    """``[load_one(item) ...]`` per batch of ``items``, loaded by a thread pool (Pillow's decoders
    and numpy release the GIL), the next batch loading while the caller uses this one."""
    workers = workers or min(8, os.cpu_count() or 1)
    chunks = list(batched(items, batch))
    with ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(load_one, it) for it in chunks[0]] if chunks else []
        for i in range(len(chunks)):
            futures = pending
            pending = [pool.submit(load_one, it) for it in chunks[i + 1]] if i + 1 < len(chunks) else []
            try:
                yield [f.result() for f in futures]
            except BaseException:
                for f in pending:
                    f.cancel()
                raise


def image_loader(pipeline: str, image_size: Sequence[int]) -> Callable[[str], np.ndarray]:
    """path -> preprocessed float32 image."""
    return functools.partial(load_image, pipeline=pipeline, image_size=tuple(image_size))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def topk(logits: np.ndarray, k: int) -> np.ndarray:
    """(B, k) class indices, best first (ties broken by the lower index, the same in every framework)."""
    k = min(k, logits.shape[-1])
    return np.argsort(-logits, axis=-1, kind="stable")[:, :k]

