"""benchmarks/accelerator.sh: its small form runs every stage on the CPU through the code the GPU
run uses and reports each stage's figures; the GPU form passes no option the small one does not."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, requires_jax, requires_torch

SCRIPT = ROOT / "benchmarks" / "accelerator.sh"
STAGES = ("PARITY", "SPEED", "INPUT", "EVAL", "SCALE")
BEGIN, END = "<!-- accelerator.sh: begin -->", "<!-- accelerator.sh: end -->"


def stage_options(text: str) -> dict[str, list[set[str]]]:
    """{stage: [options of the small form, options of the GPU form]} from the script's arrays."""
    found: dict[str, list[set[str]]] = {s: [] for s in STAGES}
    for name, body in re.findall(rf"^\s*({'|'.join(STAGES)})=\((.*?)\)$", text, re.M | re.S):
        found[name].append(set(re.findall(r"(--[a-z][a-z0-9-]*)", body)))
    return found


def test_script_parses_and_the_small_form_exercises_every_option_of_the_gpu_form():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    for stage, forms in stage_options(SCRIPT.read_text()).items():
        assert len(forms) == 2, stage
        small, gpu = forms
        assert gpu <= small, f"{stage}: options only the GPU form passes: {sorted(gpu - small)}"


def test_unknown_argument_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--smal"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--smal" in r.stderr


@pytest.mark.slow  # 2.5-5 minutes on the 2-core machine
@requires_jax
@requires_torch
def test_small_form_runs_every_stage_and_writes_its_figures_between_the_markers(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Benchmark results\n\nbefore\n\n{BEGIN}\nstale figures\n{END}\n\nafter\n")
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(SCRIPT), "--small", "--out", str(out), "--results", str(results)],
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert {k: v["status"] for k, v in stages.items()} == dict.fromkeys(
        ("parity", "speed", "input", "eval", "scale"), "ok")

    parity = stages["parity"]["figures"]
    assert parity["pass"] and parity["variants"] == 1 and 0 < parity["fp32_logits_max_abs"] < 1e-4
    speed = stages["speed"]["figures"]
    assert speed["dtype"] == "bfloat16" and speed["peak_flops"] > 0
    for row in [*speed["inference"], speed["train"]]:
        assert row["flax_img_s"] > 0 and row["torch_img_s"] > 0 and 0 < row["flax_peak_frac"]
    data = stages["input"]["figures"]
    assert data["model"] == "tiny" and data["dtype"] == "bfloat16"
    assert min(data["synthetic_img_s"], data["real_img_s"], data["old_loop_img_s"]) > 0
    for fw in ("torch", "flax"):
        # end to end: 160 tiny images less one batch, a time difference that load on a 2-core machine can
        # swamp, when bench_eval says so (None, "n/a" in the report) rather than print a negative rate
        end_to_end = stages["eval"]["figures"][fw]["end_to_end_img_s"]
        assert (end_to_end is None or end_to_end > 0) and stages["eval"]["figures"][fw]["model_img_s"] > 0
    scale = stages["scale"]["figures"]
    assert scale["complete"] and scale["devices"] == "1 x cpu" and scale["device_bytes_limit"] is None
    assert [(r["variant"], r["mode"]) for r in scale["largest_batch"]] == [("tiny", "data"), ("tiny", "fsdp+remat")]
    for row in scale["largest_batch"]:  # a CPU states no memory: everything fits, the cap (8) ends the search
        assert row["batch_per_device"] == 8 and row["capped"] and 0 < row["bytes_per_device"] < 2 ** 30
    steps = scale["steps"]
    assert steps["variant"] == "tiny" and steps["batch_per_device"] == 8 and steps["mesh"] == {"data": 1, "fsdp": 1}
    assert steps["no_scan_img_s"] > 0 and steps["scan_img_s"] > 0 and 0.2 < steps["scan_over_no_scan"] < 5
    raw = json.loads((out / "scale.json").read_text())
    assert all(0 < r["final_loss"] < 20 for r in (raw["steps"]["no_scan"], raw["steps"]["scan"]))
    assert summary["env"]["torch_device"] == "cpu" and summary["total_s"] <= summary["budget_s"]

    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nbefore\n\n" + BEGIN) and text.endswith(END + "\n\nafter\n")
    assert "stale figures" not in text and text.count(BEGIN) == text.count(END) == 1
    assert "| S/32 | 64 |" in text and "real/synthetic" in text and "| flax |" in text
    assert "| tiny | FSDP + remat | ≥ 8 |" in text and "img/s with scan" in text
    for raw in ("env.json", "parity.json", "speed.json", "input.json", "eval.json", "scale.json", "stages.tsv"):
        assert (out / raw).stat().st_size > 0, raw
