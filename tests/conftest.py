"""Shared set-up of the test suite: the code under test is this checkout's, in this interpreter and
in the child interpreters tests start (:func:`subprocess_env`); markers; fixtures.

Where a test is (a newcomer finds a module's tests by its name):

* ``tests/test_<module>.py`` tests one module, named by the module's last part: ``mixer_convert.save``
  -> ``test_save.py``, ``mixer_convert.tools.verify`` -> ``test_verify.py``, ``mixer_jax.loop`` ->
  ``test_loop.py``. A module of the ``formats`` package keeps the package's name as a prefix:
  ``formats/archive.py`` -> ``test_formats_archive.py``, ``formats/__init__.py`` -> ``test_formats.py``.
* Where two modules share a last part, the file is named for whose it is: the two ``cli.py`` by their
  commands (``mixer_jax/cli.py``, mixer-train -> ``test_train_cli.py``; ``tools/cli.py``, mixer-convert
  -> ``test_convert_cli.py``), the two ``model.py`` by their package (``test_jax_model.py``,
  ``test_torch_model.py``).
* Suites that cut across modules are named for what they check: ``test_models.py`` (the three models
  alike), ``test_hostile_inputs.py``, ``test_install_profiles.py``, ``test_import_layers.py``,
  ``test_torch_deployment.py``, ``test_timm_oracle.py`` (timm itself, through tools/timm_oracle.py),
  ``test_packaging.py``, ``test_docs.py`` (README.md, docs/ and the site); ``test_accelerator*.py`` test
  benchmarks/accelerator*.
* Helpers (builders, oracles, the training worker) are in ``tests/helpers/``, never named ``test_*``;
  pytest collects only ``test_*.py``. Shared fixtures are here.
"""
import functools
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pytest_configure(config) -> None:
    """XLA's compiled programs kept on disk between runs (JAX's persistent compilation cache, keyed
    by the program and the versions): a second run of the suite skips most compiling, which is
    about half of the Flax tests' time. In pytest's cache folder of this checkout, shared by the
    xdist workers and inherited by the child interpreters tests start; set
    JAX_COMPILATION_CACHE_DIR to use another."""
    if getattr(config, "cache", None) is None or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(config.cache.mkdir("jax-compilation"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tiny test models too
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def _alias_core() -> None:
    """Import ``mixer_convert`` from this checkout's convert/ folder (its installed name differs
    from the folder's), so a test run in any checkout or worktree tests that checkout's code."""
    spec = importlib.util.spec_from_file_location("mixer_convert", ROOT / "convert" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "convert")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mixer_convert"] = mod
    spec.loader.exec_module(mod)


if "mixer_convert" not in sys.modules:
    _alias_core()


def _no_tpu_runtime_without_a_tpu() -> None:
    """The tpu extra's libtpu (XLA's TPU compiler, for --compile-only) would otherwise look for TPU
    hosts whenever JAX starts, here and in every child interpreter, and print what it did not find.
    Where there is no TPU and no GPU the suite runs on the CPU, as it would without libtpu."""
    if importlib.util.find_spec("libtpu") is None or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):
        return
    if os.path.exists("/dev/nvidiactl"):
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


_no_tpu_runtime_without_a_tpu()


@functools.lru_cache(None)
def _link_dir() -> str:
    link_dir = Path(tempfile.mkdtemp(prefix="mixer-pypath-"))
    (link_dir / "mixer_convert").symlink_to(ROOT / "convert", target_is_directory=True)
    return str(link_dir)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child interpreter that imports this checkout (not another editable copy):
    a folder with ``mixer_convert`` -> convert/ and the checkout root go first on PYTHONPATH."""
    link_dir = _link_dir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(link_dir), str(ROOT)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


# Worker processes that libraries start themselves (Grain's, mixer-eval's process pool; spawn
# copies this interpreter's sys.path) import this checkout's code too.
sys.path.insert(0, _link_dir())


def import_blocker(*names: str) -> str:
    """Python source that makes importing any of the top-level packages ``names`` fail; prepend it
    to a child interpreter's code to prove that code path does not need them."""
    return f"""
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {set(names)!r}:
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, _Block())
"""


def images(batch: int, h: int, w: int, seed: int = 1, c: int = 3) -> np.ndarray:
    """Images already preprocessed to [-1, 1], NHWC."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, h, w, c)).astype(np.float32)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


requires_jax = pytest.mark.skipif(not has_module("flax"), reason="needs the jax extra (jax, flax)")
requires_torch = pytest.mark.skipif(not has_module("torch"), reason="needs the torch extra")


@pytest.fixture
def official(tmp_path):
    """An official-layout .npz of random TINY weights (helpers.checkpoints), and the weights."""
    from helpers.checkpoints import write_official

    return write_official(tmp_path)


# ---- mixer-predict and mixer-eval (test_predict.py, test_evaluate.py) ------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """scikit-learn's two sample photos as JPEG files."""
    from PIL import Image

    from helpers.image_data import photos as sample_photos

    d = tmp_path_factory.mktemp("photos")
    paths = []
    for i, img in enumerate(sample_photos()):
        paths.append(d / f"photo{i}.jpg")
        Image.fromarray(img).save(paths[-1], quality=90)
    return paths


@pytest.fixture(scope="module")
def weights_1k(tmp_path_factory):
    """Random weights of helpers.inference.TINY_1K in an official .npz, and the weights."""
    from helpers.inference import TINY_1K
    from mixer_convert import random_params

    flat = random_params(TINY_1K, 0)
    path = tmp_path_factory.mktemp("w") / "tiny_1k.npz"
    np.savez(path, **flat)
    return path, flat


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """An image folder of random crops of the sample photos: three classes, five images each."""
    from PIL import Image

    from helpers.image_data import photos as sample_photos

    d = tmp_path_factory.mktemp("crops")
    rng, imgs = np.random.default_rng(1), sample_photos()
    for c in range(3):
        (d / f"class{c}").mkdir()
        for j in range(5):
            img = imgs[(c + j) % 2]
            h, w = rng.integers(60, 300, 2)
            y, x = rng.integers(0, img.shape[0] - h), rng.integers(0, img.shape[1] - w)
            Image.fromarray(img[y:y + h, x:x + w]).save(d / f"class{c}" / f"{j}.jpg", quality=90)
    return d
