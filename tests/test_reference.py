"""The float64 numpy reference (mixer_convert.reference): its exact-GELU option, which the timm
folder's model card uses to measure timm's function, is accurate."""
import math

import numpy as np

from mixer_convert import config_for, random_params
from mixer_convert.reference import erfc, forward, gelu_erf


def test_erfc_is_accurate_to_a_relative_1_2e_7_everywhere():
    x = np.linspace(-9, 9, 36001)
    want = np.array([math.erfc(v) for v in x])
    assert np.max(np.abs(erfc(x) - want) / want) < 1.2e-7


def test_exact_gelu_matches_math_erf():
    x = np.linspace(-10, 10, 20001)
    want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    assert np.max(np.abs(gelu_erf(x) - want)) < 1e-7


def test_forward_computes_the_requested_gelu():
    cfg = config_for("S/16", image_size=32, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32,
                     num_classes=4)
    flat = random_params(cfg, 0)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3))
    tanh, erf = forward(flat, cfg, x), forward(flat, cfg, x, gelu="erf")
    assert 0 < np.abs(tanh - erf).max() < 1e-2  # close functions, not the same one
