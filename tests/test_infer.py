"""mixer_convert.tools.infer (shared by mixer-predict and mixer-eval): which frameworks to run,
batches read in order by worker threads or processes, top-k with the same ties everywhere, and a
Flax classifier that compiles once for a short last batch."""
import numpy as np
import pytest

from conftest import requires_jax
from mixer_convert import config_for, random_params
from mixer_convert.errors import MissingExtraError
from mixer_convert.tools import infer


class Numbers:
    """A data source of arrays: record i is an image filled with i, labelled i % 3."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return np.full((6, 5, 3), i, np.uint8), i % 3

    def name(self, i: int) -> str:
        return f"#{i}"


@pytest.mark.parametrize("spec, single, match", [("jax", False, "--framework must be torch, flax or torch,flax"),
                                                 ("torch,flax", True, "--framework must be torch or flax"),
                                                 (" , ", False, "got ' , '")])
def test_an_unknown_framework_is_a_value_error_naming_the_choices(spec, single, match):
    with pytest.raises(ValueError, match=match):
        infer.parse_frameworks(spec, single)


def test_frameworks_default_to_the_installed_ones_and_none_installed_names_both_extras(monkeypatch):
    monkeypatch.setattr(infer, "has_extra", lambda extra: extra == "jax")
    assert infer.parse_frameworks(None) == ["flax"] and infer.parse_frameworks("flax, flax") == ["flax"]
    monkeypatch.setattr(infer, "has_extra", lambda extra: False)
    with pytest.raises(MissingExtraError, match="needs the 'torch' or 'jax' extra"):
        infer.parse_frameworks(None)


@pytest.mark.parametrize("worker_type, workers", [("thread", 1), ("thread", 3), ("process", 2)])
def test_batches_come_in_order_with_their_labels_whatever_the_workers(worker_type, workers):
    got = [(x.copy(), y.copy()) for x, y in infer.load_batches(Numbers(11), 11, 4, "vit_jax", (4, 4),
                                                              workers=workers, worker_type=worker_type)]
    assert [len(y) for _, y in got] == [4, 4, 3]
    xs, ys = np.concatenate([x for x, _ in got]), np.concatenate([y for _, y in got])
    assert ys.tolist() == [i % 3 for i in range(11)] and xs.shape == (11, 4, 4, 3)
    want = np.float32(-1) + np.arange(11, dtype=np.float32) / 255 * 2  # a constant image stays constant
    np.testing.assert_allclose(xs.reshape(11, -1), np.repeat(want[:, None], 48, 1), atol=1e-6)


def test_bad_worker_settings_are_refused():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        next(infer.load_batches(Numbers(2), 2, 1, "vit_jax", (4, 4), workers=0))
    with pytest.raises(ValueError, match="worker type one of"):
        next(infer.load_batches(Numbers(2), 2, 1, "vit_jax", (4, 4), worker_type="fiber"))


def test_topk_breaks_ties_by_the_lower_index_and_softmax_is_stable():
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    assert infer.topk(logits, 3).tolist() == [[1, 2, 0], [0, 1, 2]]
    assert infer.topk(logits, 10).shape == (2, 4)  # never more than the classes
    p = infer.softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]])


def test_describe_names_a_published_variant_or_the_shape_of_a_custom_one():
    assert infer.describe(config_for("B/16", num_classes=1000)) == "B/16 at 224x224, 1000 classes"
    custom = config_for("S/16", image_size=32, patch_size=8, hidden_dim=32, num_blocks=2, num_classes=3)
    assert infer.describe(custom) == "custom Mixer (patch 8x8, width 32, 2 blocks) at 32x32, 3 classes"


def test_a_headless_checkpoint_cannot_classify(tmp_path):
    cfg = config_for("S/16", image_size=32, patch_size=8, hidden_dim=16, num_blocks=1, tokens_mlp_dim=8,
                     channels_mlp_dim=16, num_classes=None)
    np.savez(tmp_path / "h.npz", **random_params(cfg, 0))
    with pytest.raises(ValueError, match="h.npz: the checkpoint has no classification head"):
        infer.load_weights(str(tmp_path / "h.npz"))
    with pytest.raises(ValueError, match="unknown framework 'mxnet'"):
        infer.make_classifier("mxnet", {}, cfg)


@requires_jax
def test_the_flax_classifier_pads_a_short_last_batch_and_returns_only_its_rows():
    from mixer_convert.reference import forward

    cfg = config_for("S/16", image_size=16, patch_size=8, hidden_dim=16, num_blocks=1, tokens_mlp_dim=8,
                     channels_mlp_dim=16, num_classes=3)
    flat = random_params(cfg, 0)
    run = infer.make_classifier("flax", flat, cfg)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)
    full, short = run(x[:4]), run(x[4:])
    assert full.shape == (4, 3) and short.shape == (1, 3) and short.dtype == np.float32
    np.testing.assert_allclose(np.concatenate([full, short]), forward(flat, cfg, x), atol=1e-4)
