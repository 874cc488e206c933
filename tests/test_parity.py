"""Flax and PyTorch compute the same function: every variant, every block, fp32 and bf16.

Runs on whatever device each framework finds (CPU here; GPU/TPU when present). fp32
matmuls run at full precision on accelerators (no TF32), see mixer_convert.tools.parity.
"""
import numpy as np
import pytest

from conftest import images, requires_jax, requires_torch
from mixer_convert import VARIANTS, config_for, random_params
from mixer_convert.tools.parity import (BF16_REL, FP32_LOGITS_MAX_ABS, FP32_REL, compare, first_divergence, flax_forward,
                            format_table, torch_forward)

pytestmark = [requires_jax, requires_torch]

# S and B at the full 224; L and H on a 4x4 patch grid (full width, 24/32 blocks; only the
# token-mixing weights shrink), so the CPU run stays short.
FULL = {"S/32", "S/16", "S/8", "B/32", "B/16"}


def _cfg(variant):
    if variant in FULL:
        return config_for(variant)
    patch = config_for(variant).patch_size[0]
    return config_for(variant, image_size=4 * patch)


def _assert_fp32_parity(cfg, a, b):
    rows = compare(a, b, cfg)
    print(format_table(rows))
    bad = first_divergence(rows, FP32_REL)
    assert bad is None, f"first divergence at {bad.name} (rel {bad.rel:.2e})\n{format_table(rows)}"
    assert rows[-1].max_abs <= FP32_LOGITS_MAX_ABS


# S/32 runs in the fast tier; the others (seconds to a minute each on a CPU) are slow.
@pytest.mark.parametrize("variant", [v if v == "S/32" else pytest.param(v, marks=pytest.mark.slow)
                                     for v in VARIANTS])
def test_fp32_forward_parity_for_every_variant(variant):
    cfg = _cfg(variant)
    flat = random_params(cfg, seed=VARIANTS.index(variant))
    batch = 2 if variant in FULL else 1
    x = images(batch, *cfg.image_size)
    _assert_fp32_parity(cfg, flax_forward(cfg, flat, x), torch_forward(cfg, flat, x))


@pytest.mark.slow
@pytest.mark.parametrize("variant, size, num_classes, batch, seed", [
    ("S/16", (160, 224), None, 3, 3),  # non-square images, no head
    ("S/32", (224, 224), 21843, 1, 4),  # a batch of one, the 21k head
], ids=["non-square-without-head", "batch-of-one-21k-head"])
def test_fp32_parity_on_non_square_images_a_batch_of_one_and_any_head(variant, size, num_classes, batch, seed):
    cfg = config_for(variant, image_size=size, num_classes=num_classes)
    flat = random_params(cfg, seed=seed)
    x = images(batch, *size)
    _assert_fp32_parity(cfg, flax_forward(cfg, flat, x), torch_forward(cfg, flat, x))


@pytest.mark.slow
def test_batch_elements_are_independent():
    cfg = config_for("S/32", image_size=128)
    flat = random_params(cfg, seed=5)
    x = images(4, 128, 128)
    for fwd in (flax_forward, torch_forward):
        whole = fwd(cfg, flat, x)["logits"]
        alone = fwd(cfg, flat, x[2:3])["logits"]
        np.testing.assert_allclose(whole[2:3], alone, atol=1e-5)


@pytest.mark.slow  # bf16 runs in the fast tier through test_nnx.py's bit-identity with Linen
@pytest.mark.parametrize("variant", ["S/32", "B/16"])
def test_bf16_parity_within_the_documented_tolerance(variant):
    cfg = config_for(variant)
    flat = random_params(cfg, seed=6)
    x = images(2, 224, 224)
    ref = flax_forward(cfg, flat, x)
    jb, tb = flax_forward(cfg, flat, x, "bfloat16"), torch_forward(cfg, flat, x, "bfloat16")
    for name, (a, b) in {"flax vs torch": (jb, tb), "flax bf16 vs fp32": (ref, jb),
                         "torch bf16 vs fp32": (ref, tb)}.items():
        rows = compare(a, b, cfg)
        bad = first_divergence(rows, BF16_REL)
        assert bad is None, f"{name}: first divergence at {bad.name}\n{format_table(rows)}"
    # bf16 really ran: it must differ from fp32 (a silent fp32 fallback would pass the above).
    assert compare(ref, tb, cfg)[-1].max_abs > 1e-4 and compare(ref, jb, cfg)[-1].max_abs > 1e-4


def test_a_changed_block_is_named_as_the_first_divergence():
    cfg = config_for("S/32", image_size=128)
    flat = random_params(cfg, seed=7)
    x = images(2, 128, 128)
    broken = dict(flat)
    broken["MixerBlock_5/channel_mixing/Dense_1/bias"] = flat["MixerBlock_5/channel_mixing/Dense_1/bias"] + 1e-2
    rows = compare(flax_forward(cfg, flat, x), torch_forward(cfg, broken, x), cfg)
    assert first_divergence(rows, FP32_REL).name == "MixerBlock_5"


def test_tanh_gelu_matters_at_the_tolerance():
    """The official model uses tanh GELU; exact GELU (timm's) would fail our fp32 bound."""
    import torch.nn.functional as F

    import mixer_torch.model as tm

    cfg = config_for("S/32", image_size=128)
    flat = random_params(cfg, seed=8)
    x = images(2, 128, 128)
    ref = flax_forward(cfg, flat, x)
    orig = tm.MlpBlock.forward
    tm.MlpBlock.forward = lambda self, y: self.Dense_1(F.gelu(self.Dense_0(y)))
    try:
        exact = torch_forward(cfg, flat, x)
    finally:
        tm.MlpBlock.forward = orig
    assert first_divergence(compare(ref, exact, cfg), FP32_REL) is not None
