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

The sources are :mod:`mixer_convert.datasets`' (the ones mixer-train reads). ``--workers`` threads
(or processes) read and preprocess whole batches (:mod:`mixer_convert.preprocess`, exact) while the
models run; the report gives each model's img/s and the end-to-end img/s of the whole run.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import numpy as np

from mixer_convert.datasets import ImageFolder, TfdsSource, folder_classes, synset_labels
from mixer_convert.preprocess import PIPELINES
from mixer_convert.spec import MixerConfig
from mixer_convert.errors import MissingExtraError, importable
from mixer_convert.command import (Parser, add_device, add_image_size, add_json, add_quiet, command, emit,
                                   positive_int)
from mixer_convert.tools.infer import (FRAMEWORKS, WORKER_TYPES, default_workers, describe, load_batches, load_weights,
                                       make_classifier, parse_frameworks, topk)


@dataclasses.dataclass
class Dataset:
    spec: str
    source: Any  # a mixer_convert.datasets source: (payload, label) records
    num_classes: int  # classes the data has
    label_rule: str  # how labels were assigned, for the report
    exif_orientation: bool  # files are shown as a viewer shows them; tfds records as TensorFlow decodes them


def image_folder(root: str, cfg: MixerConfig) -> Dataset:
    classes = folder_classes(root)
    labels = synset_labels(classes, cfg.num_classes)
    if labels is not None:
        rule = f"synset folder names -> ImageNet-{'1k' if cfg.num_classes == 1000 else '21k'} index"
    elif len(classes) > cfg.num_classes:
        raise ValueError(f"imagefolder: {len(classes)} class folders but the model has {cfg.num_classes} classes")
    else:
        rule = "sorted class folder index"
    # entries named like images that are not files (FIFOs, dangling links) are left out, as before
    src = ImageFolder(root, classes, labels=labels, nested=True, skip_bad=True)
    return Dataset(f"imagefolder:{root}", src, len(classes), rule, True)


def tfds_data(name: str, split: str | None, data_dir: str | None, cfg: MixerConfig) -> Dataset:
    if not importable("tensorflow_datasets"):
        raise MissingExtraError(["train"], "tensorflow_datasets")
    src = TfdsSource(name, split, data_dir)
    if src.num_classes > cfg.num_classes:
        raise ValueError(f"tfds: {name} has {src.num_classes} classes but the model has {cfg.num_classes}")
    return Dataset(f"tfds:{name}:{src.split}", src, src.num_classes, "the dataset's labels", False)


def parse_data_spec(spec: str) -> tuple[str, str, str | None]:
    """'imagefolder:DIR' -> ('imagefolder', DIR, None); 'tfds:NAME[:SPLIT]' -> ('tfds', NAME, SPLIT or None)."""
    kind, _, rest = spec.partition(":")
    if kind == "imagefolder" and rest:
        return kind, rest, None
    if kind == "tfds" and rest:
        name, _, split = rest.partition(":")
        return kind, name, split or None
    raise ValueError(f"--data must be imagefolder:DIR or tfds:NAME[:SPLIT], got {spec!r}")


def open_data(spec: str, cfg: MixerConfig, data_dir: str | None = None) -> Dataset:
    kind, where, split = parse_data_spec(spec)
    if kind == "imagefolder":
        return image_folder(where, cfg)
    return tfds_data(where, split, data_dir, cfg)


def evaluate(weights: str, data: str, frameworks: str | None = None, pipeline: str = "vit_jax",
             batch: int = 64, limit: int | None = None, data_dir: str | None = None, image_size=None,
             device: str | None = None, progress: bool = True, workers: int | None = None,
             worker_type: str = "thread") -> dict:
    """Accuracy per framework and their top-1 agreement, as a JSON-ready dict (``top5`` is top-k
    with k = min(5, classes)); images are read and preprocessed by ``workers`` threads or processes
    while the models run, and ``end_to_end_images_per_second`` counts all of it."""
    parse_data_spec(data)  # a typo fails before a large checkpoint is read
    fws = parse_frameworks(frameworks)
    flat, cfg = load_weights(weights, image_size)
    ds = open_data(data, cfg, data_dir)
    n = len(ds.source) if limit is None else min(limit, len(ds.source))
    models = {fw: make_classifier(fw, flat, cfg, device) for fw in fws}
    workers = default_workers() if workers is None else workers
    batches = load_batches(ds.source, n, batch, pipeline, cfg.image_size, exif_orientation=ds.exif_orientation,
                           workers=workers, worker_type=worker_type)
    run = _run_all(models, batches, n, min(5, cfg.num_classes), progress)
    results = {}
    for fw in fws:
        hit1, hitk = run.top[fw][:, 0] == run.labels, (run.top[fw] == run.labels[:, None]).any(-1)
        results[fw] = {"top1": float(hit1.mean()), "top5": float(hitk.mean()), "correct_top1": int(hit1.sum()),
                       "correct_top5": int(hitk.sum()), "seconds": run.seconds[fw],
                       "images_per_second": n / run.seconds[fw]}
    out = {"weights": weights, "model": describe(cfg), "data": ds.spec, "data_classes": ds.num_classes,
           "labels": ds.label_rule, "preprocess": pipeline, "images": n, "topk": min(5, cfg.num_classes),
           "results": results, "end_to_end_images_per_second": n / run.total_seconds,
           "input": {"workers": workers, "worker_type": worker_type, "seconds_waiting": run.waited}}
    if len(fws) > 1:
        same = run.top[fws[0]][:, 0] == run.top[fws[1]][:, 0]
        out["identical_top1"] = {"frameworks": fws[:2], "fraction": float(same.mean()), "count": int(same.sum())}
        out["logits_max_abs_difference"] = run.max_diff
    return out


@dataclasses.dataclass
class _Run:
    labels: np.ndarray
    top: dict[str, np.ndarray]  # top-k classes per framework
    seconds: dict[str, float]  # in each model
    max_diff: float  # largest logit difference between the first framework and the others
    total_seconds: float  # first batch asked for -> last logits
    waited: float  # of which the models waited for input


def _run_all(models: dict[str, Callable], batches, n: int, k: int, progress: bool) -> _Run:
    from tqdm.auto import tqdm

    labels, top = [], {fw: [] for fw in models}
    seconds, max_diff, waited, first = dict.fromkeys(models, 0.0), 0.0, 0.0, next(iter(models))
    start = time.perf_counter()
    with tqdm(total=n, unit="img", desc="mixer-eval", disable=not progress, file=sys.stderr) as bar:
        while True:
            t0 = time.perf_counter()
            x, y = next(batches, (None, None))
            waited += time.perf_counter() - t0
            if x is None:
                break
            labels.append(y)
            logits = {}
            for fw, model in models.items():
                t0 = time.perf_counter()
                logits[fw] = model(x)
                seconds[fw] += time.perf_counter() - t0
                top[fw].append(topk(logits[fw], k))
                max_diff = max(max_diff, float(np.abs(logits[fw] - logits[first]).max()))
            bar.update(len(x))
    return _Run(np.concatenate(labels), {fw: np.concatenate(t) for fw, t in top.items()}, seconds, max_diff,
                time.perf_counter() - start, waited)


def format_eval(out: dict) -> str:
    lines = [f"{out['model']}; {out['images']} images from {out['data']} ({out['data_classes']} classes, labels: "
             f"{out['labels']}); {out['preprocess']} preprocessing",
             f"{'framework':<10}{'top-1':>9}{'top-' + str(out['topk']):>9}{'model img/s':>13}"]
    for fw, r in out["results"].items():
        lines.append(f"{fw:<10}{r['top1']:>9.4f}{r['top5']:>9.4f}{r['images_per_second']:>13.1f}")
    inp = out["input"]
    lines.append(f"end-to-end {out['end_to_end_images_per_second']:.1f} img/s (reading + preprocessing in "
                 f"{inp['workers']} {inp['worker_type']}{'s' if inp['workers'] > 1 else ''} beside the model"
                 f"{'s' if len(out['results']) > 1 else ''}; waited {inp['seconds_waiting']:.1f} s for input)")
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
    p.add_argument("--workers", type=positive_int, help="threads (or processes) reading and preprocessing images "
                                                        "while the model runs (default: one per core)")
    p.add_argument("--worker-type", choices=WORKER_TYPES, default="thread",
                   help="thread (default: faster on the 2-core machine, see benchmarks/RESULTS.md) or process")
    add_image_size(p, "only for checkpoints whose patch grid is not square")
    add_device(p)
    add_json(p)
    add_quiet(p)
    return p


@command("mixer-eval")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = evaluate(args.weights, args.data, args.framework, args.preprocess, args.batch, args.limit, args.data_dir,
                   args.image_size, args.device, progress=not args.quiet, workers=args.workers,
                   worker_type=args.worker_type)
    emit(out, args.json, format_eval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
