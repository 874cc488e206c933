"""Round trips through timm itself. timm cannot share the CPU torch wheel (PyPI's
torchvision will not load beside it), so it lives in its own interpreter: set
MIXER_TIMM_PYTHON (.ci/run builds one), or install timm in this environment."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import requires_torch
from mixer_convert import config_for, random_params
from mixer_convert.formats.timm_hub import PREPROCESSING
from mixer_convert.tools.bridge import convert_checkpoint
from mixer_convert.load import read_params
from mixer_convert.tools.parity import timm_python
from mixer_convert.reference import forward

ORACLE = Path(__file__).resolve().parents[1] / "convert" / "tools" / "timm_oracle.py"


pytestmark = [pytest.mark.skipif(timm_python() is None, reason="no timm interpreter (set MIXER_TIMM_PYTHON)"),
              pytest.mark.slow]


OUT_ARG = {"load": 4, "export": 4, "hub": 3}  # where each oracle mode's output .npz is


def run_oracle(*args):
    r = subprocess.run([timm_python(), str(ORACLE), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(args[OUT_ARG[args[0]]]) as z:
        return {k: z[k] for k in z.files}


def probe(tmp_path, n=2):
    x = np.random.default_rng(0).uniform(-1, 1, (n, 224, 224, 3)).astype(np.float32)
    np.save(tmp_path / "probe.npy", x.transpose(0, 3, 1, 2).copy())
    return x


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_official_npz_converted_for_timm_loads_with_the_documented_command(tmp_path, suffix):
    cfg = config_for("B/16")  # mixer_b16_224: 1000 classes, so no num_classes override is needed
    flat = random_params(cfg, 0)
    np.savez(tmp_path / "Mixer-B_16.npz", **flat)
    convert_checkpoint(tmp_path / "Mixer-B_16.npz", tmp_path / f"timm{suffix}", "timm", progress=False)
    x = probe(tmp_path)
    out = run_oracle("load", "mixer_b16_224", tmp_path / f"timm{suffix}", tmp_path / "probe.npy", tmp_path / "o.npz")
    ref = forward(flat, cfg, x)
    tanh_gap, exact_gap = np.abs(out["tanh"] - ref).max(), np.abs(out["exact"] - ref).max()
    print(f"timm {out['version']}: tanh GELU max-abs {tanh_gap:.2e}, exact GELU max-abs {exact_gap:.2e}")
    assert tanh_gap < 1e-4  # same function once timm uses the official GELU
    assert exact_gap > tanh_gap  # timm's default exact GELU is a (small) different function


def test_a_21k_head_loads_in_timm_with_num_classes(tmp_path):
    cfg = config_for("S/32", num_classes=21843)
    flat = random_params(cfg, 1)
    np.savez(tmp_path / "s.npz", **flat)
    convert_checkpoint(tmp_path / "s.npz", tmp_path / "s.safetensors", "timm", progress=False)
    x = probe(tmp_path, 1)
    out = run_oracle("load", "mixer_s32_224", tmp_path / "s.safetensors", tmp_path / "probe.npy", tmp_path / "o.npz",
                     21843)
    assert np.abs(out["tanh"] - forward(flat, cfg, x)).max() < 1e-4


@requires_torch
def test_timm_state_dict_round_trips_bit_identically_and_computes_the_same(tmp_path):
    import torch

    x = probe(tmp_path)
    out = run_oracle("export", "mixer_s16_224", tmp_path / "timm.pth", tmp_path / "probe.npy", tmp_path / "o.npz")
    convert_checkpoint(tmp_path / "timm.pth", tmp_path / "ours.npz", progress=False)
    flat = dict(np.load(tmp_path / "ours.npz"))
    cfg = config_for("S/16")
    np.testing.assert_allclose(forward(flat, cfg, x), out["tanh"], atol=1e-4, rtol=0)
    convert_checkpoint(tmp_path / "ours.npz", tmp_path / "again.pth", "timm", progress=False)
    a = torch.load(tmp_path / "timm.pth", weights_only=True)
    b = torch.load(tmp_path / "again.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_params(tmp_path / "again.pth").layout == "timm"


@requires_torch
@pytest.mark.parametrize("num_classes, preprocess", [(1000, "vit_jax"), (10, "big_vision"), (None, "vit_jax")])
def test_timm_local_dir_loads_the_model_folder_and_computes_our_function(tmp_path, num_classes, preprocess):
    import torch

    import mixer_torch

    cfg = config_for("S/32", num_classes=num_classes)  # any head size; None: timm's num_classes=0
    flat = random_params(cfg, 3)
    np.savez(tmp_path / "s.npz", **flat)
    report = convert_checkpoint(tmp_path / "s.npz", tmp_path / "folder", "timm-hub", preprocess=preprocess,
                                progress=False)
    x = probe(tmp_path)
    out = run_oracle("hub", tmp_path / "folder", tmp_path / "probe.npy", tmp_path / "o.npz")
    assert (str(out["architecture"]), int(out["num_classes"])) == ("mixer_s32_224", num_classes or 0)
    data_config = json.loads(str(out["data_config"]))  # timm's resolve_data_config for the model
    assert {k: data_config[k] for k in PREPROCESSING[preprocess]} == PREPROCESSING[preprocess]
    assert data_config["mean"] == data_config["std"] == [0.5, 0.5, 0.5]
    with torch.no_grad():
        ours = mixer_torch.from_checkpoint(tmp_path / "folder").eval()(torch.from_numpy(np.load(tmp_path / "probe.npy")))
    tanh_gap = np.abs(out["tanh"] - ours.numpy()).max()
    erf_gap = np.abs(out["exact"] - forward(flat, cfg, x, gelu="erf")).max()
    print(f"timm {out['version']} local-dir: tanh GELU vs our PyTorch model {tanh_gap:.2e}, "
          f"exact GELU vs float64 exact-GELU reference {erf_gap:.2e}, timm exact vs official "
          f"{np.abs(out['exact'] - forward(flat, cfg, x)).max():.2e} (card: "
          f"{report.verification.exact_gelu_max_abs:.2e})")
    assert tanh_gap < 1e-4  # timm's own loader, the folder, our model: the same function
    assert erf_gap < 1e-4  # what the card's exact-GELU figure measures is what timm computes
