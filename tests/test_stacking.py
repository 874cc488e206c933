"""mixer_jax.stacking: official per-block trees <-> stacked (a scanned model's), for params, optimizer
states and abstract trees with shardings alike."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixer_convert import random_params
from mixer_convert.spec import config_for
from mixer_convert.trees import nest
from mixer_jax.stacking import STACKED, is_stacked, stack_blocks, unstack_blocks

CFG = config_for("S/32", num_blocks=3, image_size=(64, 64), num_classes=5)


def _params():
    return nest(random_params(CFG, 0))


def test_stacking_then_unstacking_gives_back_the_official_tree_exactly():
    params = _params()
    stacked = stack_blocks(params)
    assert is_stacked(stacked) and not any(k.startswith("MixerBlock_") for k in stacked)
    assert stacked[STACKED]["token_mixing"]["Dense_0"]["kernel"].shape == (3, 4, 256)
    np.testing.assert_array_equal(stacked[STACKED]["LayerNorm_1"]["scale"][2], params["MixerBlock_2"]["LayerNorm_1"]["scale"])
    back = unstack_blocks(stacked)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)))


def test_the_optimizer_state_mirroring_the_params_is_converted_too():
    params = jax.tree_util.tree_map(jnp.asarray, _params())
    opt = optax.adam(1e-3).init(params)
    stacked = stack_blocks(opt)
    mu = stacked[0].mu
    assert is_stacked(mu) and mu[STACKED]["LayerNorm_0"]["bias"].shape == (3, 512)
    assert int(stacked[0].count) == 0  # leaves outside the params-like dicts are left alone
    back = unstack_blocks(stacked)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(opt)


def test_a_tree_without_blocks_is_left_as_it_is():
    tree = {"a": np.zeros(2), "b": (np.ones(3),)}
    assert stack_blocks(tree)["a"] is tree["a"] and unstack_blocks(tree)["b"][0] is tree["b"][0]


def test_blocks_that_are_not_numbered_from_0_without_gaps_are_refused():
    params = _params()
    del params["MixerBlock_1"]
    with pytest.raises(ValueError, match="not MixerBlock_0..MixerBlock_1"):
        stack_blocks(params)


def test_abstract_leaves_keep_their_shardings_with_the_block_axis_unsplit():
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    leaf = jax.ShapeDtypeStruct((512, 2048), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
    tree = {f"MixerBlock_{i}": {"w": leaf} for i in range(4)}
    stacked = stack_blocks(tree)[STACKED]["w"]
    assert stacked.shape == (4, 512, 2048) and stacked.sharding.spec == P(None, None, "fsdp")
    back = unstack_blocks({STACKED: {"w": stacked}})
    assert [b["w"].sharding.spec for b in back.values()] == [P(None, "fsdp")] * 4
    split_blocks = jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    with pytest.raises(ValueError, match="along its block axis"):
        unstack_blocks({STACKED: {"w": split_blocks}})
