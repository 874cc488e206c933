"""mixer_convert.datasets: the data sources mixer-train and mixer-eval share (digits, image
folders flat and nested, tfds), the names of their records and classes, ImageNet synset labels."""
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from conftest import has_module
from helpers.image_data import make_folder
from mixer_convert.datasets import (ImageFolder, TfdsSource, class_names, digits, folder_classes, save_class_names,
                                    synset_labels)
from mixer_convert.images import ImageError


def _touch_image(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (value, value, value)).save(path)


@pytest.mark.skipif(not has_module("sklearn"), reason="needs scikit-learn (the train extra)")
def test_digits_are_real_images_split_stratified():
    train, test = digits("train"), digits("test")
    assert len(train) + len(test) == 1797 and 350 < len(test) < 370
    assert set(np.unique(test.labels)) == set(range(10))
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (8, 8, 3)
    assert test.name(3) == "digits/test[3]" and class_names(test) == [str(i) for i in range(10)]
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        digits("validation")


def test_image_folder_lists_classes_and_files_sorted_with_their_labels(tmp_path):
    for rel in ("b/2.png", "b/10.jpg", "a/x.JPG", "a/.hidden.png", ".cache/y.png"):
        _touch_image(tmp_path / rel)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("not an image")
    src = ImageFolder(tmp_path)
    assert src.classes == ["a", "b", "c"] and src.num_classes == 3  # hidden folders are not classes
    assert [os.path.relpath(src.path(i), tmp_path) for i in range(len(src))] == ["a/x.JPG", "b/10.jpg", "b/2.png"]
    assert list(src.labels) == [0, 1, 1] and src[1] == (str(tmp_path / "b" / "10.jpg"), 1)
    assert src.name(2) == str(tmp_path / "b" / "2.png")  # errors name the file
    assert class_names(src) == ["a", "b", "c"]
    back = pickle.loads(pickle.dumps(src))  # worker processes get a copy
    assert back.path(2) == src.path(2) and list(back.labels) == list(src.labels)


def test_given_classes_fix_the_labels_and_a_missing_class_has_no_images(tmp_path):
    _touch_image(tmp_path / "test" / "dog" / "1.png")
    _touch_image(tmp_path / "test" / "zebra" / "1.png")  # not a class of the train split: not read
    src = ImageFolder(tmp_path / "test", ["cat", "dog"])
    assert len(src) == 1 and list(src.labels) == [1] and src.num_classes == 2


def test_a_flat_folder_refuses_directories_named_like_images_unless_told_to_leave_them_out(tmp_path):
    _touch_image(tmp_path / "a" / "1.png")
    (tmp_path / "a" / "2.jpg").mkdir()
    with pytest.raises(ImageError) as e:
        ImageFolder(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "a" / "2.jpg") + ": is not a regular file") and "\n" not in str(e.value)
    src = ImageFolder(tmp_path, skip_bad=True)
    assert len(src) == 1 and src.left_out == 1 and src.not_files == ["a/2.jpg"]


def test_a_nested_folder_searches_sub_folders_even_ones_named_like_images(tmp_path):
    _touch_image(tmp_path / "a" / "1.png")
    _touch_image(tmp_path / "a" / "deeper" / "2.png")
    _touch_image(tmp_path / "a" / "album.jpg" / "3.png")
    _touch_image(tmp_path / "a" / ".thumbs" / "4.png")
    src = ImageFolder(tmp_path, nested=True)
    assert [os.path.relpath(src.path(i), tmp_path) for i in range(len(src))] == \
        ["a/1.png", "a/album.jpg/3.png", "a/deeper/2.png"]
    assert len(ImageFolder(tmp_path, skip_bad=True)) == 1  # flat: only the class folder's own files


@pytest.mark.parametrize("case, match", [("missing", "no directory"), ("no_classes", "has no class folders"),
                                         ("no_images", "no image files under")])
def test_folder_errors_are_one_line(tmp_path, case, match):
    root = tmp_path / "d"
    if case != "missing":
        root.mkdir()
    if case == "no_images":
        (root / "a").mkdir()
        (root / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=match) as e:
        ImageFolder(root, expected="DIR/train/<class>/*.jpg")
    assert "\n" not in str(e.value) and str(root) in str(e.value)


def test_folder_classes_without_any_is_an_error_unless_none_may_be(tmp_path):
    (tmp_path / ".hidden").mkdir()
    with pytest.raises(ValueError, match=f"imagefolder: '{tmp_path}' has no class folders \\(expected DIR/x\\)"):
        folder_classes(tmp_path, "DIR/x")
    assert folder_classes(tmp_path, at_least_one=False) == []
    with pytest.raises(ValueError, match="no image files under"):  # given classes: none of them is there
        ImageFolder(tmp_path, ["cat"])


def test_synset_folders_map_to_their_imagenet_head_index():
    assert synset_labels(["n01443537", "n15075141"], 1000) == {"n01443537": 1, "n15075141": 999}
    assert synset_labels(["n01443537", "cats"], 1000) is None  # not all synsets: sorted-index labels
    assert synset_labels(["n01443537"], 10) is None  # no ImageNet head
    assert synset_labels(["n00004475"], 21843)["n00004475"] < 21843
    with pytest.raises(ValueError, match="synset folders not in the model's 1000-class head: n99999999"):
        synset_labels(["n99999999", "n01443537"], 1000)


def test_class_names_come_from_the_source_and_are_saved_beside_the_model(tmp_path):
    src = ImageFolder(make_folder(tmp_path / "d", n=6) / "train")
    assert class_names(src) == ["class_0", "class_1", "class_2"]
    path = save_class_names(src, tmp_path / "w")
    assert json.loads(path.read_text()) == ["class_0", "class_1", "class_2"]
    assert class_names(object()) is None and save_class_names(object(), tmp_path / "x") is None
    assert folder_classes(tmp_path / "d" / "train") == ["class_0", "class_1", "class_2"]


@pytest.mark.skipif(not has_module("tensorflow_datasets"), reason="needs tensorflow-datasets (the train extra)")
def test_an_unknown_tfds_dataset_is_one_line():
    with pytest.raises(ValueError, match="tfds: unknown dataset 'no_such_dataset_xyz'") as e:
        TfdsSource("no_such_dataset_xyz")
    assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.skipif(not (has_module("tensorflow_datasets") and has_module("tensorflow")),
                    reason="tfds's mock data needs tensorflow-datasets and TensorFlow")
def test_a_tfds_source_serves_records_labels_and_class_names():
    import tensorflow_datasets as tfds

    from mixer_convert.images import read_image

    with tfds.testing.mock_data(num_examples=5):
        src = TfdsSource("cifar10", "test")
        payload, label = src[2]
        assert len(src) == 5 and 0 <= label < 10 and src.name(2) == "cifar10/test[2]"
        assert read_image(payload).shape == (32, 32, 3)
        assert src.num_classes == 10 and len(class_names(src)) == 10
        assert TfdsSource("cifar10").split == "test"  # no validation split: test
