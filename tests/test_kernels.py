"""mixer_convert.kernels: the compiled eval pipelines equal preprocess's numpy path bit for bit (which
equals TensorFlow: test_preprocess.py); without numba, or when numba fails, the numpy path runs."""
import subprocess
import sys
import warnings

import numpy as np
import pytest

from conftest import has_module, subprocess_env
from helpers.preprocessing import numpy_path_only
from mixer_convert import kernels
from mixer_convert import preprocess as pp

requires_numba = pytest.mark.skipif(not has_module("numba"), reason="needs numba (the fast extra)")


@pytest.fixture
def loaded():
    assert kernels.wait(), kernels.failure


@pytest.fixture
def settled():
    """No loading in flight: one that an earlier test in this process started would set the kernels
    in the middle of a test that replaced them (seen 2 times in 200 when it started 0-40 ms before)."""
    kernels.wait()


def _cases(n: int, seed: int):
    rng = np.random.default_rng(seed)
    cases = [((1, 1, 3), 5), ((2, 9, 3), 3), ((375, 500, 3), 224), ((427, 640, 3), 224), ((500, 375, 1), 384),
             ((224, 224, 3), 224), ((100, 60, 4), 256)]
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(1, 700, 2))
        cases.append(((h, w, int(rng.choice([1, 3, 4]))), int(rng.integers(1, 400))))
    return cases


@requires_numba
@pytest.mark.parametrize("pipeline", pp.PIPELINES)
@pytest.mark.parametrize("shape, size", _cases(20, seed=3))
def test_compiled_pipelines_equal_the_numpy_path_bit_for_bit(loaded, monkeypatch, pipeline, shape, size):
    img = np.random.default_rng(shape[0] * 1000 + shape[1]).integers(0, 256, shape).astype(np.uint8)
    try:
        with numpy_path_only():
            want = pp.preprocess(img, pipeline, size)
    except ValueError:  # too small an image for big_vision's crop: the compiled path is not reached either
        return
    compiled, ran = getattr(kernels, pipeline), []
    monkeypatch.setattr(kernels, pipeline, lambda *args: ran.append(compiled(*args)) or ran[-1])
    out = np.full((size, size, shape[2]), np.nan, np.float32)
    assert pp.preprocess(img, pipeline, size, out=out) is out
    assert ran == [True]  # the compiled kernel wrote it, not the numpy path
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))


@requires_numba
def test_threads_run_the_compiled_kernels_side_by_side_with_the_same_results(loaded):
    from concurrent.futures import ThreadPoolExecutor

    imgs = [np.random.default_rng(i).integers(0, 256, (300 + i, 400 - i, 3)).astype(np.uint8) for i in range(8)]
    want = [pp.preprocess(im, "big_vision") for im in imgs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda im: pp.preprocess(im, "big_vision"), imgs))
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_a_failing_kernel_falls_back_to_numpy_once_with_a_warning(settled, monkeypatch):
    def broken(*args):
        raise RuntimeError("LLVM said no")
    monkeypatch.setattr(kernels, "_kernels", (broken, broken))
    monkeypatch.setattr(kernels, "failure", None)
    img = np.random.default_rng(0).integers(0, 256, (40, 30, 3)).astype(np.uint8)
    with numpy_path_only():
        want = pp.preprocess(img, "vit_jax", 16)
    with pytest.warns(RuntimeWarning, match=r"numba kernels off, numpy used instead \(RuntimeError: LLVM said no\)"):
        got = pp.preprocess(img, "vit_jax", 16)
    np.testing.assert_array_equal(got, want)
    assert not kernels.enabled() and not kernels.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        np.testing.assert_array_equal(pp.preprocess(img, "vit_jax", 16), want)


def test_until_the_kernels_are_loaded_preprocess_uses_numpy_and_starts_loading_them(settled, monkeypatch):
    started = []
    monkeypatch.setattr(kernels, "_kernels", None)
    monkeypatch.setattr(kernels, "start", lambda: started.append(True))
    img = np.random.default_rng(0).integers(0, 256, (40, 30, 3)).astype(np.uint8)
    out = np.full((16, 16, 3), np.nan, np.float32)
    assert not kernels.vit_jax(img, (16, 16), out) and np.isnan(out).all()  # nothing written
    with numpy_path_only():
        want = pp.preprocess(img, "vit_jax", 16)
    np.testing.assert_array_equal(pp.preprocess(img, "vit_jax", 16), want)
    assert started


def test_non_uint8_images_take_the_numpy_path():
    img = np.random.default_rng(0).integers(0, 65536, (40, 30, 3)).astype(np.uint16)
    with numpy_path_only():
        want = pp.preprocess(img, "vit_jax", 16)
    np.testing.assert_array_equal(pp.preprocess(img, "vit_jax", 16), want)


def test_mixer_kernels_numpy_turns_the_compiled_kernels_off():
    code = "from mixer_convert import kernels; print(kernels.enabled(), kernels.wait())"
    env = {**subprocess_env(), "MIXER_KERNELS": "numpy"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "False"]
