"""A training config small enough for many short runs in the test suite."""
import dataclasses

from mixer_convert.spec import MixerConfig
from mixer_jax.configs import digits


def tiny_digits():
    cfg = digits()
    return dataclasses.replace(
        cfg, model=MixerConfig(patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64),
        # two input workers (threads), as a real run has several; the reference run uses 0 (in-process)
        data=dataclasses.replace(cfg.data, image_size=16, workers=2),
        # SGD, not Adam: Adam's normalisation turns reduction-order noise on near-zero gradients
        # into full-size steps, which would blur the device-count and process-count comparisons.
        optim=dataclasses.replace(cfg.optim, name="sgd", lr=0.05, warmup_steps=2), batch_size=32, steps=8, eval_every=0,
        log_every=2, checkpoint_every=4, eval_batch_size=64)
