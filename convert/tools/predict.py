"""mixer-predict IMAGE... --weights NAME|FILE [--framework torch|flax] [--topk 5] [--json]

Classifies images with a Mixer checkpoint in PyTorch or Flax: each image is read (EXIF orientation
applied), preprocessed by an official eval pipeline and run through the model; prints the top-k
classes with their softmax probabilities (ImageNet names for 1k and 21k heads, else indices).
"""
from __future__ import annotations

import sys

from mixer_convert.classes import head_class_names
from mixer_convert.preprocess import PIPELINES
from mixer_convert.command import Parser, add_device, add_image_size, add_json, command, emit, positive_int
from mixer_convert.tools.infer import (Files, describe, load_batches, load_weights, make_classifier, parse_frameworks,
                                       softmax, topk)


def build_parser() -> Parser:
    p = Parser(prog="mixer-predict", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything Pillow reads)")
    p.add_argument("--weights", required=True, metavar="NAME|FILE",
                   help="checkpoint: a file in any format mixer-convert reads (or a published name)")
    p.add_argument("--framework", metavar="torch|flax", help="default: torch if installed, else flax")
    p.add_argument("--preprocess", choices=PIPELINES, default="vit_jax",
                   help="official eval pipeline: vit_jax = resize to the model size (bilinear, no antialias); "
                        "big_vision = shorter side to 256, central 224 crop (default: vit_jax)")
    p.add_argument("--topk", type=positive_int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line (default: ImageNet names for "
                                                    "1000- and 21843-class heads, else class indices)")
    add_image_size(p, "only for checkpoints whose patch grid is not square")
    p.add_argument("--batch", type=positive_int, default=32, help="images per forward pass (default 32)")
    add_device(p)
    add_json(p)
    return p


def predict(images: list[str], weights: str, framework: str | None = None, pipeline: str = "vit_jax",
            k: int = 5, labels: str | None = None, image_size=None, batch: int = 32,
            device: str | None = None) -> dict:
    """Top-k predictions for every image, as a JSON-ready dict."""
    fw = parse_frameworks(framework, single=True)[0]
    flat, cfg = load_weights(weights, image_size)
    names = head_class_names(cfg.num_classes, labels)
    model = make_classifier(fw, flat, cfg, device)
    results = []
    for start, (x, _) in zip(range(0, len(images), batch), load_batches(Files(images), len(images), batch, pipeline,
                                                                       cfg.image_size)):
        logits = model(x)
        probs = softmax(logits)
        for path, row, p, top in zip(images[start:start + batch], logits, probs, topk(logits, k)):
            results.append({"image": path, "top": [
                {"index": int(c), "label": names.names[c] if names else None,
                 "synset": names.synsets[c] if names and names.synsets else None,
                 "probability": float(p[c]), "logit": float(row[c])} for c in top]})
    return {"weights": weights, "model": describe(cfg), "framework": fw, "preprocess": pipeline,
            "labels": names.source if names else None, "predictions": results}


def format_predictions(out: dict) -> str:
    lines = [f"{out['model']}; {out['framework']}; {out['preprocess']} preprocessing"]
    if out["labels"] is None:
        lines.append("no class names for this head (pass --labels FILE): showing class indices")
    for r in out["predictions"]:
        lines.append(r["image"])
        lines += [f"  {t['probability']:7.2%}  {t['index']:>5}  {t['label'] or ''}".rstrip() for t in r["top"]]
    return "\n".join(lines)


@command("mixer-predict")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = predict(args.images, args.weights, args.framework, args.preprocess, args.topk, args.labels,
                  args.image_size, args.batch, args.device)
    emit(out, args.json, format_predictions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
