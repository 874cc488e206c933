"""Read a workdir's TensorBoard events back the way TensorBoard's server does (the plugin event
accumulator behind ``tensorboard --logdir``, purge markers included), for the tests of
mixer_jax.metrics and of the training runs."""
import sys
import types
from pathlib import Path


def _accumulator(logdir: Path):
    # TensorBoard imports TensorFlow (several seconds) when it can; this module tells it not to.
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def _by_plugin(logdir: Path, plugin: str) -> dict[str, list]:
    from tensorboard.util import tensor_util

    acc = _accumulator(logdir)
    out = {}
    for tag in acc.Tags()["tensors"]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == plugin:
            out[tag] = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
    return out


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] as TensorBoard shows them."""
    return {tag: [(s, float(v)) for s, v in events] for tag, events in _by_plugin(logdir, "scalars").items()}


def texts(logdir: Path) -> dict[str, list[tuple[int, str]]]:
    """tag -> [(step, text), ...] of the text summaries."""
    return {tag: [(s, v.reshape(-1)[0].decode()) for s, v in events]
            for tag, events in _by_plugin(logdir, "text").items()}
