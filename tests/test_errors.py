"""mixer_convert.errors: the one CheckpointError, exceptions as one short line (why, one_line), and
optional dependencies imported or named with their extra (needs, MissingExtraError, importable)."""
import errno
import sys

import pytest

from mixer_convert import ParamMismatchError
from mixer_convert.errors import CheckpointError, MissingExtraError, WriteError, importable, needs, one_line, why


def test_checkpoint_errors_are_value_errors_and_write_errors_are_checkpoint_errors():
    assert issubclass(CheckpointError, ValueError) and issubclass(WriteError, CheckpointError)
    assert issubclass(MissingExtraError, ImportError)


def test_one_line_joins_a_multi_line_message():
    e = ParamMismatchError(["a/b"], ["x"], [("c", (1,), (2,))], what="w.npz")
    assert "\n" in str(e)
    assert one_line(e) == "w.npz does not match the model: missing (1): a/b; unexpected (1): x; " \
                          "mis-shaped: c has (1,), model needs (2,)"
    assert one_line(ValueError("  one  \n\n  two \n")) == "one two"
    assert one_line(ValueError("single")) == "single"
    assert one_line(KeyError()) == "KeyError" and one_line(ValueError("\n \n")) == "ValueError"


def test_why_is_the_type_and_the_first_line_or_an_os_errors_strerror():
    assert why(ValueError("bad value\nmore detail")) == "ValueError: bad value"
    assert why(OSError(errno.ENOSPC, "No space left on device", "/x")) == "OSError: No space left on device"
    assert why(RuntimeError()) == "RuntimeError"
    assert why(ValueError("x" * 1000)) == "ValueError: " + "x" * 300


def test_needs_imports_an_installed_module_and_names_the_extra_of_a_missing_one():
    assert needs("json", "core", "reading") is sys.modules["json"]
    with pytest.raises(MissingExtraError) as e:
        needs("no_such_module_xyz.sub", "torch", "reading a PyTorch checkpoint")
    assert str(e.value) == ("needs the 'torch' extra for reading a PyTorch checkpoint (no module "
                            "'no_such_module_xyz'): pip install \"mixer-toolkit[torch]\"")
    assert e.value.extras == ["torch"] and e.value.module == "no_such_module_xyz" and e.value.__cause__ is None


def test_missing_extra_messages_name_all_or_any_of_the_extras():
    assert str(MissingExtraError(["jax", "torch"])) == \
        "needs the 'jax' and 'torch' extras: pip install \"mixer-toolkit[jax,torch]\""
    assert str(MissingExtraError(["torch", "jax"], any_of=True, what="mixer-predict")) == \
        ("needs the 'torch' or 'jax' extra for mixer-predict: pip install \"mixer-toolkit[torch]\" or "
         "\"mixer-toolkit[jax]\"")


def test_importable_finds_without_importing_and_a_refusing_finder_means_absent(monkeypatch):
    assert importable("json") and not importable("no_such_module_xyz") and not importable("json.no_such_sub")

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name == "refused_module_xyz":
                raise ImportError("blocked")
    monkeypatch.setattr(sys, "meta_path", [Refuse(), *sys.meta_path])
    assert not importable("refused_module_xyz")
    assert "refused_module_xyz" not in sys.modules
