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
