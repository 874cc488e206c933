""".ci/drift.py: which installed distributions differ from a lock (bash .ci/run fails on any,
bash .ci/run --latest reports them)."""
import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT


def _drift():
    spec = importlib.util.spec_from_file_location("drift", ROOT / ".ci" / "drift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


drift = _drift()


def test_a_lock_is_read_as_canonical_names_with_comments_and_markers_ignored(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\nOpenCV_Python.Headless==5.1.0.95   # via x\n\ntorch==2.13.0+cpu ; sys_platform == 'linux'\n")
    assert drift.read_lock(lock) == {"opencv-python-headless": "5.1.0.95", "torch": "2.13.0+cpu"}


@pytest.mark.parametrize("line", ["numpy>=2", "numpy", "==1.0", "-e ."])
def test_a_line_that_is_not_a_pin_is_an_error_naming_its_line(tmp_path, line):
    lock = tmp_path / "lock.txt"
    lock.write_text(f"a==1\n{line}\n")
    with pytest.raises(ValueError, match=r"lock.txt:2: not a name==version pin"):
        drift.read_lock(lock)


def test_differences_are_changed_missing_and_unlocked_packages_but_never_pip_or_the_project():
    lock = {"numpy": "2.4.6", "jax": "0.10.2", "gone": "1.0", "pip": "1"}
    have = {"numpy": "2.5.0", "jax": "0.10.2", "extra": "3.0", "pip": "26.0", "mixer-toolkit": "0.1.0"}
    rows = drift.differences(lock, have)
    assert rows == [("extra", None, "3.0"), ("gone", "1.0", None), ("numpy", "2.4.6", "2.5.0")]
    text = drift.report("L", rows)
    assert text.splitlines()[0] == "drift: 3 package(s) differ from L (locked -> installed):"
    assert "(not locked) -> 3.0" in text and "1.0 -> (not installed)" in text and "2.4.6 -> 2.5.0" in text
    assert drift.report("L", []) == "drift: none, every package is as L pins it"
    # the lock in use (.ci/run): a locked package that is not installed is an extra left out
    assert drift.differences(lock, have, installed_only=True) == [("extra", None, "3.0"), ("numpy", "2.4.6", "2.5.0")]


def test_a_pin_without_a_build_label_is_met_by_any_build_of_that_version():
    assert drift.differences({"torch": "2.13.0"}, {"torch": "2.13.0+cpu"}) == []
    assert drift.differences({"torch": "2.13.0+cpu"}, {"torch": "2.13.0+cu128"}) == [
        ("torch", "2.13.0+cpu", "2.13.0+cu128")]
    assert drift.differences({"torch": "2.13.0"}, {"torch": "2.13.1+cpu"}) == [("torch", "2.13.0", "2.13.1+cpu")]
    assert drift.differences({"torch": "2.13.0"}, {"torch": "2.13.0.post1"}) == [("torch", "2.13.0", "2.13.0.post1")]


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "drift.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_exact_passes_on_this_interpreters_own_pins_and_fails_naming_one_that_moved(tmp_path):
    have = drift.installed()
    lock = tmp_path / "lock.txt"
    lock.write_text("".join(f"{n}=={v}\n" for n, v in have.items() if n not in drift.NOT_LOCKED)
                    + "some-extras-package==1.0\n")  # locked, not installed: fine for --exact
    ok = _run(lock, "--exact")
    assert ok.returncode == 0 and ok.stdout.startswith("drift: none"), ok.stdout + ok.stderr
    lock.write_text(lock.read_text().replace(f"numpy=={have['numpy']}", "numpy==0.0.1"))
    moved = _run(lock, "--exact")
    assert moved.returncode == 1, moved.stdout
    assert [line.split() for line in moved.stdout.splitlines()[1:]] == [["numpy", "0.0.1", "->", have["numpy"]]]
    reported = _run(lock)
    assert reported.returncode == 0  # without --exact it only reports, and names what is not installed
    assert reported.stdout.splitlines()[1:] == [moved.stdout.splitlines()[1],
                                                "locked, not installed here (1): some-extras-package"]


def test_the_locked_packages_not_installed_are_one_line_not_drift():
    assert drift.not_installed({"a": "1", "b": "2"}, {"a": "1", "b": "2"}) is None
    lock = {f"nvidia-{i:02d}": "1" for i in range(10)} | {"pip": "1"}
    assert drift.not_installed(lock, {}, shown=2) == "locked, not installed here (10): nvidia-00, nvidia-01, and 8 more"


def test_a_missing_or_malformed_lock_is_one_line_and_exit_2(tmp_path):
    missing = _run(tmp_path / "nope.txt")
    assert missing.returncode == 2 and missing.stderr.startswith("drift: error:") and missing.stderr.count("\n") == 1
    bad = tmp_path / "bad.txt"
    bad.write_text("numpy>=2\n")
    assert _run(bad).returncode == 2
