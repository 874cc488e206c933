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
    env["PYTHONPATH"] = os.pathsep.join([str(link_dir), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
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
