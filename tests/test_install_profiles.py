"""Install profiles: with only some extras installed, every console command either works or exits 2
with one line naming the extra to install -- never a traceback.

Each profile runs in a child interpreter whose import system reports the other extras' modules as
not installed (ModuleNotFoundError, as a real missing package does), and calls every
``[project.scripts]`` entry point's ``main`` there.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, has_module, subprocess_env
from mixer_convert import config_for, random_params

# Modules of each extra beyond the core (numpy, ml_dtypes, tqdm, pillow).
JAX = {"jax", "jaxlib", "flax", "optax", "orbax"}
TRAIN_ONLY = {"sklearn", "tensorflow_datasets", "tensorflow", "matplotlib", "tensorboardX"}
PROFILES = {  # profile -> modules that are "not installed"
    "torch": JAX | TRAIN_ONLY,
    "jax": {"torch"} | TRAIN_ONLY,
    "core": {"torch"} | JAX | TRAIN_ONLY,
}

_CHILD = """
import contextlib, importlib, io, json, sys, traceback
BLOCKED = {blocked!r}
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _NotInstalled())
results = {{}}
for key, entry, argv in {calls!r}:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module, func = entry.split(':')
            rc = getattr(importlib.import_module(module), func)(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            rc, err = 'traceback', io.StringIO(traceback.format_exc())
    results[key] = [rc, out.getvalue(), err.getvalue()]
print('RESULTS' + json.dumps(results))
"""


def _scripts() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _run_profile(profile: str, calls: list[tuple[str, str, list[str]]], cwd: Path) -> dict:
    code = _CHILD.format(blocked=PROFILES[profile], calls=calls)
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=subprocess_env())
    assert r.returncode == 0 and "RESULTS" in r.stdout, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULTS", 1)[1])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("profiles")
    cfg = config_for("S/32", image_size=32, num_classes=3)
    np.savez(d / "w.npz", **random_params(cfg, 0))
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (d / "folder" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(d / "folder" / c / f"{i}.png")
    return d


# command -> (argv, {profile: expected}) where expected is 0 (works) or the extra the error names.
CASES = {
    "convert-pt": ("mixer-convert", ["w.npz", "{p}.pt", "--quiet"], {"torch": 0, "jax": 0, "core": 0}),
    "convert-msgpack": ("mixer-convert", ["w.npz", "{p}.msgpack", "--quiet"],
                        {"torch": "jax", "jax": 0, "core": "jax"}),
    "convert-npz": ("mixer-convert", ["w.npz", "{p}.npz", "--quiet"], {"torch": 0, "jax": 0, "core": 0}),
    "predict": ("mixer-predict", ["folder/a/0.png", "--weights", "w.npz"], {"torch": 0, "jax": 0, "core": "torch"}),
    "predict-torch": ("mixer-predict", ["folder/a/0.png", "--weights", "w.npz", "--framework", "torch"],
                      {"torch": 0, "jax": "torch", "core": "torch"}),
    "predict-flax": ("mixer-predict", ["folder/a/0.png", "--weights", "w.npz", "--framework", "flax"],
                     {"torch": "jax", "jax": 0, "core": "jax"}),
    "eval": ("mixer-eval", ["--weights", "w.npz", "--data", "imagefolder:folder", "--quiet"],
             {"torch": 0, "jax": 0, "core": "torch"}),
    "eval-both": ("mixer-eval", ["--weights", "w.npz", "--data", "imagefolder:folder", "--framework", "torch,flax"],
                  {"torch": "jax", "jax": "torch", "core": "torch"}),
    "parity": ("mixer-parity", ["--weights", "w.npz", "--no-timm"], {"torch": "jax", "jax": "torch", "core": "jax"}),
    "train": ("mixer-train", ["--config", "digits", "--workdir", "{p}-run"],
              {"torch": "train", "jax": "train", "core": "train"}),
    "demo": ("mixer-demo", ["--workdir", "{p}-demo"], {"torch": "train", "jax": "torch", "core": "train"}),
}


def test_every_console_command_is_covered():
    assert {script for script, _, _ in CASES.values()} == set(_scripts())


@pytest.mark.slow
@pytest.mark.slow  # a child interpreter per command and profile
@pytest.mark.parametrize("profile", list(PROFILES))
def test_each_command_works_or_names_the_missing_extra_in_one_line(profile, files):
    if profile == "torch" and not has_module("torch") or profile == "jax" and not has_module("flax"):
        pytest.skip(f"the {profile} profile needs its framework installed here")
    scripts = _scripts()
    calls = [(key, scripts[script], [a.format(p=f"{profile}-{key}") for a in argv])
             for key, (script, argv, _) in CASES.items()]
    results = _run_profile(profile, calls, files)
    for key, (script, _, expect) in CASES.items():
        rc, out, err = results[key]
        assert rc != "traceback", f"{script} ({key}) crashed in the {profile} profile:\n{err}"
        if expect[profile] == 0:
            assert rc == 0, f"{script} ({key}) failed in the {profile} profile: {err}"
        else:
            extra = expect[profile]
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1, f"{script} ({key}) in the {profile} profile: rc={rc}\n{err}"
            assert lines[0].startswith(f"{script}: error: needs the ") and f"'{extra}'" in lines[0] \
                and 'pip install "mixer-toolkit[' in lines[0], lines[0]
    if profile == "torch":  # nothing was written for the commands that could not run
        assert not (files / "torch-convert-msgpack.msgpack").exists()
        assert (files / "torch-convert-pt.pt").exists() and (files / "torch-convert-npz.npz").exists()
