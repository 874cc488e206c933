"""Training checkpoints: orbax save/restore, a content fingerprint that catches silent corruption,
fallback to the newest intact checkpoint, and the rule for resuming with a changed config.

Each checkpoint ``checkpoints/<step>/`` holds the train state and a JSON ``meta`` with the step, the
data position, the run's config and the sha256 of the state's bytes. A checkpoint that cannot be
read, or whose bytes no longer match, is reported and moved aside (never deleted), and the run
resumes from the next older one; a run never silently restarts over checkpoints it could not read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from mixer_convert.errors import CheckpointError
from mixer_convert.trees import flatten

# Config keys a resumed run may change without changing what it computes (init_allow_nonfinite: the
# checkpoint's weights replace init_from's; the mesh, remat and scan: how the same function is
# computed, checkpoints being in the official layout on any mesh; data.num_classes: only ever checked
# against the data, which decides the head, and absent from configs saved before it existed).
RESUMABLE_KEYS = frozenset({"eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "export_torch",
                            "eval_batch_size", "data.workers", "data.worker_type", "init_allow_nonfinite",
                            "mesh.data", "mesh.fsdp", "mesh.fsdp_min_mib", "model.remat", "model.scan",
                            "data.num_classes"})


class ResumeConfigError(ValueError):
    """The workdir's run was started with a config that means something else."""


def to_host(tree):
    """Device arrays -> numpy, whole, when other processes hold other devices too: a replicated
    array from this process's copy, a split one (FSDP) gathered from every process (so every
    process must call this at the same point)."""
    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            if a.sharding.is_fully_replicated:
                return np.asarray(a.addressable_data(0))
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)
    return jax.tree_util.tree_map(get, tree)


def fingerprint(tree) -> str:
    """sha256 over every leaf's dtype, shape and bytes, in tree order."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(to_host(tree)):
        arr = np.ascontiguousarray(leaf)
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def jsonable(obj):
    """A (nested) dataclass config as plain JSON values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [jsonable(v) for v in obj]
    return obj


def config_changes(saved: dict, now: dict) -> list[str]:
    """The differences that change a run's meaning, as 'key: saved -> now' lines."""
    a, b = flatten(saved, "."), flatten(now, ".")
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
            for k in sorted(set(a) | set(b)) if k not in RESUMABLE_KEYS and a.get(k) != b.get(k)]


def check_resume_config(saved: dict | None, now: dict, step: int, allow_change: bool,
                        report: Callable[[str], None] = print) -> list[str]:
    """Refuse to continue a run under a config that means something else, unless told to;
    returns the (allowed) changes."""
    changes = config_changes(saved, now) if saved is not None else []
    if not changes:
        return changes
    msg = (f"the checkpoint at step {step} was written by a run with another config: " + "; ".join(changes))
    if not allow_change:
        raise ResumeConfigError(msg + ". Use another --workdir for a new run, or pass --allow-config-change "
                                      "(allow_config_change=True) to continue this one under the new config")
    report("warning: " + msg + " (continuing: config change allowed)")
    return changes


class Checkpointer:
    """orbax CheckpointManager for ``ckpt_dir`` with fingerprinted saves and safe restores."""

    def __init__(self, ckpt_dir: Path, keep: int, is_main: bool, report: Callable[[str], None] = print,
                 create: bool = True) -> None:
        self.dir, self.keep, self.is_main, self.report = Path(ckpt_dir), keep, is_main, report
        self.create = create
        self._mngr = self._open()

    def _open(self):
        import orbax.checkpoint as ocp

        return ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=self.create, enable_async_checkpointing=False))

    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        import orbax.checkpoint as ocp

        meta = {**meta, "step": step, "fingerprint": fingerprint(state)}
        self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)))
        self._mngr.wait_until_finished()

    def _restore(self, step: int, abstract_state):
        import orbax.checkpoint as ocp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            restored = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def restore_latest(self, abstract_state) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest intact checkpoint; None if there are none at all.
        Unreadable or corrupt ones are reported and moved aside; if none is intact, raise."""
        tried = []
        for step in reversed(self.steps()):
            try:
                state, meta = self._restore(step, abstract_state)
                problem = None if meta.get("fingerprint") in (None, fingerprint(state)) else \
                    "its contents do not match the fingerprint saved with it"
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                problem = f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
            if problem is None:
                if tried:
                    self._mngr.close()
                    self._mngr = self._open()  # forget the steps moved aside
                return step, state, meta
            tried.append(step)
            self.report(f"checkpoint step {step} is damaged: {problem}; trying an older one")
            self._move_aside(step)
        if tried:
            raise CheckpointError(f"no intact checkpoint in {self.dir} (damaged: steps {tried}, moved aside as "
                                  "corrupt-<step>-<time>); refusing to start over on top of them. Use another "
                                  "--workdir, or move the checkpoints directory away to start from scratch")
        return None

    def _move_aside(self, step: int) -> None:
        src = self.dir / str(step)
        if self.is_main and src.exists():
            src.rename(self.dir / f"corrupt-{step}-{time.strftime('%Y%m%d-%H%M%S')}")

    def close(self) -> None:
        self._mngr.close()

