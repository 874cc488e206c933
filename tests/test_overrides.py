"""mixer_jax.overrides: --set a.b=value parsed to each field's type, typos and bad values refused
before anything runs, and the keys another source decides refused saying which wins."""
import pytest

from conftest import requires_jax

pytestmark = requires_jax  # the configs import nothing heavy, but the package is the jax extra's


def test_overrides_are_typed_and_typos_are_errors():
    from mixer_jax.configs import get_config
    from mixer_jax.overrides import override

    cfg = override(get_config("digits"), ["steps=7", "optim.lr=0.5", "data.crop_area=0.2,0.9",
                                          "export_torch=true", "model.hidden_dim=16"])
    assert (cfg.steps, cfg.optim.lr, cfg.data.crop_area, cfg.export_torch, cfg.model.hidden_dim) == \
        (7, 0.5, (0.2, 0.9), True, 16)
    assert override(cfg, ["init_from=x.npz", "model.stoch_depth=0.1"]).init_from == "x.npz"
    assert override(cfg, ["model.patch_size=8"]).model.patch_size == (8, 8)
    with pytest.raises(ValueError, match="image_size 32x32 is not divisible by patch_size 5x5"):
        override(cfg, ["model.patch_size=5"])  # validated as it is set, before anything runs
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        override(cfg, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="bad value for 'steps'"):
        override(cfg, ["steps=many"])
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        get_config("nope")


@pytest.mark.parametrize("section", ["model", "data", "optim"])
def test_a_whole_section_cannot_be_replaced_by_a_value(section):
    from mixer_jax.configs import get_config
    from mixer_jax.overrides import override

    with pytest.raises(ValueError, match=f"'{section}' is a section, not a value; set its fields, e.g. {section}\\."):
        override(get_config("digits"), [f"{section}=5"])


def test_model_fields_the_data_decides_cannot_be_set():
    from mixer_jax.configs import get_config
    from mixer_jax.overrides import override

    with pytest.raises(ValueError, match="model.num_classes cannot be set: it is decided by the dataset"):
        override(get_config("digits"), ["model.num_classes=7"])
    with pytest.raises(ValueError, match=r"model.image_size cannot be set: it is decided by data.image_size"):
        override(get_config("digits"), ["model.image_size=64"])


def test_the_old_compute_dtype_key_names_the_new_one():
    from mixer_jax.configs import get_config
    from mixer_jax.overrides import override

    with pytest.raises(ValueError, match=r"compute_dtype cannot be set: it moved into the model section: "
                                         r"--set model.compute_dtype="):
        override(get_config("digits"), ["compute_dtype=bfloat16"])
    assert override(get_config("digits"), ["model.compute_dtype=bfloat16"]).model.compute_dtype == "bfloat16"


def test_with_init_from_only_regularisation_dtype_and_api_model_fields_can_be_set():
    from mixer_jax.configs import get_config
    from mixer_jax.overrides import override

    with pytest.raises(ValueError, match="model.hidden_dim cannot be set together with init_from: the checkpoint "
                                         "decides the architecture"):
        override(get_config("finetune"), ["init_from=m.npz", "model.hidden_dim=16"])
    with pytest.raises(ValueError, match="model.variant cannot be set together with init_from"):
        override(get_config("finetune"), ["model.variant=S/16", "init_from=m.npz"])
    cfg = override(get_config("finetune"), ["model.stoch_depth=0.1", "model.dropout_rate=0.1", "init_from=m.npz",
                                            "model.compute_dtype=bfloat16", "model.api=nnx"])
    assert (cfg.model.stoch_depth, cfg.model.dropout_rate, cfg.model.compute_dtype, cfg.model.api) == \
        (0.1, 0.1, "bfloat16", "nnx")


def test_set_variant_replaces_the_dimensions_and_a_dimension_drops_the_variant_name():
    from mixer_jax.configs import get_config
    from mixer_jax.overrides import override

    cfg = override(get_config("digits"), ["model.variant=S/16", "data.image_size=64"])
    assert (cfg.model.variant, cfg.model.patch_size, cfg.model.hidden_dim) == ("S/16", (16, 16), 512)
    cfg = override(get_config("finetune"), ["model.num_blocks=4"])
    assert (cfg.model.variant, cfg.model.num_blocks, cfg.model.hidden_dim) == (None, 4, 768)  # B/16 with 4 blocks
    with pytest.raises(ValueError, match="image_size 32x32 is not divisible by patch_size 14x14"):
        override(get_config("digits"), ["model.variant=H/14"])
