"""A narrow, shallow Mixer on a non-square 64x96 image, cheap to build in either framework."""
from __future__ import annotations

from mixer_convert import MixerConfig, config_for

# Narrow and shallow so that building a model is cheap; the full variants are built in the slow tests.
SMALL = dict(variant="S/32", image_size=(64, 96), num_classes=7, hidden_dim=64, num_blocks=2, tokens_mlp_dim=32,
             channels_mlp_dim=128)


def small_cfg(**kw) -> MixerConfig:
    args = dict(SMALL, **kw)
    return config_for(args.pop("variant"), **args)
