"""mkdocs hooks (mkdocs.yml ``hooks:``): the API reference reads this checkout's code, and the
site's figures are drawn at build time from the JSON they show, so neither can go stale.

* ``mixer_convert`` lives in the folder ``convert/``; a temporary folder holding a link named
  ``mixer_convert`` goes first on ``sys.path``, where mkdocstrings (griffe) looks for packages.
  Nothing is imported: the reference is read from the source.
* Sphinx roles (``:func:``, ``:class:``, ...) in the docstrings are dropped from the rendered
  reference, their code kept.
* ``figures/``: the parity picture (``mixer_convert.tools.parity_plot`` on ``docs/data/parity_b16_cpu.json``),
  training's curves (``mixer_jax.metrics.plot_metrics`` on ``docs/data/digits_metrics.jsonl``, what
  ``mixer-train --config digits`` wrote) and RESULTS.md's figures (``benchmarks/plot_results.py``
  on ``benchmarks/results/*.json``).
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "data"
_TMP = Path(tempfile.mkdtemp(prefix="mixer-docs-"))
atexit.register(shutil.rmtree, _TMP, True)


def on_config(config):
    link = _TMP / "path" / "mixer_convert"
    if not link.exists():
        link.parent.mkdir(parents=True)
        link.symlink_to(ROOT / "convert", target_is_directory=True)
    for path in (str(ROOT), str(link.parent)):  # this checkout's packages before any installed copy
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    return config


def _figures(folder: Path) -> list[Path]:
    import importlib

    parity_plot = importlib.import_module("mixer_convert.tools.parity_plot")
    metrics = importlib.import_module("mixer_jax.metrics")
    spec = importlib.util.spec_from_file_location("plot_results", ROOT / "benchmarks" / "plot_results.py")
    plot_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_results)

    folder.mkdir(parents=True, exist_ok=True)
    out = [parity_plot.plot(json.loads((DATA / "parity_b16_cpu.json").read_text()), folder / "parity_b16_cpu.png")]
    metrics.plot_metrics(DATA / "digits_metrics.jsonl", folder / "digits_metrics.png")
    out.append(folder / "digits_metrics.png")
    return out + plot_results.draw_all(folder)


# Sphinx roles in the docstrings (``:func:`x```), which mkdocstrings shows as they are: the code stays.
_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj):(?=<code)")


def on_page_content(html, page, config, files):
    return _ROLE.sub("", html)


def on_files(files, config):
    folder = _TMP / "figures"
    if not folder.exists():  # once per process (mkdocs serve rebuilds reuse them)
        _figures(folder)
    for png in sorted(folder.glob("*.png")):
        files.append(File.generated(config, f"figures/{png.name}", abs_src_path=str(png)))
    return files
