"""mixer_convert.formats.msgpack: Flax's msgpack files (flax.serialization), read and written; a map
key given twice, or a leaf that is no array, is one clear error line."""
import numpy as np
import pytest

from conftest import requires_jax
from helpers.checkpoints import TINY
from mixer_convert import random_params
from mixer_convert.errors import CheckpointError
from mixer_convert.load import read_params
from mixer_convert.save import write_params

pytestmark = requires_jax


def _edited(src, dst, edit):
    """``src``'s msgpack tree with ``edit(tree)`` applied (arrays stay msgpack ext payloads)."""
    import msgpack

    tree = msgpack.unpackb(src.read_bytes(), raw=False, ext_hook=lambda code, data: msgpack.ExtType(code, data))
    edit(tree)
    dst.write_bytes(msgpack.packb(tree))
    return dst


def test_written_then_read_is_exact_in_the_flax_naming(tmp_path):
    flat = random_params(TINY, 0)
    with read_params(write_params(flat, tmp_path / "w.msgpack", fmt="msgpack")) as params:
        assert (params.format, params.layout) == ("msgpack", "flax")
        assert params.keys() == flat.keys() and all(np.array_equal(params[k], flat[k]) for k in flat)


def test_a_string_where_a_tensor_should_be_is_one_error_line_through_mixer_convert(tmp_path, capsys):
    """A reported defect: this was "not enough values to unpack (expected 4, got 0)"."""
    from mixer_convert.tools.cli import main

    src = write_params(random_params(TINY, 0), tmp_path / "w.msgpack", fmt="msgpack")
    bad = _edited(src, tmp_path / "bad.msgpack", lambda tree: tree["stem"].__setitem__("kernel", "abc"))
    assert main([str(bad), str(tmp_path / "out.npz"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == ("mixer-convert: error: not an MLP-Mixer checkpoint: 'stem/kernel' has shape (), a Mixer's "
                   "has 4 dims\n")
    assert not (tmp_path / "out.npz").exists()


def test_a_step_counter_beside_the_weights_is_an_unexpected_key_not_a_crash(tmp_path):
    from mixer_convert.load import open_checkpoint

    src = write_params(random_params(TINY, 0), tmp_path / "w.msgpack", fmt="msgpack")
    bad = _edited(src, tmp_path / "step.msgpack", lambda tree: tree.__setitem__("step", 7))
    with pytest.raises(ValueError, match=r"unexpected \(1\): step"):
        open_checkpoint(bad)


def test_a_file_that_is_no_map_of_arrays_is_refused(tmp_path):
    import msgpack

    (tmp_path / "list.msgpack").write_bytes(msgpack.packb([1, 2, 3]))
    with pytest.raises(CheckpointError, match="Flax msgpack does not hold a parameter tree"):
        read_params(tmp_path / "list.msgpack")
    (tmp_path / "dup.msgpack").write_bytes(b"\x82" + msgpack.packb("a") + msgpack.packb(1) + msgpack.packb("a")
                                           + msgpack.packb(2))
    with pytest.raises(CheckpointError, match="key 'a' appears 2 times in one map"):
        read_params(tmp_path / "dup.msgpack")
