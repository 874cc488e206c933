"""mixer_convert.save: an Output is planned (format, naming, the destination checked once: kept
without force, a folder never replaced by a file) before anything is read; it never touches its
source; it writes every format exactly; the prefetching thread hands on its producer's error and
stops when the consumer does."""
import os
import threading
import time

import numpy as np
import pytest

from conftest import has_module, requires_jax, requires_torch
from helpers.checkpoints import TINY
from mixer_convert import random_params
from mixer_convert.errors import CheckpointError, WriteError
from mixer_convert.load import read_params
from mixer_convert.save import Output, prefetched, write_params

requires_orbax = pytest.mark.skipif(not has_module("orbax.checkpoint"), reason="needs orbax (the train extra)")


# ---- Output.plan ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dst, to, want", [("o.npz", None, ("npz", "flax")), ("o.pth", "timm", ("torch", "timm")),
                                           ("o", "orbax", ("orbax", "flax")), ("d", "timm-hub", ("timm-hub", "timm"))])
def test_plan_takes_format_and_naming_from_to_or_the_suffix(tmp_path, dst, to, want):
    out = Output.plan(tmp_path / dst, to)
    assert (out.fmt, out.layout) == want and out.is_dir == (want[0] in ("orbax", "timm-hub"))
    assert Output.plan(tmp_path / "x.bin", fmt="safetensors").layout == "torch"  # a format's default naming


@pytest.mark.parametrize("fmt, layout, match", [("npz", "torch", "npz files hold the Flax \\(official\\) naming"),
                                                ("timm-hub", "flax", "timm model folders hold timm's naming"),
                                                ("zip", None, "unknown format 'zip'")])
def test_plan_refuses_a_naming_the_format_cannot_hold(tmp_path, fmt, layout, match):
    with pytest.raises(ValueError, match=match):
        Output.plan(tmp_path / "o", fmt=fmt, layout=layout)


def test_plan_keeps_an_existing_output_without_force_and_never_replaces_a_folder_by_a_file(tmp_path):
    (tmp_path / "o.npz").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="exists; pass --force"):
        Output.plan(tmp_path / "o.npz")
    assert Output.plan(tmp_path / "o.npz", force=True).path == tmp_path / "o.npz"
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(CheckpointError, match="is a directory; refusing to replace a directory with a file"):
        Output.plan(tmp_path / "dir.npz", force=True)
    assert Output.plan(tmp_path / "dir.npz", "orbax", force=True).is_dir  # a folder output may replace a folder


def test_a_conversion_checks_its_destination_exactly_once(official, tmp_path, monkeypatch):
    import mixer_convert.atomic as atomic
    import mixer_convert.save as save
    from mixer_convert.tools.bridge import convert_checkpoint

    calls = []
    real = atomic.check_destination

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(atomic, "check_destination", counted)
    monkeypatch.setattr(save, "check_destination", counted)
    src, _ = official
    convert_checkpoint(src, tmp_path / "o.safetensors", progress=False, verify=True)
    assert calls == [tmp_path / "o.safetensors"]


# ---- the source is never the output ------------------------------------------------------------------------------


def test_refuse_source_refuses_the_source_by_any_path_inside_it_or_holding_it(tmp_path):
    src = tmp_path / "src.npz"
    src.write_bytes(b"x")
    os.link(src, tmp_path / "hard.npz")
    (tmp_path / "soft.npz").symlink_to(src)
    for same in (src, tmp_path / "hard.npz", tmp_path / "soft.npz", tmp_path / "." / "src.npz"):
        with pytest.raises(ValueError, match="source and destination are the same file"):
            Output(same, "npz", "flax").refuse_source(src)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match="lies inside the source"):
        Output(tmp_path / "ckpt" / "o.npz", "npz", "flax").refuse_source(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="contains the source .*replacing it would delete the source"):
        Output(tmp_path, "orbax", "flax").refuse_source(src)
    Output(tmp_path / "other.npz", "npz", "flax").refuse_source(src)  # anything else is fine


def test_write_refuses_its_source_before_writing_anything(official, tmp_path):
    src, flat = official
    with pytest.raises(ValueError, match="source and destination are the same file"):
        Output.plan(src, force=True).write(flat, source=src)
    assert sorted(os.listdir(tmp_path)) == [src.name]


# ---- writing ------------------------------------------------------------------------------------------------------

FORMATS = [("npz", "w.npz", None, None), ("safetensors", "w.safetensors", "torch", None),
           ("safetensors", "timm.safetensors", "timm", None), ("torch", "w.pt", "torch", requires_torch),
           ("torch", "timm.pth", "timm", requires_torch), ("msgpack", "w.msgpack", None, requires_jax),
           ("orbax", "w_orbax", None, requires_orbax)]  # timm-hub holds only timm's models: test_formats_timm_hub


@pytest.mark.parametrize("fmt, name, layout", [pytest.param(f, n, lay, marks=m or []) for f, n, lay, m in FORMATS])
def test_write_params_round_trips_every_format_exactly(tmp_path, fmt, name, layout):
    flat = random_params(TINY, 1)
    path = write_params(flat, tmp_path / name, fmt=fmt, layout=layout)
    with read_params(path) as back:
        assert back.format == fmt and back.layout == (layout or "flax") and set(back) == set(flat)
        assert all(back[k].dtype == v.dtype and np.array_equal(back[k], v) for k, v in flat.items())
    assert sorted(os.listdir(tmp_path)) == [name]  # no temporary left


def test_a_failing_check_before_commit_leaves_nothing(tmp_path):
    def refuse(tmp):
        assert tmp.exists() and tmp.name == "w.npz"  # the finished temporary
        raise ValueError("not good enough")
    with pytest.raises(ValueError, match="not good enough"):
        write_params(random_params(TINY, 0), tmp_path / "new" / "w.npz", before_commit=refuse)
    assert os.listdir(tmp_path) == []


def test_a_writer_failure_of_the_destination_is_one_error_naming_it(tmp_path, monkeypatch):
    from mixer_convert.formats import npz

    def full(*args):
        raise WriteError("No space left on device")
    monkeypatch.setattr(npz, "write", full)
    with pytest.raises(CheckpointError, match=rf"^cannot write {tmp_path / 'w.npz'}: No space left on device$"):
        write_params(random_params(TINY, 0), tmp_path / "w.npz")
    assert os.listdir(tmp_path) == []


def test_progress_sees_each_canonical_tensor_once_in_order(tmp_path):
    flat = random_params(TINY, 0)
    seen = []
    write_params(flat, tmp_path / "w.safetensors", fmt="safetensors", progress=lambda k, v: seen.append((k, v.shape)))
    assert seen == [(k, v.shape) for k, v in flat.items()]


# ---- prefetched ---------------------------------------------------------------------------------------------------


def test_prefetched_yields_everything_in_order():
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))
    assert list(prefetched(iter([]))) == []


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_prefetched_raises_the_producers_error_after_what_it_produced(error):
    def produce():
        yield 1
        yield 2
        raise error
    got = []
    with pytest.raises(type(error)):
        for item in prefetched(produce()):
            got.append(item)
    assert got == [1, 2]


def test_prefetched_stops_the_producer_when_closed_early():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1
    items = prefetched(endless(), depth=2)
    assert next(items) == 0
    items.close()  # joins the producer thread
    assert not [t for t in threading.enumerate() if t.name == "mixer-prefetch"]
    count = len(produced)
    time.sleep(0.2)
    assert len(produced) == count <= 5  # stopped, having run at most a few items ahead
