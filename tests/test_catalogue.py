"""The published checkpoints and their names: every file once, every spelling of a name, and what
``pretrained=...`` means for each variant."""
import re

import pytest

from mixer_convert import catalogue, hub


def test_catalogue_holds_every_published_file_once_with_its_variant_and_head():
    assert len(catalogue.CATALOGUE) == 11 and {e.folder for e in catalogue.CATALOGUE} == {"imagenet21k", "imagenet1k", "sam", "gsam"}
    names = [n for e in catalogue.CATALOGUE for n in (e.name, e.big_vision_name)]
    assert len(set(names)) == len(names) and all(catalogue.lookup(n) for n in names)
    for e in catalogue.CATALOGUE:
        assert e.variant == "{}/{}".format(*re.search(r"Mixer-([SBLH])_(\d+)", e.path).groups())
        assert e.num_classes == (21843 if e.folder == "imagenet21k" else 1000)
        assert e.path.endswith(".npz") == (e.folder != "gsam")  # as Google's listing spells them


@pytest.mark.parametrize("name", ["B/16-i21k", "B-i21k/16", "b/16-I21K", "gs://mixer_models/imagenet21k/Mixer-B_16.npz",
                                  "https://storage.googleapis.com/mixer_models/imagenet21k/Mixer-B_16.npz"])
def test_every_spelling_of_a_published_file_names_the_same_entry(name):
    assert catalogue.lookup(name).path == "imagenet21k/Mixer-B_16.npz"


def test_gsam_files_are_accepted_with_and_without_npz():
    a, b = catalogue.lookup("gs://mixer_models/gsam/Mixer-S_8"), catalogue.lookup("gs://mixer_models/gsam/Mixer-S_8.npz")
    assert a is b and a.name == "S/8-gsam" and hub.url_of(a).endswith("/gsam/Mixer-S_8")


def test_base_url_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MIXER_CHECKPOINT_BASE_URL", "http://mirror.example/mm/")
    e = catalogue.lookup("http://mirror.example/mm/imagenet1k/Mixer-L_16.npz", hub.base_url())
    assert e.name == "L/16-i1k" and hub.url_of(e) == "http://mirror.example/mm/imagenet1k/Mixer-L_16.npz"


@pytest.mark.parametrize("model, pretrained, source, variant", [
    ("B/16", "imagenet21k", "B/16-i21k", "B/16"),
    ("B/16", "i1k", "B/16-i1k", "B/16"),
    ("mixer_b16_224", True, "B/16-i1k", "B/16"),  # timm's model name; default: the ImageNet-1k file
    ("S/32", True, "S/32-gsam", "S/32"),  # only gsam published
    ("Mixer-B_32", "sam", "B/32-sam", "B/32"),
    ("mixer_b16_224.goog_in21k", True, "hf-hub:timm/mixer_b16_224.goog_in21k", "B/16"),
    ("B/16", "weights/my.npz", "weights/my.npz", "B/16"),  # a file that must hold a B/16
    ("B-i21k/16", True, "B-i21k/16", None),
    ("hf-hub:timm/mixer_l16_224.goog_in21k", True, "hf-hub:timm/mixer_l16_224.goog_in21k", None),
])
def test_pretrained_names_map_to_sources(model, pretrained, source, variant):
    assert catalogue.pretrained_source(model, pretrained) == (source, variant)


@pytest.mark.parametrize("model, pretrained, match", [
    ("L/32", True, "no published checkpoint for L/32"),
    ("S/16", "i21k", "S/16 has gsam"),
    ("B/16-i21k", "sam", "needs a variant name"),
    ("mixer_b16_224.goog_in21k", "i1k", "already names its weights"),
])
def test_impossible_pretrained_requests_say_what_exists(model, pretrained, match):
    with pytest.raises(ValueError, match=match):
        catalogue.pretrained_source(model, pretrained)



@pytest.mark.parametrize("name", ["mixer_b16_224", "mixer_b16_224.goog_in21k_ft_in1k", "B-16"])
def test_an_existing_local_path_named_like_a_variant_is_the_source(tmp_path, monkeypatch, name):
    # e.g. a timm model folder downloaded under its hub name: never a download instead
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir()
    assert catalogue.pretrained_source(name) == (name, None)
