"""mixer-convert (mixer_convert.tools.cli): exit codes, and conversions that need only one
framework run in an interpreter where the other cannot be imported."""
import subprocess
import sys

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
