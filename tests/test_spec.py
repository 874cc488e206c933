"""mixer_convert.spec: the one Mixer specification (variants and their names, MixerConfig and its
checks, the parameter tree and counts, the stochastic-depth rates per block)."""
import numpy as np
import pytest

from mixer_convert import VARIANTS, MixerConfig, config_for, num_params, param_shapes, parse_variant
from mixer_convert.spec import block_drop_rates


@pytest.mark.parametrize("variant, expected", [("B/16", 59_880_472), ("B/32", 60_293_428), ("L/16", 208_196_168)])
def test_exact_parameter_counts_match_vit_jax(variant, expected):
    assert num_params(config_for(variant)) == expected


# Paper Table 1, "Params (M)", without the head.
@pytest.mark.parametrize("variant, millions", [("S/32", 19), ("S/16", 18), ("B/32", 60), ("B/16", 59),
                                               ("L/32", 206), ("L/16", 207), ("H/14", 431)])
def test_parameter_counts_without_head_match_the_paper(variant, millions):
    assert round(num_params(config_for(variant, num_classes=None)) / 1e6) == millions


def test_every_published_variant_builds():
    assert len(VARIANTS) == 8
    for v in VARIANTS:
        cfg = config_for(v)
        size, patch = parse_variant(v)
        assert cfg.patch_size == (patch, patch) and cfg.num_tokens == (224 // patch) ** 2


def test_a_variants_dimensions_are_its_paper_row_and_name_it_back():
    from mixer_convert.spec import VARIANT_FIELDS, variant_dims, variant_name

    assert variant_dims("mixer_b16_224") == {"patch_size": (16, 16), "hidden_dim": 768, "num_blocks": 12,
                                             "tokens_mlp_dim": 384, "channels_mlp_dim": 3072}
    for v in VARIANTS:
        assert tuple(variant_dims(v)) == VARIANT_FIELDS and variant_name(config_for(v)) == v
    assert variant_name(config_for("B/16", tokens_mlp_dim=385)) is None


@pytest.mark.parametrize("name", ["B/16", "Mixer-B_16", "mixer_b16", "b-16", " B/16 "])
def test_variant_names_parse_in_all_common_spellings(name):
    assert parse_variant(name) == ("B", 16)


@pytest.mark.parametrize("name", ["B/15", "X/16", "B16x", "", "ViT-B/16"])
def test_unknown_variant_names_raise_listing_the_known_ones(name):
    with pytest.raises(ValueError, match="unknown Mixer variant.*S/32"):
        config_for(name)


def test_image_size_not_divisible_by_patch_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        config_for("B/16", image_size=(225, 224))


@pytest.mark.parametrize("field, value", [("hidden_dim", 0), ("num_classes", -3), ("stoch_depth", 1.0),
                                          ("patch_size", (16,)), ("dropout_rate", -0.1)])
def test_bad_config_values_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        config_for("S/32", **{field: value})


@pytest.mark.parametrize("size, hw", [(224, (224, 224)), ((384, 224), (384, 224)), ([32, 48], (32, 48)),
                                      (np.int64(16), (16, 16))])
def test_image_hw_turns_an_int_or_a_pair_into_height_and_width(size, hw):
    from mixer_convert.spec import image_hw
    assert image_hw(size) == hw and all(type(v) is int for v in image_hw(size))


@pytest.mark.parametrize("size", [0, -3, True, (16,), (16, 16, 3), "224", None, (16.0, 16), (16, 0)])
def test_image_hw_refuses_anything_else_in_one_message_naming_the_field(size):
    from mixer_convert.spec import image_hw
    with pytest.raises(ValueError, match=r"^data.image_size must be a positive int or a pair of positive ints "
                                         r"\(height, width\), got "):
        image_hw(size, "data.image_size")


def test_param_tree_is_the_official_one():
    shapes = param_shapes(config_for("B/16"))
    assert list(shapes)[:4] == ["stem/kernel", "stem/bias", "MixerBlock_0/LayerNorm_0/scale",
                                "MixerBlock_0/LayerNorm_0/bias"]
    assert shapes["stem/kernel"] == (16, 16, 3, 768)
    assert shapes["MixerBlock_11/token_mixing/Dense_0/kernel"] == (196, 384)
    assert shapes["MixerBlock_11/token_mixing/Dense_1/kernel"] == (384, 196)
    assert shapes["MixerBlock_0/channel_mixing/Dense_1/kernel"] == (3072, 768)
    assert shapes["head/kernel"] == (768, 1000)
    assert "MixerBlock_12/LayerNorm_0/scale" not in shapes
    assert "head/kernel" not in param_shapes(config_for("B/16", num_classes=None))


def test_non_square_images_change_only_token_mixing_shapes():
    cfg = config_for("S/32", image_size=(224, 160))
    assert cfg.grid == (7, 5)
    assert param_shapes(cfg)["MixerBlock_0/token_mixing/Dense_1/bias"] == (35,)


def test_config_is_immutable_and_replace_revalidates():
    cfg = MixerConfig()
    with pytest.raises(Exception):
        cfg.hidden_dim = 5
    with pytest.raises(ValueError):
        cfg.replace(image_size=(100, 100))


def test_drop_rates_ramp_linearly_from_zero_to_the_configured_rate():
    assert block_drop_rates(config_for("S/32", stoch_depth=0.1)) == pytest.approx([i / 7 * 0.1 for i in range(8)])
    assert block_drop_rates(config_for("S/32", num_blocks=1, stoch_depth=0.1)) == [0.0]
