"""A training config small enough for many short runs in the test suite, and bad values for it."""
import dataclasses

from mixer_jax.configs import ModelConfig, digits


def tiny_digits():
    cfg = digits()
    return dataclasses.replace(
        cfg, model=ModelConfig(variant=None, patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16,
                               channels_mlp_dim=64),
        # two input workers (threads), as a real run has several; the reference run uses 0 (in-process)
        data=dataclasses.replace(cfg.data, image_size=16, workers=2),
        # SGD, not Adam: Adam's normalisation turns reduction-order noise on near-zero gradients
        # into full-size steps, which would blur the device-count and process-count comparisons.
        optim=dataclasses.replace(cfg.optim, name="sgd", lr=0.05, warmup_steps=2), batch_size=32, steps=8, eval_every=0,
        log_every=2, checkpoint_every=4, eval_batch_size=64)


# (--set assignment, what the error says): every one is refused by validation, naming key and range.
BAD_VALUES = [
    ("log_every=0", "log_every must be an integer >= 1"),
    ("eval_batch_size=-1", "eval_batch_size must be an integer >= 0"),
    ("keep_checkpoints=0", "keep_checkpoints must be an integer >= 1"),
    ("eval_every=-1", "eval_every must be an integer >= 0"),
    ("checkpoint_every=-5", "checkpoint_every must be an integer >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be an integer >= 0"),
    ("optim.b2=2", "optim.b2 must be a number in [0, 1)"),
    ("optim.momentum=nan", "optim.momentum must be a number in [0, 1)"),
    ("optim.grad_clip=nan", "optim.grad_clip must be a finite number >= 0"),
    ("optim.lr=nan", "optim.lr must be a finite number > 0"),
    ("optim.lr=-1", "optim.lr must be a finite number > 0"),
    ("mixup_alpha=nan", "mixup_alpha must be a finite number >= 0"),
    ("data.crop_area=nan", "data.crop_area must be two numbers lo,hi with 0 < lo <= hi <= 1"),
    ("data.crop_area=0,0", "data.crop_area must be two numbers"),
    ("data.crop_area=0.9,0.2", "data.crop_area must be two numbers"),
    ("seed=-1", "seed must be an integer >= 0"),
    ("label_smoothing=1", "label_smoothing must be a number in [0, 1)"),
    ("optim.name=lamb", "optim.name must be 'sgd' or 'adam'"),
    ("data.train_augment=rotate", "data.train_augment must be"),
    ("model.stoch_depth=1", "model.stoch_depth must be a number in [0, 1)"),
    ("model.dropout_rate=-0.1", "model.dropout_rate must be a number in [0, 1)"),
    ("model.compute_dtype=float16", "model.compute_dtype must be 'float32' or 'bfloat16'"),
    ("model.hidden_dim=0", "model.hidden_dim must be an integer >= 1"),
    ("model.api=torch", "model.api must be 'linen' or 'nnx'"),
    ("model.remat=some", "model.remat must be 'none', 'block' or a jax.checkpoint_policies name"),
    ("model.scan=null", "model.scan must be true or false"),
    ("mesh.fsdp=0", "mesh.fsdp must be an integer >= 1, or -1"),
    ("mesh.data=-2", "mesh.data must be an integer >= 1, or -1"),
    ("mesh.fsdp_min_mib=-1", "mesh.fsdp_min_mib must be a finite number >= 0"),
    ("data.num_classes=-1", "data.num_classes must be an integer >= 0"),
]
