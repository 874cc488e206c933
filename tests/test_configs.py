"""mixer_jax.configs: the typed sections, every value validated naming its key, the model section (a variant or its dimensions), and the one place the data decides the model's
image size and classes."""
import dataclasses

import pytest

from conftest import requires_jax
from helpers.training import BAD_VALUES

pytestmark = requires_jax  # the configs import nothing heavy, but the package is the jax extra's


def tiny(**kw):
    from helpers.training import tiny_digits
    return dataclasses.replace(tiny_digits(), **kw)


# ---- config values: every bad one names its key and the allowed range -----------------------------


@pytest.mark.parametrize("assignment,message", BAD_VALUES)
def test_every_bad_config_value_is_refused_naming_the_key_and_range(assignment, message):
    from mixer_jax.configs import get_config, validate
    from mixer_jax.overrides import override

    cfg = override(get_config("digits"), [assignment])
    with pytest.raises(ValueError, match="bad training config") as e:
        validate(cfg, num_devices=1)
    assert message in str(e.value)


def test_bad_batch_splits_are_refused_before_any_compute():
    from mixer_jax.configs import validate

    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        validate(tiny(batch_size=36), num_devices=8)
    with pytest.raises(ValueError, match="not divisible by accum_steps"):
        validate(tiny(batch_size=32, accum_steps=3), num_devices=1)


def test_the_named_configs_are_valid():
    from mixer_jax.configs import CONFIGS, validate

    for name, make in CONFIGS.items():
        validate(make(), num_devices=1)


# ---- --set -------------------------------------------------------------------------------------------


# ---- the model section: a variant or its dimensions ----------------------------------------------


def test_a_variant_fills_in_its_dimensions_and_a_contradicting_one_is_an_error():
    from mixer_jax.configs import ModelConfig

    m = ModelConfig("S/16")
    assert (m.patch_size, m.hidden_dim, m.num_blocks, m.tokens_mlp_dim, m.channels_mlp_dim) == \
        ((16, 16), 512, 8, 256, 2048)
    assert ModelConfig("S/16", hidden_dim=512) == m == ModelConfig("mixer_s16_224")
    with pytest.raises(ValueError, match=r"model.hidden_dim=16 contradicts model.variant='S/16' \(512\)"):
        ModelConfig("S/16", hidden_dim=16)
    with pytest.raises(ValueError, match="without model.variant, model.hidden_dim, model.num_blocks"):
        ModelConfig(None, patch_size=4)
    with pytest.raises(ValueError, match="model.variant: unknown Mixer variant 'Z/3'"):
        ModelConfig("Z/3")


def test_the_image_size_and_the_classes_come_from_the_data_in_one_place():
    from mixer_jax.configs import architecture, finetune

    arch = architecture(finetune("S/16", image_size=384), num_classes=10)
    assert (arch.image_size, arch.num_classes, arch.hidden_dim) == ((384, 384), 10, 512)
    assert not hasattr(finetune().model, "image_size") and not hasattr(finetune().model, "num_classes")
    arch = architecture(tiny(data=dataclasses.replace(tiny().data, image_size=(16, 24))), num_classes=3)
    assert arch.image_size == (16, 24) and arch.grid == (4, 6)


def test_with_a_checkpoint_its_shapes_win_and_only_the_regularisation_applies():
    from mixer_convert.spec import config_for
    from mixer_jax.configs import ModelConfig, architecture

    ck = config_for("S/16", image_size=16, patch_size=4, hidden_dim=8, num_classes=10)
    cfg = tiny(init_from="m.npz", model=ModelConfig("B/16", stoch_depth=0.1, dropout_rate=0.2))
    assert architecture(cfg, 10, checkpoint=ck) == ck.replace(stoch_depth=0.1, dropout_rate=0.2)
    with pytest.raises(ValueError, match=r"checkpoint m.npz is for \(16, 16\) images .* data.image_size is \(32, 32\)"):
        architecture(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=32)), 10, checkpoint=ck)


def test_a_config_saved_by_an_earlier_version_compares_in_todays_layout():
    from mixer_jax.checkpointing import config_changes, jsonable
    from mixer_jax.configs import current_layout, digits, finetune

    for cfg in (finetune(), digits()):
        now = jsonable(cfg)
        old = {k: v for k, v in now.items() if k not in ("model", "init_allow_nonfinite")}
        old["model"] = {k: v for k, v in now["model"].items()
                        if k not in ("variant", "compute_dtype", "api", "remat", "scan")}
        old["data"] = {k: v for k, v in now["data"].items() if k != "num_classes"}
        del old["mesh"]
        old["model"].update(num_classes=1000, image_size=[224, 224], in_chans=3)
        old["compute_dtype"] = "float32"
        assert config_changes(current_layout(old), now) == []
        assert current_layout(now) == now
    old["compute_dtype"] = "bfloat16"
    assert config_changes(current_layout(old), jsonable(digits())) == ["model.compute_dtype: 'bfloat16' -> 'float32'"]


def test_a_run_saved_before_model_api_existed_resumes_as_linen_and_not_silently_as_nnx():
    from mixer_jax.checkpointing import config_changes, jsonable
    from mixer_jax.configs import current_layout, digits
    from mixer_jax.overrides import override

    now = jsonable(digits())
    saved = {**now, "model": {k: v for k, v in now["model"].items() if k != "api"}}
    assert current_layout(saved)["model"]["api"] == "linen" and config_changes(current_layout(saved), now) == []
    nnx = jsonable(override(digits(), ["model.api=nnx"]))
    assert config_changes(current_layout(saved), nnx) == ["model.api: 'linen' -> 'nnx'"]


def test_every_remat_policy_name_is_one_of_jaxs_and_takes_no_arguments():
    import jax

    from mixer_jax.configs import REMAT_POLICIES
    from mixer_jax.model import remat_policy

    for name in REMAT_POLICIES:
        assert callable(getattr(jax.checkpoint_policies, name)) and remat_policy(name) is getattr(
            jax.checkpoint_policies, name)
    assert remat_policy("block") is jax.checkpoint_policies.nothing_saveable


def test_a_mesh_that_does_not_divide_the_devices_is_refused_before_any_compute():
    from mixer_jax.configs import MeshConfig, digits, validate

    with pytest.raises(ValueError, match="mesh.data=3 x mesh.fsdp=-1 does not divide the 8 devices"):
        validate(dataclasses.replace(digits(), mesh=MeshConfig(data=3, fsdp=-1)), 8)
    validate(dataclasses.replace(digits(), mesh=MeshConfig(data=2, fsdp=4)), 8)
