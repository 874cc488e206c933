"""mixer_convert.taps: TensorFlow's resize taps (which pixels, what weights); that they give TF's
outputs is tested through the resizes in test_preprocess.py. The per-thread scratch buffers and the
[-1, 1] map that the numpy and the compiled paths share."""
import threading

import numpy as np
import pytest

from mixer_convert.taps import _SCRATCH_MAX_BYTES, area_plan, area_taps, bilinear_taps, scratch, value_range


@pytest.mark.parametrize("n_in, n_out", [(500, 224), (224, 500), (1, 7), (7, 1), (375, 375)])
def test_bilinear_taps_stay_inside_the_input_with_lerps_in_0_1(n_in, n_out):
    lower, upper, lerp = bilinear_taps(n_in, n_out)
    assert lower.min() >= 0 and upper.max() <= n_in - 1 and (upper >= lower).all()
    assert lerp.dtype == np.float32 and (lerp >= 0).all() and (lerp < 1).all()


@pytest.mark.parametrize("n_in, n_out", [(500, 341), (375, 256), (3, 7), (7, 3), (256, 256)])
def test_area_weights_of_each_cell_add_up_to_its_width_in_input_pixels(n_in, n_out):
    idx, w = area_taps(n_in, n_out, 0, n_out)
    assert idx.min() >= 0 and idx.max() <= n_in - 1
    np.testing.assert_allclose(w.sum(1), n_in / n_out, rtol=1e-4)  # float32 positions near 500: ~1e-5 off


def test_an_area_plan_is_read_only_and_shared():
    p = area_plan(375, 500, 256, 341, 3, (16, 58, 224, 224))
    assert area_plan(375, 500, 256, 341, 3, (16, 58, 224, 224)) is p  # cached: built once per size
    assert not p.columns[0].flags.writeable and p.rows.start <= 16 * 375 // 256


def test_value_range_maps_0_and_255_to_the_ends():
    np.testing.assert_array_equal(value_range(np.array([0, 127.5, 255])), [-1, 0, 1])


def test_the_two_value_range_formulas_agree_to_one_ulp():
    x = np.arange(256, dtype=np.uint8)
    vit, bv = value_range(x), value_range(x, "big_vision")
    np.testing.assert_array_equal(vit, (x.astype(np.float32) - np.float32(127.5)) / np.float32(127.5))
    np.testing.assert_array_equal(bv, np.float32(-1) + x.astype(np.float32) / np.float32(255) * np.float32(2))
    assert np.abs(vit - bv).max() <= np.spacing(np.float32(1)) and (vit != bv).any()


def test_scratch_is_reused_by_key_shape_and_dtype_per_thread_and_huge_ones_are_not_kept():
    a = scratch("t_a", (3, 4), np.float32)
    assert a.shape == (3, 4) and a.dtype == np.float32 and scratch("t_a", (3, 4), np.float32) is a
    assert np.shares_memory(scratch("t_a", (2, 2), np.float32), a)  # one buffer per key
    assert not np.shares_memory(scratch("t_b", (3, 4), np.float32), a)
    bigger = scratch("t_a", (100, 100), np.uint8)  # grows the key's buffer: the old views are dropped
    assert bigger.shape == (100, 100) and scratch("t_a", (3, 4), np.float32) is not a
    huge = (_SCRATCH_MAX_BYTES // 4 + 1,)
    assert scratch("t_huge", huge, np.float32) is not scratch("t_huge", huge, np.float32)
    other = []
    thread = threading.Thread(target=lambda: other.append(scratch("t_a", (3, 4), np.float32)))
    thread.start()
    thread.join()
    assert not np.shares_memory(other[0], scratch("t_a", (3, 4), np.float32))  # each thread its own
