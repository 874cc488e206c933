"""mixer-predict (mixer_convert.tools.predict): the right classes with their ImageNet names, the
same answers in both frameworks as in the float64 numpy reference on real photos, text or JSON,
and one-line errors."""
import json

import numpy as np
import pytest

from conftest import has_module
from helpers.inference import INSTALLED, TINY_1K, reference_top1
from mixer_convert import random_params
from mixer_convert.classes import imagenet_classes
from mixer_convert.tools import predict

pytestmark = pytest.mark.skipif(not (has_module("torch") or has_module("flax")), reason="needs torch or flax")


@pytest.mark.parametrize("framework", INSTALLED)
@pytest.mark.parametrize("pipeline", ["vit_jax", "big_vision"])
def test_predictions_match_the_float64_reference_with_imagenet_names(weights_1k, photos, framework, pipeline):
    path, flat = weights_1k
    out = predict.predict([str(p) for p in photos], str(path), framework, pipeline, k=3)
    want = reference_top1(flat, TINY_1K, photos, pipeline)
    names = imagenet_classes(1000)
    for r, w in zip(out["predictions"], want):
        top = r["top"]
        assert top[0]["index"] == w and top[0]["label"] == names.names[w] and top[0]["synset"] == names.synsets[w]
        assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"] > 0


def test_predict_cli_prints_each_image_and_json(weights_1k, photos, capsys):
    path, _ = weights_1k
    assert predict.main([str(photos[0]), str(photos[1]), "--weights", str(path), "--topk", "2"]) == 0
    text = capsys.readouterr().out
    assert str(photos[0]) in text and str(photos[1]) in text and "%" in text
    assert predict.main([str(photos[0]), "--weights", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["labels"].endswith("imagenet1k_classes.txt") and len(doc["predictions"][0]["top"]) == 5


def test_heads_without_shipped_names_show_indices_or_given_labels(tmp_path, photos, capsys):
    cfg = TINY_1K.replace(num_classes=3)
    np.savez(tmp_path / "w3.npz", **random_params(cfg, 1))
    assert predict.main([str(photos[0]), "--weights", str(tmp_path / "w3.npz")]) == 0
    out = capsys.readouterr().out
    assert "no class names for this head" in out and out.count("%") == 3  # top-5 of 3 classes: 3
    (tmp_path / "names.txt").write_text("ant\nbee\ncat\n")
    assert predict.main([str(photos[0]), "--weights", str(tmp_path / "w3.npz"), "--labels",
                         str(tmp_path / "names.txt"), "--json"]) == 0
    assert {t["label"] for t in json.loads(capsys.readouterr().out)["predictions"][0]["top"]} == {"ant", "bee", "cat"}


@pytest.mark.parametrize("case, match", [
    ("bad_image", "not an image"), ("no_weights", "no such checkpoint"), ("headless", "no classification head"),
    ("labels_count", "2 class names for a 1000-class head"), ("framework", "--framework must be torch or flax"),
    ("topk", "argument --topk: expected a positive integer, got 0"),
])
def test_predict_errors_are_one_line_and_exit_2(tmp_path, weights_1k, photos, capsys, case, match):
    path, flat = weights_1k
    argv = [str(photos[0]), "--weights", str(path)]
    if case == "bad_image":
        (tmp_path / "x.jpg").write_text("not a picture")
        argv[0] = str(tmp_path / "x.jpg")
    elif case == "no_weights":
        argv[2] = str(tmp_path / "none.npz")
    elif case == "headless":
        np.savez(tmp_path / "h.npz", **{k: v for k, v in flat.items() if not k.startswith("head/")})
        argv[2] = str(tmp_path / "h.npz")
    elif case == "labels_count":
        (tmp_path / "n.txt").write_text("a\nb\n")
        argv += ["--labels", str(tmp_path / "n.txt")]
    elif case == "framework":
        argv += ["--framework", "torch,flax"]
    elif case == "topk":
        argv += ["--topk", "0"]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mixer-predict: error: ") and match in err and "\n" not in err
    if case == "bad_image":
        assert str(tmp_path / "x.jpg") in err
