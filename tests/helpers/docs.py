"""What tests/test_docs.py needs to run and check the documentation's code blocks: the sandbox the
Python blocks run in (published names resolved to small local files, no network), the fenced blocks
of a Markdown file, and the ``mixer-*`` command lines of its bash blocks."""
from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import numpy as np

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Every size (S, B, L, H) shrunk to this (hidden, blocks, tokens MLP, channels MLP) while the docs
# run: the published names keep their patch sizes, image sizes and heads, so each page's code runs
# as written, compiling small models in a second or two instead of downloading hundreds of MB.
TINY_SIZE = (16, 2, 8, 32)
# No published file is ever fetched: anything the cache lacks fails at once, naming the URL.
NO_SERVER = "http://127.0.0.1:9"

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence) *$",
                    re.MULTILINE | re.DOTALL)


def fenced_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line, language, source) of every fenced code block of a Markdown file."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group("info").strip().split(" ")[0], textwrap.dedent(m.group("body")))
            for m in _FENCE.finditer(text)]


def write_published(monkeypatch, folder: Path) -> None:
    """Every published checkpoint, as random weights of the shrunk variants, in a private cache
    (``$MIXER_CACHE``) placed there by hand: the cache verifies each on first use, as it would a
    real one, and never downloads."""
    from mixer_convert import catalogue, hub, random_params, spec

    for size in spec.SIZES:
        monkeypatch.setitem(spec.SIZES, size, TINY_SIZE)
    monkeypatch.setenv("MIXER_CACHE", str(folder / "cache"))
    monkeypatch.setenv("MIXER_CHECKPOINT_BASE_URL", NO_SERVER)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for seed, entry in enumerate(catalogue.CATALOGUE):
        path = hub.cached_path(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **random_params(spec.config_for(entry.variant, num_classes=entry.num_classes), seed))


def write_user_files(folder: Path) -> None:
    """What the pages' code reads from the working folder: ``photo.jpg`` (a 500x375 photo-like
    JPEG), ``Mixer-B_16.npz`` (the official i21k file, as a user who downloaded it has it) and
    ``mixer-toolkit`` (a clone of this repository: this checkout, for torch.hub's ``source="local"``)."""
    from PIL import Image

    from mixer_convert import hub
    from mixer_convert.catalogue import published_for

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    base = np.stack([x / 500 * 255, y / 375 * 255, (x + y) % 256], axis=-1)
    photo = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(photo).save(folder / "photo.jpg", quality=90)
    (folder / "Mixer-B_16.npz").write_bytes(hub.cached_path(published_for("B/16", "i21k")).read_bytes())
    (folder / "mixer-toolkit").symlink_to(ROOT, target_is_directory=True)


# ---- bash blocks -----------------------------------------------------------------------------


def command_lines(source: str) -> list[list[str]]:
    """The ``mixer-*`` invocations of a bash block, as argument lists: continuation lines joined,
    comments dropped, ``a && b`` and ``a; b`` split, leading ``VAR=value`` assignments left out."""
    out = []
    for line in source.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for w in words + [";"]:
            if w in ("&&", ";", "||", "|"):
                while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
                    command.pop(0)
                if command and command[0].startswith("mixer-"):
                    out.append(command)
                command = []
            else:
                command.append(w)
    return out


def script_paths(source: str) -> list[str]:
    """Repository scripts a bash block runs (``bash X.sh``, ``python X.py``)."""
    words = shlex.split(source.replace("\\\n", " "), comments=True)
    return [b for a, b in zip(words, words[1:])
            if (a in ("bash", "python", "python3") and b.endswith((".sh", ".py"))) or (a == "bash" and "/" in b)]
