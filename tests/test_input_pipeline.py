"""mixer_jax.input_pipeline: the config's data source, the Grain pipeline (workers, determinism,
process slices, resume), bad data (stop or replace, one line naming the file), uint8 out and
[-1, 1] on the device."""
from pathlib import Path

import numpy as np
import pytest

from conftest import requires_jax
from helpers.image_data import BAD_KINDS, make_bad, make_folder

pytestmark = requires_jax


def data_cfg(root=None, **kw):
    from mixer_jax.configs import DataConfig
    if root is None:
        return DataConfig(name="digits", image_size=16, **kw)
    return DataConfig(name="imagefolder", data_dir=str(root), image_size=16, **kw)


# ---- deterministic batches ------------------------------------------------------------------------


def test_train_batches_are_a_pure_function_of_seed_and_step_and_split_across_processes():
    from mixer_jax.input_pipeline import make_source
    from mixer_jax.input_pipeline import TrainBatches

    dc = data_cfg(train_augment="inception_crop_flip")
    src = make_source(dc, "train")
    a, b = TrainBatches(src, dc, 32, seed=0), TrainBatches(src, dc, 32, seed=0)
    xa, ya, _, _ = a(5)
    xb, yb, _, _ = b(5)
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert xa.dtype == np.uint8 and xa.shape == (32, 16, 16, 3)  # uint8 to the device, normalised there
    assert not np.array_equal(TrainBatches(src, dc, 32, seed=1)(5).images, xa)
    halves = [TrainBatches(src, dc, 32, seed=0, process_index=i, process_count=2)(5) for i in range(2)]
    assert np.array_equal(np.concatenate([h.images for h in halves]), xa)
    assert np.array_equal(np.concatenate([h.labels for h in halves]), ya)
    epoch_len = len(src) // 32
    order = a.epoch_order(0)
    seen = [order(k) for k in range(epoch_len * 32)]
    assert len(set(seen)) == len(seen)  # one epoch visits distinct examples
    assert np.array_equal(np.concatenate([a(s).labels for s in range(epoch_len)]), src.labels[seen])
    assert a.position(epoch_len + 2) == (1, 64)
    assert [a.epoch_order(1)(k) for k in range(8)] != seen[:8]  # each epoch has its own order


@pytest.mark.parametrize("workers,kind", [(2, "thread"), (3, "thread"),
                                          pytest.param(2, "process", marks=pytest.mark.slow)])
def test_workers_and_resuming_give_the_same_stream_as_in_process(workers, kind):
    import dataclasses

    from mixer_jax.input_pipeline import make_source
    from helpers.training import tiny_digits
    from mixer_jax.input_pipeline import make_train_iterator

    cfg = dataclasses.replace(tiny_digits(), steps=7)
    src = make_source(cfg.data, "train")

    def stream(start, **data):
        it = make_train_iterator(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data)), src, start)
        try:
            return list(it)
        finally:
            it.close()

    ref = stream(0, workers=0)
    assert len(ref) == 7
    got = stream(0, workers=workers, worker_type=kind)
    assert all(np.array_equal(x, gx) and np.array_equal(y, gy) for (x, y), (gx, gy) in zip(ref, got))
    tail = stream(4, workers=workers, worker_type=kind)  # a resumed run starts at its checkpoint's step
    assert len(tail) == 3 and all(np.array_equal(x, tx) for (x, _), (tx, _) in zip(ref[4:], tail))


def test_eval_iterator_covers_the_split_once_and_splits_across_processes():
    from mixer_jax.input_pipeline import make_source
    from mixer_jax.input_pipeline import eval_iterator

    dc = data_cfg(workers=2)
    src = make_source(dc, "test")
    whole = list(eval_iterator(dc, src, 64))
    assert sum(int(m.sum()) for _, _, m in whole) == len(src) and all(x.shape[0] == 64 for x, _, _ in whole)
    assert whole[0][0].dtype == np.uint8
    parts = [list(eval_iterator(dc, src, 64, i, 2)) for i in range(2)]
    for b, (x, y, m) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([parts[0][b][0], parts[1][b][0]]), x)
        np.testing.assert_array_equal(np.concatenate([parts[0][b][2], parts[1][b][2]]), m)
    assert np.array_equal(np.concatenate([y[m] for _, y, m in whole]), src.labels)


def test_config_rejects_bad_worker_settings():
    import dataclasses

    from mixer_jax.configs import validate
    from helpers.training import tiny_digits

    cfg = tiny_digits()
    with pytest.raises(ValueError, match="data.workers must be an integer >= 0"):
        validate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=-1)), 1)
    with pytest.raises(ValueError, match="data.worker_type must be 'thread' or 'process'"):
        validate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, worker_type="fiber")), 1)


# ---- bad data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_bad_file_stops_with_one_line_naming_it_or_is_replaced_deterministically(tmp_path, kind):
    from mixer_jax.input_pipeline import make_source
    from mixer_convert.images import ImageError
    from mixer_jax.input_pipeline import TrainBatches

    root = make_folder(tmp_path / "d", n=12)
    dc = data_cfg(root, train_augment="inception_crop_flip")
    dc_skip = data_cfg(root, train_augment="inception_crop_flip", skip_bad=True)
    src = make_source(dc, "train")
    clean = TrainBatches(src, dc, 12, seed=0)(0)
    row = 3
    bad_index = TrainBatches(src, dc, 12, seed=0).epoch_order(0)(row)
    victim = src.path(bad_index)
    make_bad(Path(victim), kind)

    with pytest.raises(ImageError) as e:
        TrainBatches(make_source(dc, "train"), dc, 12, seed=0)(0)
    msg = str(e.value)
    assert victim in msg and "\n" not in msg and "skip_bad" in msg

    skip_src = make_source(dc_skip, "train")
    if kind == "directory":  # found when listing, before training: left out of the dataset
        assert len(skip_src) == 11 and skip_src.left_out == 1 and victim not in map(skip_src.path, range(11))
        return
    got = TrainBatches(skip_src, dc_skip, 12, seed=0)(0)
    others = [r for r in range(12) if r != row]
    np.testing.assert_array_equal(got.images[others], clean.images[others])
    np.testing.assert_array_equal(got.labels[others], clean.labels[others])
    nxt = (bad_index + 1) % len(src)  # the next example, with its own label and this row's augmentation
    assert got.labels[row] == src.labels[nxt]
    key = (0, 0, row)
    want = TrainBatches(src, dc, 12, seed=0).pre.train(src[nxt][0], np.random.default_rng(key))
    np.testing.assert_array_equal(got.images[row], want)
    assert len(got.bad) == 1 and victim in got.bad[0]


def test_skip_bad_in_eval_masks_the_example_out_and_reports_it(tmp_path):
    from mixer_jax.input_pipeline import make_source
    from mixer_jax.input_pipeline import eval_iterator

    root = make_folder(tmp_path / "d", n=9, split="test")
    make_folder(tmp_path / "d", n=6, split="train")
    (root / "test" / "class_1" / "004.jpg").write_bytes(b"")
    reports = []
    dc = data_cfg(root, skip_bad=True, workers=2)
    batches = list(eval_iterator(dc, make_source(dc, "test"), 4, report=reports.append))
    masks = np.concatenate([m for _, _, m in batches])
    assert masks.sum() == 8 and len(masks) == 12
    assert len(reports) == 1 and "004.jpg" in reports[0] and "empty file" in reports[0] and "1 so far" in reports[0]


def test_a_bad_file_from_a_worker_thread_reaches_the_caller_as_one_line(tmp_path):
    import dataclasses

    from mixer_jax.configs import TrainConfig
    from mixer_jax.input_pipeline import make_source
    from mixer_convert.images import ImageError
    from mixer_jax.input_pipeline import make_train_iterator

    root = make_folder(tmp_path / "d", n=12)
    (root / "train" / "class_0" / "000.jpg").write_bytes(b"GIF89a not really")
    cfg = TrainConfig(data=data_cfg(root, workers=2), batch_size=12, steps=2)
    it = make_train_iterator(cfg, make_source(cfg.data, "train"))
    with pytest.raises(ImageError, match=r"000\.jpg: not an image"):
        next(it)
    it.close()
    reports = []
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, skip_bad=True))
    it = make_train_iterator(cfg, make_source(cfg.data, "train"), report=reports.append)
    list(it)
    assert it.skipped == 2 and len(reports) == 1  # once per epoch (2 steps = 2 epochs), reported once


@pytest.mark.slow
def test_cli_stops_on_a_bad_file_with_exit_2_and_one_line(tmp_path, capsys):
    from mixer_jax.cli import main

    root = make_folder(tmp_path / "d", n=12)
    make_folder(tmp_path / "d", n=4, split="test")
    (root / "train" / "class_2" / "005.jpg").write_bytes(b"")
    args = ["--workdir", str(tmp_path / "w"), "--quiet", "--set", "data.name=imagefolder",
            "--set", f"data.data_dir={root}", "--set", "data.image_size=16", "--set", "model.patch_size=4",
            "--set", "model.hidden_dim=8", "--set", "model.num_blocks=1", "--set", "batch_size=12",
            "--set", "steps=2", "--set", "eval_batch_size=4", "--set", "data.workers=2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mixer-train: error: {root / 'train' / 'class_2' / '005.jpg'}: ")
    assert "empty file" in err[0]


# ---- the config's source, and [-1, 1] --------------------------------------------------------------


def test_class_names_come_from_the_source_and_every_split_takes_the_train_splits(tmp_path):
    from mixer_convert.datasets import class_names
    from mixer_jax.input_pipeline import make_source

    root = make_folder(tmp_path / "d", n=6)
    make_folder(tmp_path / "d", n=2, classes=2, split="test")  # class_2 has no test images
    src = make_source(data_cfg(root), "train")
    assert class_names(src) == ["class_0", "class_1", "class_2"]
    assert class_names(make_source(data_cfg(), "train")) == [str(i) for i in range(10)]
    test = make_source(data_cfg(root), "test")
    assert test.classes == src.classes and test.num_classes == 3 and sorted(set(test.labels)) == [0, 1]
    with pytest.raises(ValueError, match="imagefolder: no directory .*the train split names the classes"):
        make_source(data_cfg(root, train_split="nope"), "test")


def test_normalize_is_the_cores_value_range_on_the_host_and_in_jit():
    import jax

    from mixer_convert.preprocess import value_range
    from mixer_jax.input_pipeline import normalize

    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(normalize(x), value_range(x))
    # XLA turns the division by a constant into a multiplication by its reciprocal: 1 ulp at most
    np.testing.assert_allclose(np.asarray(jax.jit(normalize)(x)), value_range(x), rtol=0, atol=1.2e-7)
    f = np.zeros(3, np.float32)
    assert normalize(f) is f  # float input is already in [-1, 1]
