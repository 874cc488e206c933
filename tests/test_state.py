"""mixer_jax.state: the train state made sharded over the data x fsdp mesh, its on-disk layout (always
the official per-block names), and checkpoints restored onto another mesh. Whole runs on 8
simulated CPU devices: FSDP trains to the one-device losses, scanned or not, Linen or NNX; a
checkpoint written over fsdp=8 resumes over fsdp=4, over data=8 and on one device."""
import dataclasses
import shutil

import jax
import numpy as np
import pytest

from conftest import requires_jax
from test_train import assert_params_close, load_run, run_worker

pytestmark = requires_jax
FSDP8 = ["--devices", 8, "--set", "mesh.fsdp=8", "--set", "mesh.fsdp_min_mib=0"]


def _tiny(**model):
    from helpers.training import tiny_digits

    cfg = tiny_digits()
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def test_a_scanned_state_is_stacked_in_the_run_and_official_on_disk_and_converts_back_exactly():
    from mixer_jax.configs import architecture
    from mixer_jax.sharding import make_mesh
    from mixer_jax.state import build_state

    cfg = _tiny(scan=True, remat="block")
    state, layout, _ = build_state(cfg, architecture(cfg, 10), None, make_mesh(-1, 1, jax.devices()[:1]))
    assert "MixerBlock" in state.params and "MixerBlock_0" not in state.params
    disk = layout.to_disk(state)
    assert {"MixerBlock_0", "MixerBlock_1"} <= set(disk.params) and "MixerBlock" not in disk.params
    assert {"MixerBlock_0", "MixerBlock_1"} <= set(disk.opt_state[1].trace)  # SGD momentum mirrors the params
    assert jax.tree_util.tree_structure(disk) == jax.tree_util.tree_structure(layout.disk_abstract)
    back = layout.from_disk(disk)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(state)))


def test_a_fresh_scanned_state_starts_from_the_plain_models_weights_for_the_seed():
    from mixer_jax.configs import architecture
    from mixer_jax.sharding import make_mesh
    from mixer_jax.state import build_state

    mesh = make_mesh(-1, 1, jax.devices()[:1])
    plain, _, _ = build_state(_tiny(), architecture(_tiny(), 10), None, mesh)
    scanned, layout, _ = build_state(_tiny(scan=True), architecture(_tiny(), 10), None, mesh)
    a, b = jax.tree_util.tree_leaves(plain.params), jax.tree_util.tree_leaves(layout.to_disk(scanned).params)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


# ---- whole runs on 8 simulated devices ------------------------------------------------------------


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    run_worker(d / "w", d / "out.npz", "--set", "steps=12")
    return load_run(d / "out.npz")


@pytest.fixture(scope="module")
def fsdp8_killed(tmp_path_factory):
    """fsdp=8, SIGKILLed after step 10: its newest checkpoint is step 8's, written over 8 devices."""
    d = tmp_path_factory.mktemp("killed")
    r = run_worker(d / "w", d / "out.npz", *FSDP8, "--set", "steps=12", "--kill-at", 10, check=False)
    assert r.returncode == -9, r.stderr[-2000:]
    return d / "w"


@pytest.mark.slow
@pytest.mark.parametrize("api,scan", [("linen", False), ("linen", True), ("nnx", True)])
def test_fsdp_over_eight_devices_trains_to_the_one_device_losses(one_device, tmp_path, api, scan):
    ref, ref_hist, _, _ = one_device
    run_worker(tmp_path / "w", tmp_path / "o.npz", *FSDP8, "--set", "steps=12", "--set", f"model.api={api}",
               "--set", f"model.scan={str(scan).lower()}", "--set", "model.remat=block")
    params, hist, _, devices = load_run(tmp_path / "o.npz")
    assert devices == 8 and params.keys() == ref.keys()  # official names, whatever the run computed with
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref_hist], rel=1e-4)
    assert_params_close(params, ref, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [["--devices", 4, "--set", "mesh.fsdp=4", "--set", "mesh.fsdp_min_mib=0"],
                                  ["--devices", 8, "--set", "mesh.data=8"], ["--devices", 1]],
                         ids=["fsdp4", "data8", "one-device"])
def test_a_checkpoint_written_over_fsdp8_resumes_exactly_on_another_mesh(one_device, fsdp8_killed, tmp_path, mesh):
    ref, ref_hist, _, _ = one_device
    w = tmp_path / "w"
    shutil.copytree(fsdp8_killed, w)
    r = run_worker(w, tmp_path / "o.npz", *mesh, "--set", "steps=12")
    # restored bit for bit: the restore checks every array against the sha256 saved with it
    assert "resumed from step 8" in r.stdout and "damaged" not in r.stdout + r.stderr
    params, hist, _, _ = load_run(tmp_path / "o.npz")
    assert [h["step"] for h in hist] == [9, 10, 11, 12]
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref_hist[8:]], rel=1e-4)
    assert_params_close(params, ref, atol=1e-5)


@pytest.mark.slow
def test_resuming_on_the_same_fsdp_mesh_ends_bit_identical_to_the_uninterrupted_run(fsdp8_killed, tmp_path):
    run_worker(tmp_path / "u", tmp_path / "u.npz", *FSDP8, "--set", "steps=12")
    w = tmp_path / "w"
    shutil.copytree(fsdp8_killed, w)
    run_worker(w, tmp_path / "o.npz", *FSDP8, "--set", "steps=12")
    (a, ha, _, _), (b, hb, _, _) = load_run(tmp_path / "u.npz"), load_run(tmp_path / "o.npz")
    assert_params_close(b, a, atol=0.0)
    assert [h["loss"] for h in hb] == [h["loss"] for h in ha[8:]]
