"""mixer-convert SRC DST [--to torch|timm|flax|nnx|npz|msgpack|orbax] [--verify] ...; mixer-convert --list

A thin command over :func:`mixer_convert.tools.bridge.convert_checkpoint`, following the commands'
one convention (:mod:`mixer_convert.command`): every failure is one line, exit status 2;
SIGINT and SIGTERM remove the temporary output and exit with 128 + the signal number.
"""
from __future__ import annotations

import sys

from mixer_convert.arrays import DTYPES
from mixer_convert.formats import OUTPUT_KINDS, output_format
from mixer_convert.formats.timm_hub import PREPROCESSING
from mixer_convert.source import MAX_BYTES
from mixer_convert.tools.bridge import convert_checkpoint
from mixer_convert.command import Parser, add_image_size, add_json, add_quiet, command, emit
from mixer_convert.extras import require

# The extra a checkpoint format needs to be written (npz, safetensors, torch's .pt and timm folders need none).
FORMAT_EXTRA = {"msgpack": "jax", "orbax": "jax"}

PROG = "mixer-convert"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=(
        "Convert MLP-Mixer checkpoints between Google's official .npz, Flax (msgpack, orbax), PyTorch "
        "(.pt/.pth/.bin) and safetensors, in our naming or timm's. The architecture is read from the "
        "tensor shapes; the source is never modified. SRC may name a published checkpoint (see --list), "
        "which is downloaded into the cache ($MIXER_CACHE) first."))
    p.add_argument("src", nargs="?", help="checkpoint to read (.npz, .msgpack, orbax dir, .pt/.pth/.bin, "
                   ".safetensors), or a published one: B/16-i21k, B-i21k/16, gs://mixer_models/..., its https "
                   "URL, hf-hub:timm/...")
    p.add_argument("dst", nargs="?", help="file to write (its suffix picks the format unless --to is given)")
    p.add_argument("--list", action="store_true",
                   help="list the published checkpoints (name, bucket path, variant, head, MiB, cached) and exit")
    p.add_argument("--to", choices=OUTPUT_KINDS,
                   help="timm: keys for timm's mlp_mixer (.pth or .safetensors); flax: .npz/.msgpack/orbax dir; "
                        "timm-hub: a timm / Hugging Face model folder (config.json, model.safetensors, README.md "
                        "model card; always verified) that timm.create_model('local-dir:DST') loads; "
                        "nnx: an orbax dir of nnx.state(model, nnx.Param) (a .msgpack is the same as flax's)")
    p.add_argument("--preprocess", choices=tuple(PREPROCESSING),
                   help="timm-hub only: the official eval preprocessing config.json asks timm for: vit_jax "
                        "(default; whole image resized to 224, bilinear) or big_vision (shorter side 256, "
                        "central 224 crop)")
    p.add_argument("--variant", help="expected variant, e.g. B/16; an error if the weights say otherwise")
    add_image_size(p, "only for checkpoints whose patch grid is not square")
    p.add_argument("--prefix", help="the parameter tree to read when a file holds several "
                                    "(e.g. params/ beside opt/target/); the error lists them")
    p.add_argument("--dtype", choices=DTYPES, default="keep", help="cast floating weights (default: keep)")
    p.add_argument("--verify", action="store_true",
                   help="read the output back and compare probe-batch logits against a float64 reference; "
                        "fails (and writes nothing) on NaN/Inf or over-tolerance logits")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert weights with NaN/Inf (with a warning)")
    p.add_argument("--allow-large", action="store_true",
                   help="read checkpoints declaring more than 4x the size of H/14 (refused by default)")
    add_quiet(p)
    add_json(p)
    return p


@command(PROG, interrupted="; nothing was written")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        from mixer_convert.hub import catalogue_table
        print(catalogue_table())
        return 0
    if args.src is None or args.dst is None:
        parser.error("SRC and DST are required (or --list)")
    # Before reading anything: a missing extra for the output is one line, not a traceback
    # (the source's reader says so itself, once it knows the format).
    fmt = output_format(args.dst, args.to)[0]
    require(*([FORMAT_EXTRA[fmt]] if fmt in FORMAT_EXTRA else []))
    report = convert_checkpoint(args.src, args.dst, args.to, variant=args.variant, dtype=args.dtype,
                                force=args.force, verify=args.verify, allow_nonfinite=args.allow_nonfinite,
                                image_size=tuple(args.image_size) if args.image_size else None,
                                progress=False if args.quiet else None, prefix=args.prefix,
                                max_bytes=None if args.allow_large else MAX_BYTES, preprocess=args.preprocess)
    emit(report.to_json(), args.json, lambda _: report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
