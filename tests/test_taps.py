"""mixer_convert.taps: TensorFlow's resize taps (which pixels, what weights); that they give TF's
outputs is tested through the resizes in test_preprocess.py."""
import numpy as np
import pytest

from mixer_convert.taps import area_plan, area_taps, bilinear_taps


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
