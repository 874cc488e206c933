"""mixer-convert (mixer_convert.tools.cli): exit codes, and conversions that need only one
framework run in an interpreter where the other cannot be imported."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, import_blocker, requires_jax, requires_torch, subprocess_env


def test_cli_reports_errors_with_exit_code_2(official, tmp_path):
    src, _ = official
    from mixer_convert.tools.cli import main
    assert main([str(src), str(tmp_path / "o.npz"), "--quiet"]) == 0
    assert main([str(src), str(tmp_path / "o.npz"), "--quiet"]) == 2  # exists
    assert main([str(tmp_path / "nope.npz"), str(tmp_path / "p.npz")]) == 2


def _run_blocked(blocked, code, tmp_path):
    script = import_blocker(*blocked) + f"sys.path.insert(0, {str(ROOT)!r})\n" + code
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=subprocess_env())


@requires_torch
def test_npz_to_pytorch_and_timm_works_without_jax(official, tmp_path):
    src, flat = official
    code = f"""
from mixer_convert.tools.cli import main
assert main([{str(src)!r}, 'm.pt', '--verify', '--quiet']) == 0
assert main([{str(src)!r}, 'timm.safetensors', '--to', 'timm', '--quiet']) == 0
from mixer_torch import from_checkpoint
m = from_checkpoint('timm.safetensors', num_classes=3, scale=2)
assert m.config.num_classes == 3 and m.config.image_size == (96, 96)
assert not any(k.split('.')[0] in ('jax', 'flax', 'jaxlib') for k in sys.modules)
print('ok')
"""
    r = _run_blocked({"jax", "jaxlib", "flax", "optax", "orbax"}, code, tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert "our PyTorch model" in r.stdout


@requires_jax
def test_flax_side_works_without_torch(official, tmp_path):
    src, _ = official
    code = f"""
from mixer_convert.tools.cli import main
assert main([{str(src)!r}, 'm.msgpack', '--verify', '--quiet']) == 0
assert main(['m.msgpack', 'orbax_dir', '--to', 'orbax', '--quiet']) == 0
import mixer_jax, mixer_jax.train, mixer_jax.input_pipeline
assert 'torch' not in sys.modules
print('ok')
"""
    r = _run_blocked({"torch"}, code, tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert "our Flax model" in r.stdout


@pytest.mark.parametrize("image_size", [None, (32, 48)], ids=["square", "non-square"])
def test_a_bfloat16_npz_as_big_vision_writes_it_converts_kept_or_cast(tmp_path, image_size):
    import ml_dtypes
    from mixer_convert.load import read_params
    from mixer_convert.tools.cli import main
    from helpers.checkpoints import NON_SQUARE, assert_same, bf16_npz, load_np

    cfg = NON_SQUARE.replace(image_size=image_size or (32, 32))
    want = bf16_npz(tmp_path / "bf16.npz", cfg)
    size = ["--image-size", *map(str, image_size)] if image_size else []
    for out in ("kept.npz", "kept.safetensors"):  # kept bfloat16: bit for bit (in .npz as 'V2' again)
        assert main([str(tmp_path / "bf16.npz"), str(tmp_path / out), *size, "--verify", "--quiet"]) == 0
        back = read_params(tmp_path / out)
        assert {back.dtypes[k] for k in back} == {np.dtype(ml_dtypes.bfloat16)}
        assert all(np.array_equal(back[k].astype(np.float32), want[k]) for k in want)
    with np.load(tmp_path / "bf16.npz") as a, np.load(tmp_path / "kept.npz") as b:
        assert all(b[k].dtype == np.dtype("V2") and a[k].tobytes() == b[k].tobytes() for k in a.files)
    assert main([str(tmp_path / "bf16.npz"), str(tmp_path / "f32.npz"), *size, "--dtype", "float32", "--quiet"]) == 0
    assert_same(load_np(tmp_path / "f32.npz"), want)
