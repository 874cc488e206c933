"""benchmarks/bench_compile.py: the search finds the largest power-of-two batch that fits in a few
compiles, says when the compiler's own rematerialisation made it fit, and the cache answers a rerun
(and --cached-only) without compiling."""
import importlib.util

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("bench_compile", ROOT / "benchmarks" / "bench_compile.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

GIB = 2 ** 30


def compiler(state_gib: float, gib_per_image: float, hbm_gib: float = 16.0, calls: list | None = None):
    """A fake compile: memory a line in the batch, fits while under the HBM."""
    def run(exp: int) -> dict:
        if calls is not None:
            calls.append(exp)
        total = (state_gib + gib_per_image * 2 ** exp) * GIB
        return {"fits": total <= hbm_gib * GIB, "hbm_bytes_per_chip": hbm_gib * GIB,
                "bytes_per_chip": {"total": total if total <= hbm_gib * GIB else None,
                                   "arguments": state_gib * GIB, "temporaries": gib_per_image * 2 ** exp * GIB},
                "compiler_flops_per_chip": 1e12 * 2 ** exp}
    return run


@pytest.mark.parametrize("state,per_image,expected", [
    (2.0, 0.05, 256),    # 2 + 12.8 fits, 2 + 25.6 does not
    (4.8, 0.17, 64),     # H/14-like: 15.68 fits, 26.56 does not
    (15.2, 0.5, 1),      # only one image
    (17.0, 0.01, 0),     # not even the state
    (0.1, 0.001, 512),   # more than the cap fits: the cap
])
def test_the_search_finds_the_largest_power_of_two_that_fits(state, per_image, expected):
    calls = []
    found = bench.largest_batch(compiler(state, per_image, calls=calls), bench.MAX_EXP)
    assert found["batch"] == expected
    brute = max((2 ** e for e in range(bench.MAX_EXP + 1) if (state + per_image * 2 ** e) <= 16.0), default=0)
    assert found["batch"] == brute
    assert len(calls) == len(set(calls)) <= 5  # the line's guess, not a walk through every power of two


def test_a_batch_that_fits_only_by_recomputing_says_how_much_more_it_computes():
    def run(exp):
        r = compiler(1.0, 0.01)(exp)
        if exp >= 7:
            r["compiler_flops_per_chip"] *= 1.16  # XLA rematerialised to fit
        return r
    found = bench.largest_batch(run, bench.MAX_EXP)
    assert found["batch"] == 512 and found["flops_per_image_vs_smallest"] == pytest.approx(1.16)
    assert bench._batch(found) == ">= 512 (+16% FLOPs)"
    assert bench._batch(None) == "not measured" and bench._batch({"batch": 0}) == "none"


def test_the_cache_answers_a_rerun_and_cached_only_never_compiles(tmp_path):
    path = tmp_path / "cache.jsonl"
    made = []
    first = bench.Cache(path)
    assert first.get("k", lambda: made.append(1) or {"fits": True}) == {"fits": True}
    again = bench.Cache(path)
    assert again.get("k", lambda: made.append(1) or {"fits": False}) == {"fits": True} and made == [1]
    with pytest.raises(bench.NotCompiled):
        bench.Cache(path, cached_only=True).get("other", lambda: {"fits": True})
    assert path.read_text().count("\n") == 1
