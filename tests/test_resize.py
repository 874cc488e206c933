"""mixer_convert.resize: token mixing resized for K x larger images (the paper's appendix C) is
exact -- the resized model on tiled images equals the base model on each tile -- in the float64
reference and in both frameworks' models."""
import numpy as np
import pytest

from conftest import images, requires_jax, requires_torch
from helpers.checkpoints import TINY
from mixer_convert import random_params
from mixer_convert.reference import forward


@pytest.mark.parametrize("scale", [2, 3])
def test_resized_model_on_tiled_images_equals_the_base_model_per_tile(scale):
    from mixer_convert.resize import resize_token_mixing, tile_images

    flat = random_params(TINY, 3)
    big, big_cfg = resize_token_mixing(flat, TINY, scale)
    assert big_cfg.image_size == (48 * scale, 48 * scale) and big_cfg.tokens_mlp_dim == 8 * scale ** 2
    x = images(2 * scale ** 2, 48, 48)  # different images in every tile
    base = forward(flat, TINY, x).reshape(2, scale ** 2, -1).mean(1)  # head is linear: mean of logits
    np.testing.assert_allclose(forward(big, big_cfg, tile_images(x, scale)), base, atol=1e-10)


@requires_torch
def test_resize_is_exact_in_pytorch(official):
    import torch
    from mixer_convert.resize import tile_images
    from mixer_torch import from_checkpoint

    src, _ = official
    base, big = from_checkpoint(src).eval(), from_checkpoint(src, scale=2).eval()
    assert big.config.image_size == (96, 96)
    x = images(8, 48, 48)
    with torch.no_grad():
        want = base(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).reshape(2, 4, -1).mean(1)
        got = big(torch.from_numpy(tile_images(x, 2).transpose(0, 3, 1, 2).copy()))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.slow  # the PyTorch model proves the same in the fast tier
@requires_jax
def test_resize_is_exact_in_flax(official):
    from mixer_convert.resize import tile_images
    from mixer_jax import from_checkpoint

    src, _ = official
    base_m, base_p = from_checkpoint(src)
    big_m, big_p = from_checkpoint(src, scale=2)
    assert big_m.config.image_size == (96, 96)
    x = images(8, 48, 48)
    want = np.asarray(base_m.apply({"params": base_p}, x)).reshape(2, 4, -1).mean(1)
    got = np.asarray(big_m.apply({"params": big_p}, tile_images(x, 2)))
    np.testing.assert_allclose(got, want, atol=2e-5)
