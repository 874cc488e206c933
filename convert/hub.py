"""Fetching published checkpoints: :func:`resolve` turns any checkpoint source into a local path
(the first step of :mod:`mixer_convert.load`), downloading a published file into the cache once.

Sources: a local path (file or folder), used as it is and never touching the network; a name the
catalogue knows (:mod:`mixer_convert.catalogue`), downloaded from ``$MIXER_CHECKPOINT_BASE_URL``
(default :data:`~mixer_convert.catalogue.DEFAULT_BASE_URL`); ``hf-hub:timm/<repo>[@revision]``
through huggingface_hub (the optional ``hub`` extra, with its own cache and offline mode).

Downloads land in ``$MIXER_CACHE`` (default ``$XDG_CACHE_HOME/mixer-toolkit``) under
``mixer_models/<bucket path>``. One download at a time per file (a filelock on ``<file>.lock``;
a second caller waits, then uses the finished file); bytes go to ``<file>.part``, resumed with
an HTTP Range request after a cut connection; then the zip CRCs, the architecture in the headers
(the catalogue's variant and head size) and the sha256 recorded at the first download
(``<file>.json``; Google publishes none, so the first download is trusted) must pass before the
file is renamed into place. A damaged download is deleted; a cut one is kept to be resumed.

The fetcher is the standard library's urllib, hand-written on purpose: a torch-only install (no
extra) must download too, and the maintained fetchers either need an extra (requests,
huggingface_hub's http_get) or do not resume a cut download (pooch).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from filelock import FileLock, Timeout

from mixer_convert.atomic import atomic_path
from mixer_convert.catalogue import (CATALOGUE, DEFAULT_BASE_URL, HF_PREFIX, Published, bucket_path_entry,
                                     lookup)
from mixer_convert.errors import CheckpointError
from mixer_convert.formats import npz
from mixer_convert.layouts import canonicalize
from mixer_convert.params import check_config
from mixer_convert.source import Source

TIMEOUT_S = 60.0  # per socket operation, not for the whole download
_CHUNK = 1 << 20


class DownloadError(CheckpointError):
    """A published file could not be fetched (network, HTTP error); says how to get it by hand."""


def base_url() -> str:
    return os.environ.get("MIXER_CHECKPOINT_BASE_URL", DEFAULT_BASE_URL).rstrip("/")


def cache_dir() -> Path:
    if os.environ.get("MIXER_CACHE"):
        return Path(os.environ["MIXER_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mixer-toolkit"


def url_of(entry: Published) -> str:
    return f"{base_url()}/{entry.path}"


def cached_path(entry: Published) -> Path:
    """Where the cache keeps a published file (``.npz`` appended to the gsam names)."""
    return cache_dir() / "mixer_models" / (entry.path if entry.path.endswith(".npz") else entry.path + ".npz")


# --------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------


def is_remote(source: str | os.PathLike) -> bool:
    """Whether :func:`resolve` would fetch ``source`` (no network used to answer)."""
    s = os.fspath(source)
    return not os.path.exists(s) and (s.startswith(HF_PREFIX) or lookup(s, base_url()) is not None)


def resolve(source: str | os.PathLike, progress: bool | None = None) -> Path:
    """A local path for any checkpoint source, downloading a published file into the cache first
    if needed (with a progress bar on stderr unless ``progress`` is False). An existing local path is
    returned as it is; anything else that is neither a catalogue name nor an hf-hub name is
    returned as a path too (its reader reports it missing). ``~`` is the user's home."""
    s = os.path.expanduser(os.fspath(source))
    if os.path.exists(s):
        return Path(s)
    if s.startswith(HF_PREFIX):
        return _hf_download(s[len(HF_PREFIX):])
    entry = lookup(s, base_url())
    if entry is not None:
        return fetch(entry, progress)
    if re.match(r"^[a-z][a-z0-9+.-]*://", s, re.IGNORECASE):
        raise CheckpointError(f"{s} is not a published Mixer checkpoint; only the catalogue's files "
                              "(mixer-convert --list) and hf-hub: names are downloaded; download it "
                              "yourself and pass its path")
    entry = bucket_path_entry(s)
    if entry is not None:
        raise FileNotFoundError(f"no such checkpoint: {s!r} (to download the published file, "
                                f"pass {entry.name} or {entry.gs_url})")
    return Path(s)


def fetch(entry: Published, progress: bool | None = None) -> Path:
    """The cached copy of a published file, downloaded and verified if it is not there yet."""
    dst = cached_path(entry)
    if dst.exists() and _record(dst) is not None:
        _check_cached(dst, entry)  # no lock: the file appears only once complete (rename)
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dst):
        if dst.exists():  # another process finished it while we waited, or the user placed it
            _check_cached(dst, entry)
        else:
            _download(entry, dst, progress)
    return dst


def cached(entry: Published) -> bool:
    return cached_path(entry).exists()


# --------------------------------------------------------------------------------------
# Cache records and checks
# --------------------------------------------------------------------------------------


def _record_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".json")


def _record(dst: Path) -> dict | None:
    try:
        return json.loads(_record_path(dst).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise CheckpointError(f"{_record_path(dst)} is damaged; delete it (and {dst.name}) to download again") \
            from None


def _write_record(dst: Path, st: os.stat_result, url: str, digest: str) -> None:
    rec = {"url": url, "sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "downloaded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with atomic_path(_record_path(dst), force=True) as tmp:
        tmp.write_text(json.dumps(rec, indent=1) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_cached(dst: Path, entry: Published) -> None:
    """A cached file must still be what was downloaded: same size and mtime as recorded (cheap),
    else the same sha256 (a touched but unchanged file passes). A file without a record (put
    there by hand) is verified like a download and then recorded."""
    rec = _record(dst)
    st = dst.stat()
    if rec is None:
        _verify(dst, entry, f"{dst} (placed in the cache by hand)")
        _write_record(dst, st, "(placed by hand)", sha256_file(dst))
        return
    if (rec.get("size"), rec.get("mtime_ns")) == (st.st_size, st.st_mtime_ns):
        return
    digest = sha256_file(dst)
    if digest != rec.get("sha256"):
        raise CheckpointError(f"cached {dst} changed since it was downloaded (sha256 {digest[:12]}..., "
                              f"recorded {str(rec.get('sha256'))[:12]}...); delete it to download it again")
    _write_record(dst, st, rec.get("url", ""), digest)


def _verify(path: Path, entry: Published, what: str) -> None:
    """Zip CRCs, then the architecture in the headers against the catalogue's entry. Every
    published file is an official-layout .npz, so its headers are all that is read."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{what} is not a valid .npz ({e})") from None
    if bad is not None:
        raise CheckpointError(f"{what} is corrupt: CRC mismatch in {bad}")
    try:
        entries, close = npz.read(Source.open(path))
        close()
        _, entries = canonicalize(entries, "flax")
        cfg = check_config({k: e[0] for k, e in entries.items()}, {k: e[1] for k, e in entries.items()},
                           variant=entry.variant, what=str(path))
    except ValueError as e:
        raise CheckpointError(f"{what} is not {entry.path}: {str(e).splitlines()[0]}") from None
    if cfg.num_classes != entry.num_classes:
        raise CheckpointError(f"{what} is not {entry.path}: its head has {cfg.num_classes} classes, "
                              f"the published file {entry.num_classes}")


# --------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(dst: Path):
    """One downloader per file across processes. filelock never deletes its lock file (deleting
    it would let a third process lock a fresh inode while the second still holds the old one)."""
    lock = FileLock(dst.with_name(dst.name + ".lock"))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        print(f"waiting for another process to finish downloading {dst.name}", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _manual_hint(entry: Published, url: str) -> str:
    return (f"download it yourself with `gsutil cp {entry.gs_url} .` or `curl -fLO {url}` "
            "and pass the file's path")


def _download(entry: Published, dst: Path, progress: bool | None) -> None:
    url = url_of(entry)
    part = dst.with_name(dst.name + ".part")
    try:
        _fetch_to(url, part, _Progress(f"downloading {url} ({entry.mib:.0f} MiB) to {dst}", entry.name, progress))
    except OSError as e:  # network: keep the .part so the next call resumes it
        raise DownloadError(f"cannot download {url}: {_reason(e)}; {_manual_hint(entry, url)}") from None
    try:
        _verify(part, entry, f"the file downloaded from {url}")
        digest = sha256_file(part)
        rec = _record(dst)
        if rec is not None and rec.get("sha256") != digest:
            raise CheckpointError(
                f"the file downloaded from {url} has sha256 {digest[:12]}..., but the first download "
                f"({rec.get('downloaded')}) had {str(rec.get('sha256'))[:12]}...; not kept. If the "
                f"published file really changed, delete {_record_path(dst)} to accept it")
        _write_record(dst, part.stat(), url, digest)
        os.replace(part, dst)
    except Exception:
        part.unlink(missing_ok=True)  # damaged or refused: the next attempt starts from zero
        raise


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


class _Progress:
    """A line saying what is downloaded and a byte bar, both shown only once the server answers
    (so a failed connection prints nothing but its one-line error); none if ``enabled`` is False."""

    def __init__(self, announce: str, desc: str, enabled: bool | None) -> None:
        self.announce, self.desc, self.enabled, self.bar = announce, desc, enabled is not False, None

    def start(self, total: int | None, done: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            print(self.announce, file=sys.stderr)
            self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=self.desc, file=sys.stderr)
        else:  # a resumed attempt
            self.bar.reset(total=total)
            self.bar.update(done)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fetch_to(url: str, part: Path, bar: _Progress) -> None:
    """Download ``url`` into ``part``, resuming what is there; retried while each attempt makes
    progress (a cut connection), raised as soon as one makes none."""
    try:
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                _fetch_once(url, part, before, bar)
                return
            except urllib.error.HTTPError as e:
                if e.code == 416 and before:  # our .part is not a prefix of the file: start over
                    part.unlink()
                    continue
                raise
            except OSError:
                if (part.stat().st_size if part.exists() else 0) <= before:
                    raise
                time.sleep(0.2)
    finally:
        bar.close()


def _fetch_once(url: str, part: Path, offset: int, bar: _Progress) -> None:
    headers = {"User-Agent": "mixer-toolkit"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as r:
        length = r.headers.get("Content-Length")
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range") or "")
        if offset and r.status == 206 and m and int(m.group(1)) == offset:
            mode = "ab"
            total = int(m.group(2)) if m.group(2) != "*" else None
        else:  # no range asked, or the server ignored it: the body is the whole file
            mode, offset = "wb", 0
            total = int(length) if length is not None else None
        bar.start(total, offset)
        with open(part, mode) as f:
            while chunk := r.read(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        # http.client returns a short body without an error when the connection drops
        raise ConnectionError(f"connection closed after {size} of {total} bytes")


# --------------------------------------------------------------------------------------
# Hugging Face hub
# --------------------------------------------------------------------------------------

HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repos hold, preferred first


def _hf_download(spec: str) -> Path:
    repo, _, revision = spec.partition("@")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"hf-hub:{spec} needs huggingface_hub: pip install 'mixer-toolkit[hub]'") from None
    missing: list[str] = []
    for filename in HF_FILES:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision or None))
        except (EntryNotFoundError, LocalEntryNotFoundError) as e:
            missing.append(f"{filename}: {str(e).splitlines()[0]}")
        except Exception as e:  # network, auth, unknown repo: huggingface_hub's own message
            raise DownloadError(f"cannot download hf-hub:{spec}: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    raise DownloadError(f"cannot download hf-hub:{spec}: " + "; ".join(missing) +
                        " (offline? HF_HUB_OFFLINE=1 uses only huggingface_hub's cache)")


# --------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------


def catalogue_table() -> str:
    """The catalogue as text: name, bucket path, variant, head, MiB, and whether it is cached."""
    rows = [("name", "also", "path (gs://mixer_models/...)", "variant", "head", "MiB", "cached")]
    for e in CATALOGUE:
        rows.append((e.name, e.big_vision_name, e.path, e.variant, f"{e.num_classes:,}", f"{e.mib:.2f}",
                     "yes" if cached(e) else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines + [f"cache: {cache_dir() / 'mixer_models'}; base URL: {base_url()}"])
