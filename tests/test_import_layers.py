"""The layers point one way: framework-free core <- models <- tools, with no import cycles, read
from the code's own imports (function-level ones included); each package imports in a fresh
interpreter without the other framework; a user's own convert.py does not shadow anything."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, has_module, subprocess_env

# folder -> import name (convert/ is installed as mixer_convert)
PACKAGES = {"convert": "mixer_convert", "mixer_jax": "mixer_jax", "mixer_torch": "mixer_torch"}
MODELS = {"mixer_jax", "mixer_jax.model", "mixer_jax.nnx", "mixer_jax.stacking", "mixer_torch", "mixer_torch.model",
          "mixer_torch.mlp_mixer"}
FRAMEWORKS = {"jax", "jaxlib", "flax", "optax", "orbax", "torch", "torchvision", "timm"}


def module_files() -> dict[str, Path]:
    out = {}
    for folder, name in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([name, *parts])] = f
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[tuple[str, bool]]]:
    """(our modules it imports, {(third-party top-level name, at module level?)})."""
    ours, others = set(), set()
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n in modules:
                ours.add(n)
            elif n.split(".")[0] in FRAMEWORKS:
                others.add((n.split(".")[0], id(node) in top_level))
    return ours, others


def layer(module: str) -> str:
    if module.startswith("mixer_convert.tools") or module == "mixer_convert.tools":
        return "tools"
    if module.startswith("mixer_convert"):
        return "core"
    return "model" if module in MODELS else "tools"


GRAPH = {m: imports_of(f, module_files()) for m, f in module_files().items()}


def test_the_core_imports_neither_model_nor_any_tool():
    bad = {m: sorted(d for d in deps if layer(d) != "core")
           for m, (deps, _) in GRAPH.items() if layer(m) == "core"}
    assert not {m: d for m, d in bad.items() if d}


def test_the_models_import_only_the_core_and_their_own_framework():
    for m, (deps, frameworks) in GRAPH.items():
        if layer(m) != "model":
            continue
        # the core, or its own package's model modules: never training (mixer_jax.configs, ...)
        assert all(layer(d) in ("core", "model") and d.split(".")[0] in (m.split(".")[0], "mixer_convert")
                   for d in deps), (m, deps)
        other = {"torch", "torchvision"} if m.startswith("mixer_jax") else {"jax", "jaxlib", "flax", "optax", "orbax"}
        assert not {f for f, _ in frameworks} & other, (m, frameworks)


def test_training_and_the_models_import_none_of_the_converters_tools():
    # what the commands share (the CLI convention, the extras) is in the core, for mixer-train too
    for m, (deps, _) in GRAPH.items():
        if m.startswith(("mixer_jax", "mixer_torch")):
            assert not [d for d in deps if layer(d) == "tools" and d.startswith("mixer_convert")], m


def test_the_core_imports_a_framework_only_inside_the_function_that_needs_it():
    for m, (_, frameworks) in GRAPH.items():
        if layer(m) == "core":
            assert not [f for f, at_top in frameworks if at_top], m


def test_there_are_no_import_cycles_even_through_function_level_imports():
    graph = {m: {d for d in deps if d != m} for m, (deps, _) in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_the_graph_check_sees_function_level_imports():
    # --verify imports the parity harness only inside the function that runs a framework's model
    deps, _ = GRAPH["mixer_convert.tools.verify"]
    assert "mixer_convert.tools.parity" in deps and "mixer_convert.load" in deps


def _fresh(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=subprocess_env())


@pytest.mark.parametrize("package,absent", [
    ("mixer_convert", FRAMEWORKS),
    ("mixer_convert.load", FRAMEWORKS),
    ("mixer_torch", {"jax", "flax", "optax", "orbax"}),
    ("mixer_jax", {"torch"}),
    ("mixer_jax.nnx", {"torch"}),
    ("mixer_convert.tools.cli", FRAMEWORKS),
])
def test_each_package_imports_alone_in_a_fresh_interpreter(package, absent, tmp_path):
    top = package.split(".")[0]
    if top == "mixer_torch" and not has_module("torch") or top == "mixer_jax" and not has_module("flax"):
        pytest.skip("framework not installed")
    r = _fresh(f"import sys, {package}; print(sorted(m for m in {sorted(absent)!r} if m in sys.modules))", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_users_own_convert_py_does_not_shadow_the_toolkit(tmp_path):
    (tmp_path / "convert.py").write_text("raise SystemExit('the user convert.py was imported')\n")
    r = _fresh("import mixer_convert, mixer_convert.load, mixer_convert.tools.bridge; print('ok')", tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
