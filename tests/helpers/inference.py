"""What the mixer-predict and mixer-eval tests share: a small Mixer with an ImageNet-1k head, the
frameworks installed here, and the float64 reference's answers on image files."""
from __future__ import annotations

import numpy as np

from conftest import has_module
from mixer_convert import config_for
from mixer_convert.preprocess import load_image
from mixer_convert.reference import forward

INSTALLED = [fw for fw, mod in (("torch", "torch"), ("flax", "flax")) if has_module(mod)]

# A small non-standard Mixer with an ImageNet-1k head (random weights, random head).
TINY_1K = config_for("S/16", image_size=32, patch_size=8, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16,
                     channels_mlp_dim=64, num_classes=1000)


def reference_top1(flat, cfg, paths, pipeline) -> np.ndarray:
    x = np.stack([load_image(p, pipeline, cfg.image_size) for p in paths])
    return forward(flat, cfg, x).argmax(-1)
