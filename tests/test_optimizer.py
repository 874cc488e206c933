"""mixer_jax.optimizer: the recipes' schedules and decoupled weight decay."""
import numpy as np
import pytest

from conftest import requires_jax

pytestmark = requires_jax


def test_schedules_warm_up_then_decay_to_zero():
    from mixer_jax.configs import OptimConfig
    from mixer_jax.optimizer import make_schedule

    cos = make_schedule(OptimConfig(lr=0.03, warmup_steps=500, schedule="cosine"), 10_000)
    assert float(cos(0)) == 0 and float(cos(250)) == pytest.approx(0.015) and float(cos(500)) == pytest.approx(0.03)
    assert float(cos(10_000)) == pytest.approx(0, abs=1e-9)
    lin = make_schedule(OptimConfig(lr=1e-3, warmup_steps=100, schedule="linear"), 1100)
    assert float(lin(100)) == pytest.approx(1e-3) and float(lin(600)) == pytest.approx(5e-4)


def test_weight_decay_is_decoupled_and_applies_to_kernels_only():
    import jax.numpy as jnp
    from mixer_jax.configs import OptimConfig
    from mixer_jax.optimizer import make_optimizer

    tx, _ = make_optimizer(OptimConfig(name="adam", lr=0.1, weight_decay=0.5, warmup_steps=0, grad_clip=0,
                                       schedule="cosine"), 10)
    params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "LayerNorm_0": {"scale": jnp.ones(2)}}
    zero = {"Dense_0": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}, "LayerNorm_0": {"scale": jnp.zeros(2)}}
    updates, _ = tx.update(zero, tx.init(params), params)
    assert np.allclose(updates["Dense_0"]["kernel"], -0.1 * 0.5)  # -lr * wd * w with zero gradient
    assert not np.any(updates["Dense_0"]["bias"]) and not np.any(updates["LayerNorm_0"]["scale"])
