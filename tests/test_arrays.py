"""mixer_convert.arrays: the float dtypes a weight may have, casts, the exact NaN/Inf count, the
tiled transpose that makes C-ordered copies of the layouts' transposed views, and the raw bytes the
writers write (checked against the specs a header declared)."""
import ml_dtypes
import numpy as np
import pytest

from mixer_convert.arrays import (DTYPES, bf16, cast, check_float, contiguous, count_nonfinite, is_bf16, np_dtype,
                                  raw, raw_as_declared, transpose2d)
from mixer_convert.errors import CheckpointError

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOATS = [np.float16, np.float32, np.float64, BF16]


def _random(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ---- raw bytes, as the writers write them ----------------------------------------------------------


def test_raw_is_the_c_ordered_bytes_without_a_copy_where_they_are_already():
    a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(BF16)
    assert bytes(raw(a)) == a.tobytes() and np.shares_memory(np.frombuffer(raw(a), np.uint8), a)
    assert bytes(raw(a.T)) == np.ascontiguousarray(a.T).tobytes()


def test_raw_as_declared_checks_each_array_against_its_spec_in_order():
    a, b = np.zeros((2, 3), np.float32), np.ones(4, np.float16)
    specs = [("a", (2, 3), a.dtype), ("b", (4,), b.dtype)]
    assert [bytes(d) for d in raw_as_declared(iter([("a", a), ("b", b)]), specs, "w", "the header")] == \
        [a.tobytes(), b.tobytes()]
    for items in ([("b", b), ("a", a)], [("a", a), ("b", b.astype(np.float32))], [("a", a.T), ("b", b)]):
        with pytest.raises(ValueError, match="^w: .* where the header has "):
            list(raw_as_declared(iter(items), specs, "w", "the header"))
    with pytest.raises(ValueError):  # one array too few
        list(raw_as_declared(iter([("a", a)]), specs, "w", "the header"))


# ---- contiguous / transpose2d ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS + [np.int8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (63, 255), (65, 257), (130, 513), (64, 256)])
def test_transpose2d_equals_numpys_transpose_for_odd_shapes_and_every_dtype(shape, dtype):
    a = _random(shape, dtype)
    got = transpose2d(a)
    assert got.dtype == a.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(np.uint8) if dtype == BF16 else got,
                                  np.ascontiguousarray(a.T).view(np.uint8) if dtype == BF16 else a.T)


@pytest.mark.parametrize("shape", [(1031, 1537), (100_003, 13), (13, 100_003)])
def test_a_large_transpose_shared_among_threads_equals_numpys(monkeypatch, shape):
    """Above _SPLIT_BYTES the output's rows are shared out among helper threads (here 2, whatever
    this machine's core count), including shares of uneven width and a width of one tile."""
    from mixer_convert import arrays

    monkeypatch.setattr(arrays, "_HELPERS", 2)
    monkeypatch.setattr(arrays, "_helpers", None)
    a = _random(shape, np.float32, 3)
    assert a.nbytes >= arrays._SPLIT_BYTES
    got = transpose2d(a)
    assert arrays._helpers is not None and got.flags.c_contiguous
    np.testing.assert_array_equal(got, a.T)
    arrays._helpers.shutdown()


def test_transpose2d_of_an_empty_matrix_is_empty_with_the_swapped_shape():
    assert transpose2d(np.zeros((0, 5), np.float32)).shape == (5, 0)
    assert transpose2d(np.zeros((3, 0), np.float32)).shape == (0, 3)


@pytest.mark.parametrize("dtype", FLOATS)
def test_contiguous_copies_a_transposed_view_tile_by_tile_and_equals_numpy(dtype):
    base = _random((300, 70), dtype, 1)
    view = base.T
    got = contiguous(view)
    assert got.flags.c_contiguous and got is not view and not np.shares_memory(got, base)
    assert got.tobytes() == np.ascontiguousarray(view).tobytes()


def test_contiguous_returns_a_c_ordered_array_itself_and_copies_other_views():
    a = _random((5, 6), np.float32)
    assert contiguous(a) is a
    strided = a[:, ::2]  # neither C- nor transposed-C-contiguous
    got = contiguous(strided)
    assert got.flags.c_contiguous and np.array_equal(got, strided)
    four_d = np.transpose(_random((2, 3, 4, 5), np.float32), (3, 2, 0, 1))  # a kernel map's view
    assert np.array_equal(contiguous(four_d), four_d) and contiguous(four_d).flags.c_contiguous


# ---- count_nonfinite ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad, count", [([], 0), ([np.nan], 1), ([-np.inf], 1), ([np.inf], 1),
                                        ([np.nan] * 3, 3), ([-np.inf, -np.inf], 2), ([np.nan, np.inf, -np.inf], 3)])
def test_count_nonfinite_is_exact_for_nan_only_inf_only_and_mixed(dtype, bad, count):
    a = _random((17, 9), dtype).reshape(-1)
    a[[5, 40, 100][:len(bad)]] = np.array(bad, np.float64).astype(dtype)
    assert count_nonfinite(a.reshape(17, 9)) == count


def test_count_nonfinite_of_an_empty_array_and_of_a_transposed_view():
    assert count_nonfinite(np.zeros((0, 3), np.float32)) == 0
    a = _random((4, 6), np.float16)
    a[1, 2] = -np.inf
    assert count_nonfinite(a.T) == 1


def test_a_float16_value_that_overflows_is_counted_once_it_is_inf():
    a = np.array([65504, 1], np.float16)  # float16's largest finite value: still finite
    assert count_nonfinite(a) == 0
    with np.errstate(over="ignore"):
        doubled = a * np.float16(2)
    assert count_nonfinite(doubled) == 1  # overflowed to +Inf


# ---- dtypes and casts -----------------------------------------------------------------------------------


def test_bfloat16_is_recognised_by_name_and_given_by_name():
    assert bf16() == BF16 and is_bf16(BF16) and is_bf16("bfloat16") and not is_bf16(np.float16)
    assert np_dtype("bfloat16") == BF16 and np_dtype("float16") == np.float16
    assert DTYPES[0] == "keep" and set(DTYPES[1:]) == {"float32", "bfloat16", "float16"}


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8, np.bool_, np.complex64, np.dtype("V4"), object])
def test_cast_and_check_float_refuse_non_float_tensors_naming_them(dtype):
    a = np.zeros(3, dtype)
    with pytest.raises(CheckpointError, match=rf"tensor 'stem/bias' has unsupported dtype {np.dtype(dtype)}; "
                                              r"Mixer weights are float"):
        cast("stem/bias", a, "float32")
    with pytest.raises(CheckpointError):
        check_float("stem/bias", dtype)
    with pytest.raises(CheckpointError):
        cast("stem/bias", a, "keep")  # keep does not mean unchecked


@pytest.mark.parametrize("src", FLOATS)
@pytest.mark.parametrize("to", ["float32", "bfloat16", "float16"])
def test_cast_converts_float_tensors_and_keeps_them_without_a_copy(src, to):
    a = _random((3, 4), src)
    got = cast("k", a, to)
    assert got.dtype == np_dtype(to)
    np.testing.assert_array_equal(got.astype(np.float64), a.astype(np_dtype(to)).astype(np.float64))
    assert cast("k", a, "keep") is a
    assert cast("k", a, np.dtype(src).name) is a  # already that dtype: no copy
