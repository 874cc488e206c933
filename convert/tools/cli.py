"""mixer-convert SRC DST [--to torch|timm|flax|npz|msgpack|orbax] [--verify] ...; mixer-convert --list

Every failure is one line on stderr, ``mixer-convert: error: ...``, exit status 2; SIGINT and
SIGTERM remove the temporary output and exit with 128 + the signal number.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from mixer_convert.atomic import Interrupted, interruptible
from mixer_convert.errors import one_line
from mixer_convert.dtypes import DTYPES
from mixer_convert.errors import CheckpointError, MissingExtraError
from mixer_convert.formats import output_format
from mixer_convert.source import MAX_BYTES
from mixer_convert.params import ParamMismatchError
from mixer_convert.tools.extras import cli_errors, require

# The extra a checkpoint format needs to be read or written (npz and safetensors need none).
FORMAT_EXTRA = {"torch": "torch", "msgpack": "jax", "orbax": "jax"}

PROG = "mixer-convert"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=(
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
    p.add_argument("--to", choices=["torch", "timm", "flax", "npz", "msgpack", "orbax"],
                   help="timm: keys for timm's mlp_mixer (.pth or .safetensors); flax: .npz/.msgpack/orbax dir")
    p.add_argument("--variant", help="expected variant, e.g. B/16; an error if the weights say otherwise")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="only for checkpoints whose patch grid is not square")
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {one_line(Warning(str(message)))}", file=sys.stderr)


@cli_errors(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        from mixer_convert.hub import catalogue_table
        print(catalogue_table())
        return 0
    if args.src is None or args.dst is None:
        parser.error("SRC and DST are required (or --list)")

    def error(msg: str) -> None:
        print(f"{PROG}: error: {msg}", file=sys.stderr)

    old_show = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        # Before reading anything: a missing extra for the output is one line, not a traceback
        # (the source's reader says so itself, once it knows the format).
        fmt = output_format(args.dst, args.to)[0]
        require(*([FORMAT_EXTRA[fmt]] if fmt in FORMAT_EXTRA else []))
        with interruptible():
            from mixer_convert.tools.bridge import convert_checkpoint
            report = convert_checkpoint(args.src, args.dst, args.to, variant=args.variant, dtype=args.dtype,
                                        force=args.force, verify=args.verify, allow_nonfinite=args.allow_nonfinite,
                                        image_size=tuple(args.image_size) if args.image_size else None,
                                        progress=False if args.quiet else None, prefix=args.prefix,
                                        max_bytes=None if args.allow_large else MAX_BYTES)
    except Interrupted as e:
        error(f"interrupted by {e}; nothing was written")
        return 128 + e.signum
    except (CheckpointError, ParamMismatchError, OSError, ValueError) as e:
        error(one_line(e))
        return 2
    except (MissingExtraError, ModuleNotFoundError):
        raise  # cli_errors names the extra to install
    except MemoryError:
        error("out of memory")
        return 2
    except Exception as e:  # a bug, not bad input: still one line, but say so
        error(f"internal error ({type(e).__name__}: {one_line(e)}); please report this")
        return 2
    finally:
        warnings.showwarning = old_show
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
