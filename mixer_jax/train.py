"""Flax training and fine-tuning: one code path from a laptop CPU to multi-host GPU/TPU.

Thin ``main`` (mixer_jax.cli) over testable pieces: ``make_optimizer``,
``create_train_state``, ``train_step``, ``eval_step``, ``train_and_evaluate``.
Data parallelism uses ``jax.sharding``: a 1-D ``Mesh`` over every device of every process,
batches sharded along it, parameters replicated; XLA inserts the gradient all-reduce.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixer_convert.spec import MixerConfig
from mixer_jax.configs import OptimConfig, TrainConfig, validate
from mixer_jax.data import make_source, save_class_names
from mixer_jax.input_pipeline import eval_iterator, make_train_iterator, normalize
from mixer_jax.model import MlpMixer, params_from_flat


# ---- optimizer ----------------------------------------------------------------------------------


def make_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(total_steps, warmup + 1), 0.0)
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup),
                                 optax.linear_schedule(o.lr, 0.0, max(total_steps - warmup, 1))], [warmup])


def _kernel_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def make_optimizer(o: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    sched = make_schedule(o, total_steps)
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    if o.name == "adam":
        parts.append(optax.scale_by_adam(o.b1, o.b2))
    elif o.momentum:
        parts.append(optax.trace(decay=o.momentum))
    if o.weight_decay:
        # Decoupled: added after the adaptive scaling, so it is multiplied by the schedule below.
        parts.append(optax.add_decayed_weights(o.weight_decay, mask=_kernel_mask))
    parts.append(optax.scale_by_learning_rate(sched))
    return optax.chain(*parts), sched


# ---- state and steps ---------------------------------------------------------------------------


TrainState = train_state.TrainState


def create_train_state(model: MlpMixer, tx: optax.GradientTransformation, rng: jax.Array,
                       params: Any | None = None) -> TrainState:
    if params is None:
        cfg = model.config
        params = model.init(rng, jnp.zeros((1, *cfg.image_size, cfg.in_chans), jnp.float32))["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def _loss(params, model, images, labels, rng, num_classes, label_smoothing, mixup_alpha):
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    mix_rng, drop_rng = jax.random.split(rng)
    if mixup_alpha:
        lam = jax.random.beta(mix_rng, mixup_alpha, mixup_alpha)
        images = lam * images + (1 - lam) * images[::-1]
        targets = lam * targets + (1 - lam) * targets[::-1]
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": drop_rng})
    loss = cross_entropy(logits, targets).mean()
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return loss, correct


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, rng: jax.Array, *, model: MlpMixer,
               num_classes: int, label_smoothing: float = 0.0, mixup_alpha: float = 0.0,
               schedule: Callable | None = None) -> tuple[TrainState, dict]:
    """One optimizer step over ``images`` of shape (accum, micro_batch, H, W, C): gradients
    of the micro-batches are averaged (lax.scan, so memory is one micro-batch's). uint8 images
    (the input pipeline's) are normalised here, on the device."""
    images = normalize(images)
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    rng = jax.random.fold_in(rng, state.step)

    def micro(carry, xs):
        grads, loss, correct = carry
        i, x, y = xs
        (l, c), g = grad_fn(state.params, model, x, y, jax.random.fold_in(rng, i), num_classes,
                            label_smoothing, mixup_alpha)
        return (jax.tree_util.tree_map(jnp.add, grads, g), loss + l, correct + c), None

    accum = images.shape[0]
    if accum == 1:  # XLA optimises a loop body much less well: 3-4x slower on CPU even for one trip
        (loss, correct), grads = grad_fn(state.params, model, images[0], labels[0], jax.random.fold_in(rng, 0),
                                         num_classes, label_smoothing, mixup_alpha)
    else:
        # A rolled loop: ~3x slower per micro-batch on CPU, but memory stays one micro-batch's
        # (measured B/16, micro-batch 8: 1.25 GB temp for accum 2..8; unrolled it grows to 10 GB at 8).
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        (grads, loss, correct), _ = jax.lax.scan(micro, (zeros, 0.0, 0), (jnp.arange(accum), images, labels))
        grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
    metrics = {"loss": loss / accum, "accuracy": correct / labels.size, "grad_norm": optax.tree.norm(grads)}
    if schedule is not None:
        metrics["lr"] = schedule(state.step)
    return state.apply_gradients(grads=grads), metrics


def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array, *,
              model: MlpMixer) -> dict:
    logits = model.apply({"params": state.params}, normalize(images))
    loss = cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {"correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "correct5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
            "loss_sum": jnp.sum(loss * mask), "count": jnp.sum(mask)}


# ---- the loop ---------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    pass


def _global_array(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local)


def to_host(tree):
    """Replicated device arrays -> numpy; works when other processes hold other devices."""
    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)
    return jax.tree_util.tree_map(get, tree)


def load_init_params(cfg: TrainConfig, num_classes: int) -> tuple[dict, MixerConfig]:
    """Weights and architecture from any checkpoint the bridge reads, with a fresh zero head
    for ``num_classes`` and token-mixing resized by ``resize_scale``. The checkpoint fixes the
    architecture; ``cfg.model`` contributes only its regularisation (stoch_depth, dropout_rate)."""
    from mixer_convert.load import load_checkpoint

    flat, ck = load_checkpoint(cfg.init_from, num_classes, cfg.resize_scale)
    image_size = MixerConfig(patch_size=ck.patch_size, image_size=cfg.data.image_size).image_size
    if ck.image_size != image_size:
        raise ValueError(f"checkpoint {cfg.init_from} is for {ck.image_size} images (after resize_scale "
                         f"{cfg.resize_scale}); data.image_size is {image_size}")
    model_cfg = ck.replace(stoch_depth=cfg.model.stoch_depth, dropout_rate=cfg.model.dropout_rate)
    return params_from_flat(flat, model_cfg), model_cfg


def train_and_evaluate(cfg: TrainConfig, workdir: str | os.PathLike, *, progress: bool = True,
                       on_step: Callable[[int], None] | None = None) -> dict:
    """Train, evaluate, checkpoint and (optionally) export. Resumes from the newest checkpoint
    in ``workdir``. ``on_step(step)`` is called after every optimizer step (after any
    checkpoint of that step is written)."""
    import orbax.checkpoint as ocp

    workdir = Path(workdir).absolute()
    devices = jax.devices()
    validate(cfg, len(devices), jax.process_count())
    train_src = make_source(cfg.data, cfg.data.train_split)
    eval_src = make_source(cfg.data, cfg.data.eval_split)
    init_params = None
    if cfg.init_from:
        init_params, model_cfg = load_init_params(cfg, train_src.num_classes)
    else:
        model_cfg = cfg.model.replace(num_classes=train_src.num_classes, image_size=cfg.data.image_size)
    model = MlpMixer(model_cfg, dtype=jnp.dtype(cfg.compute_dtype))
    is_main = jax.process_index() == 0

    mesh = Mesh(np.asarray(devices), ("data",))
    repl = NamedSharding(mesh, P())
    batch_sh = NamedSharding(mesh, P(None, "data"))  # (accum, micro, ...) split on micro
    eval_sh = NamedSharding(mesh, P("data"))

    tx, sched = make_optimizer(cfg.optim, cfg.steps)
    rng = jax.random.PRNGKey(cfg.seed)
    state = jax.jit(partial(create_train_state, model, tx), out_shardings=repl)(rng, init_params)

    ckpt_dir = workdir / "checkpoints"
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints, create=cfg.steps > 0, enable_async_checkpointing=False))
    start = 0
    if mngr.latest_step() is not None:
        start = mngr.latest_step()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
        restored = mngr.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                               meta=ocp.args.JsonRestore()))
        state = restored["state"]
        if is_main:
            print(f"resumed from step {start} ({ckpt_dir}); data position {restored['meta']['data_position']}")

    step_fn = jax.jit(partial(train_step, model=model, num_classes=model_cfg.num_classes,
                              label_smoothing=cfg.label_smoothing, mixup_alpha=cfg.mixup_alpha, schedule=sched),
                      in_shardings=(repl, batch_sh, batch_sh, repl), out_shardings=(repl, repl),
                      donate_argnums=(0,))
    eval_fn = jax.jit(partial(eval_step, model=model), in_shardings=(repl, eval_sh, eval_sh, eval_sh),
                      out_shardings=repl)
    micro = cfg.batch_size // cfg.accum_steps // jax.process_count()
    param_norm = jax.jit(optax.tree.norm, out_shardings=repl)
    eval_bs = cfg.eval_batch_size or cfg.batch_size // cfg.accum_steps

    def evaluate() -> dict:
        tot = {"correct": 0, "correct5": 0, "loss_sum": 0.0, "count": 0}
        for x, y, m in eval_iterator(cfg.data, eval_src, eval_bs, jax.process_index(), jax.process_count()):
            out = eval_fn(state, *(_global_array(a, eval_sh) for a in (x, y, m)))
            for k in tot:
                tot[k] += float(out[k])
        n = max(tot["count"], 1)
        return {"eval_accuracy": tot["correct"] / n, "eval_top5": tot["correct5"] / n, "eval_loss": tot["loss_sum"] / n}

    if cfg.steps == 0:  # evaluate only: init_from, or the workdir's latest checkpoint
        if start == 0 and not cfg.init_from:
            mngr.close()
            raise ValueError(f"steps=0 evaluates init_from or the latest checkpoint in {ckpt_dir}; there is neither")
        try:
            result = evaluate()
        finally:
            mngr.close()
        return {**result, "step": start, "history": [], "params": to_host(state.params), "model_config": model_cfg}

    # Batch `step` is a pure function of (seed, step): workers prepare the next ones while this one runs.
    train_batches = make_train_iterator(cfg, train_src, start, jax.process_index(), jax.process_count())

    metrics_path = workdir / "metrics.jsonl"
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        save_class_names(train_src, workdir)
    if is_main and metrics_path.exists():  # a killed run logged steps past its last checkpoint: drop them
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    log = open(metrics_path, "a") if is_main else None
    pending: list[tuple[int, dict]] = []
    last_good = start
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    t_last, n_last = time.perf_counter(), 0
    history: list[dict] = []

    def flush() -> None:
        # Pull the pending per-step metrics; a non-finite loss stops before anything is saved.
        nonlocal t_last, n_last
        if not pending:
            return
        host = to_host([m for _, m in pending])
        now = time.perf_counter()
        ips = n_last * cfg.batch_size / max(now - t_last, 1e-9)
        for (step, _), m in zip(pending, host):
            rec = {"step": step, **{k: float(v) for k, v in m.items()}, "img_per_s": ips}
            if not math.isfinite(rec["loss"]):
                raise NonFiniteLossError(
                    f"loss is {rec['loss']} at step {step}; stopping. The last good checkpoint is step {last_good} "
                    f"in {ckpt_dir} (lower optim.lr, raise warmup, or check the data)")
            history.append(rec)
            if log:
                log.write(json.dumps(rec) + "\n")
        if log:
            log.flush()
        last = history[-1]
        if bar is not None:
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.3f}", lr=f"{last['lr']:.2e}",
                            img_s=f"{ips:.0f}")
        elif is_main:
            print(f"step {last['step']}: loss {last['loss']:.4f} accuracy {last['accuracy']:.3f} "
                  f"lr {last['lr']:.2e} {ips:.0f} img/s", flush=True)
        pending.clear()
        t_last, n_last = now, 0

    def save(step: int) -> None:
        nonlocal last_good
        # A finite loss at this step does not make the updated params finite; check them too.
        if not math.isfinite(float(to_host(param_norm(state.params)))):
            raise NonFiniteLossError(f"parameters became NaN/Inf at step {step}; stopping. The last good "
                                     f"checkpoint is step {last_good} in {ckpt_dir}")
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"step": step, "data_position": train_batches.position(step),
                                    "config": _jsonable(cfg)})))
        mngr.wait_until_finished()
        last_good = step

    result: dict = {}
    try:
        for step in range(start, cfg.steps):
            x, y = next(train_batches)
            x = x.reshape(cfg.accum_steps, micro, *x.shape[1:])
            y = y.reshape(cfg.accum_steps, micro)
            state, m = step_fn(state, _global_array(x, batch_sh), _global_array(y, batch_sh), rng)
            pending.append((step + 1, m))
            n_last += 1
            done = step + 1
            if bar is not None:
                bar.update(1)
            boundary = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps
            if done % cfg.log_every == 0 or boundary:
                flush()
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                ev = evaluate()
                if log:
                    log.write(json.dumps({"step": done, **ev}) + "\n")
                if is_main:
                    (bar.write if bar is not None else print)(
                        f"step {done}: eval accuracy {ev['eval_accuracy']:.4f} loss {ev['eval_loss']:.4f}")
            if boundary:
                save(done)
            if on_step is not None:
                on_step(done)
        flush()
        result = evaluate()
        if log:
            log.write(json.dumps({"step": cfg.steps, **result}) + "\n")
        if mngr.latest_step() != cfg.steps:
            save(cfg.steps)
    finally:
        train_batches.close()
        if bar is not None:
            bar.close()
        if log:
            log.close()
        mngr.close()

    result["step"] = int(to_host(state.step))
    result["history"] = history
    if is_main:
        write_outputs(state.params, model_cfg, workdir, cfg.export_torch)
        plot_metrics(metrics_path, workdir / "metrics.png")
    result["params"] = to_host(state.params)
    result["model_config"] = model_cfg
    return result


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(v) for v in obj]
    return obj


def write_outputs(params, model_cfg: MixerConfig, workdir: Path, export_torch: bool) -> None:
    """Final weights as an official-layout .npz (loads anywhere the official files do) and,
    on request, as a PyTorch state dict."""
    from mixer_convert.io import write_params
    from mixer_jax.model import params_to_flat

    flat = params_to_flat(to_host(params))
    write_params(flat, workdir / "model.npz", fmt="npz", force=True)
    (workdir / "model_config.json").write_text(json.dumps(_jsonable(model_cfg), indent=1))
    if export_torch:
        write_params(flat, workdir / "model.pt", fmt="torch", force=True)


def plot_metrics(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    axes[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    axes[0].set_title("loss")
    axes[1].plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train (batch)")
    axes[1].plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="eval")
    axes[1].set_title("accuracy")
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
