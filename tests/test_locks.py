"""The locks in .ci/locks/ (written by `bash .ci/lock`, installed by `bash .ci/run` and the README's
install command) pin what pyproject.toml asks for: an edit to pyproject without a new lock fails
here, before a fresh machine installs something that was never tested."""
import re

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import ROOT
from test_drift import drift

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as the lock's platform

LOCKS = ROOT / ".ci" / "locks"
# The platform the locks are for (.ci/lock's --python-version / --python-platform).
PLATFORM = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements() -> list[tuple[str, Requirement]]:
    project = _pyproject()
    reqs = [("core", Requirement(r)) for r in project["dependencies"]]
    for extra, items in project["optional-dependencies"].items():
        reqs += [(extra, Requirement(r)) for r in items]
    return reqs


@pytest.mark.parametrize("where,req", _requirements(), ids=lambda v: str(v))
def test_every_requirement_of_every_extra_is_pinned_within_its_range(where, req):
    lock = drift.read_lock(LOCKS / "project.txt")
    if req.marker is not None and not req.marker.evaluate(PLATFORM):
        pytest.skip(f"{req} is not for the lock's platform")
    name = drift.canonical(req.name)
    assert name in lock, f"{req} ({where}) is not in the lock: run bash .ci/lock"
    assert Version(lock[name]) in req.specifier, f"{req} ({where}): the lock pins {lock[name]}; run bash .ci/lock"


def test_the_lock_holds_the_platforms_torch_and_setuptools_for_the_editable_install():
    lock = drift.read_lock(LOCKS / "project.txt")
    platform = drift.read_lock(LOCKS / "platform.txt")
    assert lock["torch"] == platform["torch"] == "2.13.0"
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert all(Version(lock["setuptools"]) in Requirement(r).specifier for r in build)


def test_the_timm_oracle_lock_pins_what_its_input_asks_for():
    lock = drift.read_lock(LOCKS / "timm-oracle.txt")
    for line in (LOCKS / "timm-oracle.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert Version(lock[drift.canonical(req.name)]) in req.specifier, req


def test_every_install_command_of_the_readme_the_docs_and_ci_uses_the_lock():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    installs = [cmd for page in pages for cmd in re.findall(r"pip install [^\n`]*-e \"\.\[[^\n`]*", page.read_text())]
    assert installs and all("-c .ci/locks/project.txt" in cmd for cmd in installs), installs
    run = (ROOT / ".ci" / "run").read_text()
    assert 'LOCK=.ci/locks/project.txt' in run and 'constraints="$LOCK"' in run and "timm-oracle.txt" in run
    assert run.count('-c "$constraints"') == 2  # setuptools, then the project with its extras


def test_no_pin_carries_a_build_label_that_only_one_index_has():
    """torch==2.13.0+cpu is on one machine's disk and PyTorch's own index, not on PyPI: a fresh
    machine could not install it. A bare version takes the local build where there is one."""
    for name in ("project.txt", "timm-oracle.txt", "platform.txt"):
        labelled = {n: v for n, v in drift.read_lock(LOCKS / name).items() if "+" in v}
        assert not labelled, f"{name}: {labelled}"
