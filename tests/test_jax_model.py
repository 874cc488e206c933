"""mixer_jax.model (the Linen Mixer): its parameter tree is the spec's, its initialisers the
official ones, no head gives pre-logits, and a bad image shape is an error naming the problem."""
import numpy as np
import pytest

from conftest import images, requires_jax
from helpers.models import small_cfg
from mixer_convert import config_for, param_shapes

pytestmark = requires_jax


@pytest.fixture(scope="module")
def small_model():
    """The Linen model of helpers.models.small_cfg() and its initial parameters, built once."""
    from mixer_jax import create_model, init_params

    model = create_model(small_cfg())
    return model, init_params(model, 0)


@requires_jax
@pytest.mark.slow
def test_flax_param_tree_equals_the_spec_exactly():
    from mixer_jax import create_model, init_params, params_to_flat

    for cfg in (config_for("B/16"), small_cfg(), small_cfg(num_classes=None)):
        flat = params_to_flat(init_params(create_model(cfg), 0))
        assert {k: v.shape for k, v in flat.items()} == param_shapes(cfg)


@requires_jax
def test_flax_head_is_zero_initialised_and_kernels_are_lecun_normal():
    from mixer_jax import create_model, init_params, params_to_flat

    flat = params_to_flat(init_params(create_model("S/32", num_classes=10, num_blocks=1), 0))  # one block: enough
    assert not flat["head/kernel"].any() and not flat["head/bias"].any()
    w = flat["MixerBlock_0/channel_mixing/Dense_0/kernel"]
    assert abs(w.std() * np.sqrt(512) - 1) < 0.05


@requires_jax
def test_flax_without_head_returns_pre_logits():
    import jax
    from mixer_jax import create_model, init_params

    model = create_model(small_cfg(num_classes=None))
    out = model.apply({"params": init_params(model, 0)}, images(2, 64, 96))
    assert out.shape == (2, 64)
    assert jax.numpy.isfinite(out).all()


@requires_jax
@pytest.mark.parametrize("shape, match", [
    ((2, 64, 90, 3), "not divisible by the patch size"),
    ((2, 96, 64, 3), "does not match the model's 64x96"),
    ((2, 64, 96, 1), "expected 3 input channels"),
    ((64, 96, 3), "4 dims"),
])
def test_flax_bad_image_shapes_raise_naming_the_problem(small_model, shape, match):
    model, params = small_model
    with pytest.raises(ValueError, match=match):
        model.apply({"params": params}, np.zeros(shape, np.float32))
