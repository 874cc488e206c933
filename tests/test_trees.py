"""mixer_convert.trees: the one flattener of nested mappings, and its inverse."""
import pytest

from mixer_convert.trees import TreeError, flatten, nest


def test_flatten_joins_nested_keys_and_nest_undoes_it():
    tree = {"stem": {"kernel": 1, "bias": 2}, "MixerBlock_0": {"LayerNorm_0": {"scale": 3}}, "top": 4}
    flat = flatten(tree)
    assert flat == {"stem/kernel": 1, "stem/bias": 2, "MixerBlock_0/LayerNorm_0/scale": 3, "top": 4}
    assert nest(flat) == tree
    assert flatten({"optim": {"lr": 0.1}, "steps": 3}, ".") == {"optim.lr": 0.1, "steps": 3}


def test_lists_are_leaves_unless_sequences_are_asked_for():
    tree = {"data": {"crop_area": [0.05, 1.0]}, "layers": [{"w": 1}, {"w": 2}]}
    assert flatten(tree, ".")["data.crop_area"] == [0.05, 1.0]
    assert flatten(tree, sequences=True) == {"data/crop_area/0": 0.05, "data/crop_area/1": 1.0,
                                             "layers/0/w": 1, "layers/1/w": 2}


@pytest.mark.parametrize("tree", [{"a/b": 1, "a": {"b": 2}}, {"a": {"b": 2}, "a/b": 1}])
def test_two_paths_to_one_key_are_an_error_not_an_overwrite(tree):
    with pytest.raises(TreeError, match="two entries are both named 'a/b'"):
        flatten(tree)


def test_nesting_deeper_than_the_limit_is_refused():
    deep = {}
    node = deep
    for _ in range(70):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(TreeError, match="nested more than 64 levels deep"):
        flatten(deep)
    assert flatten(deep, max_depth=100) == {}  # empty mappings hold no entries


@pytest.mark.parametrize("flat", [{"a": 1, "a/b": 2}, {"a/b": 2, "a": 1}])
def test_nest_refuses_a_key_that_is_both_an_entry_and_a_section(flat):
    with pytest.raises(TreeError, match="both an entry and a section"):
        nest(flat)


def test_tree_errors_are_value_errors():
    assert issubclass(TreeError, ValueError)
