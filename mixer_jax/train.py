"""Flax training and fine-tuning: one code path from a laptop CPU to multi-host GPU/TPU.

``train_and_evaluate`` reads as the order of a run: check the config, open the data, decide the
model (``configs.architecture``; ``init_from`` is read, and refused if broken, before anything is
compiled), build the state and the compiled steps, resume from the newest intact checkpoint, run
the loop (``mixer_jax.loop``), write the outputs. The steps are in ``mixer_jax.steps``, the
optimizer in ``mixer_jax.optimizer``, checkpoints in ``mixer_jax.checkpointing``, the metrics'
destinations in ``mixer_jax.metrics``. Parallelism uses ``jax.sharding``: a ``data`` x ``fsdp``
``Mesh`` over every device of every process (``mixer_jax.sharding``), batches split over all of
it, the state replicated along ``data`` and split along ``fsdp`` (``mixer_jax.state``); XLA
inserts the collectives.
"""
from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixer_convert.datasets import save_class_names
from mixer_convert.spec import MixerConfig
from mixer_jax.checkpointing import Checkpointer, check_resume_config, jsonable, to_host
from mixer_jax.configs import TrainConfig, architecture, current_layout, expand_paths, validate
from mixer_jax.input_pipeline import make_source, make_train_iterator
from mixer_jax.loop import Compiled, Loop, Sinks, evaluate, finish, train_loop
from mixer_jax.metrics import Console, MetricsLog, NonFiniteLossError, TensorBoardLog
from mixer_jax.sharding import AXES, BATCH, make_mesh
from mixer_jax.state import Layout, build_state
from mixer_jax.steps import TrainState, eval_step, train_step

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "load_init_params", "model_for", "train_and_evaluate",
           "write_outputs"]

NONFINITE_HINT = "--set init_allow_nonfinite=true trains from them anyway"


@dataclasses.dataclass
class TrainResult:
    step: int  # the step the run stopped at (cfg.steps unless interrupted)
    model_config: MixerConfig
    params: Any  # final parameters, host numpy
    history: list[dict]  # training records of this process's run, in step order
    eval: dict[str, float]  # final eval metrics (eval_accuracy, eval_top5, eval_loss); empty if interrupted
    interrupted: bool = False  # stopped by SIGINT/SIGTERM after saving a checkpoint


# ---- the model and its initial weights -------------------------------------------------------------


def load_init_params(cfg: TrainConfig, num_classes: int) -> tuple[dict, MixerConfig]:
    """Weights and architecture from ``init_from`` (any checkpoint the bridge reads) through the
    one loading path, token-mixing resized by ``resize_scale``; NaN/Inf weights are refused unless
    ``init_allow_nonfinite``. The head: kept when the checkpoint's head already has ``num_classes``
    outputs (e.g. continuing an ImageNet-1k model on ImageNet-1k), otherwise replaced by the
    official fresh head (zeros)."""
    from mixer_convert.load import load_checkpoint
    from mixer_jax.model import params_from_flat

    flat, ck = load_checkpoint(cfg.init_from, num_classes, cfg.resize_scale, allow_nonfinite=cfg.init_allow_nonfinite,
                               nonfinite_hint=NONFINITE_HINT)
    model_cfg = architecture(cfg, num_classes, checkpoint=ck)
    return params_from_flat(flat, model_cfg), model_cfg


def num_classes_of(cfg: TrainConfig, source: Any) -> int:
    """The data's number of classes; ``data.num_classes``, if given, must agree with it."""
    n = source.num_classes
    if cfg.data.num_classes and cfg.data.num_classes != n:
        raise ValueError(f"data.num_classes={cfg.data.num_classes}, but {cfg.data.name} has {n} classes")
    return n


def num_classes_without_data(cfg: TrainConfig) -> int:
    """``data.num_classes``, or the embedded digits' (the only data at hand without reading any)."""
    if cfg.data.num_classes:
        return cfg.data.num_classes
    if cfg.data.name == "digits":
        return make_source(cfg.data, cfg.data.train_split).num_classes
    raise ValueError(f"--compile-only reads no data: give {cfg.data.name}'s number of classes with "
                     "--set data.num_classes=N")


def architecture_of(cfg: TrainConfig, num_classes: int) -> MixerConfig:
    """The architecture to train without reading any weights (what ``--compile-only`` compiles):
    ``init_from``'s — a published name's from the catalogue, nothing downloaded; a file's from its
    header (another hub's name is fetched into the cache first) — resized by ``resize_scale`` as
    loading resizes it, with ``num_classes``."""
    if not cfg.init_from:
        return architecture(cfg, num_classes)
    from mixer_convert.catalogue import lookup
    from mixer_convert.load import open_checkpoint
    from mixer_convert.resize import resized_config
    from mixer_convert.spec import config_for

    entry = None if os.path.exists(cfg.init_from) else lookup(str(cfg.init_from))
    if entry is not None:
        ck = config_for(entry.variant, num_classes=entry.num_classes)
    else:
        params, ck = open_checkpoint(cfg.init_from)
        params.close()
    return architecture(cfg, num_classes,
                        checkpoint=resized_config(ck, cfg.resize_scale).replace(num_classes=num_classes))


def model_for(cfg: TrainConfig, num_classes: int) -> tuple[MixerConfig, dict | None]:
    """The architecture to train and its initial weights (None: fresh init)."""
    if cfg.init_from:
        params, model_cfg = load_init_params(cfg, num_classes)
        return model_cfg, params
    return architecture(cfg, num_classes), None


# ---- state, compiled steps, resume ------------------------------------------------------------------


def compile_steps(cfg: TrainConfig, num_classes: int, schedule: Callable, mesh: Mesh, layout: Layout) -> Compiled:
    """The jitted steps, the state split as ``layout`` says, every batch over the whole mesh."""
    repl = NamedSharding(mesh, P())
    batch_sh = NamedSharding(mesh, P(None, AXES))  # (accum, micro, ...) split on micro
    eval_sh = NamedSharding(mesh, BATCH)
    fsdp = mesh.shape["fsdp"] > 1
    step = partial(train_step, num_classes=num_classes, label_smoothing=cfg.label_smoothing,
                   mixup_alpha=cfg.mixup_alpha, schedule=schedule,
                   grad_shardings=layout.shardings.params if fsdp else None)
    state_sh = layout.shardings
    return Compiled(
        train_step=jax.jit(step, in_shardings=(state_sh, batch_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                           donate_argnums=(0,)),
        eval_step=jax.jit(eval_step, in_shardings=(state_sh, eval_sh, eval_sh, eval_sh), out_shardings=repl),
        param_norm=jax.jit(optax.tree.norm, out_shardings=repl), batch_sharding=batch_sh, eval_sharding=eval_sh,
        accum_steps=cfg.accum_steps, micro_batch=cfg.batch_size // cfg.accum_steps // jax.process_count(),
        to_disk=layout.to_disk)


def resume(cfg: TrainConfig, state: TrainState, layout: Layout, sinks: Sinks, allow_config_change: bool
           ) -> tuple[TrainState, int, list[str]]:
    """(state, step, allowed config changes) from the newest intact checkpoint, placed on this
    run's mesh whatever mesh wrote it; (state, 0, []) when there is none. A config that changes
    the run's meaning is refused unless allowed."""
    restored = sinks.ckpt.restore_latest(layout.disk_abstract)
    if restored is None:
        return state, 0, []
    start, state, meta = restored
    state = layout.from_disk(state)
    changes = []
    if cfg.steps > 0 and meta.get("config") is not None:  # evaluating a checkpoint under another config is fine
        changes = check_resume_config(current_layout(meta["config"]), jsonable(cfg), start, allow_config_change,
                                      report=sinks.console.print)
    sinks.console.print(f"resumed from step {start} ({sinks.ckpt.dir}); data position {meta['data_position']}")
    return state, start, changes


# ---- the run ------------------------------------------------------------------------------------------


def config_text(cfg: TrainConfig) -> str:
    """The config as TensorBoard text (markdown: indented, so shown as code)."""
    return "\n".join("    " + line for line in json.dumps(jsonable(cfg), indent=2).splitlines())


def open_logs(sinks: Sinks, cfg: TrainConfig, workdir: Path, start: int, config_changed: bool) -> None:
    """metrics.jsonl and the TensorBoard events (main process only), both cut back to ``start``;
    the config goes to TensorBoard once, or again when a resume was allowed to change it."""
    is_main = sinks.ckpt.is_main
    sinks.log = MetricsLog(workdir / "metrics.jsonl", start, is_main, report=sinks.console.print)
    text = config_text(cfg) if start == 0 or config_changed else None
    sinks.tensorboard = TensorBoardLog(workdir, start, is_main, config_text=text)


def run(cfg: TrainConfig, workdir: Path, state: TrainState, start: int, compiled: Compiled, sinks: Sinks,
        sources: tuple, on_step: Callable[[int], None] | None, config_changed: bool):
    """The training proper from step ``start``: (LoopEnd, final eval or {} if interrupted)."""
    train_src, eval_src = sources
    # Batch `step` is a pure function of (seed, step): workers prepare the next ones while this one runs.
    batches = make_train_iterator(cfg, train_src, start, jax.process_index(), jax.process_count())
    try:
        open_logs(sinks, cfg, workdir, start, config_changed)
        if sinks.ckpt.is_main:
            save_class_names(train_src, workdir)
        sinks.console.start_bar(cfg.steps, start)
        loop = Loop(cfg, compiled, sinks, batches, eval_src, workdir, jax.random.PRNGKey(cfg.seed), jsonable(cfg),
                    on_step)
        end = train_loop(loop, state, start, last_good=start or None)
        return end, (finish(loop, end) if end.done == cfg.steps else {})
    finally:
        batches.close()


def train_and_evaluate(cfg: TrainConfig, workdir: str | os.PathLike, *, progress: bool = True,
                       on_step: Callable[[int], None] | None = None,
                       allow_config_change: bool = False) -> TrainResult:
    """Train, evaluate, checkpoint and (optionally) export. Resumes from the newest intact
    checkpoint in ``workdir`` (refusing a config that changes the run's meaning unless
    ``allow_config_change``). ``on_step(step)`` is called after every optimizer step (after any
    checkpoint of that step is written; the last step's follows the final eval). SIGINT/SIGTERM
    save a checkpoint and return early with ``interrupted=True``. ``steps=0`` evaluates the latest
    checkpoint, or ``init_from``."""
    cfg, workdir = expand_paths(cfg), Path(workdir).expanduser().absolute()
    validate(cfg, jax.device_count(), jax.process_count())
    sources = make_source(cfg.data, cfg.data.train_split), make_source(cfg.data, cfg.data.eval_split)
    model_cfg, init_params = model_for(cfg, num_classes_of(cfg, sources[0]))
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    state, layout, schedule = build_state(cfg, model_cfg, init_params, mesh)
    is_main = jax.process_index() == 0
    console = Console(is_main and progress, is_main)
    # evaluating (steps=0) leaves the workdir as it was
    sinks = Sinks(Checkpointer(workdir / "checkpoints", cfg.keep_checkpoints, is_main, report=console.print,
                               create=cfg.steps > 0), console=console)
    try:
        state, start, changes = resume(cfg, state, layout, sinks, allow_config_change)
        compiled = compile_steps(cfg, model_cfg.num_classes, schedule, mesh, layout)
        if cfg.steps == 0:
            if start == 0 and not cfg.init_from:
                raise ValueError(f"steps=0 evaluates init_from or the latest checkpoint in {sinks.ckpt.dir}; "
                                 "there is neither")
            return TrainResult(start, model_cfg, official_params(state, layout), [],
                               evaluate(state, cfg, compiled, sources[1]))
        end, result = run(cfg, workdir, state, start, compiled, sinks, sources, on_step, bool(changes))
    finally:
        sinks.close()
    interrupted = end.done < cfg.steps
    params = official_params(end.state, layout)
    if is_main and not interrupted:
        write_outputs(params, model_cfg, workdir, cfg.export_torch)
    return TrainResult(step=int(to_host(end.state.step)), model_config=model_cfg, params=params,
                       history=end.history, eval=result, interrupted=interrupted)


def official_params(state: TrainState, layout: Layout) -> dict:
    """The params on the host, in the official layout (every process takes part: FSDP's shards
    live on all of them)."""
    return to_host(layout.to_disk(state).params)


def write_outputs(params, model_cfg: MixerConfig, workdir: Path, export_torch: bool) -> None:
    """Final weights as an official-layout .npz (loads anywhere the official files do) and,
    on request, as a PyTorch state dict."""
    from mixer_convert.save import write_params
    from mixer_jax.model import params_to_flat

    flat = params_to_flat(to_host(params))
    write_params(flat, workdir / "model.npz", fmt="npz", force=True)
    (workdir / "model_config.json").write_text(json.dumps(jsonable(model_cfg), indent=1))
    if export_torch:
        write_params(flat, workdir / "model.pt", fmt="torch", force=True)
