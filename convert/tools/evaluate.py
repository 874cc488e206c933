"""mixer-eval --weights NAME|FILE --data imagefolder:DIR|tfds:NAME[:SPLIT] [--framework torch,flax]
[--preprocess vit_jax|big_vision]

Top-1/top-5 accuracy of a checkpoint on labelled images in each framework, and the fraction of
images on which the frameworks predict the same top-1 class.

Data:
* ``imagefolder:DIR``: ``DIR/<class>/...`` image files (sub-folders searched too). The label is the
  class folder's index in sorted order, unless every folder is named by an ImageNet synset id
  (``n01440764``) and the model has a 1000- or 21843-class head: then the synset's index in that
  head (so a folder holding a few ImageNet classes is labelled correctly).
* ``tfds:NAME[:SPLIT]``: a tfds dataset prepared in array_record format (``--data-dir``), read with
  ``tfds.data_source`` (no TensorFlow); features ``image`` and ``label``. Default split:
  ``validation`` if the dataset has one, else ``test``.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mixer_convert.classes import SYNSET_RE, imagenet_classes
from mixer_convert.preprocess import PIPELINES, preprocess
from mixer_convert.spec import MixerConfig
from mixer_convert.errors import MissingExtraError
from mixer_convert.tools.command import (Parser, add_device, add_image_size, add_json, add_quiet, command, emit,
                                         positive_int)
from mixer_convert.tools.infer import (FRAMEWORKS, describe, image_loader, load_batches, load_weights,
                                       make_classifier, parse_frameworks, topk)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}


@dataclasses.dataclass
class Dataset:
    spec: str
    items: Sequence  # (path, label) pairs, or record indices
    load_one: Callable[..., tuple[np.ndarray, int]]  # item -> (preprocessed float32 image, label)
    num_classes: int  # classes the data has
    label_rule: str  # how labels were assigned, for the report


def image_folder(root: str, cfg: MixerConfig, pipeline: str) -> Dataset:
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"imagefolder: {root!r} is not a directory (expected DIR/<class>/*.jpg)")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"imagefolder: {root!r} has no class folders (expected DIR/<class>/*.jpg)")
    known = imagenet_classes(cfg.num_classes)
    if known is not None and all(SYNSET_RE.fullmatch(c) for c in classes):
        index = {s: i for i, s in enumerate(known.synsets)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise ValueError(f"imagefolder: synset folders not in the model's {cfg.num_classes}-class head: "
                             + ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
        label_of, rule = index, f"synset folder names -> ImageNet-{'1k' if cfg.num_classes == 1000 else '21k'} index"
    else:
        if len(classes) > cfg.num_classes:
            raise ValueError(f"imagefolder: {len(classes)} class folders but the model has {cfg.num_classes} classes")
        label_of, rule = {c: i for i, c in enumerate(classes)}, "sorted class folder index"
    items = [(str(f), label_of[c]) for c in classes for f in sorted((base / c).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()]
    if not items:
        raise ValueError(f"imagefolder: no image files under {root!r} ({', '.join(sorted(IMAGE_SUFFIXES))})")
    load = image_loader(pipeline, cfg.image_size)
    return Dataset(f"imagefolder:{root}", items, lambda item: (load(item[0]), item[1]), len(classes), rule)


def tfds_data(name: str, split: str | None, data_dir: str | None, cfg: MixerConfig, pipeline: str) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ModuleNotFoundError:
        raise MissingExtraError(["train"], "tensorflow_datasets") from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError lists every registered name; keep the first line
        raise ValueError(f"tfds: unknown dataset {name!r}: {str(e).splitlines()[0]}") from None
    info = builder.info
    if "image" not in info.features or "label" not in info.features:
        raise ValueError(f"tfds: {name} has no 'image' and 'label' features ({', '.join(info.features)})")
    if split is None:
        split = "validation" if "validation" in info.splits else "test"
    try:
        src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
        raise ValueError(f"tfds: {name} split {split!r} cannot be read from {builder.data_dir!r}: "
                         f"{str(e).splitlines()[0]} (prepare it with `tfds build {name} --file_format=array_record`,"
                         " or pass --data-dir)") from None
    num_classes = info.features["label"].num_classes
    if num_classes > cfg.num_classes:
        raise ValueError(f"tfds: {name} has {num_classes} classes but the model has {cfg.num_classes}")

    def load_one(i: int) -> tuple[np.ndarray, int]:
        record = src[int(i)]
        img = np.asarray(record["image"])
        if img.ndim == 2 or img.shape[-1] == 1:
            img = np.repeat(img.reshape(*img.shape[:2], 1), 3, axis=-1)
        return preprocess(img, pipeline, cfg.image_size), int(record["label"])

    return Dataset(f"tfds:{name}:{split}", range(len(src)), load_one, num_classes, "the dataset's labels")


def parse_data_spec(spec: str) -> tuple[str, str, str | None]:
    """'imagefolder:DIR' -> ('imagefolder', DIR, None); 'tfds:NAME[:SPLIT]' -> ('tfds', NAME, SPLIT or None)."""
    kind, _, rest = spec.partition(":")
    if kind == "imagefolder" and rest:
        return kind, rest, None
    if kind == "tfds" and rest:
        name, _, split = rest.partition(":")
        return kind, name, split or None
    raise ValueError(f"--data must be imagefolder:DIR or tfds:NAME[:SPLIT], got {spec!r}")


def open_data(spec: str, cfg: MixerConfig, pipeline: str, data_dir: str | None = None) -> Dataset:
    kind, where, split = parse_data_spec(spec)
    if kind == "imagefolder":
        return image_folder(where, cfg, pipeline)
    return tfds_data(where, split, data_dir, cfg, pipeline)


def evaluate(weights: str, data: str, frameworks: str | None = None, pipeline: str = "vit_jax",
             batch: int = 64, limit: int | None = None, data_dir: str | None = None, image_size=None,
             device: str | None = None, progress: bool = True) -> dict:
    """Accuracy per framework and their top-1 agreement, as a JSON-ready dict (``top5`` is top-k
    with k = min(5, classes))."""
    parse_data_spec(data)  # a typo fails before a large checkpoint is read
    fws = parse_frameworks(frameworks)
    flat, cfg = load_weights(weights, image_size)
    ds = open_data(data, cfg, pipeline, data_dir)
    n = len(ds.items) if limit is None else min(limit, len(ds.items))
    models = {fw: make_classifier(fw, flat, cfg, device) for fw in fws}
    k = min(5, cfg.num_classes)
    y, top, seconds, max_diff = _run_all(models, ds, n, batch, k, progress)
    results = {}
    for fw in fws:
        hit1, hitk = top[fw][:, 0] == y, (top[fw] == y[:, None]).any(-1)
        results[fw] = {"top1": float(hit1.mean()), "top5": float(hitk.mean()), "correct_top1": int(hit1.sum()),
                       "correct_top5": int(hitk.sum()), "seconds": seconds[fw], "images_per_second": n / seconds[fw]}
    out = {"weights": weights, "model": describe(cfg), "data": ds.spec, "data_classes": ds.num_classes,
           "labels": ds.label_rule, "preprocess": pipeline, "images": n, "topk": k, "results": results}
    if len(fws) > 1:
        same = top[fws[0]][:, 0] == top[fws[1]][:, 0]
        out["identical_top1"] = {"frameworks": fws[:2], "fraction": float(same.mean()), "count": int(same.sum())}
        out["logits_max_abs_difference"] = max_diff
    return out


def _run_all(models: dict[str, Callable], ds: Dataset, n: int, batch: int, k: int, progress: bool
             ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float], float]:
    """Labels, top-k classes per framework, model seconds per framework, and the largest logit
    difference between the first framework and the others, over the first ``n`` items."""
    from tqdm.auto import tqdm

    labels, top = [], {fw: [] for fw in models}
    seconds, max_diff, first = dict.fromkeys(models, 0.0), 0.0, next(iter(models))
    with tqdm(total=n, unit="img", desc="mixer-eval", disable=not progress, file=sys.stderr) as bar:
        for loaded in load_batches(ds.items[:n], ds.load_one, batch):
            x = np.stack([img for img, _ in loaded])
            labels.append(np.array([label for _, label in loaded]))
            logits = {}
            for fw, model in models.items():
                t0 = time.perf_counter()
                logits[fw] = model(x)
                seconds[fw] += time.perf_counter() - t0
                top[fw].append(topk(logits[fw], k))
                max_diff = max(max_diff, float(np.abs(logits[fw] - logits[first]).max()))
            bar.update(len(x))
    return np.concatenate(labels), {fw: np.concatenate(t) for fw, t in top.items()}, seconds, max_diff


def format_eval(out: dict) -> str:
    lines = [f"{out['model']}; {out['images']} images from {out['data']} ({out['data_classes']} classes, labels: "
             f"{out['labels']}); {out['preprocess']} preprocessing",
             f"{'framework':<10}{'top-1':>9}{'top-' + str(out['topk']):>9}{'model img/s':>13}"]
    for fw, r in out["results"].items():
        lines.append(f"{fw:<10}{r['top1']:>9.4f}{r['top5']:>9.4f}{r['images_per_second']:>13.1f}")
    if "identical_top1" in out:
        s = out["identical_top1"]
        lines.append(f"identical top-1, {' vs '.join(s['frameworks'])}: {s['fraction']:.4f} ({s['count']}/"
                     f"{out['images']}); logits max-abs difference {out['logits_max_abs_difference']:.2e}")
    return "\n".join(lines)


def build_parser() -> Parser:
    p = Parser(prog="mixer-eval", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--weights", required=True, metavar="NAME|FILE",
                   help="checkpoint: a file in any format mixer-convert reads (or a published name)")
    p.add_argument("--data", required=True, metavar="imagefolder:DIR|tfds:NAME[:SPLIT]")
    p.add_argument("--data-dir", help="tfds data directory (default: tfds's)")
    p.add_argument("--framework", metavar=",".join(FRAMEWORKS), help="default: every installed one")
    p.add_argument("--preprocess", choices=PIPELINES, default="vit_jax",
                   help="vit_jax: resize to the model size, bilinear without antialias; big_vision: shorter "
                        "side to 256 (area), central 224 crop (default: vit_jax)")
    p.add_argument("--batch", type=positive_int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N images")
    add_image_size(p, "only for checkpoints whose patch grid is not square")
    add_device(p)
    add_json(p)
    add_quiet(p)
    return p


@command("mixer-eval")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = evaluate(args.weights, args.data, args.framework, args.preprocess, args.batch, args.limit, args.data_dir,
                   args.image_size, args.device, progress=not args.quiet)
    emit(out, args.json, format_eval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
