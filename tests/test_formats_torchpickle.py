"""mixer_convert.formats.torchpickle: the state-dict pickle torch.save writes, read by a restricted
unpickler and written without torch. What we write torch.load reads (weights_only, mmap); what
torch.save writes we read (plain dicts, a model's OrderedDict with _metadata, Parameters, every
float dtype, shared storages and strided views); anything else is refused before it can run."""
import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from conftest import requires_torch
from mixer_convert.errors import CheckpointError
from mixer_convert.formats import torch as torch_format
from mixer_convert.formats import torchpickle
from mixer_convert.source import Source

BF16 = np.dtype(ml_dtypes.bfloat16)
TENSORS = {"w32": np.arange(12, dtype=np.float32).reshape(3, 4), "w16": np.linspace(-1, 1, 5).astype(np.float16),
           "w64": np.full((2, 1, 2), 0.1), "bf": np.arange(6, dtype=np.float32).astype(BF16).reshape(2, 3),
           "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32)}


def _ours(path, tensors=TENSORS):
    torch_format.write(path, iter(tensors.items()), [(k, v.shape, v.dtype) for k, v in tensors.items()])
    return path


def _read(path) -> dict[str, np.ndarray]:
    """Through our reader only: the torch fallback would hide what the restricted unpickler refuses."""
    entries, close = torch_format.read(Source.open(path))
    try:
        return {k: load() for k, (_, _, load) in entries.items()}
    finally:
        if close:
            close()


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype == BF16 else a


@pytest.fixture
def no_fallback(monkeypatch):
    monkeypatch.setattr(torch_format, "_read_with_torch", lambda *a: pytest.fail("fell back to torch.load"))


# ---- what we write, torch reads ---------------------------------------------------------------------------


@requires_torch
@pytest.mark.parametrize("mmap", [False, True])
def test_torch_load_reads_our_pickle_with_weights_only_and_mmap(tmp_path, mmap):
    import torch

    sd = torch.load(_ours(tmp_path / "ours.pt"), weights_only=True, mmap=mmap)
    assert list(sd) == list(TENSORS)
    for k, v in TENSORS.items():
        t = sd[k]
        if v.dtype == BF16:
            assert t.dtype == torch.bfloat16 and np.array_equal(t.view(torch.int16).numpy().view(np.uint16),
                                                                v.view(np.uint16))
        else:
            assert t.numpy().dtype == v.dtype and np.array_equal(t.numpy(), v) and t.is_contiguous()


def test_our_reader_reads_what_our_writer_wrote(tmp_path, no_fallback):
    got = _read(_ours(tmp_path / "ours.pt"))
    assert list(got) == list(TENSORS)
    assert all(got[k].dtype == v.dtype and np.array_equal(_bits(got[k]), _bits(v)) for k, v in TENSORS.items())


def test_dumps_is_a_plain_protocol_2_pickle_of_rebuild_calls():
    data = torchpickle.dumps([("a", (2, 3), np.float32), ("b", (70000,), np.float16)])
    obj, rebuilt = torchpickle.load(data)
    assert rebuilt == 2 and list(obj) == ["a", "b"]
    a, b = obj["a"], obj["b"]
    assert (a.storage.key, a.storage.dtype, a.storage.numel, a.offset, a.shape, a.stride) == \
        ("0", np.float32, 6, 0, (2, 3), (3, 1))
    assert (b.storage.key, b.storage.dtype, b.storage.numel, b.stride) == ("1", np.float16, 70000, (1,))


# ---- what torch.save writes, we read ----------------------------------------------------------------------


def _saved(tmp_path, obj, name="t.pt"):
    import torch

    torch.save(obj, tmp_path / name)
    return tmp_path / name


@requires_torch
def test_a_real_models_state_dict_with_its_metadata_is_read(tmp_path, no_fallback):
    import torch

    torch.manual_seed(0)
    sd = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)).state_dict()
    assert isinstance(sd, collections.OrderedDict) and hasattr(sd, "_metadata")
    got = _read(_saved(tmp_path, sd))
    assert list(got) == list(sd)
    assert all(np.array_equal(got[k], v.numpy()) for k, v in sd.items())


@requires_torch
def test_parameters_and_every_float_dtype_are_read(tmp_path, no_fallback):
    import torch

    sd = {"p": torch.nn.Parameter(torch.randn(3, 2)), "f64": torch.randn(4, dtype=torch.float64),
          "f16": torch.randn(2, 2).half(), "bf16": torch.randn(5).bfloat16()}
    got = _read(_saved(tmp_path, sd))
    np.testing.assert_array_equal(got["p"], sd["p"].detach().numpy())
    assert got["f64"].dtype == np.float64 and np.array_equal(got["f64"], sd["f64"].numpy())
    assert got["f16"].dtype == np.float16 and np.array_equal(got["f16"], sd["f16"].numpy())
    assert got["bf16"].dtype == BF16
    np.testing.assert_array_equal(got["bf16"].view(np.int16), sd["bf16"].view(torch.int16).numpy())


@requires_torch
def test_shared_storages_and_views_with_offsets_and_strides_are_read(tmp_path, no_fallback):
    import torch

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"base": base, "rows": base[1:], "corner": base[1:, 2:], "t": base.t(), "column": base[:, 3],
          "every_other": base.reshape(-1)[1::2]}
    assert len({v.untyped_storage().data_ptr() for v in sd.values()}) == 1
    got = _read(_saved(tmp_path, sd))
    for k, v in sd.items():
        assert got[k].shape == tuple(v.shape) and np.array_equal(got[k], v.numpy()), k
    assert len([n for n in zipfile.ZipFile(tmp_path / "t.pt").namelist() if "/data/" in n]) == 1


@requires_torch
def test_expanded_scalar_and_empty_tensors_are_read(tmp_path, no_fallback):
    import torch

    sd = {"expanded": torch.arange(3.0).expand(4, 3), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
          "tail": torch.randn(70000)[5:]}  # zero strides, no dims, no elements, an offset past 65535
    got = _read(_saved(tmp_path, sd))
    assert all(got[k].shape == tuple(v.shape) and np.array_equal(got[k], v.numpy()) for k, v in sd.items())


@requires_torch
def test_a_state_dict_inside_a_training_checkpoint_is_found(tmp_path, no_fallback):
    import torch

    got = _read(_saved(tmp_path, {"epoch": 3, "state_dict": {"w": torch.ones(2)}}))
    assert list(got) == ["w"] and np.array_equal(got["w"], np.ones(2, np.float32))


def test_a_key_given_twice_is_refused_as_ambiguous(tmp_path):
    x, y = np.zeros(2, np.float32), np.ones(2, np.float32)
    torch_format.write(tmp_path / "twice.pt", iter([("a", x), ("a", y)]), [("a", (2,), x.dtype)] * 2)
    obj, rebuilt = torchpickle.load(zipfile.ZipFile(tmp_path / "twice.pt").read("twice/data.pkl"))
    assert rebuilt == 2 and len(obj) == 1  # the pickle's own dict keeps only the last one
    with pytest.raises(CheckpointError, match="the pickle builds 2 tensors but only 1 are reachable; a key given "
                                              "twice"):
        _read(tmp_path / "twice.pt")


# ---- anything else is refused -----------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_forbidden_global_is_refused_by_the_unpickler_naming_it():
    data = pickle.dumps({"w": _Payload()}, protocol=2)
    with pytest.raises(torchpickle.UnsupportedPickle, match=r"global (__builtin__|builtins)\.print is not allowed"):
        torchpickle.load(data)


@pytest.mark.parametrize("with_torch", [pytest.param(True, marks=requires_torch), False])
def test_a_file_with_a_forbidden_global_is_refused_with_the_refusing_to_load_message(tmp_path, capsys,
                                                                                      monkeypatch, with_torch):
    if not with_torch:  # a core install: no torch.load to judge other pickles
        monkeypatch.setattr(torch_format, "importable", lambda module: False)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        from mixer_convert.formats.archive import ZipWriter
        z = ZipWriter(f)
        z.add("evil/data.pkl", [pickle.dumps({"w": _Payload()}, protocol=2)])
        z.add("evil/version", [b"3\n"])
        z.close()
    with pytest.raises(CheckpointError, match=r"evil.pt: refusing to load: not a plain tensor state dict"):
        _read(path)
    assert "pwned" not in capsys.readouterr().out


def _s(text: str) -> bytes:
    b = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _i(n: int) -> bytes:
    return pickle.BININT + struct.pack("<i", n)


def _one_tensor(pid: bytes, offset: int = 0, size=(2,), stride=(1,)) -> bytes:
    """The pickle of {'w': tensor} with a persistent id made of the opcodes ``pid``."""
    tup = lambda xs: pickle.MARK + b"".join(_i(x) for x in xs) + pickle.TUPLE  # noqa: E731
    return b"".join([pickle.PROTO + b"\x02", pickle.EMPTY_DICT, _s("w"),
                     pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n", pickle.MARK,
                     pickle.MARK, pid, pickle.TUPLE, pickle.BINPERSID, _i(offset), tup(size), tup(stride),
                     pickle.NEWFALSE, pickle.EMPTY_DICT, pickle.TUPLE, pickle.REDUCE, pickle.SETITEM, pickle.STOP])


FLOAT_STORAGE = pickle.GLOBAL + b"torch\nFloatStorage\n"
GOOD_PID = _s("storage") + FLOAT_STORAGE + _s("0") + _s("cpu") + _i(2)


def test_the_hand_made_pickle_is_accepted_as_it_stands():
    obj, rebuilt = torchpickle.load(_one_tensor(GOOD_PID))
    assert rebuilt == 1 and obj["w"].shape == (2,) and obj["w"].storage.numel == 2


@pytest.mark.parametrize("pid", [
    _s("storage") + FLOAT_STORAGE + _i(0) + _s("cpu") + _i(2),  # the storage key not a string
    _s("storage") + FLOAT_STORAGE + _s("0") + _s("cpu") + _i(-1),  # a negative element count
    _s("storage") + FLOAT_STORAGE + _s("0") + _s("cpu"),  # four fields, not five
    _s("module") + FLOAT_STORAGE + _s("0") + _s("cpu") + _i(2),  # not a storage
    _s("storage") + _s("NoSuchStorage") + _s("0") + _s("cpu") + _i(2),  # an unknown storage type
], ids=["key-not-str", "negative-numel", "four-fields", "not-storage", "unknown-type"])
def test_malformed_persistent_ids_are_refused(pid):
    with pytest.raises(pickle.UnpicklingError, match="unexpected persistent id"):
        torchpickle.load(_one_tensor(pid))


@pytest.mark.parametrize("offset, size, stride", [(-1, (2,), (1,)), (0, (2, 2), (1,)), (0, (-2,), (1,))],
                         ids=["negative-offset", "size-and-stride-disagree", "negative-size"])
def test_a_tensor_rebuilt_from_malformed_arguments_is_refused(offset, size, stride):
    with pytest.raises(pickle.UnpicklingError, match="malformed arguments"):
        torchpickle.load(_one_tensor(GOOD_PID, offset, size, stride))


def test_view_and_extent_follow_offset_and_strides():
    ref = torchpickle.TensorRef(torchpickle.StorageRef("0", np.dtype(np.float32), 20), 3, (3, 2), (5, 2))
    storage = np.arange(20, dtype=np.float32)
    np.testing.assert_array_equal(torchpickle.view(ref, storage), [[3, 5], [8, 10], [13, 15]])
    assert torchpickle.extent(ref) == 3 + 1 + 2 * 5 + 1 * 2
    empty = torchpickle.TensorRef(ref.storage, 7, (0, 4), (4, 1))
    assert torchpickle.extent(empty) == 0 and torchpickle.view(empty, storage).shape == (0, 4)


def test_a_view_reaching_past_its_storage_is_refused(tmp_path):
    good = io.BytesIO()
    from mixer_convert.formats.archive import ZipWriter
    z = ZipWriter(good)
    z.add("x/data.pkl", [_one_tensor(GOOD_PID, offset=1)])  # elements 1 and 2 of a 2-element storage
    z.add("x/data/0", [np.zeros(2, np.float32).tobytes()])
    z.close()
    (tmp_path / "x.pt").write_bytes(good.getvalue())
    with pytest.raises(CheckpointError, match="tensor 'w' reaches past the end of its storage"):
        _read(tmp_path / "x.pt")
