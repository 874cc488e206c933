"""mixer_convert.preprocess: the two official eval pipelines in numpy, and image reading.

Oracles: hand-derived values (always), jax.image.resize without antialias (when JAX is installed)
and tf.image.resize itself, in a child interpreter (when TensorFlow is installed; slow tier).
"""
import importlib.util
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import requires_jax, subprocess_env
from mixer_convert import preprocess as pp
from mixer_convert.preprocess import ImageError, read_image

RNG = np.random.default_rng(0)
# (input H, W) -> (output H, W): down, up, non-integer ratios, aspect changes, identity, tiny.
SIZES = [((5, 7), (3, 4)), ((375, 500), (224, 224)), ((100, 60), (224, 224)), ((1000, 777), (256, 333)),
         ((3, 3), (7, 5)), ((224, 224), (224, 224)), ((333, 257), (331, 256)), ((1, 1), (4, 4))]


def _row(values) -> np.ndarray:
    """A 1-pixel-high, 1-channel image."""
    return np.asarray(values, np.float32).reshape(1, -1, 1)


# ---- bilinear (vit_jax) -----------------------------------------------------------------------


@pytest.mark.parametrize("src, n, want", [
    # upsampling 2 -> 4: x_in = (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25; outside the image clamps
    ([0, 100], 4, [0, 25, 75, 100]),
    # downsampling 4 -> 2: x_in = 0.5, 2.5 (the mean of each pair)
    ([10, 20, 30, 50], 2, [15, 40]),
    # 3 -> 2: x_in = 0.25, 1.75
    ([0, 100, 200], 2, [25, 175]),
    # 8 -> 2: x_in = 1.5, 5.5 -- only two input pixels per output, no antialiasing
    ([0, 0, 100, 0, 0, 0, 60, 80], 2, [50, 30]),
])
def test_bilinear_uses_half_pixel_centres_without_antialiasing(src, n, want):
    np.testing.assert_allclose(pp.resize_bilinear(_row(src), (1, n))[0, :, 0], want, rtol=0, atol=1e-5)


@requires_jax
@pytest.mark.parametrize("src, n, want", [([0, 100], 4, [0, 25, 75, 100]), ([10, 20, 30, 50], 2, [15, 40]),
                                          ([0, 100, 200], 2, [25, 175]), ([0, 0, 100, 0, 0, 0, 60, 80], 2, [50, 30])])
def test_jax_resize_without_antialias_has_the_same_hand_derived_values(src, n, want):
    """So jax.image.resize(antialias=False) is a valid oracle for tf.image.resize's semantics."""
    import jax

    got = np.asarray(jax.image.resize(_row(src), (1, n, 1), "bilinear", antialias=False))
    np.testing.assert_allclose(got[0, :, 0], want, rtol=0, atol=1e-5)


def test_pillow_bilinear_is_a_different_function_when_shrinking():
    """Why resize_bilinear exists: Pillow's BILINEAR antialiases (a wider tent) when downscaling."""
    img = np.tile(np.array([0, 255, 255, 0], np.uint8), 8)[None, :, None].repeat(3, axis=2).repeat(4, axis=0)
    ours = pp.resize_bilinear(img, (4, 8))  # 32 -> 8: every output samples between two 255s
    pil = np.asarray(Image.fromarray(img).resize((8, 4), Image.BILINEAR))
    assert np.all(ours == 255) and pil.max() < 200


@requires_jax
@pytest.mark.parametrize("src, dst", SIZES)
def test_bilinear_equals_jax_resize_without_antialias(src, dst):
    import jax

    img = RNG.integers(0, 256, (*src, 3), dtype=np.uint8)
    got = pp.resize_bilinear(img, dst)
    want = np.asarray(jax.image.resize(img.astype(np.float32), (*dst, 3), "bilinear", antialias=False))
    assert got.dtype == np.float32 and got.shape == (*dst, 3)
    # jax computes the sample positions and weights its own way in float32: equal to ~1e-5 of the range
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2)


# ---- area + resize_small + central_crop (big_vision) ------------------------------------------


@pytest.mark.parametrize("src, n, want", [
    ([10, 20, 30, 50], 2, [15, 40]),  # integer factor: means of the covered pixels
    ([10, 40], 4, [10, 10, 40, 40]),  # upsampling: each output lies inside one input pixel
    ([30, 60, 90], 2, [(30 + 0.5 * 60) / 1.5, (0.5 * 60 + 90) / 1.5]),  # fractional overlaps
])
def test_area_resize_averages_the_covered_input_area(src, n, want):
    np.testing.assert_allclose(pp.resize_area(_row(src), (1, n))[0, :, 0], want, rtol=1e-6)


@pytest.mark.parametrize("shape, want", [((500, 375), (341, 256)), ((375, 500), (256, 341)), ((256, 300), (256, 300)),
                                         ((100, 100), (256, 256)), ((1000, 257), (996, 256))])
def test_resize_small_scales_the_shorter_side_keeping_the_aspect(shape, want):
    out = pp.resize_small(RNG.integers(0, 256, (*shape, 3), dtype=np.uint8), 256)
    assert out.shape == (*want, 3) and out.dtype == np.uint8


def test_resize_small_truncates_back_to_uint8_as_tf_cast_does():
    img = np.array([[2, 1, 1]], np.uint8)[..., None].repeat(3, axis=2)  # 3 -> 2 wide at 2 -> 1 high
    area = pp.resize_area(img, (1, 2))[0, :, 0]
    np.testing.assert_allclose(area, [2.5 / 1.5, 1.5 / 1.5], rtol=1e-6)  # 1.667 and 1.0
    small = pp.resize_small(np.repeat(img, 3, axis=0), 2)  # 3x3 -> 2x2: the same 1.667 per row
    assert small[0, 0, 0] == 1  # truncated, not rounded to 2


def test_central_crop_takes_the_floor_offset():
    img = np.arange(5 * 6).reshape(5, 6, 1)
    np.testing.assert_array_equal(pp.central_crop(img, (2, 3)), img[1:3, 1:4])
    with pytest.raises(ValueError, match="cannot crop"):
        pp.central_crop(img, 6)


# ---- the pipelines ------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", pp.PIPELINES)
@pytest.mark.parametrize("size", [224, (64, 96)])
def test_pipelines_give_model_inputs_in_minus_one_to_one(pipeline, size):
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, 200:] = 255
    out = pp.preprocess(img, pipeline, size)
    assert out.dtype == np.float32 and out.shape == (*((size, size) if isinstance(size, int) else size), 3)
    assert out.min() == -1.0 and out.max() == 1.0


def test_value_range_maps_0_and_255_to_the_ends():
    np.testing.assert_array_equal(pp.value_range(np.array([0, 127.5, 255])), [-1, 0, 1])


def test_big_vision_crops_the_centre_while_vit_jax_squashes_the_whole_image():
    img = np.zeros((256, 512, 3), np.uint8)
    img[:, :64] = 255  # a bar at the left edge: outside big_vision's central crop
    assert pp.preprocess(img, "big_vision", 224).max() == -1.0
    assert pp.preprocess(img, "vit_jax", 224)[:, :20].min() == 1.0


def test_unknown_pipeline_is_an_error():
    with pytest.raises(ValueError, match="vit_jax, big_vision"):
        pp.preprocess(np.zeros((8, 8, 3), np.uint8), "timm")


# ---- TensorFlow itself as the oracle (child interpreter; slow: TF takes seconds to import) --------

_TF_ORACLE = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf
data = np.load(sys.argv[1])
out = {}
for key in data.files:
    img = data[key]
    for (oh, ow) in SIZES[key]:
        out[f"{key}/bilinear/{oh}x{ow}"] = tf.image.resize(img, [oh, ow]).numpy()
        out[f"{key}/area/{oh}x{ow}"] = tf.image.resize(img, [oh, ow], method="area").numpy()
    # big_vision, pp/ops_image.py + ops_general.py: resize_small(256) | central_crop(224) | value_range(-1, 1)
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    factor = tf.cast(256, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    nh = tf.cast(tf.round(tf.cast(h, tf.float32) * factor), tf.int32)
    nw = tf.cast(tf.round(tf.cast(w, tf.float32) * factor), tf.int32)
    small = tf.cast(tf.clip_by_value(tf.image.resize(img, (nh, nw), method="area"), 0, 255), tf.uint8)
    dy, dx = (tf.shape(small)[0] - 224) // 2, (tf.shape(small)[1] - 224) // 2
    crop = tf.image.crop_to_bounding_box(small, dy, dx, 224, 224)
    out[f"{key}/big_vision"] = (-1 + tf.cast(crop, tf.float32) / 255.0 * 2).numpy()
    # vit_jax, input_pipeline.py (eval): tf.image.resize to the model size, then (x - 127.5) / 127.5
    out[f"{key}/vit_jax"] = ((tf.image.resize(img, [224, 224]) - 127.5) / 127.5).numpy()
np.savez(sys.argv[2], **out)
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow (test oracle) not installed")
def test_resizes_and_pipelines_equal_tensorflow(tmp_path):
    images = {f"img{i}": RNG.integers(0, 256, (*src, 3), dtype=np.uint8) for i, (src, _) in enumerate(SIZES)}
    images["photo"] = _sample_photo()
    sizes = {f"img{i}": [dst] for i, (_, dst) in enumerate(SIZES)}
    sizes["photo"] = [(224, 224), (256, 341)]
    np.savez(tmp_path / "in.npz", **images)
    code = f"SIZES = {sizes!r}\n" + _TF_ORACLE
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                       capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(tmp_path / "out.npz") as tf_out:
        for key, img in images.items():
            for dst in sizes[key]:
                oh, ow = dst
                # bit-identical: the same float32 arithmetic in the same order
                np.testing.assert_array_equal(pp.resize_bilinear(img, dst), tf_out[f"{key}/bilinear/{oh}x{ow}"])
                np.testing.assert_array_equal(pp.resize_area(img, dst), tf_out[f"{key}/area/{oh}x{ow}"])
            if min(img.shape[:2]) >= 2:
                for pipeline in pp.PIPELINES:  # value_range differs by at most 1 float32 ulp
                    np.testing.assert_allclose(pp.preprocess(img, pipeline, 224), tf_out[f"{key}/{pipeline}"],
                                               rtol=0, atol=2.5e-7)


def _sample_photo() -> np.ndarray:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return RNG.integers(0, 256, (427, 640, 3), dtype=np.uint8)
    return load_sample_images().images[0]  # 427 x 640 real photo


# ---- reading ------------------------------------------------------------------------------------


def _save(tmp_path, name, im, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


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


def _png_rgb16(path, rgb16: np.ndarray) -> None:
    """A 48-bit RGB PNG (Pillow cannot write one)."""
    h, w, _ = rgb16.shape

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    raw = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_rgb_is_scaled_not_saturated(tmp_path):
    _png_rgb16(tmp_path / "rgb16.png", np.array([[[0x8000, 0x0100, 0xFFFF]]], np.uint16))
    r, g, b = read_image(tmp_path / "rgb16.png")[0, 0].astype(int)
    assert abs(r - 128) <= 1 and g <= 1 and b == 255


def test_exif_orientation_is_applied_unless_disabled(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = 255  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display rotated 90 degrees clockwise
    path = _save(tmp_path, "o.jpg", Image.fromarray(img), exif=exif.tobytes(), quality=95)
    shown = read_image(path)
    assert shown.shape == (40, 20, 3) and shown[:10].mean() > 200 and shown[-10:].mean() < 50  # white on top
    assert read_image(path, exif_orientation=False).shape == (20, 40, 3)


def test_animation_reads_its_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (0, 255)]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert read_image(path).max() == 0


def _jpeg_bytes() -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("case, match", [
    ("missing", "no such file"), ("directory", "is a directory"), ("empty", "empty file"),
    ("text", "not an image"), ("corrupt", "not an image|corrupt"), ("truncated", "corrupt or truncated"),
    ("float", "floating-point"), ("bomb", "decompression bomb"),
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
    with pytest.raises(ImageError, match=match) as e:
        read_image(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
