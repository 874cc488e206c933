"""mixer_jax.train: whole runs. Data sources, sharding across devices and processes, TensorBoard
events, checkpoint/resume after SIGKILL, failure handling, init_from, fine-tuning and export; the
NNX model (model.api=nnx) through the same loop, equal to the Linen run. (The
pieces have their own tests: test_configs, test_steps, test_loop, test_checkpointing, test_metrics.)"""
import contextlib
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
from helpers.tensorboard_events import scalars, texts

pytestmark = requires_jax
WORKER = Path(__file__).parent / "helpers" / "train_worker.py"


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
    from helpers.training import tiny_digits
    return dataclasses.replace(tiny_digits(), **kw)


# ---- config errors come before any compute ----------------------------------------------------


def test_bad_data_configs_fail_before_any_compute(tmp_path):
    from mixer_jax.configs import DataConfig
    from mixer_jax.train import train_and_evaluate

    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'"):
        train_and_evaluate(tiny(data=DataConfig(name="no_such_dataset")), tmp_path / "a")
    with pytest.raises(ValueError, match="data_dir '/nonexistent/dir' does not exist"):
        train_and_evaluate(tiny(data=DataConfig(name="cifar10", data_dir="/nonexistent/dir")), tmp_path / "b")
    with pytest.raises(ValueError, match="imagefolder: no directory"):
        train_and_evaluate(tiny(data=DataConfig(name="imagefolder", data_dir=str(tmp_path))), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "checkpoints").exists()


# ---- data --------------------------------------------------------------------------------------


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
def reference_runs(tmp_path_factory):
    """``reference_runs(api)``: 12 steps of the model in that Flax API on one device, uninterrupted,
    input in the training thread (data.workers=0); the runs compared with it use input workers.
    Each is run once, when a test first asks for it."""
    runs = {}

    def get(api: str = "linen"):
        if api not in runs:
            d = tmp_path_factory.mktemp(f"ref_{api}")
            run_worker(d / "w", d / "out.npz", "--set", "steps=12", "--set", "data.workers=0",
                       "--set", f"model.api={api}")
            runs[api] = load_run(d / "out.npz"), d
        return runs[api]
    return get


@pytest.fixture(scope="module")
def reference_run(reference_runs):
    return reference_runs("linen")


APIS = ["linen", "nnx"]


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
    from mixer_convert.load import read_params
    saved = read_params(w / "model.npz")
    assert all(np.array_equal(saved[k], params[k]) for k in params)
    # the bridge reads the training checkpoint itself (params beside opt_state and step)
    from_ckpt = read_params(w / "checkpoints" / "12" / "state")
    assert set(from_ckpt) == set(params) and all(np.array_equal(from_ckpt[k], params[k]) for k in params)
    # TensorBoard: every logged value at its step, the final eval, the config once
    tb = scalars(w)
    for key, tag in (("loss", "train/loss"), ("accuracy", "train/accuracy"), ("lr", "train/lr"),
                     ("grad_norm", "train/grad_norm"), ("img_per_s", "train/img_per_s")):
        assert tb[tag] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train], tag
    assert tb["eval/top1"] == [(12, pytest.approx(acc))]
    assert tb["eval/top5"] == [(12, pytest.approx(recs[-1]["eval_top5"]))]
    assert tb["eval/loss"] == [(12, pytest.approx(recs[-1]["eval_loss"]))]
    [(step, text)] = texts(w)["config/text_summary"]
    assert step == 0 and json.loads(text)["steps"] == 12


@pytest.mark.slow
def test_the_nnx_run_logs_the_linen_runs_losses_from_the_same_seed(reference_runs):
    (linen, linen_hist, linen_acc, _), _ = reference_runs("linen")
    (nnx, nnx_hist, nnx_acc, _), d = reference_runs("nnx")
    assert [h["step"] for h in nnx_hist] == list(range(1, 13))
    # The two models are bit-identical functions (tests/test_nnx.py); float32 tolerance allows for XLA
    # fusing the two programs differently. (Observed on CPU: identical.)
    assert [h["loss"] for h in nnx_hist] == pytest.approx([h["loss"] for h in linen_hist], rel=1e-6, abs=1e-6)
    assert_params_close(nnx, linen, atol=1e-6)
    assert nnx_acc == pytest.approx(linen_acc, abs=1 / 64)
    from mixer_convert.load import read_params
    saved = read_params(d / "w" / "model.npz")  # the official layout, as the Linen run writes it
    assert saved.keys() == nnx.keys() and all(np.array_equal(saved[k], nnx[k]) for k in nnx)
    from_ckpt = read_params(d / "w" / "checkpoints" / "12" / "state")  # the same params tree as Linen's
    assert from_ckpt.keys() == nnx.keys() and all(np.array_equal(from_ckpt[k], nnx[k]) for k in nnx)


@pytest.mark.slow
def test_a_linen_runs_checkpoint_resumes_under_nnx_when_the_change_is_allowed(reference_runs, tmp_path):
    import shutil

    from mixer_jax.checkpointing import ResumeConfigError
    from mixer_jax.model import params_to_flat
    from mixer_jax.train import train_and_evaluate

    (ref, _, _, _), d = reference_runs("linen")
    shutil.copytree(d / "w" / "checkpoints", tmp_path / "w" / "checkpoints")
    shutil.rmtree(tmp_path / "w" / "checkpoints" / "12")  # resume from step 8
    cfg = tiny(steps=12, model=dataclasses.replace(tiny().model, api="nnx"))
    with pytest.raises(ResumeConfigError, match="model.api: 'linen' -> 'nnx'"):
        train_and_evaluate(cfg, tmp_path / "w", progress=False)
    res = train_and_evaluate(cfg, tmp_path / "w", progress=False, allow_config_change=True)
    assert [h["step"] for h in res.history] == [9, 10, 11, 12]
    assert_params_close(params_to_flat(res.params), ref, atol=1e-6)  # the same tree, the same function


@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
def test_eight_devices_match_one_device_for_the_same_global_batch(reference_runs, tmp_path, api):
    (ref, ref_hist, _, _), _ = reference_runs(api)
    run_worker(tmp_path / "w", tmp_path / "o.npz", "--devices", 8, "--set", "steps=12", "--set", f"model.api={api}")
    params, hist, _, devices = load_run(tmp_path / "o.npz")
    assert devices == 8
    assert_params_close(params, ref, atol=1e-5)
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref_hist], abs=1e-5)


@contextlib.contextmanager
def _reserved_port():
    """A port for JAX's coordinator, held for the test: bound (not listening) with SO_REUSEPORT, which
    the coordinator's gRPC server also sets, so it binds the port beside this socket while nothing
    else can take it. A port picked and then closed could be taken by another process (or handed
    out for an outgoing connection) before the coordinator binds it, which crashes process 0."""
    try:
        s, anywhere = socket.socket(socket.AF_INET6), "::"  # the coordinator listens on [::]
    except OSError:  # no IPv6: it listens on 0.0.0.0
        s, anywhere = socket.socket(socket.AF_INET), "0.0.0.0"
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((anywhere, 0))
        yield s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_localhost_train_like_one(reference_run, tmp_path):
    (ref, ref_hist, _, _), _ = reference_run
    with _reserved_port() as port:
        procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "w"), str(tmp_path / "o.npz"),
                                   "--devices", "2", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                   "--process-id", str(i), "--set", "steps=12", "--set", "data.worker_type=process"],
                                  cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for i in range(2)]
        try:
            for p in procs:
                _, err = p.communicate(timeout=600)
                assert p.returncode == 0, err[-4000:]
        finally:  # one failed: the other would wait for it until JAX's own timeout
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
    params, hist, _, devices = load_run(tmp_path / "o.npz")
    assert devices == 4
    assert len(list((tmp_path / "w").glob("events.out.tfevents.*"))) == 1  # process 0's only
    assert [s for s, _ in scalars(tmp_path / "w")["train/loss"]] == list(range(1, 13))
    assert_params_close(params, ref, atol=1e-5)
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref_hist], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
def test_sigkill_mid_training_then_resume_reaches_the_same_params(reference_runs, tmp_path, api):
    (ref, ref_hist, _, _), _ = reference_runs(api)
    # two input worker processes; SIGKILL takes them down with the trainer
    r = run_worker(tmp_path / "w", tmp_path / "o.npz", "--set", "steps=12", "--kill-at", 10,
                   "--set", "data.worker_type=process", "--set", f"model.api={api}", check=False)
    assert r.returncode == -signal.SIGKILL
    ckpts = sorted(int(p.name) for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [4, 8]  # killed after step 10: 8 is the newest complete checkpoint
    meta = json.loads((tmp_path / "w" / "checkpoints" / "8" / "meta" / "metadata").read_text())
    assert meta["step"] == 8 and meta["data_position"] == {"epoch": 0, "index": 256}
    r = run_worker(tmp_path / "w", tmp_path / "o.npz", "--set", "steps=12", "--set", f"model.api={api}")  # 2 threads
    assert "resumed from step 8" in r.stdout
    params, hist, _, _ = load_run(tmp_path / "o.npz")
    assert_params_close(params, ref, atol=0.0)  # bit-identical
    assert [h["step"] for h in hist] == [9, 10, 11, 12]
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist[8:]]
    logged = [json.loads(line)["step"] for line in open(tmp_path / "w" / "metrics.jsonl")
              if "loss" in json.loads(line)]
    assert logged == list(range(1, 13))  # steps 9-10 of the killed run are not logged twice
    # TensorBoard, as it reads the two runs' files: each step once, the resumed run's values after step 8
    assert len(list((tmp_path / "w").glob("events.out.tfevents.*"))) == 2
    assert scalars(tmp_path / "w")["train/loss"] == [(h["step"], pytest.approx(h["loss"], rel=1e-6)) for h in ref_hist]
    assert [s for s, _ in texts(tmp_path / "w")["config/text_summary"]] == [0]


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


@pytest.mark.parametrize("api", ["linen", pytest.param("nnx", marks=pytest.mark.slow)])  # the NNX run: ~5 s more
def test_fine_tune_from_an_official_npz_with_new_head_and_resolution_then_export_to_pytorch(tmp_path, monkeypatch,
                                                                                              api):
    from mixer_convert import config_for, random_params
    from mixer_convert.load import read_params
    from mixer_convert.resize import new_head, resize_token_mixing
    from mixer_jax.train import train_and_evaluate

    base_cfg = config_for("S/16", patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64,
                          image_size=8, num_classes=21)
    flat = random_params(base_cfg, 0)
    np.savez(tmp_path / "Mixer-tiny.npz", **flat)
    monkeypatch.setenv("HOME", str(tmp_path))  # and a ~ in workdir and init_from means home
    cfg = tiny(steps=1, init_from="~/Mixer-tiny.npz", resize_scale=2, export_torch=True,
               model=dataclasses.replace(tiny().model, api=api),
               optim=dataclasses.replace(tiny().optim, lr=1e-12, warmup_steps=0, weight_decay=0.0))
    res = train_and_evaluate(cfg, "~/runs/w", progress=False)
    assert res.step == 1 and (tmp_path / "runs" / "w" / "model.npz").exists()
    expected, _ = new_head(*resize_token_mixing(flat, base_cfg, 2), 10)
    got = read_params(tmp_path / "runs" / "w" / "model.npz")
    assert set(got) == set(expected)
    for k in expected:  # one step at lr 1e-12 leaves the loaded weights as they were
        np.testing.assert_allclose(got[k], expected[k], atol=1e-6, err_msg=k)
    assert res.model_config.image_size == (16, 16) and res.model_config.num_classes == 10
    pytest.importorskip("torch")
    from mixer_torch import from_checkpoint
    model = from_checkpoint(tmp_path / "runs" / "w" / "model.pt")
    assert model.config.num_classes == 10 and model.config.tokens_mlp_dim == 64


def test_init_from_a_checkpoint_for_another_resolution_is_a_clear_error(tmp_path):
    from mixer_convert import config_for, random_params
    from mixer_jax.train import train_and_evaluate

    base_cfg = config_for("S/16", patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64,
                          image_size=8, num_classes=10)
    np.savez(tmp_path / "m.npz", **random_params(base_cfg, 0))
    with pytest.raises(ValueError, match=r"is for \(8, 8\) images"):
        train_and_evaluate(tiny(init_from=str(tmp_path / "m.npz")), tmp_path / "w", progress=False)


def _tiny_checkpoint(path, num_classes):
    from mixer_convert import config_for, random_params

    cfg = config_for("S/16", patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64,
                     image_size=16, num_classes=num_classes)
    flat = random_params(cfg, 0)
    np.savez(path, **flat)
    return flat


def test_init_from_keeps_a_head_of_the_right_size_and_replaces_any_other(tmp_path):
    from mixer_jax.model import params_to_flat
    from mixer_jax.train import load_init_params

    same = _tiny_checkpoint(tmp_path / "ten.npz", 10)
    params, cfg = load_init_params(tiny(init_from=str(tmp_path / "ten.npz")), num_classes=10)
    np.testing.assert_array_equal(params_to_flat(params)["head/kernel"], same["head/kernel"])
    _tiny_checkpoint(tmp_path / "other.npz", 21)
    params, cfg = load_init_params(tiny(init_from=str(tmp_path / "other.npz")), num_classes=10)
    head = params_to_flat(params)["head/kernel"]
    assert cfg.num_classes == 10 and head.shape == (32, 10) and not head.any()


def test_init_from_with_nan_weights_is_refused_unless_allowed(tmp_path):
    from mixer_convert.errors import CheckpointError
    from mixer_jax.model import params_to_flat
    from mixer_jax.train import load_init_params

    flat = _tiny_checkpoint(tmp_path / "nan.npz", 10)
    flat["stem/bias"][:2] = [np.nan, np.inf]
    np.savez(tmp_path / "nan.npz", **flat)
    with pytest.raises(CheckpointError, match=r"nan.npz: stem/bias: 2 of 32 values are NaN or Inf "
                                              r"\(--set init_allow_nonfinite=true"):
        load_init_params(tiny(init_from=str(tmp_path / "nan.npz")), num_classes=10)
    params, _ = load_init_params(tiny(init_from=str(tmp_path / "nan.npz"), init_allow_nonfinite=True), num_classes=10)
    assert np.array_equal(params_to_flat(params)["stem/bias"], flat["stem/bias"], equal_nan=True)




@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
def test_bf16_compute_follows_the_float32_run_with_float32_parameters(reference_runs, tmp_path, api):
    # (A few steps of this tiny model move the loss by less than batch-to-batch noise, so the
    # check is against the float32 run on the same batches, not "the loss went down".)
    import jax
    from mixer_jax.train import train_and_evaluate

    (_, ref_hist, _, _), _ = reference_runs(api)
    res = train_and_evaluate(tiny(steps=12, model=dataclasses.replace(tiny().model, compute_dtype="bfloat16", api=api)),
                             tmp_path / "w", progress=False)
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
    assert main(["--workdir", str(tmp_path / "e"), "--quiet", "--set", "steps=0", "--set",
                 f"init_from={tmp_path / 'm.npz'}", "--set", "data.image_size=16"]) == 0
    out = capsys.readouterr().out
    assert f"evaluated {tmp_path / 'm.npz'} on digits test: top-1 " in out and ", top-5 " in out
    assert not (tmp_path / "e").exists()  # nothing written
    with pytest.raises(ValueError, match="steps=0 evaluates init_from or the latest checkpoint"):
        train_and_evaluate(tiny(steps=0), tmp_path / "empty", progress=False)


@pytest.mark.slow
def test_resuming_with_other_steps_is_refused_then_allowed_with_the_flag(tmp_path):
    from mixer_jax.checkpointing import ResumeConfigError
    from mixer_jax.train import train_and_evaluate

    train_and_evaluate(tiny(steps=2, checkpoint_every=2), tmp_path / "w", progress=False)
    with pytest.raises(ResumeConfigError, match="steps: 2 -> 4"):
        train_and_evaluate(tiny(steps=4), tmp_path / "w", progress=False)
    res = train_and_evaluate(tiny(steps=4), tmp_path / "w", progress=False, allow_config_change=True)
    assert res.step == 4 and [h["step"] for h in res.history] == [3, 4]
    # TensorBoard: each step once, and the config again at the step the changed run resumed from
    assert [s for s, _ in scalars(tmp_path / "w")["train/loss"]] == [1, 2, 3, 4]
    assert [(s, json.loads(t)["steps"]) for s, t in texts(tmp_path / "w")["config/text_summary"]] == [(0, 2), (2, 4)]


def test_the_architecture_compile_only_compiles_is_the_one_loading_makes(tmp_path, monkeypatch):
    """--compile-only reads no weights: ``init_from`` resized as loading resizes it (token mixing 4x
    wider at twice the resolution), and a published name from the catalogue, nothing downloaded."""
    from mixer_convert import config_for, random_params
    from mixer_jax.train import architecture_of, load_init_params

    base = config_for("S/16", patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64,
                      image_size=8, num_classes=21)
    np.savez(tmp_path / "m.npz", **random_params(base, 0))
    cfg = tiny(init_from=str(tmp_path / "m.npz"), resize_scale=2)
    assert architecture_of(cfg, 10) == load_init_params(cfg, 10)[1]
    assert architecture_of(cfg, 10).tokens_mlp_dim == 64 and architecture_of(cfg, 10).image_size == (16, 16)
    monkeypatch.setenv("MIXER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MIXER_CHECKPOINT_BASE_URL", "http://127.0.0.1:9")  # nothing listens: no download
    published = tiny(init_from="L/16-i1k", resize_scale=2, data=dataclasses.replace(tiny().data, image_size=448))
    assert architecture_of(published, 10) == config_for("L/16", image_size=448, tokens_mlp_dim=4 * 512,
                                                        num_classes=10)
    assert not (tmp_path / "cache").exists()
