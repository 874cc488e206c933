"""mixer-eval (mixer_convert.tools.evaluate): accuracy per framework on image folders (sorted class
folders or ImageNet synsets) and tfds datasets, the frameworks' agreement, the float64 reference's
answers on the same files, reading in worker threads or processes, and one-line errors."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import has_module
from helpers.inference import INSTALLED, TINY_1K, reference_top1
from mixer_convert import config_for, random_params
from mixer_convert.preprocess import preprocess
from mixer_convert.reference import forward
from mixer_convert.tools import evaluate

pytestmark = pytest.mark.skipif(not (has_module("torch") or has_module("flax")), reason="needs torch or flax")


@pytest.mark.parametrize("pipeline", ["vit_jax", "big_vision"])
def test_eval_reports_accuracy_per_framework_and_their_agreement(crops, tmp_path, pipeline):
    cfg3 = TINY_1K.replace(num_classes=3)  # a 3-class head on the 3-class folder of real crops
    flat3 = random_params(cfg3, 5)
    np.savez(tmp_path / "w3.npz", **flat3)
    out = evaluate.evaluate(str(tmp_path / "w3.npz"), f"imagefolder:{crops}", None, pipeline, batch=4,
                            progress=False)
    paths = sorted(crops.glob("*/*.jpg"))
    labels = np.array([int(p.parent.name[-1]) for p in paths])
    ref = reference_top1(flat3, cfg3, paths, pipeline)
    assert out["images"] == len(paths) == 15 and out["labels"] == "sorted class folder index"
    for fw in INSTALLED:
        r = out["results"][fw]
        assert abs(r["correct_top1"] - int((ref == labels).sum())) <= 1  # float32 vs float64: at most one flip
        assert r["top5"] == 1.0  # 3 classes: top-3 always hits
    if len(INSTALLED) == 2:
        assert out["identical_top1"]["count"] >= len(paths) - 1 and out["logits_max_abs_difference"] < 1e-4


def test_synset_folders_are_labelled_by_their_imagenet_index(tmp_path, photos):
    flat = random_params(TINY_1K, 0)
    flat["head/kernel"][:] = 0
    flat["head/bias"][:] = 0
    flat["head/bias"][999] = 10.0  # always predicts class 999 (n15075141, toilet tissue)
    np.savez(tmp_path / "w.npz", **flat)
    for synset, n in (("n01443537", 1), ("n15075141", 2)):  # classes 1 and 999; sorted index would say 0 and 1
        (tmp_path / "data" / synset).mkdir(parents=True)
        for i in range(n):
            Image.open(photos[i]).save(tmp_path / "data" / synset / f"{i}.png")
    out = evaluate.evaluate(str(tmp_path / "w.npz"), f"imagefolder:{tmp_path / 'data'}", progress=False)
    assert out["labels"].startswith("synset folder names")
    for r in out["results"].values():
        assert r["correct_top1"] == 2 and r["top1"] == 2 / 3


def test_eval_cli_prints_a_table_or_json(weights_1k, crops, capsys):
    path, _ = weights_1k
    assert evaluate.main(["--weights", str(path), "--data", f"imagefolder:{crops}", "--quiet", "--limit", "4"]) == 0
    text = capsys.readouterr().out
    assert "top-1" in text and all(fw in text for fw in INSTALLED) and "4 images" in text
    assert "end-to-end" in text and "img/s (reading + preprocessing in" in text
    if len(INSTALLED) == 2:
        assert "identical top-1, torch vs flax" in text
    assert evaluate.main(["--weights", str(path), "--data", f"imagefolder:{crops}", "--json", "--quiet",
                          "--framework", INSTALLED[0]]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc["results"]) == INSTALLED[:1] and doc["images"] == 15 and "identical_top1" not in doc
    assert doc["end_to_end_images_per_second"] > 0 and doc["input"]["worker_type"] == "thread"
    assert 0 <= doc["input"]["seconds_waiting"] and doc["input"]["workers"] >= 1


@pytest.mark.slow
def test_eval_in_worker_processes_equals_eval_in_threads(weights_1k, crops):
    path, _ = weights_1k
    runs = [evaluate.evaluate(str(path), f"imagefolder:{crops}", INSTALLED[0], "big_vision", batch=4, progress=False,
                              workers=2, worker_type=kind) for kind in ("thread", "process")]
    assert runs[1]["input"] == {**runs[0]["input"], "worker_type": "process",
                                "seconds_waiting": runs[1]["input"]["seconds_waiting"]}
    for a, b in zip(runs[0]["results"].values(), runs[1]["results"].values()):
        assert (a["correct_top1"], a["correct_top5"]) == (b["correct_top1"], b["correct_top5"])


@pytest.mark.parametrize("case, match", [
    ("spec", "--data must be imagefolder:DIR or tfds:NAME"), ("not_dir", "imagefolder: no directory"),
    ("no_classes", "has no class folders"), ("no_images", "no image files"),
    ("too_many_classes", "4 class folders but the model has 3 classes"), ("bad_image", "corrupt or truncated"),
    ("unknown_synset", "not in the model's 1000-class head"), ("tfds_unknown", "unknown dataset"),
    ("workers", "argument --workers: expected a positive integer, got 0"),
])
def test_eval_errors_are_one_line_and_exit_2(tmp_path, photos, capsys, case, match):
    cfg = TINY_1K.replace(num_classes=1000 if case == "unknown_synset" else 3)
    np.savez(tmp_path / "w.npz", **random_params(cfg, 0))
    data = tmp_path / "data"
    data.mkdir()
    if case == "too_many_classes":
        for c in "abcd":
            (data / c).mkdir()
            Image.open(photos[0]).save(data / c / "0.png")
    elif case == "no_images":
        (data / "a").mkdir()
        (data / "a" / "notes.txt").write_text("x")
    elif case == "bad_image":
        (data / "a").mkdir()
        (data / "a" / "bad.jpg").write_bytes(photos[0].read_bytes()[:2000])
    elif case == "unknown_synset":
        (data / "n99999999").mkdir()
        Image.open(photos[0]).save(data / "n99999999" / "0.png")
    spec = {"spec": f"folder:{data}", "not_dir": f"imagefolder:{tmp_path / 'nope'}",
            "tfds_unknown": "tfds:no_such_dataset_xyz"}.get(case, f"imagefolder:{data}")
    if case == "tfds_unknown" and not has_module("tensorflow_datasets"):
        match = "needs the 'train' extra (no module 'tensorflow_datasets')"
    extra = ["--workers", "0"] if case == "workers" else []
    assert evaluate.main(["--weights", str(tmp_path / "w.npz"), "--data", spec, "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixer-eval: error: ") and match in err[0], err
    if case == "bad_image":
        assert str(data / "a" / "bad.jpg") in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["vit_jax", "big_vision"])
def test_eval_of_a_model_trained_on_the_fly_matches_its_in_memory_accuracy(tmp_path, pipeline):
    """A small Mixer trained (PyTorch, seconds) on scikit-learn's handwritten digits, saved in the
    official layout; mixer-eval on the held-out digits written out as 24x24 greyscale PNGs (resized to
    the model's 16x16 on the way in) must find what the float64 reference finds on the same files."""
    torch = pytest.importorskip("torch")
    sklearn = pytest.importorskip("sklearn.datasets")
    from mixer_torch.model import MlpMixer, to_flat

    d = sklearn.load_digits()
    big = np.kron(d.images, np.ones((3, 3))) * (255 / 16)  # 8x8 -> 24x24, 0..255
    imgs = np.repeat(np.rint(big).astype(np.uint8)[..., None], 3, axis=-1)
    test = np.arange(len(imgs)) % 5 == 0
    cfg = config_for("S/16", image_size=16, patch_size=4, hidden_dim=64, num_blocks=2, tokens_mlp_dim=32,
                     channels_mlp_dim=128, num_classes=10)
    x = np.stack([preprocess(im, "vit_jax", 16) for im in imgs[~test]])
    y = d.target[~test]
    torch.manual_seed(0)
    model = MlpMixer(cfg)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(y).long()
    g, threads = np.random.default_rng(0), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add synchronisation
    try:
        for _ in range(200):
            i = torch.from_numpy(g.integers(0, len(y), 128))
            loss = torch.nn.functional.cross_entropy(model(xt[i]), yt[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    flat = {k: np.asarray(v, np.float32) for k, v in to_flat(model.eval()).items()}
    np.savez(tmp_path / "digits.npz", **flat)
    folder, paths = tmp_path / "digits", []
    for i in np.flatnonzero(test):
        (folder / str(d.target[i])).mkdir(parents=True, exist_ok=True)
        paths.append(folder / str(d.target[i]) / f"{i}.png")
        Image.fromarray(imgs[i, ..., 0]).save(paths[-1])  # greyscale PNG
    out = evaluate.evaluate(str(tmp_path / "digits.npz"), f"imagefolder:{folder}", None, pipeline, progress=False)
    ref = reference_top1(flat, cfg, sorted(paths), pipeline)
    labels = np.array([int(p.parent.name) for p in sorted(paths)])
    n, ref_correct = len(paths), int((ref == labels).sum())
    assert out["images"] == n
    for fw in INSTALLED:
        assert abs(out["results"][fw]["correct_top1"] - ref_correct) <= 1
    assert ref_correct / n > (0.85 if pipeline == "vit_jax" else 0.3)
    if len(INSTALLED) == 2:
        assert out["identical_top1"]["count"] >= n - 1


@pytest.mark.slow
@pytest.mark.skipif(not (has_module("tensorflow_datasets") and has_module("tensorflow")),
                    reason="building a tfds dataset needs tensorflow-datasets and TensorFlow")
def test_eval_reads_a_tfds_dataset_with_its_labels(tmp_path):
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)
    records = [(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8), i % 3) for i in range(7)]

    class MixerTestImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            for i, (img, label) in enumerate(records):
                yield i, {"image": img, "label": label}

    MixerTestImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = TINY_1K.replace(num_classes=3)
    flat = random_params(cfg, 4)
    np.savez(tmp_path / "w.npz", **flat)
    out = evaluate.evaluate(str(tmp_path / "w.npz"), "tfds:mixer_test_images", data_dir=str(tmp_path), progress=False)
    assert out["data"] == "tfds:mixer_test_images:validation" and out["images"] == 7
    x = np.stack([preprocess(img, "vit_jax", cfg.image_size) for img, _ in records])
    ref_correct = int((forward(flat, cfg, x).argmax(-1) == [label for _, label in records]).sum())
    for r in out["results"].values():
        assert abs(r["correct_top1"] - ref_correct) <= 1
