"""The input side: sources, image decoding and conversions, the Grain pipeline (workers,
determinism, process slices, resume), bad data, class names."""
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import requires_jax

pytestmark = requires_jax


# ---- helpers ------------------------------------------------------------------------------------


def _photos():
    from sklearn.datasets import load_sample_images
    return load_sample_images().images  # two 427x640 RGB photos


def make_folder(root, n=24, classes=3, size=(64, 48), split="train"):
    """root/<split>/class_k/NNN.jpg: n small JPEGs cut from scikit-learn's sample photos."""
    from PIL import Image

    photos = _photos()
    rng = np.random.default_rng(0)
    for i in range(n):
        ph = photos[i % 2]
        y, x = int(rng.integers(0, 300)), int(rng.integers(0, 500))
        d = root / split / f"class_{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ph[y:y + 120, x:x + 140]).resize(size).save(d / f"{i:03d}.jpg", quality=90)
    return root


def data_cfg(root=None, **kw):
    from mixer_jax.configs import DataConfig
    if root is None:
        return DataConfig(name="digits", image_size=16, **kw)
    return DataConfig(name="imagefolder", data_dir=str(root), image_size=16, **kw)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path, arr: np.ndarray) -> None:
    """A PNG written by hand (Pillow cannot write 16-bit RGB): uint16 (H, W, 3) or uint8 (H, W)."""
    h, w = arr.shape[:2]
    depth, color = (16, 2) if arr.dtype == np.uint16 else (8, 0)
    rows = b"".join(b"\x00" + arr[y].astype(">u2" if depth == 16 else "u1").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
                     + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


def write_bomb_png(path, side: int) -> None:
    """A ~100 kB grayscale PNG that claims side x side pixels (a decompression bomb)."""
    co = zlib.compressobj(9)
    body = b"".join(co.compress(b"\x00" + bytes(side)) for _ in range(8)) + co.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b""))


def tf_resize_reference(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """tf.image.resize(method='bilinear', antialias=False) in float64 numpy: half-pixel centres,
    source index clamped to the image."""
    def axis(out, n):
        c = (np.arange(out) + 0.5) * (n / out) - 0.5
        f = np.floor(c)
        return np.clip(f, 0, n - 1).astype(int), np.clip(np.ceil(c), 0, n - 1).astype(int), c - f
    ylo, yhi, dy = axis(oh, img.shape[0])
    xlo, xhi, dx = axis(ow, img.shape[1])
    a = img.astype(np.float64)
    top = a[ylo][:, xlo] * (1 - dx)[None, :, None] + a[ylo][:, xhi] * dx[None, :, None]
    bot = a[yhi][:, xlo] * (1 - dx)[None, :, None] + a[yhi][:, xhi] * dx[None, :, None]
    return top * (1 - dy)[:, None, None] + bot * dy[:, None, None]


# ---- deterministic batches ------------------------------------------------------------------------


def test_train_batches_are_a_pure_function_of_seed_and_step_and_split_across_processes():
    from mixer_jax.data import make_source
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

    from mixer_jax.data import make_source
    from tests_config import tiny_digits
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
    from mixer_jax.data import make_source
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


def test_digits_are_real_images_split_stratified():
    from mixer_jax.data import digits_source

    train, test = digits_source("train"), digits_source("test")
    assert len(train) + len(test) == 1797 and 350 < len(test) < 370
    assert set(np.unique(test.labels)) == set(range(10))
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (8, 8, 3)


def test_config_rejects_bad_worker_settings():
    import dataclasses

    from mixer_jax.configs import validate
    from tests_config import tiny_digits

    cfg = tiny_digits()
    with pytest.raises(ValueError, match="data.workers must be an integer >= 0"):
        validate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=-1)), 1)
    with pytest.raises(ValueError, match="data.worker_type must be 'thread' or 'process'"):
        validate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, worker_type="fiber")), 1)


# ---- one image: resize function, draft decoding, modes ---------------------------------------------


def test_resize_is_tf_bilinear_without_antialiasing_not_pillows():
    from PIL import Image

    from mixer_jax.images import crop_resize

    rng = np.random.default_rng(0)
    for h, w, oh, ow in [(8, 8, 16, 16), (375, 500, 224, 224), (100, 37, 224, 224), (500, 375, 50, 70)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = tf_resize_reference(img, oh, ow)
        ours = crop_resize(img, (0, 0, w, h), (oh, ow)).astype(np.float64)
        assert np.abs(ours - ref).max() <= 0.51 and abs((ours - ref).mean()) < 0.01  # rounding only, unbiased
        flipped = crop_resize(img, (0, 0, w, h), (oh, ow), flip=True).astype(np.float64)
        assert np.abs(flipped - ref[:, ::-1]).max() <= 0.51
    # Pillow's BILINEAR antialiases when downscaling: a different function, far from tf's
    img = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(img).resize((50, 50), Image.BILINEAR)).astype(np.float64)
    assert np.abs(pil - tf_resize_reference(img, 50, 50)).mean() > 10


def test_a_box_is_cropped_then_resized():
    from mixer_jax.images import crop_resize

    img = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    out = crop_resize(img, (10, 20, 50, 40), (20, 40))  # exactly 1:1 on an integer box
    np.testing.assert_array_equal(out, img[20:40, 10:50])


def test_jpeg_draft_decodes_at_reduced_scale_only_when_the_crop_is_downscaled(tmp_path):
    from PIL import Image

    from mixer_jax.images import crop_resize, draft_scale, read_image

    # smooth enough that a 13x non-antialiased downscale does not alias: any error is geometry
    y, x = np.mgrid[:854, :1280]
    wave = 127 + 100 * np.sin(2 * np.pi * x / 160) * np.cos(2 * np.pi * y / 120)
    Image.fromarray(np.stack([wave, wave[::-1], 255 - wave], -1).astype(np.uint8)).save(tmp_path / "big.jpg",
                                                                                        quality=95)
    assert draft_scale((1280, 854), (0, 0, 1280, 854), (224, 224)) == 2  # 854/4 < 224
    assert draft_scale((1280, 854), (0, 0, 1280, 854), (96, 96)) == 8
    assert draft_scale((1280, 854), (100, 100, 400, 400), (224, 224)) == 1
    full, fbox = read_image(tmp_path / "big.jpg", None, (96, 96), draft=False)
    small, sbox = read_image(tmp_path / "big.jpg", None, (96, 96), draft=True)
    assert full.shape == (854, 1280, 3) and small.shape == (107, 160, 3) and sbox == (0, 0, 160, 106.75)
    a, b = crop_resize(full, fbox, (96, 96)).astype(int), crop_resize(small, sbox, (96, 96)).astype(int)
    assert np.abs(a - b).mean() < 1.5  # the same region, slightly different pixels
    crop = lambda w, h: (300.0, 200.0, 700.0, 600.0)  # noqa: E731  (a 400-pixel box to 96: scale 4)
    small, sbox = read_image(tmp_path / "big.jpg", crop, (96, 96), draft=True)
    assert small.shape == (214, 320, 3) and sbox == (75.0, 50.0, 175.0, 150.0)
    full, fbox = read_image(tmp_path / "big.jpg", crop, (96, 96), draft=False)
    assert np.abs(crop_resize(full, fbox, (96, 96)).astype(int) - crop_resize(small, sbox, (96, 96))).mean() < 1.5


def test_grayscale_rgba_palette_cmyk_and_16bit_images_become_8bit_rgb(tmp_path):
    from PIL import Image

    from mixer_jax.images import read_image

    g16 = np.full((4, 6), 40000, np.uint16)
    g16[:, 3:] = 65535
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb16 = np.zeros((4, 6, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 40000, 65535, 257 * 3
    write_png(tmp_path / "rgb16.png", rgb16)
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((4, 6, 3), (10, 20, 30), np.uint8)).convert("P", palette=Image.ADAPTIVE).save(
        tmp_path / "p.png")
    Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    Image.new("L", (6, 4), 77).save(tmp_path / "l.jpg", quality=100)
    Image.new("LA", (6, 4), (99, 3)).save(tmp_path / "la.png")
    Image.new("1", (6, 4), 1).save(tmp_path / "one.png")
    expect = {"g16.png": (156, 156, 156), "rgb16.png": (156, 255, 3), "rgba.png": (200, 0, 0),
              "p.png": (10, 20, 30), "cmyk.jpg": (255, 0, 0), "l.jpg": (77, 77, 77), "la.png": (99, 99, 99),
              "one.png": (255, 255, 255)}
    for name, rgb in expect.items():
        img, _ = read_image(tmp_path / name)
        assert img.dtype == np.uint8 and img.shape == (4, 6, 3), name
        assert np.abs(img[0, 0].astype(int) - rgb).max() <= 1, (name, img[0, 0])
    g, _ = read_image(tmp_path / "g16.png")
    assert list(g[0, :, 0]) == [156, 156, 156, 255, 255, 255]  # 40000/257, not saturated at 255


def test_decoded_arrays_become_rgb_and_bad_arrays_are_bad_images():
    from mixer_jax.images import BadImageError, read_image

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgba = np.dstack([np.full((3, 4, 3), 9, np.uint8), np.zeros((3, 4), np.uint8)])
    np.testing.assert_array_equal(read_image(grey)[0], np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(read_image(grey[..., None])[0], np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(read_image(rgba)[0], rgba[..., :3])
    assert read_image(rgba, lambda w, h: (0, 0, w / 2, h))[1] == (0, 0, 2.0, 3)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(buf, "PNG")  # tfds serves encoded bytes
    for encoded in (buf.getvalue(), np.array(buf.getvalue(), dtype=object)):
        np.testing.assert_array_equal(read_image(encoded)[0], np.repeat(grey[..., None], 3, -1))
    with pytest.raises(BadImageError, match=r"bad image cifar10/train\[3\]: cannot identify"):
        read_image(b"not an image", name="cifar10/train[3]")
    for bad in (np.zeros((3, 4, 2), np.uint8), np.zeros((3, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(BadImageError, match="expected uint8"):
            read_image(bad, name="rec[7]")


# ---- bad data ------------------------------------------------------------------------------------


BAD_KINDS = ["corrupt", "truncated", "empty", "not_an_image", "directory", "bomb"]


def make_bad(path, kind):
    """Replace the image at ``path`` (a .jpg) with a bad one of ``kind``."""
    good = path.read_bytes()
    path.unlink()
    if kind == "corrupt":
        path.write_bytes(good[:2] + np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes()
                         + good[402:])
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_an_image":
        path.write_text("this is a text file with an image's name\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "bomb":
        write_bomb_png(path, 14000)  # 196 M pixels: past Pillow's hard limit; a .jpg name on a PNG


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_bad_file_stops_with_one_line_naming_it_or_is_replaced_deterministically(tmp_path, kind):
    from mixer_jax.data import make_source
    from mixer_jax.images import BadImageError
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

    with pytest.raises(BadImageError) as e:
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
    from mixer_jax.data import make_source
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
    from mixer_jax.data import make_source
    from mixer_jax.images import BadImageError
    from mixer_jax.input_pipeline import make_train_iterator

    root = make_folder(tmp_path / "d", n=12)
    (root / "train" / "class_0" / "000.jpg").write_bytes(b"GIF89a not really")
    cfg = TrainConfig(data=data_cfg(root, workers=2), batch_size=12, steps=2)
    it = make_train_iterator(cfg, make_source(cfg.data, "train"))
    with pytest.raises(BadImageError, match=r"000\.jpg'?: cannot identify image file"):
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
    assert len(err) == 1 and err[0].startswith("mixer-train: error: bad image ") and "005.jpg" in err[0]
    assert "empty file" in err[0]


# ---- class names -----------------------------------------------------------------------------------


def test_class_names_come_from_the_source_and_are_saved_beside_the_model(tmp_path):
    from mixer_jax.data import class_names, make_source, save_class_names

    root = make_folder(tmp_path / "d", n=6)
    src = make_source(data_cfg(root), "train")
    assert class_names(src) == ["class_0", "class_1", "class_2"]
    assert class_names(make_source(data_cfg(), "train")) == [str(i) for i in range(10)]
    path = save_class_names(src, tmp_path / "w")
    assert json.loads(path.read_text()) == ["class_0", "class_1", "class_2"]
    assert class_names(object()) is None and save_class_names(object(), tmp_path / "x") is None
