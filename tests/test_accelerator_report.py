"""benchmarks/accelerator_report.py: the marked section is replaced or appended, never duplicated;
a stage that failed, timed out or was skipped is reported as such, with its log's last line."""
import importlib.util
import json

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("accelerator_report", ROOT / "benchmarks" / "accelerator_report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def section(body: str) -> str:
    return f"{report.BEGIN}\n{body}\n{report.END}\n"


def test_the_marked_section_is_replaced_in_place():
    text = f"# R\n\nbefore\n\n{section('old')}\nafter\n"
    new = report.replace_section(text, section("new"))
    assert new == f"# R\n\nbefore\n\n{section('new')}\nafter\n"
    assert report.replace_section(new, section("new")) == new  # a rerun changes nothing


def test_a_file_without_markers_gets_the_section_appended():
    assert report.replace_section("# R\n\ntext\n\n\n", section("new")) == f"# R\n\ntext\n\n{section('new')}"


def write_stages(out, *rows):
    (out / "stages.tsv").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))


def test_failed_timed_out_and_skipped_stages_are_named_with_their_logs_last_line(tmp_path):
    write_stages(tmp_path, ("setup", "ok", 0, 3, 0), ("parity", "timed out after 150s", 124, 150, 150),
                 ("speed", "failed (exit 1)", 1, 9, 100), ("input", "skipped", 0, 0, 12))
    (tmp_path / "parity.log").write_text("[3/8] S/8: gradients\n\n")
    (tmp_path / "speed.log").write_text("Traceback ...\nRuntimeError: CUDA out of memory\n")
    text, summary = report.build(tmp_path, "bash benchmarks/accelerator.sh", 480, 300)
    assert "**Parity**: not measured (timed out after 150s; its log ends: `[3/8] S/8: gradients`)" in text
    assert "**Speed**: not measured (failed (exit 1); its log ends: `RuntimeError: CUDA out of memory`)" in text
    assert "**Input pipeline**: not measured (skipped)." in text
    assert "**mixer-eval**: not measured (not run)." in text
    assert summary["stages"]["speed"]["rc"] == 1 and "figures" not in summary["stages"]["speed"]
    assert "| parity | timed out after 150s | 150 | 150 |" in text


def test_output_of_an_unexpected_shape_is_reported_not_raised(tmp_path):
    write_stages(tmp_path, ("eval", "ok", 0, 5, 60))
    (tmp_path / "eval.json").write_text(json.dumps({"rows": [{"framework": "torch"}]}))
    text, summary = report.build(tmp_path, "cmd", 480, 10)
    assert summary["stages"]["eval"]["status"].startswith("unreadable output (KeyError")
    assert "**mixer-eval**: output unreadable (KeyError" in text


def test_main_writes_summary_and_results_atomically(tmp_path):
    write_stages(tmp_path, ("setup", "ok", 0, 1, 0))
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# R\n\n{section('old')}")
    assert report.main(["--out", str(tmp_path), "--results", str(results), "--budget", "480", "--total", "7"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["total_s"] == 7
    text = results.read_text()
    assert "old" not in text and text.count(report.BEGIN) == 1 and "7 s of a 480 s budget" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md", "stages.tsv", "summary.json"]


def scale_output(complete=True, steps=True) -> dict:
    """bench_scale.py's JSON, shortened: one GPU, B/16 found, L/16 capped, steps with and without scan."""
    gib = 2 ** 30
    rows = [{"variant": "B/16", "mode": "data", "batch_per_device": 512, "capped": False,
             "bytes_per_device": 41.5 * gib, "hbm_bytes_per_device": 60 * gib, "fraction_of_memory": 41.5 / 60},
            {"variant": "B/16", "mode": "fsdp+remat", "batch_per_device": 4096, "capped": True,
             "bytes_per_device": 30 * gib, "hbm_bytes_per_device": 60 * gib, "fraction_of_memory": 0.5},
            {"variant": "L/16", "mode": "data", "batch_per_device": 0, "capped": False,
             "bytes_per_device": None, "hbm_bytes_per_device": 60 * gib, "fraction_of_memory": None}]
    d = {"config": "pretrain_i1k", "num_classes": 1000, "image_size": 224, "max_batch": 4096, "complete": complete,
         "devices": {"count": 1, "platform": "gpu", "kind": "NVIDIA H100 80GB HBM3", "bytes_limit": 60 * gib},
         "largest_batch": rows if complete else rows[:1]}
    if steps:
        d["steps"] = {"variant": "B/16", "batch_per_device": 256, "mesh": {"data": 1, "fsdp": 1}, "steps": 10,
                      "repeat": 3, "no_scan": {"img_s": 2000.0, "compile_s": 30.4},
                      "scan": {"img_s": 1900.0, "compile_s": 8.5}, "scan_over_no_scan": 0.95}
    return d


def test_scale_stage_is_a_table_of_batches_and_one_of_step_rates(tmp_path):
    write_stages(tmp_path, ("scale", "ok", 0, 200, 220))
    (tmp_path / "scale.json").write_text(json.dumps(scale_output()))
    text, summary = report.build(tmp_path, "cmd", 480, 400)
    assert "| scale | ok | 200 | 220 |" in text
    assert "1 × NVIDIA H100 80GB HBM3, memory JAX may use per device: 60.00 GiB" in text
    assert "| B/16 | data parallel | 512 | 41.50 GiB | 60.00 GiB | 69% |" in text
    assert "| B/16 | FSDP + remat | ≥ 4096 | 30.00 GiB | 60.00 GiB | 50% |" in text
    assert "| L/16 | data parallel | none fits | — | 60.00 GiB | — |" in text
    assert "mesh data 1 × fsdp 1" in text and "median of 3 × 10 steps" in text
    assert "| B/16 | 2,000.0 | 1,900.0 | **0.95** | 30.4 / 8.5 |" in text
    assert "Partial" not in text
    fig = summary["stages"]["scale"]["figures"]
    assert fig["devices"] == "1 x NVIDIA H100 80GB HBM3" and fig["complete"]
    assert [r["batch_per_device"] for r in fig["largest_batch"]] == [512, 4096, 0]
    assert fig["steps"]["scan_over_no_scan"] == 0.95 and fig["steps"]["no_scan_img_s"] == 2000.0


def test_a_scale_stage_cut_short_reports_what_it_measured_as_partial(tmp_path):
    write_stages(tmp_path, ("scale", "timed out after 90s", 124, 90, 90))
    (tmp_path / "scale.json").write_text(json.dumps(scale_output(complete=False, steps=False)))
    text, summary = report.build(tmp_path, "cmd", 480, 400)
    assert "| scale | timed out after 90s | 90 | 90 |" in text
    assert "| B/16 | data parallel | 512 |" in text and "L/16" not in text
    assert "Step img/s: not measured." in text and "Partial: the stage stopped" in text
    entry = summary["stages"]["scale"]
    assert entry["status"] == "timed out after 90s" and entry["figures"]["steps"] is None
    assert not entry["figures"]["complete"]


def test_a_cpu_scale_run_states_no_memory_and_capped_batches(tmp_path):
    d = scale_output()
    d["devices"] |= {"kind": "cpu", "platform": "cpu", "bytes_limit": None}
    d["largest_batch"] = [{"variant": "tiny", "mode": "data", "batch_per_device": 8, "capped": True,
                           "bytes_per_device": 25.4 * 2 ** 20, "hbm_bytes_per_device": None,
                           "fraction_of_memory": None}]
    write_stages(tmp_path, ("scale", "ok", 0, 60, 600))
    (tmp_path / "scale.json").write_text(json.dumps(d))
    text, _ = report.build(tmp_path, "cmd", 900, 300)
    assert "memory JAX may use per device: not stated" in text
    assert "| tiny | data parallel | ≥ 8 | 25.4 MiB | not stated | — |" in text
