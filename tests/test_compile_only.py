"""mixer_jax.compile_only and mixer-train --compile-only: the real train step compiled for a TPU slice
(libtpu, the tpu extra) or this machine, reading no data and writing nothing; per-chip memory, fits,
FLOPs; a step that does not fit is exit 1 with the compiler's numbers, never a traceback."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, has_module, subprocess_env
from mixer_jax.compile_only import parse_oom, summary

pytestmark = pytest.mark.skipif(not has_module("optax"), reason="needs the train extra")
needs_libtpu = pytest.mark.skipif(not has_module("libtpu"), reason="needs the tpu extra (libtpu)")
TINY = ["--set", "model.patch_size=4", "--set", "model.hidden_dim=32",
        "--set", "model.num_blocks=2", "--set", "model.tokens_mlp_dim=16", "--set", "model.channels_mlp_dim=64",
        "--set", "data.image_size=16", "--set", "batch_size=16"]


def _train(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mixer_jax.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or subprocess_env(), timeout=900)


def test_the_compilers_out_of_memory_message_gives_temporaries_and_the_hbm():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (34.00G) "
           "exceeds available HBM (15.75G).")
    assert parse_oom(msg) == (int(34 * 2 ** 30), int(15.75 * 2 ** 30), "temporaries")
    # libtpu's other wording gives everything the step holds
    other = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
             "Used 21.95G of 15.48G hbm. Exceeded hbm capacity by 6.47G.")
    assert parse_oom(other) == (int(21.95 * 2 ** 30), int(15.48 * 2 ** 30), "total")
    assert parse_oom("some other failure") is None


def test_the_summary_says_fits_or_not_with_the_numbers():
    fits = {"topology": "v5e:4x4", "chips": 16, "per_chip_batch": 32, "compile_seconds": 23.4,
            "mesh": {"data": 1, "fsdp": 16}, "hbm_bytes_per_chip": int(15.75 * 2 ** 30), "fits": True,
            "bytes_per_chip": {"arguments": 2 ** 30, "temporaries": 2 ** 31, "outputs": 2 ** 30, "aliased": 2 ** 30,
                               "total": 3 * 2 ** 30}, "flops_per_step": 1.6e15, "step_seconds_lower_bound": 0.5}
    text = summary(fits)
    assert "v5e:4x4: 16 chips (mesh data=1 x fsdp=16), 32 images per chip" in text
    assert "= 3.00 GiB of 15.75 GiB HBM: fits" in text and "at least 500 ms per step" in text
    too_big = {**fits, "fits": False, "error": "RESOURCE_EXHAUSTED: ...",
               "bytes_per_chip": {**fits["bytes_per_chip"], "temporaries": 34 * 2 ** 30, "total": None}}
    assert "does NOT fit: 34.00 GiB of temporaries" in summary(too_big)
    in_all = {**too_big, "bytes_per_chip": {**fits["bytes_per_chip"], "temporaries": None, "total": 22 * 2 ** 30}}
    assert "does NOT fit: 22.00 GiB in all per chip, 15.75 GiB of HBM" in summary(in_all)


def test_local_compile_of_the_digits_run_reads_no_data_and_needs_no_workdir(tmp_path):
    r = _train("--config", "digits", "--compile-only", "local", *TINY, "--json", "-")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["topology"] == "local" and out["fits"] and out["per_chip_batch"] == 16
    assert set(out["bytes_per_chip"]) == {"arguments", "temporaries", "outputs", "aliased", "total"}
    assert out["bytes_per_chip"]["arguments"] > 0 and out["flops_per_step"] > 0
    # the model's matmuls are a lower bound of what XLA counts (norms, GELU, the optimizer on top)
    assert out["compiler_flops_per_chip"] * out["chips"] >= out["flops_per_step"]
    assert set(out) >= {"topology", "chips", "per_chip_batch", "bytes_per_chip", "hbm_bytes_per_chip", "fits",
                        "flops_per_step", "compile_seconds", "mesh"}


@pytest.mark.parametrize("args,message", [
    (["--config", "finetune", "--compile-only", "local"], "--set data.num_classes=N"),
    (["--config", "digits", "--compile-only", "v5e"], "a TPU slice is GENERATION:SHAPE"),
    (["--config", "digits"], "--workdir is required (except with --compile-only)"),
    (["--config", "digits", "--compile-only", "local", "--workdir", "w", "--coordinator", "h:1", "--process-id", "0"],
     "--compile-only compiles for every host of the topology in one process: drop --coordinator, --process-id"),
])
def test_what_compile_only_cannot_know_or_parse_is_one_line(args, message):
    r = _train(*args)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.slow
@needs_libtpu
def test_a_tpu_slice_compiles_silently_and_fsdp_shrinks_the_state_per_chip(tmp_path):
    runs = {}
    for mode, extra in [("data", []), ("fsdp", ["--set", "mesh.fsdp=-1", "--set", "mesh.fsdp_min_mib=0",
                                                 "--set", "model.remat=block", "--set", "model.scan=true"])]:
        r = _train("--config", "digits", "--compile-only", "v5e:2x2", *TINY, *extra, "--json", "-")
        assert r.returncode == 0 and r.stderr == "mixer-train: compiling the train step for v5e:2x2 (4 chips) ...\n", r.stderr
        runs[mode] = json.loads(r.stdout)
    assert runs["data"]["chips"] == 4 and runs["data"]["mesh"] == {"data": 4, "fsdp": 1}
    assert runs["fsdp"]["mesh"] == {"data": 1, "fsdp": 4}
    assert runs["data"]["hbm_bytes_per_chip"] > 15 * 2 ** 30  # asked of the compiler: 15.75 GiB on v5e
    # the state split 4 ways; what stays whole per chip (the rng key, step counts) is a few bytes
    assert runs["fsdp"]["bytes_per_chip"]["arguments"] < 0.7 * runs["data"]["bytes_per_chip"]["arguments"]


@pytest.mark.slow
@needs_libtpu
def test_a_users_persistent_compilation_cache_neither_breaks_nor_fills_with_tpu_programs(tmp_path):
    # an entry compiled for described chips cannot be loaded back: JAX warned on every later run
    env = {**subprocess_env(), "JAX_COMPILATION_CACHE_DIR": str(tmp_path),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    for _ in range(2):
        r = _train("--config", "digits", "--compile-only", "v5e:2x2", *TINY, "--json", "-", env=env)
        assert r.returncode == 0 and r.stderr == "mixer-train: compiling the train step for v5e:2x2 (4 chips) ...\n", r.stderr
    assert not any(p.name.startswith("jit_train_step") for p in tmp_path.iterdir())


@pytest.mark.slow
@needs_libtpu
def test_a_step_that_does_not_fit_is_exit_1_with_the_compilers_numbers():
    big = [a if a != "batch_size=16" else "batch_size=65536" for a in TINY]
    big = [a if a != "data.image_size=16" else "data.image_size=512" for a in big]
    r = _train("--config", "digits", "--compile-only", "v5e:2x2", *big, "--json", "-")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] is False and out["bytes_per_chip"]["temporaries"] > out["hbm_bytes_per_chip"]
    assert "Traceback" not in r.stderr


GPU_PYTHON = os.environ.get("MIXER_GPU_COMPILE_PYTHON")
needs_gpu_compiler = pytest.mark.skipif(
    not GPU_PYTHON, reason="needs an interpreter with the gpu-compile extra in MIXER_GPU_COMPILE_PYTHON (.ci/run "
                           "makes one; JAX's CUDA plugin stays out of the main venv, where it would print at every "
                           "JAX start)")


@pytest.mark.slow
@needs_gpu_compiler
def test_h100s_described_by_xlas_target_config_compile_without_a_gpu_and_print_nothing_else():
    r = subprocess.run([GPU_PYTHON, "-m", "mixer_jax.cli", "--config", "digits", "--compile-only", "h100:2", *TINY,
                        "--set", "mesh.fsdp=-1", "--set", "model.scan=true", "--set", "model.remat=block", "--json", "-"],
                       capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=900)
    assert r.returncode == 0 and r.stderr == "mixer-train: compiling the train step for h100:2 (2 chips) ...\n", r.stderr
    out = json.loads(r.stdout)
    assert out["chips"] == 2 and out["mesh"] == {"data": 1, "fsdp": 2} and out["fits"]
    assert out["hbm_bytes_per_chip"] == int(84942979072 * 0.75)  # the target config's memory, JAX's default share
    assert out["step_seconds_lower_bound"] == pytest.approx(out["flops_per_step"] / 2 / 989e12)
    bad = subprocess.run([GPU_PYTHON, "-m", "mixer_jax.cli", "--config", "digits", "--compile-only", "h100:0"],
                         capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=300)
    assert bad.returncode == 2 and bad.stderr == ("mixer-train: error: --compile-only 'h100:0': GPUs are h100 or "
                                                  "h100:N (N GPUs on one host)\n"), bad.stderr
