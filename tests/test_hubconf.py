"""hubconf.py: torch.hub.load(CHECKOUT, ..., source="local") in a fresh interpreter that has torch
and numpy but not the toolkit (no editable finder, no site .pth files), so mixer_convert can only
come from the checkout, as it does for a torch.hub user."""
import importlib.util
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, requires_torch, subprocess_env
from mixer_convert import config_for, random_params
from mixer_convert.save import write_params

pytestmark = requires_torch
ENTRY_POINTS = {"mixer", "mixer_s32_224", "mixer_s16_224", "mixer_b32_224", "mixer_b16_224", "mixer_l32_224",
                "mixer_l16_224"}


def run_child(code: str, env: dict[str, str], cwd: Path, bare: bool) -> dict:
    """Run ``code`` in a new interpreter; ``bare``: with ``-S`` (see :func:`bare_env`)."""
    r = subprocess.run([sys.executable, *(["-S"] if bare else []), "-c", code], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def bare_env(*first: Path) -> dict[str, str]:
    """For ``python -S``: only ``first`` and this interpreter's site-packages on PYTHONPATH, so torch
    and numpy import but no .pth file (an editable install's finder) is processed and the
    checkout is not on the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, first), *site.getsitepackages()])
    return env


LOAD = """
import importlib.util, json, sys
import numpy as np, torch
root, weights, probe = {root!r}, {weights!r}, {probe!r}
before = {{n: importlib.util.find_spec(n) is not None for n in ("mixer_convert", "mixer_torch")}}
hub_model = torch.hub.load(root, "mixer_s32_224", source="local", pretrained=weights).eval()
import mixer_convert, mixer_torch
x = torch.from_numpy(np.load(probe))
with torch.no_grad():
    ref = mixer_torch.from_checkpoint(weights).eval()
    diff = float((hub_model(x) - ref(x)).abs().max())
random = torch.hub.load(root, "mixer_s32_224", source="local", pretrained=False)
generic = torch.hub.load(root, "mixer", "B/16", num_classes=10, source="local")
print(json.dumps({{"findable_before": before, "files": [mixer_convert.__file__, mixer_torch.__file__],
                  "max_abs": diff, "types": [type(m).__module__ + "." + type(m).__name__ for m in (hub_model, random, generic)],
                  "random_differs": any(not torch.equal(a, b) for a, b in zip(random.state_dict().values(),
                                                                             ref.state_dict().values())),
                  "configs": [[m.config.patch_size[0], m.config.hidden_dim, m.config.num_blocks, m.config.num_classes]
                              for m in (hub_model, random, generic)]}}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("hubconf")
    write_params(random_params(config_for("S/32"), 3), d / "s32.npz")
    np.save(d / "probe.npy", np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32))
    return d


@pytest.mark.slow  # a random-init B/16 costs ~15 s on the 2-core machine
def test_hub_load_from_a_checkout_without_the_toolkit_installed(checkpoint):
    code = LOAD.format(root=str(ROOT), weights=str(checkpoint / "s32.npz"), probe=str(checkpoint / "probe.npy"))
    out = run_child(code, bare_env(), cwd=checkpoint, bare=True)
    assert out["findable_before"] == {"mixer_convert": False, "mixer_torch": False}
    for f in out["files"]:
        assert Path(f).resolve().is_relative_to(ROOT), f
    assert out["types"] == ["mixer_torch.model.MlpMixer"] * 3
    assert out["max_abs"] == 0.0  # pretrained=PATH is create_model's path: the same weights as from_checkpoint
    assert out["random_differs"]
    assert out["configs"] == [[32, 512, 8, 1000], [32, 512, 8, 1000], [16, 768, 12, 10]]


def test_a_core_already_imported_is_kept(checkpoint):
    """An installed core (here: this checkout's, reached through PYTHONPATH as an install would)
    imported before torch.hub.load stays the one module in use."""
    code = f"""
import json, sys, torch
import mixer_convert
first = mixer_convert
m = torch.hub.load({str(ROOT)!r}, "mixer_s32_224", source="local", pretrained={str(checkpoint / 's32.npz')!r})
print(json.dumps({{"same": sys.modules["mixer_convert"] is first, "classes": m.config.num_classes}}))
"""
    assert run_child(code, subprocess_env(), cwd=checkpoint, bare=False) == {"same": True, "classes": 1000}


def test_another_copy_of_the_core_not_yet_imported_is_not_mixed_with_this_checkouts_model(checkpoint, tmp_path):
    """mixer_torch comes from the checkout torch.hub loads, so its core does too, even when a
    different mixer_convert is installed (nothing on disk changes)."""
    other = tmp_path / "site" / "mixer_convert"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("raise ImportError('the other copy was imported')\n")
    env = bare_env(tmp_path / "site")
    code = f"""
import json, torch
m = torch.hub.load({str(ROOT)!r}, "mixer_s32_224", source="local", pretrained={str(checkpoint / 's32.npz')!r})
import mixer_convert
print(json.dumps({{"file": mixer_convert.__file__}}))
"""
    assert Path(run_child(code, env, cwd=checkpoint, bare=True)["file"]).resolve() == ROOT / "convert" / "__init__.py"
    assert (other / "__init__.py").read_text().startswith("raise")


def test_entry_points_are_timms_names_plus_the_generic_one():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # what torch.hub.list shows: every public callable of the module
    listed = {n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")}
    assert listed == ENTRY_POINTS
    assert module.dependencies == ["torch", "numpy"]
    from mixer_convert.spec import TIMM_NAMES
    assert set(TIMM_NAMES.values()) == ENTRY_POINTS - {"mixer"}
    for name in ENTRY_POINTS - {"mixer"}:
        variant = next(v for v, n in TIMM_NAMES.items() if n == name)
        assert f"Mixer-{variant} " in getattr(module, name).__doc__
