"""Published checkpoints by name: catalogue, resolution, download cache (resume, lock, integrity),
hf-hub names, pretrained model creation. Downloads come from a bucket-shaped HTTP server on
127.0.0.1 serving generated files with the real shapes of gsam/Mixer-S_32 (the smallest
published checkpoint, so the catalogue's own checks run unchanged)."""
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import has_module, images, import_blocker, requires_jax, requires_torch, subprocess_env
from mixer_convert import catalogue, config_for, hub, random_params
from mixer_convert.errors import CheckpointError
from mixer_convert.save import write_params
from mixer_convert.reference import forward

S32 = config_for("S/32", num_classes=1000)
TINY = config_for("S/16", image_size=48, hidden_dim=24, num_blocks=3, tokens_mlp_dim=8, channels_mlp_dim=40,
                  num_classes=5)
REMOTE = "/gsam/Mixer-S_32"  # as listed in the bucket: no .npz suffix
requires_hf = pytest.mark.skipif(not has_module("huggingface_hub"), reason="needs the hub extra (huggingface_hub)")


# ---- a bucket on 127.0.0.1 -------------------------------------------------------------------------


class Bucket:
    """What the server serves and what it was asked. ``cut[path] = n``: the next full response
    for ``path`` stops after n body bytes; ``fail``: HTTP status for every request;
    ``fail_ranged``: HTTP status for Range requests; ``ignore_range``: answer Range requests with
    the whole file (200); ``hold``: an Event; each response stops after its first MiB until it is set."""

    def __init__(self):
        self.files: dict[str, Path] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}
        self.fail: int | None = None
        self.fail_ranged: int | None = None
        self.ignore_range = False
        self.hold: threading.Event | None = None


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        b: Bucket = self.server.bucket
        rng = self.headers.get("Range")
        b.requests.append((self.path, rng))
        if b.fail or (rng and b.fail_ranged):
            return self.send_error(b.fail or b.fail_ranged)
        if self.path not in b.files:
            return self.send_error(404)
        data = b.files[self.path].read_bytes()
        start = 0
        if rng and not b.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                return self.send_error(416)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not rng and self.path in b.cut:
            body = body[: b.cut.pop(self.path)]
        for i in range(0, len(body), 1 << 20):
            self.wfile.write(body[i:i + (1 << 20)])
            if b.hold is not None:
                b.hold.wait(600)  # a hang guard only: the test sets it

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def s32_params():
    return random_params(S32, 0)


@pytest.fixture(scope="session")
def s32_file(tmp_path_factory, s32_params):
    path = tmp_path_factory.mktemp("bucket") / "Mixer-S_32.npz"
    np.savez(path, **s32_params)
    return path


@pytest.fixture
def bucket(tmp_path, monkeypatch, s32_file):
    """A server with gsam/Mixer-S_32 on it, the base URL and an empty cache pointed at it."""
    b = Bucket()
    b.files[REMOTE] = s32_file
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.bucket = b
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    b.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MIXER_CHECKPOINT_BASE_URL", b.url)
    monkeypatch.setenv("MIXER_CACHE", str(tmp_path / "cache"))
    b.cached = tmp_path / "cache" / "mixer_models" / "gsam" / "Mixer-S_32.npz"
    yield b
    server.shutdown()
    server.server_close()


def gets(b: Bucket, path: str = REMOTE) -> list[str | None]:
    return [rng for p, rng in b.requests if p == path]


def leftovers(b: Bucket) -> list[str]:
    d = b.cached.parent
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock")) if d.exists() else []


# ---- resolution without network --------------------------------------------------------------------


def test_a_local_path_is_used_as_is_even_when_it_looks_like_a_name(bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "S").mkdir()
    write_params(random_params(TINY, 0), tmp_path / "S" / "32-gsam", fmt="npz")
    assert hub.resolve("S/32-gsam") == Path("S/32-gsam")
    assert bucket.requests == []


def test_unknown_urls_and_bare_bucket_paths_are_never_downloaded(bucket):
    with pytest.raises(CheckpointError, match="not a published Mixer checkpoint"):
        hub.resolve(f"{bucket.url}/gsam/Mixer-S_33.npz")
    with pytest.raises(FileNotFoundError, match=r"S/32-gsam or gs://mixer_models/gsam/Mixer-S_32"):
        hub.resolve("gsam/Mixer-S_32.npz")  # may be a mistyped local path: the error names the download
    assert bucket.requests == []


# ---- downloads ---------------------------------------------------------------------------------------


def test_download_lands_in_the_cache_and_a_second_use_makes_no_request(bucket, s32_file):
    path = hub.resolve("S/32-gsam", progress=False)
    assert path == bucket.cached and path.read_bytes() == s32_file.read_bytes()
    assert gets(bucket) == [None]
    rec = json.loads(path.with_name(path.name + ".json").read_text())
    assert rec["url"] == bucket.url + REMOTE and rec["size"] == s32_file.stat().st_size
    assert rec["sha256"] == hub.sha256_file(s32_file)
    assert hub.resolve(f"{bucket.url}{REMOTE}") == path and hub.resolve("gs://mixer_models/gsam/Mixer-S_32.npz") == path
    assert len(bucket.requests) == 1
    assert leftovers(bucket) == ["Mixer-S_32.npz", "Mixer-S_32.npz.json"]


def test_a_cut_connection_is_resumed_with_a_range_request(bucket, s32_file):
    size = s32_file.stat().st_size
    bucket.cut[REMOTE] = size // 3
    path = hub.resolve("S/32-gsam", progress=False)
    assert gets(bucket) == [None, f"bytes={size // 3}-"]
    assert path.read_bytes() == s32_file.read_bytes()


def test_a_partial_download_survives_the_call_and_the_next_call_resumes_it(bucket, s32_file):
    size = s32_file.stat().st_size
    bucket.cut[REMOTE] = size // 2
    bucket.fail_ranged = 503  # the in-call resume fails: the call gives up, keeping the .part
    with pytest.raises(hub.DownloadError, match=r"cannot download .*HTTP 503"):
        hub.resolve("S/32-gsam", progress=False)
    part = bucket.cached.with_name("Mixer-S_32.npz.part")
    assert part.stat().st_size == size // 2 and not bucket.cached.exists()
    bucket.fail_ranged = None
    path = hub.resolve("S/32-gsam", progress=False)
    assert gets(bucket) == [None, f"bytes={size // 2}-", f"bytes={size // 2}-"]
    assert path.read_bytes() == s32_file.read_bytes() and not part.exists()


def test_a_server_that_ignores_the_range_makes_the_download_start_over(bucket, s32_file):
    part = bucket.cached.with_name("Mixer-S_32.npz.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1000)  # not a prefix of the file: appending the rest would corrupt it
    bucket.ignore_range = True
    path = hub.resolve("S/32-gsam", progress=False)
    assert gets(bucket) == ["bytes=1000-"]  # asked to resume; got 200 with the whole file
    assert path.read_bytes() == s32_file.read_bytes()


def _flip_a_byte(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def _write(params: dict, dst: Path) -> Path:
    np.savez(dst, **params)
    return dst


@pytest.mark.parametrize("damage, match", [
    ("bit flip", "CRC mismatch"),
    ("not a zip", "not a valid .npz"),
    ("other variant", "not S/32"),
    pytest.param("other head", "head has 10 classes, the published file 1000", marks=pytest.mark.slow),  # 76 MB more
])
def test_a_damaged_or_wrong_download_is_refused_and_not_kept(bucket, s32_file, s32_params, tmp_path, damage, match):
    if damage == "bit flip":
        bad = _flip_a_byte(s32_file, tmp_path / "bad.npz")
    elif damage == "not a zip":
        bad = tmp_path / "bad.npz"
        bad.write_bytes(b"<html>Access denied</html>")
    elif damage == "other variant":
        bad = _write(random_params(TINY, 0), tmp_path / "bad.npz")
    else:
        bad = _write({**s32_params, "head/kernel": np.zeros((512, 10), np.float32),
                      "head/bias": np.zeros(10, np.float32)}, tmp_path / "bad.npz")
    bucket.files[REMOTE] = bad
    with pytest.raises(CheckpointError, match=match) as e:
        hub.resolve("S/32-gsam", progress=False)
    assert "\n" not in str(e.value) and bucket.url + REMOTE in str(e.value)
    assert leftovers(bucket) == []  # nothing cached, no .part, no sha256 recorded


def test_a_later_download_with_another_sha256_is_refused(bucket, s32_params, tmp_path):
    first = hub.resolve("S/32-gsam", progress=False)
    recorded = json.loads(first.with_name(first.name + ".json").read_text())["sha256"]
    first.unlink()  # e.g. cleaned up by hand; the record stays
    bucket.files[REMOTE] = _write({**s32_params, "head/bias": np.ones(1000, np.float32)}, tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match=f"first download .* had {recorded[:12]}"):
        hub.resolve("S/32-gsam", progress=False)
    assert leftovers(bucket) == ["Mixer-S_32.npz.json"]
    assert len(gets(bucket)) == 2


def test_a_cached_file_changed_on_disk_is_refused(bucket):
    path = hub.resolve("S/32-gsam", progress=False)
    _flip_a_byte(path, path)
    with pytest.raises(CheckpointError, match="changed since it was downloaded"):
        hub.resolve("S/32-gsam", progress=False)
    assert len(gets(bucket)) == 1


def test_a_file_put_in_the_cache_by_hand_is_verified_then_used(bucket, s32_file, tmp_path):
    bucket.cached.parent.mkdir(parents=True)
    bucket.cached.write_bytes(s32_file.read_bytes())  # offline use: copied from elsewhere
    assert hub.resolve("S/32-gsam") == bucket.cached
    assert bucket.requests == [] and bucket.cached.with_name("Mixer-S_32.npz.json").exists()
    _write(random_params(TINY, 0), tmp_path / "tiny.npz").replace(hub.cached_path(catalogue.lookup("S/16-gsam")))
    with pytest.raises(CheckpointError, match="placed in the cache by hand.* not S/16"):
        hub.resolve("S/16-gsam")


@pytest.mark.slow  # two interpreters
def test_two_processes_download_the_same_file_once_without_any_framework(bucket, s32_file):
    # The download is held after its first MiB until the other process says it waits for it: the
    # second process arrives mid-download however slowly either interpreter starts.
    bucket.hold = threading.Event()
    # downloading needs neither framework nor huggingface_hub (the standard library's urllib)
    code = import_blocker("torch", "jax", "jaxlib", "flax", "huggingface_hub", "requests") + \
        "import mixer_convert.hub as hub\nhub.TIMEOUT_S = 600.0  # held by the test, not a dead server\n" + \
        "print(hub.resolve('S/32-gsam', progress=False))"
    env = subprocess_env(MIXER_CACHE=os.environ["MIXER_CACHE"], MIXER_CHECKPOINT_BASE_URL=bucket.url)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs: list[list[str]] = [[], []]

    def read_stderr(p, lines):
        for line in p.stderr:
            lines.append(line)
            if "waiting for another process" in line:
                bucket.hold.set()
        bucket.hold.set()  # at its exit too: one that never waited fails the assertions below, not a hang guard

    readers = [threading.Thread(target=read_stderr, args=pe, daemon=True) for pe in zip(procs, errs)]
    for t in readers:
        t.start()
    for p in procs:
        p.wait(timeout=600)
    for t in readers:
        t.join(600)
    outs = [(p.stdout.read(), "".join(e)) for p, e in zip(procs, errs)]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert [o[0].strip() for o in outs] == [str(bucket.cached)] * 2
    assert gets(bucket) == [None]  # one download; the other process waited for it
    assert any("waiting for another process" in err for _, err in outs)
    assert bucket.cached.read_bytes() == s32_file.read_bytes()


def test_an_unreachable_server_is_one_line_naming_the_url_and_the_manual_way(tmp_path, monkeypatch, capsys):
    import socket

    from mixer_convert.tools.cli import main

    # A port nobody listens on: bound and not listening for the whole call (connections are refused),
    # so no other process (another worker's server binding port 0) can be handed it meanwhile.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        monkeypatch.setenv("MIXER_CHECKPOINT_BASE_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("MIXER_CACHE", str(tmp_path / "cache"))
        assert main(["S/32-gsam", str(tmp_path / "out.safetensors")]) == 2  # progress on: still one line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"mixer-convert: error: cannot download http://127.0.0.1:{port}/gsam/Mixer-S_32: ")
    assert "gsutil cp gs://mixer_models/gsam/Mixer-S_32 ." in err and "pass the file's path" in err
    assert not (tmp_path / "out.safetensors").exists()


# ---- the loading path takes names everywhere ----------------------------------------------------


def test_converter_takes_a_published_name_and_list_shows_it_cached(bucket, s32_params, tmp_path, capsys):
    from mixer_convert.load import read_params
    from mixer_convert.tools.cli import main

    assert main(["--list"]) == 0
    before = capsys.readouterr().out
    assert re.search(r"^S/32-gsam\s+S-gsam/32\s+gsam/Mixer-S_32\s+S/32\s+1,000\s+72.91\s+-$", before, re.M)
    assert main(["S-gsam/32", str(tmp_path / "s32.safetensors"), "--to", "timm", "--quiet"]) == 0
    back = read_params(tmp_path / "s32.safetensors")
    assert back.layout == "timm" and np.array_equal(back["head/kernel"], s32_params["head/kernel"])
    assert main(["--list"]) == 0
    assert re.search(r"^S/32-gsam .* yes$", capsys.readouterr().out, re.M)


@requires_jax
def test_training_accepts_a_published_name_for_init_from():
    from mixer_jax.configs import TrainConfig, validate

    validate(TrainConfig(init_from="B/16-i21k"), 1, 1)  # no error, nothing downloaded by validation
    with pytest.raises(ValueError, match="does not exist"):
        validate(TrainConfig(init_from="no/such/file.npz"), 1, 1)


# ---- pretrained models ---------------------------------------------------------------------------------


@requires_torch
def test_torch_create_model_pretrained_loads_the_published_weights(bucket, s32_params):
    from mixer_torch import create_model, from_pretrained, to_flat

    model = create_model("mixer_s32_224", pretrained=True)  # timm's name; S/32's default is gsam
    got = to_flat(model)
    assert got.keys() == s32_params.keys() and all(np.array_equal(got[k], s32_params[k]) for k in got)
    tuned = from_pretrained("S/32", "gsam", num_classes=10, stoch_depth=0.1)
    assert tuned.num_classes == 10 and tuned.config.stoch_depth == 0.1 and not tuned.head.weight.any()
    assert len(bucket.requests) == 1  # the second load came from the cache
    with pytest.raises(ValueError, match=r"image_size 448x448 does not fit the checkpoint: .* 49 tokens \(7x7 "
                                         r"patches: 224x224 images\); for 448x448 images load it with scale=2"):
        create_model("S/32", pretrained="gsam", image_size=448)


@requires_jax
def test_flax_from_pretrained_loads_the_published_weights(bucket, s32_params):
    from mixer_jax import from_pretrained, params_to_flat

    model, params = from_pretrained("S-gsam/32")
    got = params_to_flat(params)
    assert model.config == S32 and got.keys() == s32_params.keys()
    assert all(np.array_equal(got[k], s32_params[k]) for k in got)


@requires_jax
def test_nnx_create_model_and_from_pretrained_load_the_published_weights(bucket, s32_params):
    import mixer_jax.nnx

    model = mixer_jax.nnx.from_pretrained("S/32", "gsam")  # the README's quick start, by tag
    got = mixer_jax.nnx.state_to_flat(model)
    assert model.config == S32 and got.keys() == s32_params.keys()
    assert all(np.array_equal(got[k], s32_params[k]) for k in got)
    tuned = mixer_jax.nnx.create_model("S/32", pretrained=True, num_classes=10, stoch_depth=0.1)
    assert tuned.config.num_classes == 10 and tuned.config.stoch_depth == 0.1 and not tuned.head.kernel[...].any()
    assert len(bucket.requests) == 1  # the second load came from the cache


# ---- hf-hub: names, offline through huggingface_hub's own cache ----------------------------------------


def _hf_cache(root: Path, repo: str, flat: dict) -> Path:
    """A cache laid out the way huggingface_hub stores downloads (refs/main -> snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    write_params(flat, folder / "snapshots" / commit / "model.safetensors", fmt="safetensors", layout="timm")
    return root


_HF_CODE = """
import sys, numpy as np, torch
from mixer_torch import from_pretrained
x = np.random.default_rng(1).uniform(-1, 1, (2, 48, 48, 3)).astype(np.float32)
with torch.no_grad():
    np.save(sys.argv[2], from_pretrained(sys.argv[1]).eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy())
try:
    from_pretrained(sys.argv[3])
except Exception as e:
    print(type(e).__name__, e)
"""


@pytest.mark.slow  # a child interpreter importing torch
@requires_hf
@requires_torch
def test_hf_hub_names_load_through_huggingface_hubs_cache_offline(tmp_path):
    flat = random_params(TINY, 3)
    env = subprocess_env(HF_HUB_CACHE=str(_hf_cache(tmp_path / "hf", "timm/mixer_tiny.test", flat)),
                         HF_HUB_OFFLINE="1", MIXER_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", _HF_CODE, "hf-hub:timm/mixer_tiny.test", str(tmp_path / "out.npy"),
                        "hf-hub:timm/mixer_other.test"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), forward(flat, TINY, images(2, 48, 48, seed=1)), atol=1e-5)
    # not in the cache and offline: one line naming the source and why
    assert r.stdout.startswith("DownloadError cannot download hf-hub:timm/mixer_other.test: ")
    assert len(r.stdout.strip().splitlines()) == 1 and "HF_HUB_OFFLINE" in r.stdout
    assert not (tmp_path / "cache").exists()  # hf-hub files stay in huggingface_hub's own cache


def test_hf_hub_names_without_huggingface_hub_say_which_extra_to_install(tmp_path):
    code = import_blocker("huggingface_hub") + f"""
from mixer_convert.tools.cli import main
sys.exit(main(['hf-hub:timm/mixer_b16_224.goog_in21k', {str(tmp_path / 'o.npz')!r}]))
"""
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == ("mixer-convert: error: hf-hub:timm/mixer_b16_224.goog_in21k needs huggingface_hub: "
                                "pip install 'mixer-toolkit[hub]'")
