"""``mixer-parity --plot FILE.png``: the parity report as a picture. One row per model checked,
three panels -- forward fp32, forward bf16, loss gradients fp32 -- each showing, block by block
(stem, MixerBlock_0 ... N-1, pre_logits, logits), the relative error of every framework pair
(Linen vs PyTorch, NNX vs PyTorch, NNX vs Linen) against the bound it is checked with (dashed).

What is drawn is what :mod:`mixer_convert.tools.parity_report` checks, from its JSON alone:

* forward: each output's max-abs difference over the reference's largest magnitude (``rel``),
  bound 1e-5 (fp32) and 5e-2 (bf16); the fp32 logits' absolute bound (1e-4) is in the title.
* gradients: per parameter, max-abs / (max|grad of that parameter| + 1e-2 x max|grad of any
  parameter|) -- the check ``max-abs <= 1e-4 x own scale + 1e-6 x the largest`` divided through,
  so it is passed exactly when this relative error is at most 1e-4; per block the worst of the
  block's parameters (the head's under ``logits``, ``pre_head_layer_norm``'s under ``pre_logits``).

A difference of exactly 0 (NNX vs Linen on the CPU is bit-identical) cannot sit on a log axis; it
is drawn at the panel's floor with a hollow marker. matplotlib is imported only when drawing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from mixer_convert.tools.parity import BF16_REL, FP32_LOGITS_MAX_ABS, FP32_REL, GRAD_ATOL_GLOBAL, GRAD_RTOL

# (JSON key prefix, legend label, colour, line style, marker) of each framework pair, in drawing
# order; Linen and NNX compute the same bits, so NNX's line is dashed over Linen's solid one.
PAIRS = (("", "Linen vs PyTorch", "tab:blue", "-", "o"), ("nnx_", "NNX vs PyTorch", "tab:orange", "--", "x"),
         ("nnx_linen_", "NNX vs Linen", "tab:green", ":", "s"))
# (JSON key without prefix, panel title, bound on the relative error).
PANELS = (("forward_fp32", "forward fp32", FP32_REL), ("forward_bf16", "forward bf16", BF16_REL),
          ("grads_fp32", "gradients fp32", GRAD_RTOL))
_PARAM_BLOCK = {"stem": "stem", "pre_head_layer_norm": "pre_logits", "head": "logits"}


def block_of(param: str) -> str:
    """The output a parameter belongs to: 'MixerBlock_3/token_mixing/...' -> 'MixerBlock_3'."""
    top = param.split("/", 1)[0]
    return _PARAM_BLOCK.get(top, top)


def model_order(output: str) -> tuple[int, int]:
    """Sort key of an output name: stem, MixerBlock_0, 1, ..., 10, ..., pre_logits, logits."""
    if output.startswith("MixerBlock_"):
        return 1, int(output.rsplit("_", 1)[1])
    return {"stem": (0, 0), "pre_logits": (2, 0), "logits": (3, 0)}.get(output, (4, 0))


def gradient_errors(rows: Iterable[dict]) -> dict[str, float]:
    """Per block, the worst parameter's relative gradient error as the bound sees it (module
    docstring), in model order."""
    rows = list(rows)
    floor = GRAD_ATOL_GLOBAL / GRAD_RTOL * max(r["scale"] for r in rows)
    out: dict[str, float] = {}
    for r in rows:
        block = block_of(r["name"])
        out[block] = max(out.get(block, 0.0), r["max_abs"] / max(r["scale"] + floor, 1e-30))
    return dict(sorted(out.items(), key=lambda kv: model_order(kv[0])))


def series(report: dict, panel: str) -> dict[str, dict[str, float]]:
    """{pair label: {output name: relative error}} of one panel, for the pairs the report has."""
    out = {}
    for prefix, label, *_ in PAIRS:
        rows = report.get(prefix + panel)
        if rows:
            out[label] = gradient_errors(rows) if panel == "grads_fp32" else {r["name"]: r["rel"] for r in rows}
    return out


def _checked(report: dict, panel: str) -> bool:
    """Whether every pair of the panel passed its check."""
    return all(ok for key, ok in report.get("checks", {}).items() if key.endswith(panel))


def _title(report: dict) -> str:
    h, w = report["image_size"]
    verdict = "PASS" if report.get("pass") else "FAIL"
    return (f"{report['variant']} at {h}x{w}, batch {report['batch']}, {report['weights']} "
            f"(jax: {report['jax_backend']}, torch: {report['torch_device']}): {verdict}")


def _draw_panel(ax, report: dict, panel: str, title: str, bound: float) -> None:
    data = series(report, panel)
    names = list(next(iter(data.values()))) if data else []
    values = [v for pair in data.values() for v in pair.values() if v > 0]
    floor = min(values + [bound]) / 10
    style = {label: rest for _, label, *rest in PAIRS}
    for label, errors in data.items():
        colour, line, marker = style[label]
        ys = [errors.get(n, 0.0) for n in names]
        ax.plot(range(len(names)), [max(y, floor) for y in ys], line, color=colour, lw=1.3,
                label=label + (" (bit-identical)" if not any(ys) else ""))
        ax.scatter([i for i, y in enumerate(ys) if y > 0], [y for y in ys if y > 0], s=14, color=colour, marker=marker)
        ax.scatter([i for i, y in enumerate(ys) if y == 0], [floor] * ys.count(0.0), s=16,
                   facecolors="none", edgecolors=colour)
    if any(v == 0 for pair in data.values() for v in pair.values()):
        ax.scatter([], [], s=16, facecolors="none", edgecolors="grey", label="hollow: exactly 0 (at the floor)")
    ax.axhline(bound, color="k", ls="--", lw=0.9, label=f"bound {bound:g}")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, max(values + [bound]) * 300)  # room above the bound for the legend
    every = 1 if len(names) <= 20 else 4  # deep models: every 4th block named
    ticks = [i for i, n in enumerate(names) if not n.startswith("MixerBlock_") or model_order(n)[1] % every == 0]
    ax.set_xticks(ticks, [_short(names[i]) for i in ticks], rotation=90, fontsize=7)
    ax.set_ylabel("relative error")
    extra = f"; logits max-abs <= {FP32_LOGITS_MAX_ABS:g}" if panel == "forward_fp32" else ""
    ax.set_title(f"{title}{extra}: {'ok' if _checked(report, panel) else 'FAIL'}", fontsize=9)
    ax.grid(alpha=0.3, which="both", axis="y")
    ax.legend(fontsize=7, loc="upper left", ncol=2)


def _short(name: str) -> str:
    return name.replace("MixerBlock_", "block ")


def plot(doc: dict, path: str | os.PathLike) -> Path:
    """Draw ``doc`` (what ``mixer-parity --json`` writes: ``{"reports": [...]}``, or one report)
    to the PNG ``path``, replaced atomically. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixer_convert.atomic import atomic_path

    reports = doc["reports"] if "reports" in doc else [doc]
    fig, axes = plt.subplots(len(reports), len(PANELS), figsize=(15, 3.9 * len(reports)), squeeze=False)
    for row, report in zip(axes, reports):
        for ax, (panel, title, bound) in zip(row, PANELS):
            if series(report, panel):
                _draw_panel(ax, report, panel, title, bound)
            else:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{title}: not run", ha="center", va="center", transform=ax.transAxes)
        row[1].set_title(_title(report) + "\n" + row[1].get_title(), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, force=True) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
    return path
