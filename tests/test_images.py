"""mixer_convert.images: one image from a file, bytes or an array to uint8 RGB (every mode,
16-bit, alpha, EXIF, animations), JPEG draft decoding, the training crop/resize, and the one
error for an unreadable image."""
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import subprocess_env
from helpers.image_data import crop_resize_errors, tf_resize_reference, write_png
from mixer_convert.images import ImageError, crop_resize, draft_scale, read_crop, read_image

RNG = np.random.default_rng(0)


def _save(tmp_path, name, im, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


# ---- modes --------------------------------------------------------------------------------------


def test_grayscale_palette_and_one_bit_images_become_rgb(tmp_path):
    grey = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
    out = read_image(_save(tmp_path, "g.png", Image.fromarray(grey)))
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8 and all(np.array_equal(out[..., c], grey) for c in range(3))
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    np.testing.assert_array_equal(read_image(_save(tmp_path, "p.png", pal))[0, :], [[255, 0, 0], [0, 0, 255]])
    one = Image.fromarray(np.array([[True, False]]))
    np.testing.assert_array_equal(read_image(_save(tmp_path, "b.png", one))[0, :, 0], [255, 0])


def test_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = [10, 20, 30]
    rgba[0, 0, 3] = 0  # fully transparent pixel keeps its colour (as tf.io.decode_image(channels=3))
    rgba[1, 1, 3] = 255
    out = read_image(_save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    assert (out == [10, 20, 30]).all()
    la = Image.fromarray(np.array([[[50, 0], [60, 255]]], np.uint8), "LA")
    np.testing.assert_array_equal(read_image(_save(tmp_path, "la.png", la))[0, :, 0], [50, 60])


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = [200, 30, 30]
    path = _save(tmp_path, "c.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    out = read_image(path)
    assert out.shape == (16, 16, 3)
    assert np.abs(out[4, 2].astype(int) - [200, 30, 30]).max() < 12 and out[4, 12].max() < 12


def test_16_bit_greyscale_is_scaled_not_saturated(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 65535]], np.uint16)
    path = _save(tmp_path, "g16.png", Image.fromarray(values))
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    np.testing.assert_array_equal(read_image(path)[0, :, 0], [0, 1, 4, 128, 255])


def test_16_bit_rgb_is_scaled_not_saturated(tmp_path):
    write_png(tmp_path / "rgb16.png", np.array([[[0x8000, 0x0100, 0xFFFF]]], np.uint16))
    r, g, b = read_image(tmp_path / "rgb16.png")[0, 0].astype(int)
    assert abs(r - 128) <= 1 and g <= 1 and b == 255


def test_every_mode_reads_the_same_through_both_readers(tmp_path):
    """read_image (whole picture) and read_crop (training) share the mode conversion."""
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
        img, box = read_crop(tmp_path / name)
        assert img.dtype == np.uint8 and img.shape == (4, 6, 3) and box == (0, 0, 6, 4), name
        assert np.abs(img[0, 0].astype(int) - rgb).max() <= 1, (name, img[0, 0])
        np.testing.assert_array_equal(read_image(tmp_path / name), img)
    g, _ = read_crop(tmp_path / "g16.png")
    assert list(g[0, :, 0]) == [156, 156, 156, 255, 255, 255]  # 40000/257, not saturated at 255


def test_exif_orientation_is_applied_unless_disabled(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = 255  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display rotated 90 degrees clockwise
    path = _save(tmp_path, "o.jpg", Image.fromarray(img), exif=exif.tobytes(), quality=95)
    shown = read_image(path)
    assert shown.shape == (40, 20, 3) and shown[:10].mean() > 200 and shown[-10:].mean() < 50  # white on top
    assert read_image(path, exif_orientation=False).shape == (20, 40, 3)
    assert read_crop(path)[0].shape == (20, 40, 3)  # training decodes as TensorFlow does: no rotation


def test_animation_reads_its_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (0, 255)]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert read_image(path).max() == 0


# ---- payloads -----------------------------------------------------------------------------------


def test_decoded_arrays_become_rgb_and_bad_arrays_are_bad_images():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgba = np.dstack([np.full((3, 4, 3), 9, np.uint8), np.zeros((3, 4), np.uint8)])
    np.testing.assert_array_equal(read_crop(grey)[0], np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(read_crop(grey[..., None])[0], np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(read_crop(rgba)[0], rgba[..., :3])
    np.testing.assert_array_equal(read_image(rgba), rgba[..., :3])
    assert read_crop(rgba, lambda w, h: (0, 0, w / 2, h))[1] == (0, 0, 2.0, 3)
    buf = io.BytesIO()
    Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(buf, "PNG")  # tfds serves encoded bytes
    for encoded in (buf.getvalue(), np.array(buf.getvalue(), dtype=object)):
        np.testing.assert_array_equal(read_crop(encoded)[0], np.repeat(grey[..., None], 3, -1))
        np.testing.assert_array_equal(read_image(encoded), np.repeat(grey[..., None], 3, -1))
    with pytest.raises(ImageError, match=r"^cifar10/train\[3\]: not an image"):
        read_crop(b"not an image", name="cifar10/train[3]")
    for bad in (np.zeros((3, 4, 2), np.uint8), np.zeros((3, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ImageError, match=r"^rec\[7\]: .*expected uint8"):
            read_image(bad, name="rec[7]")


def test_the_error_survives_a_trip_through_a_worker_process():
    e = pickle.loads(pickle.dumps(ImageError("a/b.jpg", "empty file")))
    assert isinstance(e, ImageError) and str(e) == "a/b.jpg: empty file" and (e.name, e.reason) == ("a/b.jpg",
                                                                                                     "empty file")


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("case, match", [
    ("missing", "no such file"), ("directory", "is a directory"), ("empty", "empty file"),
    ("text", "not an image"), ("corrupt", "not an image|corrupt"), ("truncated", "corrupt or truncated"),
    ("float", "floating-point"), ("bomb", "decompression bomb"), ("fifo", "not a regular file"),
])
def test_bad_files_raise_one_clear_error_naming_the_file(tmp_path, monkeypatch, case, match):
    path = tmp_path / f"{case}.jpg"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("hello, not a picture\n")
    elif case == "corrupt":
        path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(RNG.integers(0, 256, 500, dtype=np.uint8)))
    elif case == "truncated":
        path.write_bytes(_jpeg_bytes()[:700])
    elif case == "float":
        path = _save(tmp_path, "f.tif", Image.fromarray(np.ones((4, 4), np.float32)))
    elif case == "bomb":
        path = _save(tmp_path, "big.png", Image.fromarray(np.zeros((60, 60, 3), np.uint8)))
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 3600 px: over the limit, under 2x
    elif case == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(path)  # opening it would block forever
    for read in (read_image, read_crop):
        with pytest.raises(ImageError, match=match) as e:
            read(path)
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    if case not in ("missing", "directory", "fifo"):  # the same bytes, named by the caller
        with pytest.raises(ImageError, match=match) as e:
            read_image(path.read_bytes(), name="record 7")
        assert str(e.value).startswith("record 7: ")


# ---- training: draft decoding and the crop/resize -----------------------------------------------


def test_jpeg_draft_decodes_at_reduced_scale_only_when_the_crop_is_downscaled(tmp_path):
    pytest.importorskip("cv2")
    # smooth enough that a 13x non-antialiased downscale does not alias: any error is geometry
    y, x = np.mgrid[:854, :1280]
    wave = 127 + 100 * np.sin(2 * np.pi * x / 160) * np.cos(2 * np.pi * y / 120)
    Image.fromarray(np.stack([wave, wave[::-1], 255 - wave], -1).astype(np.uint8)).save(tmp_path / "big.jpg",
                                                                                        quality=95)
    assert draft_scale((1280, 854), (0, 0, 1280, 854), (224, 224)) == 2  # 854/4 < 224
    assert draft_scale((1280, 854), (0, 0, 1280, 854), (96, 96)) == 8
    assert draft_scale((1280, 854), (100, 100, 400, 400), (224, 224)) == 1
    full, fbox = read_crop(tmp_path / "big.jpg", None, (96, 96), draft=False)
    small, sbox = read_crop(tmp_path / "big.jpg", None, (96, 96), draft=True)
    assert full.shape == (854, 1280, 3) and small.shape == (107, 160, 3) and sbox == (0, 0, 160, 106.75)
    a, b = crop_resize(full, fbox, (96, 96)).astype(int), crop_resize(small, sbox, (96, 96)).astype(int)
    assert np.abs(a - b).mean() < 1.5  # the same region, slightly different pixels
    crop = lambda w, h: (300.0, 200.0, 700.0, 600.0)  # noqa: E731  (a 400-pixel box to 96: scale 4)
    small, sbox = read_crop(tmp_path / "big.jpg", crop, (96, 96), draft=True)
    assert small.shape == (214, 320, 3) and sbox == (75.0, 50.0, 175.0, 150.0)
    full, fbox = read_crop(tmp_path / "big.jpg", crop, (96, 96), draft=False)
    assert np.abs(crop_resize(full, fbox, (96, 96)).astype(int) - crop_resize(small, sbox, (96, 96))).mean() < 1.5


def test_training_resize_is_tf_bilinear_without_antialiasing_within_rounding_not_pillows():
    pytest.importorskip("cv2")
    errors = crop_resize_errors()
    assert errors["max_error"] <= 0.51 and abs(errors["mean_error"]) < 0.01, errors  # rounding only, unbiased
    # Pillow's BILINEAR antialiases when downscaling: a different function, far from tf's
    img = RNG.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(img).resize((50, 50), Image.BILINEAR)).astype(np.float64)
    assert np.abs(pil - tf_resize_reference(img, 50, 50)).mean() > 10


def test_a_crop_reads_only_its_window_yet_clamps_at_the_image_edge_as_tf():
    pytest.importorskip("cv2")
    img = RNG.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    for box in [(0, 0, 40, 30), (80.5, 60.25, 120, 90), (30.75, 20.5, 70.25, 50.5), (1, 1, 119, 89)]:
        ref = tf_resize_reference(img, 24, 32, box)
        for flip in (False, True):
            out = crop_resize(img, box, (24, 32), flip).astype(np.float64)
            assert np.abs(out - (ref[:, ::-1] if flip else ref)).max() <= 0.51, (box, flip)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["4.14.0.94", "5.0.0.93"])
def test_the_oldest_opencv_allowed_passes_and_an_older_one_is_refused_in_one_line(tmp_path, version):
    """The bound in pyproject (>= 5.0) and images.OPENCV_MIN, checked against the releases
    themselves, installed beside the suite's own OpenCV in a child interpreter."""
    pytest.importorskip("cv2")
    target = tmp_path / "cv2"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                          "--target", str(target), f"opencv-python-headless=={version}"],
                         capture_output=True, text=True, timeout=600)
    if pip.returncode:
        pytest.skip(f"pip could not install opencv-python-headless=={version}: {pip.stderr.strip()[-200:]}")
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import cv2; from helpers.image_data import "
            "crop_resize_errors\ntry: print(json.dumps([cv2.__version__, crop_resize_errors()]))\n"
            "except ValueError as e: print(json.dumps([cv2.__version__, str(e)]))")
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), subprocess_env()["PYTHONPATH"]]))
    run = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    found, result = json.loads(run.stdout)
    assert found == version.rsplit(".", 1)[0]
    if version.startswith("4."):
        assert result.startswith("training's crop needs OpenCV >= 5.0, found 4.14.0") and "\n" not in result
    else:
        assert result["max_error"] <= 0.51 and abs(result["mean_error"]) < 0.01, result


def test_a_box_is_cropped_then_resized():
    pytest.importorskip("cv2")
    img = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    out = crop_resize(img, (10, 20, 50, 40), (20, 40))  # exactly 1:1 on an integer box
    np.testing.assert_array_equal(out, img[20:40, 10:50])
