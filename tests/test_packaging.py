"""What the built wheel ships: the PEP 561 markers (type checkers read the packages' hints only
when ``py.typed`` is inside the installed package) and the class-name data files."""
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mixer_convert", "mixer_jax", "mixer_torch")


def build_wheel(tmp: Path) -> Path:
    """The project's wheel, built from a copy of the sources so that setuptools' build/ and
    egg-info never land in the checkout."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("convert", "mixer_jax", "mixer_torch"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # Without build isolation when setuptools is here: no registry round trip for the backend.
    isolation = [] if importlib.util.find_spec("setuptools") else ["--use-pep517"]
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(src)]
    cmd += ["--no-build-isolation"] if not isolation else isolation
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("*.whl")
    return wheel


def test_wheel_ships_py_typed_for_each_package_and_the_class_names(tmp_path):
    with zipfile.ZipFile(build_wheel(tmp_path)) as z:
        names = set(z.namelist())
    for package in PACKAGES:
        assert f"{package}/py.typed" in names, package
    assert {"mixer_convert/data/imagenet1k_classes.txt", "mixer_convert/data/imagenet21k_classes.txt"} <= names
    # the marker sits beside the code it vouches for, not in a stray top-level folder
    assert not any(n.startswith(("convert/", "py.typed")) for n in names)
