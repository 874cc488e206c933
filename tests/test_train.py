"""The Flax training stack: steps, recipes, data, sharding across devices and processes,
checkpoint/resume after SIGKILL, failure handling, fine-tuning and export."""
import dataclasses
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, requires_jax, subprocess_env

pytestmark = requires_jax
WORKER = Path(__file__).with_name("train_worker.py")


def run_worker(workdir, out, *args, check=True, timeout=600):
    cmd = [sys.executable, str(WORKER), str(workdir), str(out), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=subprocess_env())
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def load_run(out):
    with np.load(out) as z:
        params = {k: z[k] for k in z.files if not k.startswith("__")}
        return params, json.loads(str(z["__history__"])), float(z["__eval__"]), int(z["__devices__"])


def assert_params_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= atol, f"params differ by {worst:.2e}"


def tiny(**kw):
    from tests_config import tiny_digits
    return dataclasses.replace(tiny_digits(), **kw)


# ---- config errors come before any compute ----------------------------------------------------


def test_bad_configs_fail_before_any_compute(tmp_path):
    from mixer_jax.configs import DataConfig
    from mixer_jax.configs import validate
    from mixer_jax.train import train_and_evaluate

    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        validate(tiny(batch_size=36), num_devices=8)
    with pytest.raises(ValueError, match="not divisible by accum_steps"):
        validate(tiny(batch_size=32, accum_steps=3), num_devices=1)
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'"):
        train_and_evaluate(tiny(data=DataConfig(name="no_such_dataset")), tmp_path / "a")
    with pytest.raises(ValueError, match="data_dir '/nonexistent/dir' does not exist"):
        train_and_evaluate(tiny(data=DataConfig(name="cifar10", data_dir="/nonexistent/dir")), tmp_path / "b")
    with pytest.raises(ValueError, match="imagefolder: no directory"):
        train_and_evaluate(tiny(data=DataConfig(name="imagefolder", data_dir=str(tmp_path))), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "checkpoints").exists()


def test_overrides_are_typed_and_typos_are_errors():
    from mixer_jax.configs import get_config, override

    cfg = override(get_config("digits"), ["steps=7", "optim.lr=0.5", "data.crop_area=0.2,0.9",
                                          "export_torch=true", "model.hidden_dim=16"])
    assert (cfg.steps, cfg.optim.lr, cfg.data.crop_area, cfg.export_torch, cfg.model.hidden_dim) == \
        (7, 0.5, (0.2, 0.9), True, 16)
    assert override(cfg, ["init_from=x.npz", "model.stoch_depth=0.1"]).init_from == "x.npz"
    assert override(cfg, ["model.patch_size=8"]).model.patch_size == (8, 8)
    with pytest.raises(ValueError, match="image_size 32x32 is not divisible by patch_size 5x5"):
        override(cfg, ["model.patch_size=5"])  # validated as it is set, before anything runs
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        override(cfg, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="bad value for 'steps'"):
        override(cfg, ["steps=many"])
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        get_config("nope")


def test_cli_rejects_a_bad_override_with_exit_code_2(tmp_path, capsys):
    from mixer_jax.cli import main
    assert main(["--workdir", str(tmp_path), "--set", "batch_sise=3"]) == 2
    assert "unknown config key 'batch_sise'" in capsys.readouterr().err


# ---- recipes -----------------------------------------------------------------------------------


def test_schedules_warm_up_then_decay_to_zero():
    from mixer_jax.configs import OptimConfig
    from mixer_jax.train import make_schedule

    cos = make_schedule(OptimConfig(lr=0.03, warmup_steps=500, schedule="cosine"), 10_000)
    assert float(cos(0)) == 0 and float(cos(250)) == pytest.approx(0.015) and float(cos(500)) == pytest.approx(0.03)
    assert float(cos(10_000)) == pytest.approx(0, abs=1e-9)
    lin = make_schedule(OptimConfig(lr=1e-3, warmup_steps=100, schedule="linear"), 1100)
    assert float(lin(100)) == pytest.approx(1e-3) and float(lin(600)) == pytest.approx(5e-4)


def test_weight_decay_is_decoupled_and_applies_to_kernels_only():
    import jax.numpy as jnp
    from mixer_jax.configs import OptimConfig
    from mixer_jax.train import make_optimizer

    tx, _ = make_optimizer(OptimConfig(name="adam", lr=0.1, weight_decay=0.5, warmup_steps=0, grad_clip=0,
                                       schedule="cosine"), 10)
    params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "LayerNorm_0": {"scale": jnp.ones(2)}}
    zero = {"Dense_0": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}, "LayerNorm_0": {"scale": jnp.zeros(2)}}
    updates, _ = tx.update(zero, tx.init(params), params)
    assert np.allclose(updates["Dense_0"]["kernel"], -0.1 * 0.5)  # -lr * wd * w with zero gradient
    assert not np.any(updates["Dense_0"]["bias"]) and not np.any(updates["LayerNorm_0"]["scale"])


def _state_and_batch(accum, mixup=0.0, smoothing=0.0):
    import jax
    from mixer_jax.input_pipeline import make_source
    from mixer_jax.input_pipeline import TrainBatches
    from mixer_jax.model import MlpMixer
    from mixer_jax.train import create_train_state, make_optimizer

    cfg = tiny()
    model = MlpMixer(cfg.model.replace(num_classes=10, image_size=(16, 16)))
    tx, sched = make_optimizer(cfg.optim, 10)
    state = create_train_state(model, tx, jax.random.PRNGKey(0))
    x, y, _, _ = TrainBatches(make_source(cfg.data, "train"), cfg.data, 32, seed=0)(0)
    return model, state, x.reshape(accum, 32 // accum, *x.shape[1:]), y.reshape(accum, -1), sched


def test_gradient_accumulation_equals_one_big_batch():
    import jax
    from mixer_jax.train import train_step

    outs = []
    for accum in (1, 4):
        model, state, x, y, sched = _state_and_batch(accum)
        new, m = jax.jit(lambda s, a, b: train_step(s, a, b, jax.random.PRNGKey(1), model=model, num_classes=10))(
            state, x, y)
        outs.append((new.params, m))
    leaves = zip(jax.tree_util.tree_leaves(outs[0][0]), jax.tree_util.tree_leaves(outs[1][0]))
    assert max(float(np.abs(a - b).max()) for a, b in leaves) < 1e-6
    assert float(outs[0][1]["loss"]) == pytest.approx(float(outs[1][1]["loss"]), abs=1e-6)


def test_label_smoothing_and_mixup_build_the_documented_targets():
    import jax
    import jax.numpy as jnp
    import optax
    from mixer_jax.input_pipeline import normalize
    from mixer_jax.train import _loss, cross_entropy

    model, state, x, y, _ = _state_and_batch(1)
    x = normalize(x)  # _loss takes model inputs; train_step normalises the pipeline's uint8
    leaves, tree = jax.tree_util.tree_flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    x, y, rng = x[0], y[0], jax.random.PRNGKey(3)
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    onehot = jax.nn.one_hot(y, 10)

    def logits(images):
        return model.apply({"params": params}, images)

    loss, correct = _loss(params, model, x, y, rng, 10, 0.1, 0.0)
    want = cross_entropy(logits(x), optax.smooth_labels(onehot, 0.1)).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert int(correct) == int(jnp.sum(jnp.argmax(logits(x), -1) == y))

    # mixup: each batch mixed with its reverse, weight lam ~ Beta(a, a) from the step's key
    loss, correct = _loss(params, model, x, y, rng, 10, 0.0, 0.4)
    lam = jax.random.beta(jax.random.split(rng)[0], 0.4, 0.4)
    mixed_x = lam * x + (1 - lam) * x[::-1]
    want = cross_entropy(logits(mixed_x), lam * onehot + (1 - lam) * onehot[::-1]).mean()
    assert 0 < float(lam) < 1 and float(loss) == pytest.approx(float(want), rel=1e-5)
    assert int(correct) == int(jnp.sum(jnp.argmax(logits(mixed_x), -1) == y))  # accuracy vs the true labels


# ---- data --------------------------------------------------------------------------------------


def test_uint8_batches_are_normalised_on_the_device_like_float_batches():
    import jax
    from mixer_jax.input_pipeline import normalize
    from mixer_jax.train import eval_step, train_step

    model, state, x, y, _ = _state_and_batch(1)
    assert x.dtype == np.uint8
    step = jax.jit(lambda s, a: train_step(s, a, y, jax.random.PRNGKey(1), model=model, num_classes=10))
    (new_u8, m_u8), (new_f32, m_f32) = step(state, x), step(state, np.asarray(normalize(x)))
    for a, b in zip(jax.tree_util.tree_leaves(new_u8.params), jax.tree_util.tree_leaves(new_f32.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mask = np.ones(32, bool)
    assert float(eval_step(new_u8, x[0], y[0], mask, model=model)["correct"]) == \
        float(eval_step(new_u8, np.asarray(normalize(x[0])), y[0], mask, model=model)["correct"])


def test_top5_counts_labels_among_the_five_largest_logits():
    import jax.numpy as jnp
    from mixer_jax.train import eval_step

    class Fixed:  # a "model" whose logits are given
        def apply(self, variables, images):
            return jnp.asarray(logits)

    logits = np.array([[9, 8, 7, 6, 5, 4, 0], [0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0]], np.float32)
    labels = np.array([4, 0, 0])  # 5th best, worst, best
    state = type("S", (), {"params": {}})()
    out = eval_step(state, np.zeros((3, 1, 1, 3), np.float32), labels, np.array([True, True, False]), model=Fixed())
    assert (int(out["correct"]), int(out["correct5"]), int(out["count"])) == (0, 1, 2)


@pytest.mark.slow
def test_imagefolder_and_mocked_tfds_datasets_train(tmp_path):
    import tensorflow_datasets as tfds
    from PIL import Image

    from mixer_jax.configs import DataConfig
    from mixer_convert.datasets import digits
    from mixer_jax.train import train_and_evaluate

    src = digits("test")
    for split, idx in (("train", range(0, 200)), ("test", range(200, 260))):
        for i in idx:
            d = tmp_path / "folder" / split / f"class_{src.labels[i]}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(src.images[i]).save(d / f"{i}.png")
    res = train_and_evaluate(tiny(steps=2, data=DataConfig(name="imagefolder", data_dir=str(tmp_path / "folder"),
                                                           image_size=16, train_augment="none")),
                             tmp_path / "run_folder", progress=False)
    assert res.step == 2 and res.model_config.num_classes == 10
    assert json.loads((tmp_path / "run_folder" / "classes.json").read_text()) == [f"class_{c}" for c in range(10)]
    with tfds.testing.mock_data(num_examples=64):
        res = train_and_evaluate(tiny(steps=2, data=DataConfig(name="cifar10", image_size=16)),
                                 tmp_path / "run_tfds", progress=False)
    assert res.step == 2 and 0 <= res.eval["eval_accuracy"] <= res.eval["eval_top5"] <= 1
    names = tfds.builder("cifar10").info.features["label"].names  # the mock's metadata has only numbers
    assert json.loads((tmp_path / "run_tfds" / "classes.json").read_text()) == names and len(names) == 10


# ---- whole runs: devices, processes, kill and resume ---------------------------------------------


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """12 steps on one device, uninterrupted, input in the training thread (data.workers=0); the
    runs compared with it use input workers."""
    d = tmp_path_factory.mktemp("ref")
    run_worker(d / "w", d / "out.npz", "--set", "steps=12", "--set", "data.workers=0")
    return load_run(d / "out.npz"), d


@pytest.mark.slow
def test_a_run_writes_metrics_plot_checkpoints_and_official_npz(reference_run):
    (params, history, acc, _), d = reference_run
    w = d / "w"
    recs = [json.loads(line) for line in open(w / "metrics.jsonl")]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert all(k in train[0] for k in ("loss", "accuracy", "lr", "img_per_s", "grad_norm"))
    assert recs[-1]["eval_accuracy"] == pytest.approx(acc) and recs[-1]["eval_top5"] >= acc
    assert json.loads((w / "classes.json").read_text()) == [str(c) for c in range(10)]
    assert (w / "metrics.png").stat().st_size > 10_000
    assert sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit()) == [8, 12]
    from mixer_convert.io import read_params
    saved = read_params(w / "model.npz")
    assert all(np.array_equal(saved[k], params[k]) for k in params)
    # the bridge reads the training checkpoint itself (params beside opt_state and step)
    from_ckpt = read_params(w / "checkpoints" / "12" / "state")
    assert set(from_ckpt) == set(params) and all(np.array_equal(from_ckpt[k], params[k]) for k in params)


@pytest.mark.slow
def test_eight_devices_match_one_device_for_the_same_global_batch(reference_run, tmp_path):
    (ref, ref_hist, _, _), _ = reference_run
    run_worker(tmp_path / "w", tmp_path / "o.npz", "--devices", 8, "--set", "steps=12")
    params, hist, _, devices = load_run(tmp_path / "o.npz")
    assert devices == 8
    assert_params_close(params, ref, atol=1e-5)
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref_hist], abs=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_localhost_train_like_one(reference_run, tmp_path):
    (ref, ref_hist, _, _), _ = reference_run
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "w"), str(tmp_path / "o.npz"),
                               "--devices", "2", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--set", "steps=12", "--set", "data.worker_type=process"],
                              cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    params, hist, _, devices = load_run(tmp_path / "o.npz")
    assert devices == 4
    assert_params_close(params, ref, atol=1e-5)
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref_hist], abs=1e-5)


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_reaches_the_same_params(reference_run, tmp_path):
    (ref, ref_hist, _, _), _ = reference_run
    # two input worker processes; SIGKILL takes them down with the trainer
    r = run_worker(tmp_path / "w", tmp_path / "o.npz", "--set", "steps=12", "--kill-at", 10,
                   "--set", "data.worker_type=process", check=False)
    assert r.returncode == -signal.SIGKILL
    ckpts = sorted(int(p.name) for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [4, 8]  # killed after step 10: 8 is the newest complete checkpoint
    meta = json.loads((tmp_path / "w" / "checkpoints" / "8" / "meta" / "metadata").read_text())
    assert meta["step"] == 8 and meta["data_position"] == {"epoch": 0, "index": 256}
    r = run_worker(tmp_path / "w", tmp_path / "o.npz", "--set", "steps=12")  # resumed with 2 threads
    assert "resumed from step 8" in r.stdout
    params, hist, _, _ = load_run(tmp_path / "o.npz")
    assert_params_close(params, ref, atol=0.0)  # bit-identical
    assert [h["step"] for h in hist] == [9, 10, 11, 12]
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist[8:]]
    logged = [json.loads(line)["step"] for line in open(tmp_path / "w" / "metrics.jsonl")
              if "loss" in json.loads(line)]
    assert logged == list(range(1, 13))  # steps 9-10 of the killed run are not logged twice


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_is_reported_and_the_run_resumes_from_the_previous_one(reference_run, tmp_path):
    import shutil
    (ref, ref_hist, _, _), d = reference_run
    shutil.copytree(d / "w" / "checkpoints", tmp_path / "w" / "checkpoints")
    shutil.copy(d / "w" / "metrics.jsonl", tmp_path / "w" / "metrics.jsonl")
    state = tmp_path / "w" / "checkpoints" / "12" / "state"
    f = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the newest checkpoint's tensor data
    f.write_bytes(bytes(data))
    r = run_worker(tmp_path / "w", tmp_path / "o.npz", "--set", "steps=12")
    assert "checkpoint step 12 is damaged" in r.stdout and "resumed from step 8" in r.stdout
    params, hist, _, _ = load_run(tmp_path / "o.npz")
    assert_params_close(params, ref, atol=0.0)  # redone from step 8: bit-identical to the clean run
    assert [h["step"] for h in hist] == [9, 10, 11, 12]


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    r = run_worker(tmp_path / "w", tmp_path / "o.npz", "--set", "steps=30", "--set", "optim.lr=1e6",
                   "--set", "optim.grad_clip=0", "--set", "optim.name=sgd", "--set", "optim.warmup_steps=0",
                   "--set", "checkpoint_every=1", "--set", "log_every=1", check=False)
    assert r.returncode != 0
    assert "NonFiniteLossError" in r.stderr and "last good checkpoint is step" in r.stderr
    last_good = int(r.stderr.split("last good checkpoint is step ")[1].split()[0])
    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(tmp_path / "w" / "checkpoints")
    assert mngr.latest_step() == last_good
    restored = mngr.restore(last_good)
    leaves = [np.asarray(x) for x in __import__("jax").tree_util.tree_leaves(restored["state"]["params"])]
    assert all(np.isfinite(x).all() for x in leaves)


def test_fine_tune_from_an_official_npz_with_new_head_and_resolution_then_export_to_pytorch(tmp_path):
    from mixer_convert import config_for, random_params
    from mixer_convert.io import read_params
    from mixer_convert.resize import new_head, resize_token_mixing
    from mixer_jax.train import train_and_evaluate

    base_cfg = config_for("S/16", patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64,
                          image_size=8, num_classes=21)
    flat = random_params(base_cfg, 0)
    np.savez(tmp_path / "Mixer-tiny.npz", **flat)
    cfg = tiny(steps=1, init_from=str(tmp_path / "Mixer-tiny.npz"), resize_scale=2, export_torch=True,
               optim=dataclasses.replace(tiny().optim, lr=1e-12, warmup_steps=0, weight_decay=0.0))
    res = train_and_evaluate(cfg, tmp_path / "w", progress=False)
    expected, _ = new_head(*resize_token_mixing(flat, base_cfg, 2), 10)
    got = read_params(tmp_path / "w" / "model.npz")
    assert set(got) == set(expected)
    for k in expected:  # one step at lr 1e-12 leaves the loaded weights as they were
        np.testing.assert_allclose(got[k], expected[k], atol=1e-6, err_msg=k)
    assert res.model_config.image_size == (16, 16) and res.model_config.num_classes == 10
    pytest.importorskip("torch")
    from mixer_torch import from_checkpoint
    model = from_checkpoint(tmp_path / "w" / "model.pt")
    assert model.config.num_classes == 10 and model.config.tokens_mlp_dim == 64


def test_init_from_a_checkpoint_for_another_resolution_is_a_clear_error(tmp_path):
    from mixer_convert import config_for, random_params
    from mixer_jax.train import train_and_evaluate

    base_cfg = config_for("S/16", patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64,
                          image_size=8, num_classes=10)
    np.savez(tmp_path / "m.npz", **random_params(base_cfg, 0))
    with pytest.raises(ValueError, match=r"is for \(8, 8\) images"):
        train_and_evaluate(tiny(init_from=str(tmp_path / "m.npz")), tmp_path / "w", progress=False)




@pytest.mark.slow
def test_bf16_compute_follows_the_float32_run_with_float32_parameters(reference_run, tmp_path):
    # (A few steps of this tiny model move the loss by less than batch-to-batch noise, so the
    # check is against the float32 run on the same batches, not "the loss went down".)
    import jax
    from mixer_jax.train import train_and_evaluate

    (_, ref_hist, _, _), _ = reference_run
    res = train_and_evaluate(tiny(steps=12, compute_dtype="bfloat16"), tmp_path / "w", progress=False)
    bf16, fp32 = [h["loss"] for h in res.history], [h["loss"] for h in ref_hist]
    assert bf16 == pytest.approx(fp32, abs=2e-2) and bf16 != fp32
    assert {x.dtype for x in jax.tree_util.tree_leaves(res.params)} == {np.dtype("float32")}


@pytest.mark.slow
def test_steps_0_evaluates_the_latest_checkpoint_or_init_from_and_reports_top5(reference_run, tmp_path, capsys):
    import shutil

    from mixer_convert import config_for, random_params
    from mixer_jax.cli import main
    from mixer_jax.train import train_and_evaluate

    (_, _, acc, _), d = reference_run
    shutil.copytree(d / "w", tmp_path / "w")
    before = (tmp_path / "w" / "metrics.jsonl").read_text()
    res = train_and_evaluate(tiny(steps=0), tmp_path / "w", progress=False)
    assert res.step == 12 and res.eval["eval_accuracy"] == pytest.approx(acc) and res.eval["eval_top5"] >= acc
    assert (tmp_path / "w" / "metrics.jsonl").read_text() == before  # evaluating leaves the run as it was
    assert sorted(int(p.name) for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit()) == [8, 12]

    cfg = config_for("S/16", patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64,
                     image_size=16, num_classes=10)
    np.savez(tmp_path / "m.npz", **random_params(cfg, 0))
    assert main(["--workdir", str(tmp_path / "e"), "--no-progress", "--set", "steps=0", "--set",
                 f"init_from={tmp_path / 'm.npz'}", "--set", "data.image_size=16"]) == 0
    out = capsys.readouterr().out
    assert f"evaluated {tmp_path / 'm.npz'} on digits test: top-1 " in out and ", top-5 " in out
    assert not (tmp_path / "e").exists()  # nothing written
    with pytest.raises(ValueError, match="steps=0 evaluates init_from or the latest checkpoint"):
        train_and_evaluate(tiny(steps=0), tmp_path / "empty", progress=False)
