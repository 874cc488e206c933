"""The model card of a timm model folder (mixer_convert.tools.model_card): it reports what the
conversion measured and nothing it did not, names the source and its license, and describes the
chosen preprocessing."""
import re

import numpy as np
import pytest

from mixer_convert import config_for, random_params
from mixer_convert.reference import forward
from mixer_convert.tools.bridge import convert_checkpoint
from mixer_convert.formats.timm_hub import PREPROCESSING
from mixer_convert.tools.model_card import PIPELINE_TEXT, card_text, describe_source
from mixer_convert.tools.verify import Verification, probe_images

S32 = config_for("S/32")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("card")
    flat = random_params(S32, 4)
    np.savez(d / "mine.npz", **flat)
    report = convert_checkpoint(d / "mine.npz", d / "folder", "timm-hub", preprocess="big_vision", progress=False)
    return (d / "folder" / "README.md").read_text(), report, flat


def test_the_card_reports_the_figures_this_conversion_measured(converted):
    card, report, flat = converted
    v = report.verification
    assert f"logits max-abs difference {v.logits_max_abs:.2e} (tolerance {v.logits_tolerance:.1e})" in card
    assert "bit-identical" in card and v.readback_exact
    # the exact-GELU figure is timm's function against the official one on the probe it names
    x = probe_images(S32)
    gap = np.abs(forward(flat, S32, x, gelu="erf") - forward(flat, S32, x)).max()
    assert f"differs from the official one by {gap:.2e}" in card
    assert f"{v.exact_gelu_max_abs:.2e}" == f"{gap:.2e}"


def test_the_card_states_model_size_preprocessing_and_front_matter(converted):
    card, report, _ = converted
    assert card.startswith("---\n") and "\nlicense: apache-2.0\n" in card and "\nlibrary_name: timm\n" in card
    assert f"**Parameters:** {report.num_params:,} (float32)" in card
    assert "# Model card for mixer_s32_224" in card and "**Classes:** 1000" in card
    assert "area resampling" in card and 'load_image(path, "big_vision")' in card
    assert 'timm.create_model("local-dir:' in card


@pytest.mark.parametrize("preprocess", sorted(PREPROCESSING))
def test_the_preprocessing_section_states_what_config_json_asks_timm_for(preprocess):
    assert set(PIPELINE_TEXT) == set(PREPROCESSING)
    card = card_text(S32, "mine.npz", preprocess, Verification(verified_with="x"), {"float32"})
    asked = PREPROCESSING[preprocess]
    assert f"`crop_mode: {asked['crop_mode']}`" in card and f"`crop_pct: {asked['crop_pct']}`" in card
    assert asked["interpolation"] in card and f'load_image(path, "{preprocess}")' in card


def test_no_number_is_claimed_that_was_not_measured():
    v = Verification(readback_exact=True, logits_max_abs=1.25e-6, logits_tolerance=1e-4,
                     verified_with="our PyTorch model vs numpy float64 reference")
    card = card_text(S32, "mine.npz", "vit_jax", v, {"float32"})
    assert "differs from the official one by" not in card  # exact_gelu_max_abs was not measured
    figures = set(re.findall(r"\d\.\d+e-\d+", card))
    assert figures == {"1.25e-06", "1.0e-04"}, figures


@pytest.mark.parametrize("source, google", [("B/16-i1k", True), ("gs://mixer_models/gsam/Mixer-S_32", True),
                                            ("mine.npz", False), ("hf-hub:someone/mixer", False)])
def test_the_source_is_named_and_only_googles_files_claim_their_license(source, google):
    where, is_google = describe_source(source)
    assert is_google == google
    card = card_text(S32, source, "vit_jax", Verification(verified_with="x"), {"float32"})
    assert ("the license of Google's released Mixer weights" in card) == google
    assert ("whose origin the converter cannot check" in card) == (not google)
    if google:
        assert "Google's published checkpoint" in where and "gs://mixer_models/" in where
    else:
        assert source in where
