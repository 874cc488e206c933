"""mixer-parity --plot: per-block relative error against its bound, drawn from the report's JSON alone;
the gradient panel's error is within its bound exactly when the report's gradient check passes."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import has_module, import_blocker, requires_jax, requires_torch, subprocess_env
from mixer_convert.tools.parity import GRAD_ATOL_GLOBAL, GRAD_RTOL, Diff
from mixer_convert.tools.parity_plot import block_of, gradient_errors, model_order, plot, series

requires_matplotlib = pytest.mark.skipif(not has_module("matplotlib"), reason="needs matplotlib (the train extra)")
NAMES = ["stem", "MixerBlock_0", "MixerBlock_1", "pre_logits", "logits"]


def _rows(values, scale=1.0):
    return [{"name": n, "max_abs": v * scale, "rel": v, "scale": scale} for n, v in zip(NAMES, values)]


def _grad_rows(rng, n_blocks=12):
    names = ["stem/kernel", "pre_head_layer_norm/scale", "head/kernel", "head/bias"]
    names += [f"MixerBlock_{i}/token_mixing/Dense_1/bias" for i in range(n_blocks)]
    names += [f"MixerBlock_{i}/channel_mixing/Dense_0/kernel" for i in range(n_blocks)]
    scales = rng.uniform(1e-8, 1.0, len(names))
    bounds = GRAD_RTOL * scales + GRAD_ATOL_GLOBAL * scales.max()  # the report's per-parameter bound
    errors = bounds * 10.0 ** rng.uniform(-2, 0.02, len(names))  # about one report in four exceeds one
    return [{"name": k, "max_abs": float(e), "rel": float(e / s), "scale": float(s)}
            for k, e, s in zip(names, errors, scales)]


def report(with_nnx=True, **over):
    """A report shaped like mixer-parity's JSON, for a 2-block model."""
    r = {"variant": "S/32", "weights": "random (seed 0)", "batch": 2, "image_size": [64, 64], "jax_backend": "cpu",
         "torch_device": "cpu", "pass": True, "checks": {"forward_fp32": True, "forward_bf16": True},
         "forward_fp32": _rows([0.0, 5e-7, 8e-7, 3e-7, 6e-7]), "forward_bf16": _rows([6e-3, 1e-2, 2e-2, 7e-3, 6e-3]),
         "grads_fp32": _grad_rows(np.random.default_rng(0), 2)}
    if with_nnx:
        r.update({"nnx_forward_fp32": _rows([0.0, 4e-7, 9e-7, 3e-7, 5e-7]),
                  "nnx_linen_forward_fp32": _rows([0.0] * 5), "nnx_linen_forward_bf16": _rows([0.0] * 5)})
    r.update(over)
    return r


def test_parameters_belong_to_the_output_their_block_produces_in_model_order():
    assert block_of("MixerBlock_10/token_mixing/Dense_0/kernel") == "MixerBlock_10"
    assert [block_of(k) for k in ("stem/bias", "pre_head_layer_norm/scale", "head/kernel")] == \
        ["stem", "pre_logits", "logits"]
    names = ["logits", "MixerBlock_10", "pre_logits", "MixerBlock_2", "stem"]
    assert sorted(names, key=model_order) == ["stem", "MixerBlock_2", "MixerBlock_10", "pre_logits", "logits"]


def test_gradient_error_is_within_its_bound_exactly_when_the_reports_check_passes():
    from mixer_convert.tools.parity_report import _grads_within

    rng = np.random.default_rng(1)
    outcomes = set()
    for _ in range(200):
        rows = _grad_rows(rng)
        passed, _ = _grads_within([Diff(r["name"], r["max_abs"], r["scale"]) for r in rows])
        drawn = gradient_errors(rows)
        assert list(drawn) == sorted(drawn, key=model_order)
        assert passed == (max(drawn.values()) <= GRAD_RTOL)
        outcomes.add(passed)
    assert outcomes == {True, False}  # both sides of the bound were tried


def test_each_panel_has_a_series_for_each_framework_pair_the_report_holds():
    both, linen = report(), report(with_nnx=False)
    assert set(series(both, "forward_fp32")) == {"Linen vs PyTorch", "NNX vs PyTorch", "NNX vs Linen"}
    assert set(series(linen, "forward_fp32")) == {"Linen vs PyTorch"}
    assert list(series(linen, "forward_bf16")["Linen vs PyTorch"]) == NAMES
    assert set(series(both, "grads_fp32")["Linen vs PyTorch"]) == {"stem", "MixerBlock_0", "MixerBlock_1",
                                                                   "pre_logits", "logits"}


@requires_matplotlib
def test_plot_draws_one_row_per_report_including_exact_zeros_and_missing_panels(tmp_path):
    import matplotlib.image

    one = plot(report(), tmp_path / "one.png")
    two = plot({"reports": [report(), report(with_nnx=False, grads_fp32=None, variant="B/16")]}, tmp_path / "two.png")
    h1, h2 = matplotlib.image.imread(one).shape[0], matplotlib.image.imread(two).shape[0]
    assert 1.8 < h2 / h1 < 2.2
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary left


@pytest.mark.slow  # a whole report (JAX and PyTorch imported and compiled): 15-40 s here
@requires_jax
@requires_torch
@requires_matplotlib
def test_mixer_parity_plot_writes_the_picture_beside_the_json_on_stdout(tmp_path, capsys):
    import matplotlib.image

    from mixer_convert.tools.parity_report import main

    png = tmp_path / "parity.png"
    assert main(["--variant", "S/32", "--image-size", "32", "32", "--no-timm", "--flax-api", "linen", "--quiet",
                 "--plot", str(png), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone
    assert doc["pass"] and matplotlib.image.imread(png).shape[1] > 1000


def test_mixer_parity_plot_without_matplotlib_names_the_extra_before_comparing_anything(tmp_path):
    code = import_blocker("matplotlib") + "import sys\nfrom mixer_convert.tools.parity_report import main\n" \
        f"sys.exit(main(['--variant', 'S/32', '--plot', {str(tmp_path / 'p.png')!r}]))"
    if not (has_module("jax") and has_module("torch")):
        pytest.skip("needs the jax and torch extras (mixer-parity's own requirement comes first)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "mixer-parity: error: needs the 'train' extra for --plot (no module 'matplotlib'): "
        'pip install "mixer-toolkit[train]"']
