"""mixer_convert.source: what a checkpoint source may be (regular files and folders of them, never
a FIFO, device, socket, dangling link or link loop; readable), what it may declare (valid shapes,
a running total within max_bytes), tree entries without ambiguity, and positional reads."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import subprocess_env
from mixer_convert.errors import CheckpointError
from mixer_convert.source import MAX_BYTES, Buffers, Source, check_tree, no_duplicate_keys, pread_into, reading, tree_entries

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs, sockets and prctl are Linux's")


# ---- Source.open --------------------------------------------------------------------------------------------


def test_a_regular_file_and_a_folder_are_sources(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"x")
    src = Source.open(tmp_path / "w.npz")
    assert src.path == tmp_path / "w.npz" and not src.is_dir and src.max_bytes == MAX_BYTES and src.declared == 0
    assert Source.open(tmp_path, None).is_dir
    (tmp_path / "link.npz").symlink_to(tmp_path / "w.npz")  # a link to a file is followed
    assert Source.open(tmp_path / "link.npz").stat.st_size == 1


def test_a_missing_source_is_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such checkpoint: '.*nope.npz'"):
        Source.open(tmp_path / "nope.npz")


@linux_only
def test_a_fifo_a_socket_and_a_device_are_refused_without_reading_them(tmp_path):
    os.mkfifo(tmp_path / "pipe.npz")  # opening it for reading would block forever
    with pytest.raises(CheckpointError, match=r"pipe.npz: a FIFO, not a checkpoint file; only regular files are read"):
        Source.open(tmp_path / "pipe.npz")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock.pt"))
        with pytest.raises(CheckpointError, match=r"sock.pt: a socket, not a checkpoint file"):
            Source.open(tmp_path / "sock.pt")
    with pytest.raises(CheckpointError, match=r"/dev/zero: a character device, not a checkpoint file"):
        Source.open("/dev/zero")


def test_a_dangling_link_and_a_link_loop_are_refused_naming_them(tmp_path):
    (tmp_path / "dangling.npz").symlink_to(tmp_path / "gone.npz")
    with pytest.raises(CheckpointError, match=r"dangling.npz: a symlink to nothing \('.*gone.npz'\)"):
        Source.open(tmp_path / "dangling.npz")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"/a: symlink loop"):
        Source.open(tmp_path / "a")


# Root reads any file: the child drops the capabilities that let it and re-executes itself (as
# helpers.hostile.WITHOUT_ROOT_PRIVILEGE does).
_UNREADABLE = """
import ctypes, os, sys
if os.geteuid() == 0 and not os.environ.get("DROPPED"):
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        assert libc.prctl(24, cap, 0, 0, 0) == 0, ctypes.get_errno()
    os.environ["DROPPED"] = "1"
    os.execv(sys.executable, [sys.executable, *sys.argv])
from mixer_convert.errors import CheckpointError
from mixer_convert.source import Source
try:
    Source.open(sys.argv[1])
except CheckpointError as e:
    print(e)
"""


@linux_only
def test_an_unreadable_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "secret.npz"
    path.write_bytes(b"x")
    (tmp_path / "child.py").write_text(_UNREADABLE)
    os.chmod(path, 0)
    try:
        r = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(path)], capture_output=True, text=True,
                           timeout=300, env=subprocess_env())
    finally:
        os.chmod(path, 0o644)
    assert r.stdout.strip() == f"{path}: cannot read (permission denied)", r.stderr


# ---- what a source may declare ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(-1, 3), (2.0,), (True, 2), "3", None, (1,) * 9, ((2,),)])
def test_an_invalid_declared_shape_is_refused_naming_the_tensor(tmp_path, shape):
    src = Source(tmp_path, os.stat(tmp_path), MAX_BYTES)
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: tensor 'w' declares an invalid shape"):
        src.declare("w", shape, np.float32)


def test_shapes_as_lists_and_numpy_integers_are_tuples_of_ints(tmp_path):
    src = Source(tmp_path, os.stat(tmp_path), MAX_BYTES)
    got = src.declare("w", [np.int64(2), 3], np.float32)
    assert got == (2, 3) and all(type(d) is int for d in got) and src.declared == 24
    assert src.declare("scalar", (), np.float16) == () and src.declared == 26


def test_an_impossible_shape_is_refused_before_its_size_overflows(tmp_path):
    src = Source(tmp_path, os.stat(tmp_path), None)
    with pytest.raises(CheckpointError, match=r"tensor 'w' declares an impossible shape \(4294967296, 4294967296\)"):
        src.declare("w", (2**32, 2**32), np.float32)


def test_the_running_total_past_max_bytes_is_refused_naming_the_way_to_lift_it(tmp_path):
    src = Source(tmp_path, os.stat(tmp_path), max_bytes=1000)
    src.declare("a", (200,), np.float32)  # 800 bytes: within
    with pytest.raises(CheckpointError, match=r"declares tensors of 0.00 GiB, more than any Mixer needs .*pass "
                                              r"--allow-large \(max_bytes=None\) to read it anyway"):
        src.declare("b", (51,), np.float32)  # 1004 bytes in all
    unlimited = Source(tmp_path, os.stat(tmp_path), None)
    unlimited.declare("huge", (2**40,), np.float32)
    assert unlimited.declared == 2**42


def test_cap_refuses_a_whole_file_or_member_larger_than_the_budget(tmp_path):
    src = Source(tmp_path, os.stat(tmp_path), max_bytes=10)
    src.cap(10, "is a msgpack file of")
    with pytest.raises(CheckpointError, match="is a msgpack file of 0.00 GiB, more than any Mixer needs"):
        src.cap(11, "is a msgpack file of")


# ---- folders ---------------------------------------------------------------------------------------------------


def test_a_folders_tree_refuses_a_link_to_a_folder_and_a_fifo_inside(tmp_path):
    (tmp_path / "ckpt" / "d").mkdir(parents=True)
    (tmp_path / "ckpt" / "d" / "f").write_bytes(b"x")
    check_tree(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "loop").symlink_to(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="loop: a link to a folder inside a checkpoint"):
        check_tree(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "loop").unlink()
    if sys.platform.startswith("linux"):
        os.mkfifo(tmp_path / "ckpt" / "d" / "pipe")
        with pytest.raises(CheckpointError, match="pipe: a FIFO, not a checkpoint file"):
            Source.open(tmp_path / "ckpt").check_tree()


def test_a_folder_with_more_files_than_any_checkpoint_is_refused(tmp_path, monkeypatch):
    import mixer_convert.source as source

    monkeypatch.setattr(source, "MAX_FILES", 3)
    for i in range(4):
        (tmp_path / str(i)).write_bytes(b"")
    with pytest.raises(CheckpointError, match="more than 3 files; not a Mixer checkpoint"):
        check_tree(tmp_path)


# ---- decoded trees and maps ------------------------------------------------------------------------------------


def test_tree_entries_join_paths_and_take_list_items_by_index():
    assert tree_entries("f", {"a": {"b": 1}, "c": [2, {"d": 3}]}) == {"a/b": 1, "c/0": 2, "c/1/d": 3}


def test_tree_entries_refuse_two_paths_to_one_name_and_deep_nesting():
    with pytest.raises(CheckpointError, match=r"^f.msgpack: two entries are both named 'a/b'; not a parameter tree$"):
        tree_entries("f.msgpack", {"a": {"b": 1}, "a/b": 2})
    deep = 0
    for _ in range(100):
        deep = {"x": deep}
    with pytest.raises(CheckpointError, match=r"^f.msgpack: nested more than 64 levels deep; not a parameter tree$"):
        tree_entries("f.msgpack", deep)


def test_a_key_given_twice_in_one_map_is_refused():
    import json

    hook = no_duplicate_keys("h.json")
    assert json.loads('{"a": 1, "b": {"a": 2}}', object_pairs_hook=hook) == {"a": 1, "b": {"a": 2}}
    with pytest.raises(CheckpointError, match="h.json: key 'a' appears 2 times in one map; refusing an ambiguous file"):
        json.loads('{"a": 1, "a": 2}', object_pairs_hook=hook)


# ---- reads -----------------------------------------------------------------------------------------------------


def test_pread_into_reads_at_an_offset_and_refuses_a_short_file_when_exact(tmp_path):
    (tmp_path / "f").write_bytes(bytes(range(10)))
    with open(tmp_path / "f", "rb") as f:
        buf = memoryview(bytearray(4))
        assert pread_into(f.fileno(), buf, 3) == 4 and bytes(buf) == bytes([3, 4, 5, 6])
        assert f.tell() == 0  # positional: the file offset is untouched
        with pytest.raises(CheckpointError, match="file ended 2 bytes early"):
            pread_into(f.fileno(), memoryview(bytearray(4)), 8)
        short = memoryview(bytearray(4))
        assert pread_into(f.fileno(), short, 8, exact=False) == 2 and bytes(short[:2]) == bytes([8, 9])
        assert pread_into(f.fileno(), memoryview(bytearray(3)), 20, exact=False) == 0


def test_read_at_names_the_file_that_ended_early(tmp_path):
    (tmp_path / "f").write_bytes(b"abcdef")
    src = Source.open(tmp_path / "f")
    assert bytes(src.read_at(2, 3)) == b"cde"
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'f'}: file ended 1 bytes early"):
        src.read_at(4, 3)
    src.close()


def test_reading_turns_a_third_party_failure_into_one_error_naming_the_file():
    with pytest.raises(CheckpointError, match=r"^x.bin: cannot read as a thing \(KeyError: 'k'\)$"):
        with reading("x.bin", "a thing"):
            {}["k"]
    with pytest.raises(CheckpointError, match=r"^x.bin: out of memory reading it as a thing$"):
        with reading("x.bin", "a thing"):
            raise MemoryError
    with pytest.raises(CheckpointError, match=r"^ours$"):
        with reading("x.bin", "a thing"):
            raise CheckpointError("ours")  # already ours: passed on unchanged


# ---- Buffers --------------------------------------------------------------------------------------

MB = 1 << 20


def _address(view) -> int:
    return np.frombuffer(view, np.uint8).ctypes.data


def test_a_read_buffer_is_handed_out_again_only_once_nothing_refers_to_it():
    buffers = Buffers()
    first = buffers.get(2 * MB)
    where = _address(first)
    held = np.frombuffer(first, np.float32)[10:20]  # a view of an array made from it, as a reader returns
    del first
    second = buffers.get(2 * MB)
    assert _address(second) != where  # still held through the view
    held[:] = 7
    del second
    del held
    assert _address(buffers.get(2 * MB)) == where  # free again: reused


def test_a_freed_buffer_serves_a_smaller_read_but_not_one_under_half_its_size():
    buffers = Buffers()
    where = _address(buffers.get(4 * MB))
    assert _address(buffers.get(3 * MB)) == where
    assert _address(buffers.get(MB + 1)) != where  # would keep 4 MB for a 1 MB tensor


def test_at_most_keep_buffers_are_kept_and_small_reads_are_not_kept():
    buffers = Buffers()
    held = [buffers.get(MB * (i + 1)) for i in range(Buffers.KEEP + 2)]
    assert len(buffers._kept) == Buffers.KEEP
    buffers.get(1000)
    assert len(buffers._kept) == Buffers.KEEP
    del held
    buffers.clear()
    assert not buffers._kept


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_tensors_read_from_one_source_stay_intact_while_later_ones_are_read(tmp_path, fmt):
    """Every array a reader returned keeps its values while later tensors are read into reused
    buffers; one dropped frees its buffer for the next of a similar size."""
    from mixer_convert import formats

    flat = {f"t{i}": np.full((512, 1536 - 64 * i), i, np.float32) for i in range(8)}  # 3.1-2.2 MB: each fits the last
    path = tmp_path / f"w.{fmt}"
    if fmt == "npz":
        np.savez(path, **flat)
    else:
        pytest.importorskip("safetensors.numpy").save_file(flat, str(path))
    _, entries, close = formats.read(Source.open(path))
    try:
        kept = []
        for i in range(8):
            arr = entries[f"t{i}"][2]()
            assert (arr == i).all()
            if i % 2 == 0:
                kept.append((i, arr))  # the odd ones are dropped at once
        assert all((arr == i).all() for i, arr in kept)
    finally:
        if close:
            close()


def test_read_at_opens_the_file_once_for_every_read_and_close_closes_it(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "f.bin").write_bytes(bytes(range(256)) * 16)
    src = Source.open(tmp_path / "f.bin")
    opened, real_open = [], builtins.open
    monkeypatch.setattr(builtins, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert bytes(src.read_at(1, 3)) == b"\x01\x02\x03" and bytes(src.read_at(255, 2)) == b"\xff\x00"
    assert len(opened) == 1
    src.close()
    assert src._file is None
    with pytest.raises(CheckpointError, match="ended 4 bytes early"):
        src.read_at(4094, 6)  # reopened after close; the file ending first is still an error
    src.close()
