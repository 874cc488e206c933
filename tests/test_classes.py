"""mixer_convert.classes: the shipped ImageNet names, class-name files, and the names for a head."""
import pytest

from mixer_convert.classes import head_class_names, imagenet_classes, read_class_names


def test_imagenet_class_names_are_shipped_for_1k_and_21k_heads():
    k1, k21 = imagenet_classes(1000), imagenet_classes(21843)
    assert len(k1) == 1000 and k1.names[0] == "tench, Tinca tinca" and k1.names[281] == "tabby, tabby cat"
    assert list(k1.synsets) == sorted(set(k1.synsets))  # the standard order: sorted synset ids
    assert len(k21) == 21843 and len(set(k21.synsets)) == 21843
    assert imagenet_classes(10) is None


def test_class_names_file_skips_comments_and_blank_lines(tmp_path):
    (tmp_path / "n.txt").write_text("# my classes\ncat\n\ndog\n")
    assert read_class_names(tmp_path / "n.txt").names == ("cat", "dog")
    (tmp_path / "e.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no class names"):
        read_class_names(tmp_path / "e.txt")


def test_a_heads_names_come_from_the_file_given_or_the_shipped_imagenet_ones(tmp_path):
    assert head_class_names(1000) is imagenet_classes(1000) and head_class_names(3) is None
    (tmp_path / "n.txt").write_text("ant\nbee\ncat\n")
    assert head_class_names(3, tmp_path / "n.txt").names == ("ant", "bee", "cat")
    with pytest.raises(ValueError, match="3 class names for a 1000-class head"):
        head_class_names(1000, tmp_path / "n.txt")
