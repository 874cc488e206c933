"""mixer-parity: Flax (Linen and NNX) vs PyTorch (and timm) on the same weights, every block, fp32
and bf16, forward and gradients; a table for people and JSON for CI. Exit code 1 if any bound fails.

Bounds (documented in README), for Linen vs PyTorch and NNX vs PyTorch alike:
* fp32 forward: logits max-abs <= 1e-4 and every intermediate's max-abs <= 1e-5 x its max |value|.
* bf16 forward: every intermediate within 5e-2 x its max |value| (one bf16 rounding is 3.9e-3).
* fp32 gradients of the mean cross-entropy, per parameter:
  max-abs <= 1e-4 x max|grad of that parameter| + 1e-6 x max|grad of any parameter|. The second
  term is for the token-mixing Dense_1 biases, whose gradient is analytically zero (each adds
  a per-token constant across channels, which every following LayerNorm removes), so only
  rounding noise is left to compare.
* timm (exact GELU) is reported, not bounded; with its GELU switched to tanh it must meet the
  fp32 logits bound.
* NNX vs Linen (with ``--flax-api both``, the default): bit-identical forward (fp32 and bf16) and
  gradients on the CPU, where both are the same XLA program on the same device. On GPU/TPU the two
  are compiled separately and autotuning may pick other kernels, so there the bounds above apply
  (whether they were bit-identical is still recorded, ``nnx_linen_bitwise``).

``--plot FILE.png`` draws every block's relative error against its bound (forward fp32 and bf16,
gradients; each framework pair): :mod:`mixer_convert.tools.parity_plot`.

JSON: Linen's results keep their keys (``forward_fp32``, ``grads_fp32``, ...); NNX's are the same
keys prefixed ``nnx_``; NNX against Linen is under ``nnx_linen_``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from mixer_convert.spec import TIMM_NAMES, VARIANTS, MixerConfig, config_for, parse_variant, variant_name
from mixer_convert.command import (Parser, add_device, add_image_size, add_json, add_quiet, command, positive_int,
                                   write_json)
from mixer_convert.errors import MissingExtraError, importable
from mixer_convert.extras import require
from mixer_convert.tools.parity import (BF16_REL, Diff, FP32_LOGITS_MAX_ABS, FP32_REL, GRAD_ATOL_GLOBAL, GRAD_RTOL,
                                        compare, compare_params, first_divergence, flax_forward,
                                        flax_grads, format_table, nnx_forward, nnx_grads, timm_python, torch_device,
                                        torch_forward, torch_grads)


def _rows(rows) -> list[dict]:
    return [{"name": r.name, "max_abs": r.max_abs, "rel": r.rel, "scale": r.scale} for r in rows]


def load_case(variant: str | None, weights: str | None = None, image_size: tuple[int, ...] | None = None,
              seed: int = 0) -> tuple[str, MixerConfig, dict[str, np.ndarray]]:
    """(label, config, float32 params): the checkpoint's own architecture when ``weights`` is given
    (``variant``, if also given, must match it; ``image_size`` only for non-square grids), else
    random weights for ``variant`` at ``image_size`` (default 224)."""
    from mixer_convert.params import random_params

    size = None if not image_size else (image_size[0], image_size[-1])
    if weights:
        from mixer_convert.load import load_checkpoint
        flat, cfg = load_checkpoint(weights, variant=variant, image_size=size)
        return variant or variant_name(cfg) or "custom", cfg, {k: np.asarray(v, np.float32) for k, v in flat.items()}
    cfg = config_for(variant, **({"image_size": size} if size else {}))
    return variant, cfg, random_params(cfg, seed)


# What each Flax API is checked with; Linen's results keep their original JSON keys, NNX's are
# the same keys prefixed 'nnx_', and NNX against Linen is under 'nnx_linen_'.
FORWARD = {"linen": flax_forward, "nnx": nnx_forward}
GRADS = {"linen": flax_grads, "nnx": nnx_grads}
FLAX_APIS = ("linen", "nnx", "both")


def _key(api: str, name: str) -> str:
    return name if api == "linen" else f"{api}_{name}"


def run_variant(variant: str | None, weights: str | None = None, batch: int = 2, image_size=None,
                device: str | None = None, grads: bool = True, timm: bool = True, seed: int = 0,
                progress: Callable[[str], None] | None = None, flax_api: str = "both") -> dict:
    """:func:`load_case` then :func:`run_case`."""
    if isinstance(image_size, int):
        image_size = (image_size,)
    label, cfg, flat = load_case(variant, weights, image_size, seed)
    return run_case(label, cfg, flat, weights or f"random (seed {seed})", batch, device, grads, timm, seed, progress,
                    flax_api)


def run_case(label: str, cfg: MixerConfig, flat: dict[str, np.ndarray], source: str, batch: int = 2,
             device: str | None = None, grads: bool = True, timm: bool = True, seed: int = 0,
             progress: Callable[[str], None] | None = None, flax_api: str = "both") -> dict:
    """Every check on one model. ``device``: None/'auto' lets each framework pick (GPU/TPU when
    present); 'cpu' pins both to the CPU; 'gpu'/'cuda' puts PyTorch on CUDA (JAX uses its default
    backend). ``flax_api``: 'linen', 'nnx' or 'both' (then NNX is also checked against Linen).
    ``progress`` is called with the name of each stage as it starts."""
    import contextlib

    import jax

    if flax_api not in FLAX_APIS:
        raise ValueError(f"flax_api must be one of {', '.join(FLAX_APIS)}, got {flax_api!r}")
    pin = jax.default_device(jax.devices("cpu")[0]) if device == "cpu" else contextlib.nullcontext()
    with pin:
        return _run(label, cfg, flat, source, batch, device, grads, timm, seed, progress or (lambda stage: None),
                    flax_api)


def _run(label, cfg, flat, source, batch, device, grads, timm, seed, progress, flax_api) -> dict:
    apis = ("linen", "nnx") if flax_api == "both" else (flax_api,)
    rng = np.random.default_rng(seed + 1)
    x = rng.uniform(-1, 1, (batch, *cfg.image_size, cfg.in_chans)).astype(np.float32)
    out: dict = {"variant": label, "weights": source, "batch": batch, "flax_api": flax_api,
                 "image_size": list(cfg.image_size), "torch_device": torch_device(device), "checks": {}}
    import jax
    out["jax_backend"] = "cpu" if device == "cpu" else jax.default_backend()

    progress("fp32 forward")
    t32 = torch_forward(cfg, flat, x, device=device)
    f32 = {api: FORWARD[api](cfg, flat, x) for api in apis}
    for api in apis:
        rows = compare(f32[api], t32, cfg)
        bad = first_divergence(rows, FP32_REL)
        out[_key(api, "forward_fp32")] = _rows(rows)
        out["checks"][_key(api, "forward_fp32")] = bad is None and rows[-1].max_abs <= FP32_LOGITS_MAX_ABS
        out[_key(api, "first_divergence_fp32")] = bad.name if bad else None

    progress("bf16 forward")
    tb = torch_forward(cfg, flat, x, "bfloat16", device)
    fb = {api: FORWARD[api](cfg, flat, x, "bfloat16") for api in apis}
    for api in apis:
        out[_key(api, "forward_bf16")] = _rows(compare(fb[api], tb, cfg))
        out["checks"][_key(api, "forward_bf16")] = all(first_divergence(compare(a, b, cfg), BF16_REL) is None
                                                       for a, b in ((fb[api], tb), (f32[api], fb[api]), (f32[api], tb)))
    if flax_api == "both":
        _nnx_vs_linen(out, "forward_fp32", f32, compare(f32["linen"], f32["nnx"], cfg), FP32_REL)
        _nnx_vs_linen(out, "forward_bf16", fb, compare(fb["linen"], fb["nnx"], cfg), BF16_REL)

    if grads and cfg.num_classes:
        progress("gradients")
        _gradients(out, cfg, flat, x, rng.integers(0, cfg.num_classes, batch), device, apis)

    if timm:
        progress("timm")
        out["timm"] = _timm(cfg, flat, x, f32[apis[0]])
        if "tanh_max_abs" in out["timm"]:
            out["checks"]["timm_tanh"] = out["timm"]["tanh_max_abs"] <= FP32_LOGITS_MAX_ABS
    out["pass"] = all(out["checks"].values())
    return out


def _grads_within(rows: list[Diff]) -> tuple[bool, Diff]:
    """(every parameter within the gradient bound, the one closest to its bound)."""
    big = max(r.scale for r in rows)
    worst = max(rows, key=lambda r: r.max_abs / (GRAD_RTOL * r.scale + GRAD_ATOL_GLOBAL * big))
    return all(r.max_abs <= GRAD_RTOL * r.scale + GRAD_ATOL_GLOBAL * big for r in rows), worst


def _gradients(out: dict, cfg: MixerConfig, flat, x, labels, device, apis) -> None:
    tg = torch_grads(cfg, flat, x, labels, device)
    fg = {api: GRADS[api](cfg, flat, x, labels) for api in apis}
    for api in apis:
        rows = compare_params(fg[api], tg)
        ok, worst = _grads_within(rows)
        out[_key(api, "grads_fp32")] = _rows(rows)
        out[_key(api, "grads_worst")] = worst.name
        out["checks"][_key(api, "grads_fp32")] = ok
    if len(apis) == 2:
        rows = compare_params(fg["linen"], fg["nnx"])
        _nnx_vs_linen(out, "grads_fp32", fg, rows, None)


def _nnx_vs_linen(out: dict, what: str, results: dict, rows: list[Diff], rel: float | None) -> None:
    """NNX against Linen: bit-identical on the CPU (the same XLA program on the same device).
    On an accelerator the two programs are compiled separately and may get different kernels
    (autotuning), so there the fp32/bf16 parity bounds apply; whether they were bitwise is recorded."""
    linen, nnx = results["linen"], results["nnx"]
    bitwise = all(np.array_equal(linen[k], nnx[k]) for k in linen)
    within = first_divergence(rows, rel) is None if rel is not None else _grads_within(rows)[0]
    out[f"nnx_linen_{what}"] = _rows(rows)
    out.setdefault("nnx_linen_bitwise", {})[what] = bitwise
    out["checks"][f"nnx_linen_{what}"] = bitwise or (out["jax_backend"] != "cpu" and within)


def _timm(cfg: MixerConfig, flat, x, ref) -> dict:
    variant = variant_name(cfg)
    name = TIMM_NAMES.get(variant)
    if name is None:
        return {"skipped": f"timm has no {variant or 'model of this shape'}"}
    if tuple(cfg.image_size) != (224, 224):
        return {"skipped": "timm's models are for 224x224"}
    exe = timm_python()
    if exe is None:
        return {"skipped": "timm not installed (or set MIXER_TIMM_PYTHON)"}
    from mixer_convert.save import write_params

    with tempfile.TemporaryDirectory() as d:
        write_params(flat, Path(d) / "w.safetensors", fmt="safetensors", layout="timm")
        np.save(Path(d) / "probe.npy", np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        args = ["load", name, str(Path(d) / "w.safetensors"), str(Path(d) / "probe.npy"), str(Path(d) / "o.npz")]
        if cfg.num_classes != 1000:
            args.append(str(cfg.num_classes))
        r = subprocess.run([exe, str(Path(__file__).with_name("timm_oracle.py")), *args], capture_output=True,
                           text=True, timeout=900)
        if r.returncode != 0:
            return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
        with np.load(Path(d) / "o.npz") as z:
            exact, tanh, version = z["exact"], z["tanh"], str(z["version"])
    logits = ref["logits"]
    return {"model": name, "version": version, "exact_gelu_max_abs": float(np.abs(exact - logits).max()),
            "tanh_max_abs": float(np.abs(tanh - logits).max())}


# (JSON key prefix, title) of each comparison with PyTorch.
_PAIRS = (("", "Linen vs PyTorch"), ("nnx_", "NNX vs PyTorch"))
_NNX_LINEN = (("forward_fp32", "forward fp32"), ("forward_bf16", "forward bf16"), ("grads_fp32", "gradients fp32"))


def format_report(r: dict) -> str:
    lines = [f"== {r['variant']}  weights: {r['weights']}  batch {r['batch']} at {r['image_size'][0]}x"
             f"{r['image_size'][1]}  (jax: {r['jax_backend']}, torch: {r['torch_device']})"]
    for prefix, pair in _PAIRS:
        if prefix + "forward_fp32" in r:
            lines += _pair_lines(r, prefix, pair)
    for what, title in _NNX_LINEN:
        if f"nnx_linen_{what}" in r:
            ok = "ok" if r["checks"][f"nnx_linen_{what}"] else "FAIL"
            rows = r[f"nnx_linen_{what}"]
            if r["nnx_linen_bitwise"][what]:
                lines.append(f"-- {title}, NNX vs Linen: bit-identical ({len(rows)} arrays): {ok}")
            else:
                worst = max(rows, key=lambda row: row["rel"])
                lines.append(f"-- {title}, NNX vs Linen: not bit-identical, worst {worst['name']} max-abs "
                             f"{worst['max_abs']:.2e} (rel {worst['rel']:.2e}): {ok}")
    t = r.get("timm", {})
    if "tanh_max_abs" in t:
        lines.append(f"-- timm {t['version']} {t['model']}: logits max-abs {t['exact_gelu_max_abs']:.2e} with its "
                     f"exact GELU, {t['tanh_max_abs']:.2e} with tanh GELU "
                     f"({'ok' if r['checks']['timm_tanh'] else 'FAIL'})")
    elif t:
        lines.append(f"-- timm: {t.get('skipped') or t.get('error')}")
    lines.append(f"== {r['variant']}: {'PASS' if r['pass'] else 'FAIL'}")
    return "\n".join(lines)


def _pair_lines(r: dict, prefix: str, pair: str) -> list[str]:
    lines = []
    for key, title in ((prefix + "forward_fp32", "forward fp32"), (prefix + "forward_bf16", "forward bf16")):
        verdict = "ok" if r["checks"][key] else "FAIL"
        if key.endswith("fp32") and r[prefix + "first_divergence_fp32"]:
            verdict += f" (first divergence: {r[prefix + 'first_divergence_fp32']})"
        lines.append(f"-- {title}, {pair}: {verdict}")
        lines.append(format_table([Diff(row["name"], row["max_abs"], row["scale"]) for row in r[key]]))
    if prefix + "grads_fp32" in r:
        g = r[prefix + "grads_fp32"]
        worst = next(row for row in g if row["name"] == r[prefix + "grads_worst"])
        lines.append(f"-- gradients fp32, {pair} ({len(g)} parameters): "
                     f"{'ok' if r['checks'][prefix + 'grads_fp32'] else 'FAIL'}; "
                     f"median rel {np.median([row['rel'] for row in g]):.2e}; closest to its bound: "
                     f"{worst['name']} (max-abs {worst['max_abs']:.2e}, max|grad| {worst['scale']:.2e})")
    return lines


def build_parser() -> Parser:
    p = Parser(prog="mixer-parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", help=f"one of {', '.join(VARIANTS)}, or 'all' (repeatable; "
                                                      "default B/16, or what --weights holds)")
    p.add_argument("--weights", help="a checkpoint in any format the bridge reads; its architecture (any image "
                                     "size or shape) is read from it (default: random weights)")
    p.add_argument("--batch", type=positive_int, default=2)
    add_image_size(p, "random weights: default 224 224; --weights: only for a non-square patch grid")
    add_device(p)
    p.add_argument("--flax-api", choices=FLAX_APIS, default="both",
                   help="which Flax model to check against PyTorch; 'both' also checks NNX against Linen "
                        "(default: both)")
    p.add_argument("--no-grads", action="store_true")
    p.add_argument("--no-timm", action="store_true")
    p.add_argument("--plot", metavar="FILE.png", help="also draw every block's relative error against its bound "
                                                      "(forward fp32 and bf16, gradients; each framework pair)")
    add_json(p)
    add_quiet(p)
    return p


def _variants(parser: Parser, args) -> list[str | None]:
    variants = args.variant or ([None] if args.weights else ["B/16"])
    if variants == ["all"]:
        variants = list(VARIANTS)
    if args.weights and len(variants) != 1:
        parser.error("--weights takes at most one --variant (the file fixes the architecture)")
    for v in variants:
        if v is not None:
            parse_variant(v)  # an unknown name fails before anything runs
    return variants


@command("mixer-parity")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    variants = _variants(parser, args)
    require("jax", "torch")
    if args.plot and not importable("matplotlib"):  # before minutes of comparisons, not after
        raise MissingExtraError(["train"], "matplotlib", what="--plot")
    reports = []
    for i, v in enumerate(variants, 1):
        t0, tag = time.perf_counter(), f"[{i}/{len(variants)}] {v or args.weights}"

        def stage(name: str) -> None:
            if not args.quiet:
                print(f"{tag}: {name}", file=sys.stderr, flush=True)
        stage("loading weights" if args.weights else "random weights")
        label, cfg, flat = load_case(v, args.weights, args.image_size)
        r = run_case(label, cfg, flat, args.weights or "random (seed 0)", args.batch, args.device,
                     not args.no_grads, not args.no_timm, progress=stage, flax_api=args.flax_api)
        stage(f"{'PASS' if r['pass'] else 'FAIL'} ({time.perf_counter() - t0:.1f} s)")
        if args.json != "-":
            print(format_report(r), flush=True)
        reports.append(r)
    doc = {"reports": reports, "pass": all(r["pass"] for r in reports)}
    if args.json == "-":
        print(json.dumps(doc, indent=1))
    elif args.json is not None:  # the text reports were printed as each variant finished
        write_json(args.json, doc)
    if args.plot:
        from mixer_convert.tools.parity_plot import plot
        path = plot(doc, args.plot)
        if not args.quiet:
            print(f"mixer-parity: wrote {path}", file=sys.stderr)
    return 0 if doc["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
