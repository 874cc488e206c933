"""Flax training and fine-tuning: one code path from a laptop CPU to multi-host GPU/TPU.

Thin ``main`` (mixer_jax.cli) over testable pieces: ``make_optimizer``, ``create_train_state``,
``train_step``, ``eval_step``, ``model_for`` and ``train_and_evaluate``; checkpoints and their
fallback live in ``mixer_jax.checkpointing``, the metrics log and NaN guard in ``mixer_jax.metrics``.
Data parallelism uses ``jax.sharding``: a 1-D ``Mesh`` over every device of every process,
batches sharded along it, parameters replicated; XLA inserts the gradient all-reduce.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
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

from mixer_convert.datasets import save_class_names
from mixer_convert.spec import MixerConfig
from mixer_jax.checkpointing import Checkpointer, check_resume_config, jsonable, to_host
from mixer_jax.configs import OptimConfig, TrainConfig, expand_paths, validate
from mixer_jax.input_pipeline import eval_iterator, make_source, make_train_iterator, normalize
from mixer_jax.metrics import MetricsLog, NonFiniteLossError, check_finite, last_good_text, plot_metrics
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


# ---- model and initial weights ------------------------------------------------------------------


def load_init_params(cfg: TrainConfig, num_classes: int) -> tuple[dict, MixerConfig]:
    """Weights and architecture from ``init_from`` (any checkpoint the bridge reads) through the
    one loading path, token-mixing resized by ``resize_scale``. The head: kept when the checkpoint's
    head already has ``num_classes`` outputs (e.g. continuing an ImageNet-1k model on ImageNet-1k),
    otherwise replaced by the official fresh head (zeros). The checkpoint fixes the architecture;
    ``cfg.model`` contributes only its regularisation (stoch_depth, dropout_rate)."""
    from mixer_convert.load import load_checkpoint

    flat, ck = load_checkpoint(cfg.init_from, num_classes, cfg.resize_scale)
    image_size = MixerConfig(patch_size=ck.patch_size, image_size=cfg.data.image_size).image_size
    if ck.image_size != image_size:
        raise ValueError(f"checkpoint {cfg.init_from} is for {ck.image_size} images (after resize_scale "
                         f"{cfg.resize_scale}); data.image_size is {image_size}")
    model_cfg = ck.replace(stoch_depth=cfg.model.stoch_depth, dropout_rate=cfg.model.dropout_rate)
    return params_from_flat(flat, model_cfg), model_cfg


def model_for(cfg: TrainConfig, num_classes: int) -> tuple[MixerConfig, dict | None]:
    """The architecture to train and its initial weights (None: fresh init). The data decides
    num_classes and image_size; init_from decides everything else but regularisation."""
    if cfg.init_from:
        params, model_cfg = load_init_params(cfg, num_classes)
        return model_cfg, params
    return cfg.model.replace(num_classes=num_classes, image_size=cfg.data.image_size), None


# ---- the loop -------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    step: int  # the step the run stopped at (cfg.steps unless interrupted)
    model_config: MixerConfig
    params: Any  # final parameters, host numpy
    history: list[dict]  # training records of this process's run, in step order
    eval: dict[str, float]  # final eval metrics (eval_accuracy, eval_loss); empty if interrupted
    interrupted: bool = False  # stopped by SIGINT/SIGTERM after saving a checkpoint


def _global_array(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local)


@contextlib.contextmanager
def stop_requests():
    """SIGINT/SIGTERM during training set a flag (the loop saves and stops at the next step
    boundary) instead of raising inside a step; a second Ctrl-C interrupts at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.set()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _agreed(flag: bool) -> bool:
    """A stop request seen by any process stops every process at the same step (otherwise the
    others would wait forever in the next step's collectives)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


class _Console:
    """Progress for people: a tqdm bar, or one line per log when there is none (main process only)."""

    def __init__(self, want_bar: bool, enabled: bool) -> None:
        self.want_bar, self.enabled, self.bar = want_bar, enabled, None

    def start_bar(self, total: int, initial: int) -> None:
        if self.want_bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def print(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def metrics(self, rec: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}", lr=f"{rec['lr']:.2e}",
                                 img_s=f"{rec['img_per_s']:.0f}")
        elif self.enabled:
            print(f"step {rec['step']}: loss {rec['loss']:.4f} accuracy {rec['accuracy']:.3f} "
                  f"lr {rec['lr']:.2e} {rec['img_per_s']:.0f} img/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_and_evaluate(cfg: TrainConfig, workdir: str | os.PathLike, *, progress: bool = True,
                       on_step: Callable[[int], None] | None = None,
                       allow_config_change: bool = False) -> TrainResult:
    """Train, evaluate, checkpoint and (optionally) export. Resumes from the newest intact
    checkpoint in ``workdir`` (refusing a config that changes the run's meaning unless
    ``allow_config_change``). ``on_step(step)`` is called after every optimizer step (after any
    checkpoint of that step is written). SIGINT/SIGTERM save a checkpoint and return early
    with ``interrupted=True``."""
    cfg = expand_paths(cfg)
    workdir = Path(workdir).expanduser().absolute()
    devices = jax.devices()
    validate(cfg, len(devices), jax.process_count())
    train_src = make_source(cfg.data, cfg.data.train_split)
    eval_src = make_source(cfg.data, cfg.data.eval_split)
    model_cfg, init_params = model_for(cfg, train_src.num_classes)
    model = MlpMixer(model_cfg, dtype=jnp.dtype(cfg.compute_dtype))
    is_main = jax.process_index() == 0
    console = _Console(is_main and progress, is_main)

    mesh = Mesh(np.asarray(devices), ("data",))
    repl = NamedSharding(mesh, P())
    batch_sh = NamedSharding(mesh, P(None, "data"))  # (accum, micro, ...) split on micro
    eval_sh = NamedSharding(mesh, P("data"))

    tx, sched = make_optimizer(cfg.optim, cfg.steps)
    rng = jax.random.PRNGKey(cfg.seed)
    state = jax.jit(partial(create_train_state, model, tx), out_shardings=repl)(rng, init_params)

    ckpt = Checkpointer(workdir / "checkpoints", cfg.keep_checkpoints, is_main, report=console.print,
                        create=cfg.steps > 0)  # evaluating (steps=0) leaves the workdir as it was
    start, last_good = 0, None
    try:
        restored = ckpt.restore_latest(jax.tree_util.tree_map(_abstract, state))
    except Exception:
        ckpt.close()
        raise
    if restored is not None:
        start, state, meta = restored
        if cfg.steps > 0:  # evaluating a checkpoint under another config is fine
            check_resume_config(meta.get("config"), jsonable(cfg), start, allow_config_change, report=console.print)
        last_good = start
        console.print(f"resumed from step {start} ({ckpt.dir}); data position {meta['data_position']}")
    console.start_bar(cfg.steps, start)

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
        try:
            if start == 0 and not cfg.init_from:
                raise ValueError(f"steps=0 evaluates init_from or the latest checkpoint in {ckpt.dir}; there is neither")
            result = evaluate()
        finally:
            console.close()
            ckpt.close()
        return TrainResult(step=start, model_config=model_cfg, params=to_host(state.params), history=[], eval=result)

    # Batch `step` is a pure function of (seed, step): workers prepare the next ones while this one runs.
    train_batches = make_train_iterator(cfg, train_src, start, jax.process_index(), jax.process_count())

    def save(step: int) -> None:
        nonlocal last_good
        # A finite loss at this step does not make the updated params finite; check them too.
        if not math.isfinite(float(to_host(param_norm(state.params)))):
            raise NonFiniteLossError(f"parameters became NaN/Inf at step {step}; stopping. "
                                     f"{last_good_text(last_good, ckpt.dir)}")
        ckpt.save(step, state, {"data_position": train_batches.position(step), "config": jsonable(cfg)})
        last_good = step

    log = MetricsLog(workdir / "metrics.jsonl", start, is_main, report=console.print)
    if is_main:
        save_class_names(train_src, workdir)
    pending: list[tuple[int, dict]] = []
    history: list[dict] = []
    clock = [time.perf_counter(), 0]  # time of the last flush, steps since

    def flush() -> None:
        # Pull the pending per-step metrics; a non-finite loss stops before anything is saved.
        if not pending:
            return
        now = time.perf_counter()
        ips = clock[1] * cfg.batch_size / max(now - clock[0], 1e-9)
        records = [{"step": step, **{k: float(v) for k, v in m.items()}, "img_per_s": ips}
                   for (step, _), m in zip(pending, to_host([m for _, m in pending]))]
        pending.clear()
        clock[:] = [now, 0]
        check_finite(records, last_good, ckpt.dir)
        history.extend(records)
        log.write(records)
        console.metrics(records[-1])

    result: dict = {}
    done = start
    try:
        with stop_requests() as stop:
            for step in range(start, cfg.steps):
                x, y = next(train_batches)
                x = x.reshape(cfg.accum_steps, micro, *x.shape[1:])
                y = y.reshape(cfg.accum_steps, micro)
                state, m = step_fn(state, _global_array(x, batch_sh), _global_array(y, batch_sh), rng)
                pending.append((step + 1, m))
                clock[1] += 1
                done = step + 1
                console.step()
                stopping = _agreed(stop.is_set())
                boundary = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps
                evaluating = cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps
                if done % cfg.log_every == 0 or boundary or evaluating or stopping:
                    flush()  # before any eval record, so metrics.jsonl stays in step order
                if evaluating:
                    ev = evaluate()
                    log.write([{"step": done, **ev}])
                    console.print(f"step {done}: eval accuracy {ev['eval_accuracy']:.4f} loss {ev['eval_loss']:.4f}")
                if (boundary or stopping) and ckpt.latest_step() != done:
                    save(done)
                if on_step is not None:
                    on_step(done)
                if stopping and done < cfg.steps:
                    break
            flush()
            if done == cfg.steps:
                result = evaluate()
                log.write([{"step": cfg.steps, **result}])
                if ckpt.latest_step() != cfg.steps:
                    save(cfg.steps)
    finally:
        train_batches.close()
        console.close()
        log.close()
        ckpt.close()

    interrupted = done < cfg.steps
    if is_main and not interrupted:
        write_outputs(state.params, model_cfg, workdir, cfg.export_torch)
        plot_metrics(workdir / "metrics.jsonl", workdir / "metrics.png")
    return TrainResult(step=int(to_host(state.step)), model_config=model_cfg, params=to_host(state.params),
                       history=history, eval=result, interrupted=interrupted)


def _abstract(x):
    import orbax.checkpoint as ocp
    return ocp.utils.to_shape_dtype_struct(x)


def write_outputs(params, model_cfg: MixerConfig, workdir: Path, export_torch: bool) -> None:
    """Final weights as an official-layout .npz (loads anywhere the official files do) and,
    on request, as a PyTorch state dict."""
    from mixer_convert.io import write_params
    from mixer_jax.model import params_to_flat

    flat = params_to_flat(to_host(params))
    write_params(flat, workdir / "model.npz", fmt="npz", force=True)
    (workdir / "model_config.json").write_text(json.dumps(jsonable(model_cfg), indent=1))
    if export_torch:
        write_params(flat, workdir / "model.pt", fmt="torch", force=True)
