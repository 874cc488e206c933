"""mixer_convert.preprocess: the two official eval pipelines, bit-identical to TensorFlow's ops.

Oracles: hand-derived values; TensorFlow's kernels transcribed loop by loop (tests/helpers/tf_kernels.py)
on many random sizes; jax.image.resize without antialias (when JAX is installed); and
tf.image.resize itself, in a child interpreter, on random sizes, scikit-learn's photos and digits
(when TensorFlow is installed; slow tier).
"""
import importlib.util
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from helpers import tf_kernels
from conftest import requires_jax, subprocess_env
from helpers.image_data import digit_images, photos
from helpers.preprocessing import numpy_path_only
from mixer_convert import preprocess as pp

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


def test_big_vision_crops_the_centre_while_vit_jax_squashes_the_whole_image():
    img = np.zeros((256, 512, 3), np.uint8)
    img[:, :64] = 255  # a bar at the left edge: outside big_vision's central crop
    assert pp.preprocess(img, "big_vision", 224).max() == -1.0
    assert pp.preprocess(img, "vit_jax", 224)[:, :20].min() == 1.0


def test_unknown_pipeline_is_an_error():
    with pytest.raises(ValueError, match="vit_jax, big_vision"):
        pp.preprocess(np.zeros((8, 8, 3), np.uint8), "timm")


# ---- the fast kernels against TensorFlow's loops (tests/helpers/tf_kernels.py) ---------------------------


def _random_cases(n: int, max_in: int, max_out: int, seed: int):
    """(input H, W, C, dtype) -> (output H, W): random sizes, and the corners that break index maths."""
    rng = np.random.default_rng(seed)
    cases = [((1, 1, 3, np.uint8), (5, 7)), ((1, 9, 1, np.uint8), (3, 4)), ((9, 1, 4, np.uint8), (2, 5)),
             ((300, 200, 3, np.uint8), (7, 5)), ((13, 17, 3, np.float32), (13, 17)), ((6, 4, 3, np.uint16), (11, 3))]
    for _ in range(n):
        ih, iw = (int(v) for v in rng.integers(1, max_in + 1, 2))
        oh, ow = (int(v) for v in rng.integers(1, max_out + 1, 2))
        cases.append(((ih, iw, int(rng.choice([1, 3, 4])), np.uint8), (oh, ow)))
    return cases


def _image(h, w, c, dtype, seed=0):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, c))
    return (img + 0.37).astype(dtype) if dtype == np.float32 else img.astype(dtype)


@pytest.mark.parametrize("src, dst", _random_cases(24, 40, 24, seed=1))
def test_resizes_equal_tensorflows_kernels_bit_for_bit(src, dst):
    img = _image(*src)
    np.testing.assert_array_equal(pp.resize_bilinear(img, dst), tf_kernels.bilinear(img, *dst))
    full = tf_kernels.area(img, *dst)
    np.testing.assert_array_equal(pp.resize_area(img, dst), full)
    top, left = dst[0] // 3, dst[1] // 2  # a window is computed exactly as the whole
    np.testing.assert_array_equal(pp.resize_area(img, dst, window=(top, left, dst[0] - top, dst[1] - left)),
                                  full[top:, left:])


def test_big_vision_is_resize_small_then_central_crop_then_its_value_range():
    for img in (_image(427, 640, 3, np.uint8), _image(37, 300, 3, np.uint8), _image(1, 1, 3, np.uint8)):
        want = pp.value_range(pp.central_crop(pp.resize_small(img, 256), 224), "big_vision")
        np.testing.assert_array_equal(pp.preprocess(img, "big_vision", 224), want)
        want = pp.value_range(pp.resize_bilinear(img, (224, 224)))
        np.testing.assert_array_equal(pp.preprocess(img, "vit_jax", 224), want)


def test_out_is_filled_in_place_and_checked():
    img = _image(50, 70, 3, np.uint8)
    for pipeline in pp.PIPELINES:
        out = np.full((32, 48, 3), np.nan, np.float32)
        assert pp.preprocess(img, pipeline, (32, 48), out=out) is out
        np.testing.assert_array_equal(out, pp.preprocess(img, pipeline, (32, 48)))
    with pytest.raises(ValueError, match="out must be a C-contiguous float32 array of shape"):
        pp.preprocess(img, "vit_jax", 32, out=np.empty((32, 32, 3), np.float64))
    with pytest.raises(ValueError, match="not inside"):
        pp.resize_area(img, (10, 10), window=(5, 0, 6, 10))


def test_threads_preprocess_independently():
    """Intermediates live in per-thread scratch buffers: concurrent calls must not see each other's."""
    images = [_image(60 + 7 * i, 90 - 5 * i, 3, np.uint8, seed=i) for i in range(4)]
    want = [[pp.preprocess(im, pl, 40) for pl in pp.PIPELINES] for im in images]
    got = [None] * 4

    def work(i):
        got[i] = [[pp.preprocess(images[i], pl, 40) for pl in pp.PIPELINES] for _ in range(20)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for rep in got[i]:
            for a, b in zip(rep, want[i]):
                np.testing.assert_array_equal(a, b)


def test_load_image_reads_paths_bytes_and_arrays_alike(tmp_path):
    Image.fromarray(photos()[1]).save(tmp_path / "f.jpg", quality=90)
    decoded = np.asarray(Image.open(tmp_path / "f.jpg"))
    for pipeline in pp.PIPELINES:
        want = pp.preprocess(decoded, pipeline, 64)
        for payload in (tmp_path / "f.jpg", str(tmp_path / "f.jpg"), (tmp_path / "f.jpg").read_bytes(), decoded):
            np.testing.assert_array_equal(pp.load_image(payload, pipeline, 64), want)


# ---- TensorFlow itself as the oracle (child interpreter; slow: TF takes seconds to import) --------

_TF_ORACLE = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf
data, sizes = np.load(sys.argv[1]), json.load(open(sys.argv[2]))
out = {}
for key in data.files:
    img = data[key]
    for oh, ow in sizes[key]:
        out[f"{key}/bilinear/{oh}x{ow}"] = tf.image.resize(img, [oh, ow]).numpy()
        out[f"{key}/area/{oh}x{ow}"] = tf.image.resize(img, [oh, ow], method="area").numpy()
    if img.shape[-1] != 3:
        continue
    # big_vision, pp/ops_image.py + ops_general.py: resize_small(256) | central_crop(224) | value_range(-1, 1)
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    factor = tf.cast(256, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    nh = tf.cast(tf.round(tf.cast(h, tf.float32) * factor), tf.int32)
    nw = tf.cast(tf.round(tf.cast(w, tf.float32) * factor), tf.int32)
    small = tf.cast(tf.image.resize(img, (nh, nw), method="area"), tf.uint8)
    dy, dx = (tf.shape(small)[0] - 224) // 2, (tf.shape(small)[1] - 224) // 2
    crop = tf.image.crop_to_bounding_box(small, dy, dx, 224, 224)
    out[f"{key}/big_vision_uint8"] = crop.numpy()
    out[f"{key}/big_vision"] = (-1 + (tf.cast(crop, tf.float32) - 0.0) / (255.0 - 0.0) * 2).numpy()
    # vit_jax, input_pipeline.py (eval): tf.image.resize to the model size, then (x - 127.5) / 127.5
    out[f"{key}/vit_jax"] = ((tf.image.resize(img, [224, 224]) - 127.5) / 127.5).numpy()
np.savez(sys.argv[3], **out)
"""


def _oracle_inputs() -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Random images of random sizes (up and down, odd, 1-pixel), scikit-learn's two photos
    (427x640 as shipped, and re-encoded at 500x375 as ImageNet's typical size) and its digits."""
    import io

    images, sizes = {}, {}
    for i, (src, dst) in enumerate(SIZES + [(s[:2], d) for s, d in _random_cases(30, 700, 400, seed=2)]):
        images[f"img{i}"], sizes[f"img{i}"] = _image(*src[:2], 3 if len(src) < 3 else src[2], np.uint8, seed=i), [dst]
    for j, photo in enumerate(photos()):
        buf = io.BytesIO()
        Image.fromarray(photo).resize((500, 375), Image.BICUBIC).save(buf, "JPEG", quality=90)
        images[f"photo{j}"], sizes[f"photo{j}"] = photo, [(224, 224), (256, 384), (300, 451)]
        images[f"photo{j}_500"] = np.asarray(Image.open(buf).convert("RGB"))
        sizes[f"photo{j}_500"] = [(224, 224), (256, 341), (37, 600)]
    for j, digit in enumerate(digit_images()[:5]):
        images[f"digit{j}"], sizes[f"digit{j}"] = digit, [(224, 224), (16, 16), (5, 3)]
    return images, sizes


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow (test oracle) not installed")
def test_resizes_and_pipelines_equal_tensorflow(tmp_path):
    import json

    from mixer_convert import kernels

    kernels.wait()  # with numba installed, pp.preprocess below runs the compiled kernels
    images, sizes = _oracle_inputs()
    np.savez(tmp_path / "in.npz", **images)
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    r = subprocess.run([sys.executable, "-c", _TF_ORACLE, str(tmp_path / "in.npz"), str(tmp_path / "sizes.json"),
                        str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(tmp_path / "out.npz") as tf_out:
        for key, img in images.items():
            for oh, ow in sizes[key]:
                # bit-identical: the same float32 arithmetic in the same order
                np.testing.assert_array_equal(pp.resize_bilinear(img, (oh, ow)), tf_out[f"{key}/bilinear/{oh}x{ow}"])
                np.testing.assert_array_equal(pp.resize_area(img, (oh, ow)), tf_out[f"{key}/area/{oh}x{ow}"])
            if img.shape[-1] == 3:
                for pipeline in pp.PIPELINES:
                    np.testing.assert_array_equal(pp.preprocess(img, pipeline, 224), tf_out[f"{key}/{pipeline}"])
                    with numpy_path_only():  # with numba installed the line above ran the compiled kernels
                        np.testing.assert_array_equal(pp.preprocess(img, pipeline, 224), tf_out[f"{key}/{pipeline}"])
                small = pp.resize_small(img, 256)  # and no truncation flipped: the uint8 crop is tf's
                np.testing.assert_array_equal(pp.central_crop(small, 224), tf_out[f"{key}/big_vision_uint8"])
