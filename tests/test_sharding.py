"""mixer_jax.sharding: the data x fsdp mesh, the FSDP rule (big_vision's: the largest divisible
dimension, small arrays replicated, a stacked array never along its block axis), Placement."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mixer_jax.configs import mesh_shape
from mixer_jax.sharding import Placement, fsdp_spec, make_mesh, state_shardings

MIB = 2 ** 20


@pytest.mark.parametrize("data,fsdp,devices,shape", [(-1, 1, 8, (8, 1)), (1, -1, 8, (1, 8)), (2, -1, 8, (2, 4)),
                                                     (-1, -1, 8, (1, 8)),
                                                     (-1, 4, 8, (2, 4)), (2, 4, 8, (2, 4))])
def test_minus_one_is_the_rest_of_the_devices(data, fsdp, devices, shape):
    assert mesh_shape(data, fsdp, devices) == shape


@pytest.mark.parametrize("data,fsdp,devices,message", [
    (3, -1, 8, "does not divide the 8 devices"), (2, 2, 8, "is 4 devices; there are 8"),
    (1, 16, 8, "does not divide")])
def test_a_mesh_that_does_not_cover_the_devices_is_a_clear_error(data, fsdp, devices, message):
    with pytest.raises(ValueError, match=message):
        mesh_shape(data, fsdp, devices)


def test_the_largest_divisible_dimension_is_split_and_small_or_indivisible_arrays_replicated():
    assert fsdp_spec((1024, 4096), 4, 8, 4 * MIB) == P(None, "fsdp")
    assert fsdp_spec((4096, 1024), 4, 8, 4 * MIB) == P("fsdp", None)
    assert fsdp_spec((195, 4096), 4, 3, 0) == P("fsdp", None)  # 4096 % 3: the next largest that divides
    assert fsdp_spec((1024,), 4, 8, 4 * MIB) == P()  # 4 KiB: replicated
    assert fsdp_spec((7, 11), 4, 8, 0) == P()  # nothing divisible
    assert fsdp_spec((1024, 4096), 4, 1, 0) == P()  # no fsdp axis
    assert fsdp_spec((32, 1024, 4096), 4, 8, 0, skip_first=True) == P(None, None, "fsdp")
    assert fsdp_spec((64, 16), 4, 8, 0, skip_first=True) == P(None, "fsdp")  # the block axis never


def test_a_state_gets_one_sharding_per_leaf_and_adams_moments_their_parameters():
    import optax
    from jax.sharding import AbstractMesh

    mesh = AbstractMesh((1, 8), ("data", "fsdp"))  # 8 devices, described: the specs, not the arrays
    params = {"MixerBlock": {"w": jnp.zeros((4, 64, 32))}, "head": {"kernel": jnp.zeros((32, 10)),
                                                                   "bias": jnp.zeros((10,))}}
    params_, adam = jax.eval_shape(lambda p: (p, optax.adam(1.0).init(p)), params)
    shardings = state_shardings((params_, adam), mesh, 0)
    assert jax.tree_util.tree_structure(shardings) == jax.tree_util.tree_structure((params_, adam))
    specs = jax.tree_util.tree_map(lambda s: s.spec, shardings)
    expected = {"MixerBlock": {"w": P(None, "fsdp", None)},  # 64 over 8, never the block axis
                "head": {"kernel": P("fsdp", None), "bias": P()}}  # 32 over 8; 10 does not divide
    assert specs[0] == expected
    assert specs[1][0].mu == expected and specs[1][0].nu == expected  # Adam's moments: their parameter's
    assert specs[1][0].count == P()


def test_placement_keeps_values_and_runs_under_jit_on_one_device():
    mesh = make_mesh(-1, 1, jax.devices()[:1])
    place = Placement(mesh)
    x = jnp.arange(12.0).reshape(4, 3)
    out = jax.jit(lambda t: (place.batch(t[0]), place.gathered(t[1])))((x, {"w": x}))
    assert np.array_equal(out[0], x) and np.array_equal(out[1]["w"], x)
