"""mixer_convert.extras: the optional extras read from the package's own metadata (which is
pyproject's optional-dependencies, nothing copied by hand), an extra installed only when every
module of it can be imported, and the smallest extra that provides a missing module."""
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, has_module, import_blocker, subprocess_env
from mixer_convert import extras


def _normalise(name: str) -> str:  # PEP 503
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def metadata_dir(tmp_path_factory) -> Path:
    """This checkout's metadata (METADATA with its Requires-Dist) as setuptools generates it for a
    wheel -- the installed copy may come from another checkout or an older pyproject."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("metadata")
    src, out = tmp / "src", tmp / "out"
    src.mkdir()
    out.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("convert", "convert/formats", "convert/tools", "mixer_jax", "mixer_torch"):
        (src / package).mkdir(parents=True)
        (src / package / "__init__.py").touch()
    code = f"from setuptools import build_meta; build_meta.prepare_metadata_for_build_wheel({str(out)!r})"
    r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    (dist_info,) = out.glob("*.dist-info")
    return out


@pytest.fixture
def this_checkouts_metadata(metadata_dir, monkeypatch):
    """importlib.metadata finds this checkout's metadata first; the extras' caches start empty."""
    monkeypatch.syspath_prepend(str(metadata_dir))
    extras.extras_table.cache_clear()
    extras._modules_of.cache_clear()
    yield
    extras.extras_table.cache_clear()
    extras._modules_of.cache_clear()


def test_the_extras_table_is_pyprojects_optional_dependencies(this_checkouts_metadata):
    import tomllib

    requirements = pytest.importorskip("packaging.requirements")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    want = {extra: tuple(_normalise(requirements.Requirement(r).name) for r in reqs)
            for extra, reqs in declared.items()}
    assert extras.extras_table() == want
    assert extras.extras_table()["torch"] == ("torch",) and "opencv-python-headless" in extras.extras_table()["train"]


@pytest.mark.parametrize("module, extra", [
    ("torch", "torch"), ("jax", "jax"), ("flax.serialization", "jax"), ("optax", "train"), ("orbax", "train"),
    ("sklearn", "train"), ("cv2", "train"), ("huggingface_hub", "hub"), ("onnxruntime", "onnx"),
    ("numpy", None), ("no_such_module_xyz", None),
])
def test_a_missing_module_is_mapped_to_the_smallest_extra_that_provides_it(this_checkouts_metadata, module, extra):
    top = module.split(".")[0]
    if extra is not None and top not in ("torch", "jax", "flax", "optax") and not has_module(top):
        pytest.skip(f"{top} is not installed: its distribution's module names are not known here")
    assert extras.extra_for_module(module) == extra


def test_an_extra_with_a_module_blocked_by_an_import_hook_is_not_installed():
    if not (has_module("onnxruntime") and has_module("torch")):
        pytest.skip("needs the onnx and torch extras installed")
    code = import_blocker("onnxruntime") + """
from mixer_convert.errors import MissingExtraError
from mixer_convert.extras import has_extra, require
print(has_extra('onnx'), has_extra('torch'))
try:
    require('torch', 'onnx')
except MissingExtraError as e:
    print(e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["False True", "needs the 'onnx' extra: pip install \"mixer-toolkit[onnx]\""]


def test_the_installed_distribution_is_the_one_read():
    try:
        importlib.metadata.distribution(extras.DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mixer-toolkit is not installed (pip install -e .)")
    table = extras.extras_table()
    assert {"jax", "torch", "train", "dev", "hub", "onnx"} <= set(table) and table["torch"] == ("torch",)
