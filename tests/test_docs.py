"""The documentation (README.md, mkdocs.yml, docs/) cannot drift from the code:

* every ``python`` block of README.md and docs/ runs, page by page in page order, the blocks of a
  page sharing one namespace (sybil), in a sandbox: the published checkpoint names resolve to random
  weights of shrunk variants in a private cache (helpers/docs.py), nothing is downloaded, and the
  working folder holds ``photo.jpg`` and ``Mixer-B_16.npz``. A block that cannot run here says why
  in a ``<!-- skip: next "reason" -->`` comment just above it;
* ``bash`` blocks are not run (they install, train for hours, download, or address TPU pods), but
  each ``mixer-*`` command in them is parsed by that command's own parser (and mixer-train's
  ``--set`` keys applied to its config), and each repository script they name exists;
* ``text`` blocks are shown only; any other language, or none, is an error here;
* ``mkdocs build --strict`` passes (broken links, anchors, API names fail it), and headless
  Chromium renders every page; it screenshots the home page and an API page.

Sybil rather than pytest-markdown-docs: a page's blocks share one namespace and run in order, as a
reader types them (pytest-markdown-docs runs each block alone unless marked as a continuation), its
skip directive is an HTML comment that the site does not show, and its parser is a library this
file calls, so ``pytest tests`` runs the pages without a collection flag or docs/ as a test path.
"""
import contextlib
import functools
import http.server
import io
import shutil
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import pytest

from conftest import ROOT, has_module, subprocess_env
from helpers.docs import PAGES, command_lines, fenced_blocks, script_paths, write_published, write_user_files

LANGUAGES = {"python": "run", "bash": "commands parsed", "text": "shown"}
requires_docs = pytest.mark.skipif(not all(map(has_module, ("mkdocs", "material", "mkdocstrings_handlers.python"))),
                                   reason="needs the docs extra: pip install -e '.[docs]' -c .ci/locks/project.txt")
requires_sybil = pytest.mark.skipif(not has_module("sybil"), reason="needs the docs extra (sybil)")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ---- README -----------------------------------------------------------------------------------


def test_the_readme_is_a_front_door_of_at_most_200_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_relative_link_of_the_readme_leads_to_a_file_of_the_checkout():
    import re

    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert local and [link for link in local if not (ROOT / link).exists()] == []


# ---- code blocks ------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_code_block_is_in_a_language_the_suite_runs_or_checks(page):
    wrong = [(line, lang) for line, lang, _ in fenced_blocks(page) if lang not in LANGUAGES]
    assert wrong == [], f"{_rel(page)}: blocks at these lines need one of {sorted(LANGUAGES)}"


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    write_published(monkeypatch, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    write_user_files(work)
    monkeypatch.chdir(work)
    return work


@functools.lru_cache(None)
def _sybil():
    from sybil import Sybil
    from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

    return Sybil(parsers=[PythonCodeBlockParser(), SkipParser()], patterns=["*.md"])


# Pages whose blocks compile several models (all three frameworks, fp32 and bf16, gradients): 15-25 s each.
HEAVY = {"docs/models.md", "docs/parity.md"}
PYTHON_PAGES = [pytest.param(p, marks=[pytest.mark.slow] if _rel(p) in HEAVY else [], id=_rel(p))
                for p in PAGES if any(lang == "python" for _, lang, _ in fenced_blocks(p))]


@requires_sybil
@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_every_python_block_of_the_page_runs_in_page_order(page, sandbox):
    from unittest import SkipTest

    from sybil.evaluators.python import PythonEvaluator

    ran = 0
    for example in _sybil().parse(page).examples():
        try:
            example.evaluate()
        except SkipTest:
            continue
        except Exception as e:
            frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(page)]
            where = f"{frames[-1].lineno}: {frames[-1].line}" if frames else str(example.line)
            raise AssertionError(f"{_rel(page)}:{where}: {type(e).__name__}: {e}") from e
        ran += isinstance(example.region.evaluator, PythonEvaluator)
    assert ran, f"{_rel(page)}: no Python block ran"


def test_the_python_blocks_that_do_not_run_are_few_and_say_why():
    import re

    skips = [(_rel(p), m.group(1)) for p in PAGES
             for m in re.finditer(r"^ *<!-- skip: (.*?) -->$", p.read_text(), re.MULTILINE)]
    assert all(re.fullmatch(r'next "[^"]{15,}"', arg) for _, arg in skips), skips
    runnable = sum(lang == "python" for p in PAGES for _, lang, _ in fenced_blocks(p))
    assert len(skips) <= runnable // 10, f"{len(skips)} of {runnable} Python blocks skipped: {skips}"


def _scripts() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as CI
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _check_command(argv: list[str]) -> None:
    import importlib

    target = _scripts().get(argv[0])
    assert target, f"{argv[0]} is not a command of this project ({', '.join(_scripts())})"
    module = importlib.import_module(target.split(":")[0])
    if not hasattr(module, "build_parser"):  # mixer-demo takes no arguments
        assert argv[1:] == [], argv
        return
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = module.build_parser().parse_args(argv[1:])
        except SystemExit:
            raise AssertionError(err.getvalue().strip()) from None
    if argv[0] == "mixer-train":
        from mixer_jax.configs import get_config
        from mixer_jax.overrides import override
        override(get_config(args.config), args.overrides)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_the_commands_of_the_bash_blocks_parse_and_their_scripts_exist(page):
    problems = []
    for line, lang, source in fenced_blocks(page):
        if lang != "bash":
            continue
        problems += [f"line {line}: {path} does not exist" for path in script_paths(source) if not (ROOT / path).exists()]
        for argv in command_lines(source):
            try:
                _check_command(argv)
            except (AssertionError, ValueError) as e:
                problems.append(f"line {line}: {' '.join(argv)}: {e}")
    assert problems == [], "\n".join(problems)


# ---- the site ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(out)], capture_output=True, text=True, timeout=900,
                       env=subprocess_env(NO_MKDOCS_2_WARNING="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def _pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("index.html") if "search" not in p.parts)


@pytest.mark.slow  # 10-30 s: the figures are drawn and the API reference read
@requires_docs
def test_the_site_builds_strictly_with_every_page_the_reference_and_the_figures(site):
    names = {str(p.parent.relative_to(site)) for p in _pages(site)}
    assert {".", "getting-started", "predict", "converting", "fine-tuning", "scale", "parity", "benchmarks",
            "architecture", "api/mixer_convert", "api/mixer_jax", "api/mixer_jax_nnx", "api/mixer_torch"} <= names
    api = (site / "api" / "mixer_convert" / "index.html").read_text()
    assert 'id="mixer_convert.load.load_checkpoint"' in api
    figures = {p.name for p in (site / "figures").glob("*.png")}
    assert {"parity_b16_cpu.png", "digits_metrics.png", "results_cpu.png", "input_cpu.png"} <= figures


@pytest.mark.parametrize("module", ["mixer_convert", "mixer_jax", "mixer_jax.nnx", "mixer_torch"])
def test_every_public_name_of_a_package_is_in_the_api_reference(module):
    import ast

    folder = {"mixer_convert": "convert", "mixer_jax": "mixer_jax", "mixer_jax.nnx": "mixer_jax", "mixer_torch": "mixer_torch"}
    source = ROOT / folder[module] / ("nnx.py" if module == "mixer_jax.nnx" else "__init__.py")
    tree = ast.parse(source.read_text())
    names = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                  and getattr(n.targets[0], "id", "") == "__all__"), None)
    if names is None:  # mixer_jax.nnx: its public functions and classes
        names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
    page = (ROOT / "docs" / "api" / f"{module.replace('.', '_')}.md").read_text()
    assert [n for n in names if n not in page] == []


# ---- in a browser -----------------------------------------------------------------------------


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


requires_chromium = pytest.mark.skipif(chromium() is None, reason="no Chromium here (apt-get install -y chromium; "
                                                                  "bash .ci/run installs it where apt-get is usable)")


@pytest.fixture(scope="module")
def served(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _js_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]


@pytest.mark.slow  # a browser per page: 1-3 s each
@requires_docs
@requires_chromium
def test_every_page_renders_in_chromium_without_script_errors(served, site, tmp_path):
    failed = []
    for page in _pages(site):
        url = f"{served}/{page.parent.relative_to(site).as_posix()}/".replace("/./", "/")
        r = _chromium(tmp_path, "--dump-dom", url)
        if r.returncode or 'class="md-content"' not in r.stdout or "<h1" not in r.stdout or _js_errors(r.stderr):
            failed.append(f"{url}: rc {r.returncode}, {_js_errors(r.stderr)[:3]}")
    assert failed == []


@pytest.mark.slow
@requires_docs
@requires_chromium
@pytest.mark.parametrize("path", ["", "api/mixer_convert/"], ids=["home", "api"])
def test_chromium_screenshots_show_the_themed_page(served, tmp_path, path):
    import numpy as np
    from PIL import Image

    png = tmp_path / f"{path.strip('/').replace('/', '_') or 'home'}.png"
    r = _chromium(tmp_path, "--window-size=1280,900", f"--screenshot={png}", f"{served}/{path}")
    assert r.returncode == 0 and png.exists(), r.stderr[-2000:]
    shot = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert shot.shape[:2] == (900, 1280)
    header = shot[5:40, 300:900].reshape(-1, 3)
    assert np.abs(np.median(header, axis=0) - (63, 81, 181)).max() < 25  # material's indigo bar: the CSS loaded
    body = shot[150:850, 300:1200]
    assert (body.std(axis=(0, 1)) > 10).all()  # text on the page, not a blank or error screen
    print(f"screenshot: {png}")
