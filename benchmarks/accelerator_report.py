"""benchmarks/accelerator.sh's outputs -> its section of benchmarks/RESULTS.md and summary.json.

    python benchmarks/accelerator_report.py --out DIR --results RESULTS.md

Reads DIR/stages.tsv (one line per stage: name, status, exit code, seconds, time slice),
DIR/env.json and each stage's DIR/<stage>.json; writes DIR/summary.json (status and key figures
per stage) and replaces the text between the markers below in RESULTS.md (appended when absent).
A stage that failed, timed out or was skipped is reported as such, with its log's last line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("parity", "speed", "input", "eval", "scale")
BEGIN, END = "<!-- accelerator.sh: begin -->", "<!-- accelerator.sh: end -->"
TRAIN_PEAK_TARGET = 0.40  # bf16 B/16 training, fraction of the card's bf16 peak (the project's target)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_stages(out: Path) -> dict[str, dict]:
    stages = {}
    for line in (out / "stages.tsv").read_text().splitlines() if (out / "stages.tsv").exists() else []:
        name, status, rc, seconds, slice_s = line.split("\t")[:5]
        stages[name] = {"status": status, "rc": int(rc), "seconds": int(seconds), "slice_s": int(slice_s)}
    return stages


def last_log_line(out: Path, stage: str) -> str:
    try:
        lines = [ln.strip() for ln in (out / f"{stage}.log").read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "empty log"


def flops_text(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def rate_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


# ---- parity ----------------------------------------------------------------------------------


def parity_rows(d: dict) -> list[dict]:
    rows = []
    for r in d["reports"]:
        timm = r.get("timm", {})
        rows.append({"variant": r["variant"], "size": r["image_size"][0], "pass": r["pass"],
                     "fp32_logits_max_abs": r["forward_fp32"][-1]["max_abs"],
                     "fp32_worst_rel": max(x["rel"] for x in r["forward_fp32"]),
                     "bf16_worst_rel": max(x["rel"] for x in r["forward_bf16"]),
                     "grads_median_rel": (statistics.median(x["rel"] for x in r["grads_fp32"])
                                          if r.get("grads_fp32") else None),
                     "timm_exact": timm.get("exact_gelu_max_abs"), "timm_tanh": timm.get("tanh_max_abs"),
                     "devices": f"JAX {r['jax_backend']}, PyTorch {r['torch_device']}"})
    return rows


def parity_figures(d: dict) -> dict:
    rows = parity_rows(d)
    return {"variants": len(rows), "pass": d["pass"], "devices": sorted({r["devices"] for r in rows}),
            "fp32_logits_max_abs": max(r["fp32_logits_max_abs"] for r in rows),
            "bf16_worst_rel": max(r["bf16_worst_rel"] for r in rows)}


def parity_markdown(d: dict) -> list[str]:
    rows = parity_rows(d)
    sci = lambda v: "—" if v is None else f"{v:.1e}"  # noqa: E731
    lines = [f"**Parity** (`mixer-parity`, {len(rows)} variants, batch {d['reports'][0]['batch']}, random weights; "
             f"{', '.join(sorted({r['devices'] for r in rows}))}; fp32 with TF32 off and JAX at 'highest' matmul "
             f"precision, bf16, gradients): **{'all PASS' if d['pass'] else 'FAIL'}**", "",
             "| variant | size | fp32 logits max-abs | fp32 worst (rel) | bf16 worst (rel) | gradients median rel "
             "| timm exact GELU | timm tanh GELU | |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['size']} | {sci(r['fp32_logits_max_abs'])} | {sci(r['fp32_worst_rel'])} "
                     f"| {sci(r['bf16_worst_rel'])} | {sci(r['grads_median_rel'])} | {sci(r['timm_exact'])} "
                     f"| {sci(r['timm_tanh'])} | {'PASS' if r['pass'] else 'FAIL'} |")
    return lines


# ---- speed -----------------------------------------------------------------------------------


def speed_figures(d: dict) -> dict:
    inf, train = d["inference"], d["train"]
    t = train[0]
    return {"dtype": d["info"]["dtype"], "peak_flops": d["peak"]["peak_flops"],
            "inference": [{k: r[k] for k in ("variant", "batch", "flax_img_s", "torch_img_s", "flax_peak_frac",
                                             "torch_peak_frac")} for r in inf],
            "train": {"variant": t["variant"], "batch": t["batch"], "flax_img_s": t["flax_img_s"],
                      "torch_img_s": t["torch_img_s"], "flax_peak_frac": t["flax_peak_frac"],
                      "torch_peak_frac": t["flax_peak_frac"] * t["torch_img_s"] / t["flax_img_s"]}}


def speed_markdown(d: dict) -> list[str]:
    f, p = speed_figures(d), d["peak"]
    shapes = ", ".join("×".join(map(str, s)) for s in p["shapes"])
    tr = f["train"]
    lines = [f"**Speed, {f['dtype']}** (`bench_speed.py`; the peak is the best {f['dtype']} GEMM of this run over "
             f"{shapes}): JAX {flops_text(p['jax_flops'])}, PyTorch {flops_text(p['torch_flops'])} → peak "
             f"{flops_text(p['peak_flops'])}.", "",
             "| | batch | Flax img/s | PyTorch img/s | PyTorch/Flax | Flax % of peak | PyTorch % of peak |",
             "|---|---|---|---|---|---|---|"]
    for r in f["inference"]:
        lines.append(f"| {r['variant']} inference | {r['batch']} | {r['flax_img_s']:,.1f} | {r['torch_img_s']:,.1f} "
                     f"| {r['torch_img_s'] / r['flax_img_s']:.2f} | {r['flax_peak_frac']:.1%} "
                     f"| {r['torch_peak_frac']:.1%} |")
    lines.append(f"| {tr['variant']} training step (fwd + bwd + SGD; 3× forward FLOPs) | {tr['batch']} "
                 f"| {tr['flax_img_s']:,.1f} | {tr['torch_img_s']:,.1f} | {tr['torch_img_s'] / tr['flax_img_s']:.2f} "
                 f"| **{tr['flax_peak_frac']:.1%}** | {tr['torch_peak_frac']:.1%} |")
    if (tr["variant"], f["dtype"]) == ("B/16", "bfloat16"):
        best = max(tr["flax_peak_frac"], tr["torch_peak_frac"])
        lines += ["", f"Target: bf16 B/16 training at ≥ {TRAIN_PEAK_TARGET:.0%} of the peak: "
                      f"**{'met' if best >= TRAIN_PEAK_TARGET else 'not met'}** ({best:.1%})."]
    return lines


# ---- input pipeline --------------------------------------------------------------------------


def input_figures(d: dict) -> dict:
    name, t = next(iter(d["training"].items()))
    return {"model": name, "dtype": d.get("train_dtype"), "batch": d.get("train_batch"),
            "workers": d.get("train_workers"), "synthetic_img_s": t["synthetic"], "real_img_s": t["real_new"],
            "real_over_synthetic": t["real_new"] / t["synthetic"], "old_loop_img_s": t["real_old"],
            "input_only_img_s": {k: v["img_s"] for k, v in d["input"].items()}}


def input_markdown(d: dict) -> list[str]:
    f = input_figures(d)
    lines = [f"**Input pipeline feeding {f['model']}** (`bench_input.py`: {f['dtype']} training step, batch "
             f"{f['batch']}, {f['workers']} thread workers, generated 500×375 JPEGs, inception crop + flip): "
             f"synthetic batches {f['synthetic_img_s']:,.1f} img/s, real JPEGs {f['real_img_s']:,.1f} img/s "
             f"(**real/synthetic {f['real_over_synthetic']:.2f}**), the old single-thread loop "
             f"{f['old_loop_img_s']:,.1f} img/s.", "",
             f"| input only, batch {d['batch']} ({d['machine']}) | img/s | img per CPU-second | start-up |",
             "|---|---|---|---|",
             f"| old single-thread loop | {d['old_single_thread']['img_s']:,.0f} "
             f"| {d['old_single_thread']['img_per_cpu_s']:,.0f} | — |"]
    for k, v in d["input"].items():
        lines.append(f"| new, {k.replace('x', ' × ', 1)} | {v['img_s']:,.0f} | {v['img_per_cpu_s']:,.0f} "
                     f"| {v['startup_s']:.2f} s |")
    return lines


# ---- mixer-eval ------------------------------------------------------------------------------


def eval_figures(d: dict) -> dict:
    return {r["framework"]: {"end_to_end_img_s": r["end_to_end_img_s"], "model_img_s": r["model_img_s"]}
            for r in d["rows"]}


def eval_markdown(d: dict) -> list[str]:
    r0 = d["rows"][0]
    lines = [f"**mixer-eval** (`bench_eval.py`: {d['variant']} at {d.get('image_size', 224)}, {d['preprocess']} "
             f"preprocessing, batch {r0['batch']}, {r0['images']} generated JPEGs; end-to-end: the difference "
             f"between a one-batch and a full run, so start-up cancels; model: mixer-eval's classifier on one "
             f"batch, host<->device copies included)", "",
             "| framework | end-to-end img/s | model img/s | end-to-end / model |", "|---|---|---|---|"]
    for r in d["rows"]:
        ratio = (f"{r['end_to_end_img_s'] / r['model_img_s']:.2f}" if r["end_to_end_img_s"] and r["model_img_s"]
                 else "n/a")
        lines.append(f"| {r['framework']} | {rate_text(r['end_to_end_img_s'])} | {rate_text(r['model_img_s'])} "
                     f"| {ratio} |")
    return lines


# ---- scale ---------------------------------------------------------------------------------------

MODE_NAMES = {"data": "data parallel", "fsdp+remat": "FSDP + remat"}


def bytes_text(n: float | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def scale_figures(d: dict) -> dict:
    s = d.get("steps")
    dev = d["devices"]
    return {"devices": f"{dev['count']} x {dev['kind']}", "device_bytes_limit": dev["bytes_limit"],
            "complete": d["complete"], "max_batch": d["max_batch"],
            "largest_batch": [{k: r[k] for k in ("variant", "mode", "batch_per_device", "capped", "bytes_per_device",
                                                 "hbm_bytes_per_device", "fraction_of_memory")}
                              for r in d.get("largest_batch", [])],
            "steps": None if s is None else {
                "variant": s["variant"], "batch_per_device": s["batch_per_device"], "mesh": s["mesh"],
                "no_scan_img_s": s["no_scan"]["img_s"], "scan_img_s": s["scan"]["img_s"],
                "scan_over_no_scan": s["scan_over_no_scan"], "no_scan_compile_s": s["no_scan"]["compile_s"],
                "scan_compile_s": s["scan"]["compile_s"]}}


def scale_markdown(d: dict) -> list[str]:
    f, dev = scale_figures(d), d["devices"]
    size = d["image_size"]
    lines = [f"**Scale** (`bench_scale.py`: {d['config']}'s train step, Adam, mixup, bf16 compute, "
             f"{d['num_classes']} classes, {size}×{size}; {dev['count']} × {dev['kind']}, memory JAX may use per "
             f"device: {bytes_text(dev['bytes_limit']) if dev['bytes_limit'] else 'not stated'}). Largest batch: the "
             f"largest power of two per device whose step, compiled for these devices, fits that memory (searched up "
             f"to {d['max_batch']}; where no limit is stated everything fits and the cap ends the search).", "",
             "| variant | mode | largest batch per device | bytes at it | device memory | share |",
             "|---|---|---|---|---|---|"]
    for r in f["largest_batch"]:
        batch = f"≥ {r['batch_per_device']}" if r["capped"] else str(r["batch_per_device"] or "none fits")
        share = "—" if r["fraction_of_memory"] is None else f"{r['fraction_of_memory']:.0%}"
        memory = bytes_text(r["hbm_bytes_per_device"]) if r["hbm_bytes_per_device"] else "not stated"
        lines.append(f"| {r['variant']} | {MODE_NAMES.get(r['mode'], r['mode'])} | {batch} "
                     f"| {bytes_text(r['bytes_per_device'])} | {memory} | {share} |")
    s = f["steps"]
    if s is None:
        lines += ["", "Step img/s: not measured."]
    else:
        mesh = " × ".join(f"{k} {v}" for k, v in s["mesh"].items())
        lines += ["", f"Training steps, {s['variant']} at {s['batch_per_device']} per device (remat block, FSDP "
                      f"over the local devices: mesh {mesh}; synthetic uint8 batches, median of "
                      f"{d['steps']['repeat']} × {d['steps']['steps']} steps after warm-up):", "",
                  "| model | img/s without scan | img/s with scan | with / without | compile s without / with scan |",
                  "|---|---|---|---|---|",
                  f"| {s['variant']} | {s['no_scan_img_s']:,.1f} | {s['scan_img_s']:,.1f} "
                  f"| **{s['scan_over_no_scan']:.2f}** | {s['no_scan_compile_s']:.1f} / {s['scan_compile_s']:.1f} |"]
    if not f["complete"]:
        lines += ["", "Partial: the stage stopped before it had measured everything (see its status above)."]
    return lines


FIGURES = {"parity": parity_figures, "speed": speed_figures, "input": input_figures, "eval": eval_figures,
           "scale": scale_figures}
MARKDOWN = {"parity": parity_markdown, "speed": speed_markdown, "input": input_markdown, "eval": eval_markdown,
            "scale": scale_markdown}
TITLES = {"parity": "Parity", "speed": "Speed", "input": "Input pipeline", "eval": "mixer-eval", "scale": "Scale"}


def machine_line(env: dict | None) -> str:
    if not env:
        return "machine not recorded"
    gpus = env.get("gpus") or []
    gpu = (f"{gpus[0]['name']} ({gpus[0]['memory.total']}, driver {gpus[0]['driver_version']})" if gpus
           else "no GPU")
    v = env.get("versions", {})
    cuda = f" (CUDA {env['torch_cuda']})" if env.get("torch_cuda") else ""
    return (f"{gpu}; {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB; torch {v.get('torch')}{cuda} on "
            f"{env.get('torch_device')}, JAX {v.get('jax')} on {env.get('jax_backend')}, Flax {v.get('flax')}")


def stage_result(out: Path, name: str, stage: dict | None) -> tuple[dict, list[str]]:
    """(summary entry, markdown lines) of one stage."""
    stage = stage or {"status": "not run", "rc": -1, "seconds": 0, "slice_s": 0}
    data = read_json(out / f"{name}.json")
    entry = dict(stage)
    if data is None or stage["status"] == "skipped":
        why = stage["status"] if stage["status"] != "ok" else "no output"
        tail = "" if stage["status"] in ("skipped", "not run") else f"; its log ends: `{last_log_line(out, name)}`"
        return entry, [f"**{TITLES[name]}**: not measured ({why}{tail})."]
    try:
        entry["figures"] = FIGURES[name](data)
        return entry, MARKDOWN[name](data)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
        entry["status"] = f"unreadable output ({type(e).__name__}: {e})"
        return entry, [f"**{TITLES[name]}**: output unreadable ({type(e).__name__}: {e})."]


def build(out: Path, command: str, budget: int, total: int) -> tuple[str, dict]:
    env, stages = read_json(out / "env.json"), read_stages(out)
    where = out.resolve()
    where_text = str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else str(where)
    lines = [BEGIN, f"## GPU — {env['date'] if env else 'date not recorded'} — {machine_line(env)}", "",
             f"`{command}`: {total} s of a {budget} s budget (setup included); raw outputs in `{where_text}/`. "
             "Every ratio below is from this one run on this one machine.", "",
             "| stage | status | seconds | time slice |", "|---|---|---|---|"]
    for name in ("setup", *STAGES):
        s = stages.get(name, {"status": "not run", "seconds": 0, "slice_s": 0})
        lines.append(f"| {name} | {s['status']} | {s['seconds']} | {s['slice_s'] or '—'} |")
    summary: dict = {"command": command, "budget_s": budget, "total_s": total, "env": env,
                     "setup": stages.get("setup"), "stages": {}}
    for name in STAGES:
        entry, md = stage_result(out, name, stages.get(name))
        summary["stages"][name] = entry
        lines += ["", *md]
    lines.append(END)
    return "\n".join(lines) + "\n", summary


def replace_section(text: str, section: str) -> str:
    """``text`` with the marked section replaced by ``section`` (appended if there is none)."""
    start, end = text.find(BEGIN), text.find(END)
    if start != -1 and end > start:
        return text[:start] + section.rstrip("\n") + text[end + len(END):]
    return text.rstrip("\n") + "\n\n" + section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the folder accelerator.sh wrote")
    p.add_argument("--results", required=True, help="the RESULTS.md to update")
    p.add_argument("--command", default="bash benchmarks/accelerator.sh", help="how the run was started")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--total", type=int, default=0, help="seconds the whole run took")
    args = p.parse_args(argv)
    out, results = Path(args.out), Path(args.results)
    section, summary = build(out, args.command, args.budget, args.total)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    old = results.read_text() if results.exists() else "# Benchmark results\n"
    tmp = results.with_name(f".{results.name}.tmp")
    tmp.write_text(replace_section(old, section))
    tmp.replace(results)  # never a half-written RESULTS.md
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
