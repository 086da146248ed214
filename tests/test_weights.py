"""hybridgl.weights against a local HTTP server (127.0.0.1 only): download, resume after a cut, checksum,
the check table, offline mode, local paths, and the command line. No real weights are involved."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hybridgl import weights

from local_http import LocalServer, QuietHandler
from tiny_models import TINY_CLIP_DIR

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = hashlib.sha256(b"seed").digest() * 16384  # 512 KiB fake checkpoint
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
TYPE = "vit_b"
NAME = weights.SAM_CHECKPOINTS[TYPE].filename


class Server(LocalServer):
    """Serves PAYLOAD at /NAME on 127.0.0.1 with Range support, recording every request.

    cut: the first response stops after that many body bytes and the connection is closed;
    ignore_range: answer 200 with the whole file even to a Range request;
    fail: answer that many requests with HTTP 503 first.
    """

    def __init__(self, cut: int | None = None, ignore_range: bool = False, fail: int = 0):
        self.requests: list[dict] = []
        self.cut, self.ignore_range, self.fail = cut, ignore_range, fail
        outer = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                outer.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if outer.fail:
                    outer.fail -= 1
                    self.send_error(503)
                    return
                if self.path != "/" + NAME:
                    self.send_error(404)
                    return
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and not outer.ignore_range:
                    start, status = int(match.group(1)), 206
                    if start >= len(PAYLOAD):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = PAYLOAD[start:]
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut is not None:
                    body, outer.cut = body[:outer.cut], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the connection breaks mid-file
                    return
                self.wfile.write(body)

        super().__init__(Handler)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A clean environment: MODEL_DIR and HF_HOME in tmp_path, online, the fake file's checksum."""
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_OFFLINE", "HYBRIDGL_OFFLINE", "HYBRIDGL_SAM_BASE_URL", "STANZA_RESOURCES_DIR",
                 "STANZA_RESOURCES_URL", "STANZA_MODEL_URL", "HYBRIDGL_STANZA_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HYBRIDGL_SAM_SHA256", PAYLOAD_SHA)
    return tmp_path


@pytest.fixture
def server(env, monkeypatch, request):
    srv = Server(**getattr(request, "param", {}))
    monkeypatch.setenv("HYBRIDGL_SAM_BASE_URL", srv.url)
    yield srv
    srv.close()


def sam_path(env) -> Path:
    return env / "models" / "sam" / NAME


# -- the table ------------------------------------------------------------------------------------

def test_official_checkpoints_table():
    assert set(weights.SAM_CHECKPOINTS) == {"vit_h", "vit_l", "vit_b"}
    for model_type, (filename, url, sha256, size) in weights.SAM_CHECKPOINTS.items():
        assert filename.startswith(f"sam_{model_type}_") and filename.endswith(".pth")
        assert url == "https://dl.fbaipublicfiles.com/segment_anything/" + filename
        assert re.fullmatch(r"[0-9a-f]{64}", sha256) and size > 300_000_000
    assert weights.SAM_CHECKPOINTS["vit_h"].sha256.startswith("a7bf3b02")
    assert weights.SAM_CHECKPOINTS["vit_h"].size == 2_564_550_879


def test_locations_follow_the_environment(env, monkeypatch):
    assert weights.model_dir() == env / "models"
    assert weights.stanza_dir() == env / "models" / "stanza"
    monkeypatch.setenv("STANZA_RESOURCES_DIR", str(env / "st"))
    assert weights.stanza_dir() == env / "st"
    assert weights.stanza_dir(env / "other") == env / "other" / "stanza"  # an explicit root wins
    assert weights.clip_local_dir("openai/clip-vit-base-patch16") == env / "models" / "clip" / \
        "openai--clip-vit-base-patch16"
    monkeypatch.delenv("MODEL_DIR")
    assert weights.model_dir() == Path.home() / ".cache" / "hybridgl"
    assert not weights.is_offline()
    for value, expected in (("1", True), ("true", True), ("YES", True), ("0", False), ("", False)):
        monkeypatch.setenv("HYBRIDGL_OFFLINE", value)
        assert weights.is_offline() is expected


# -- downloading ----------------------------------------------------------------------------------

def test_download_then_cached(env, server):
    path = weights.resolve_sam_checkpoint(TYPE, progress=False)
    assert path == sam_path(env) and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == [NAME]  # no .part, no lock file left
    assert weights.resolve_sam_checkpoint(TYPE, progress=False) == path
    assert len(server.requests) == 1 and server.requests[0]["range"] is None  # cached: one request


@pytest.mark.parametrize("server", [{"cut": 100_000}], indirect=True)
def test_resume_after_a_cut(env, server):
    """The connection breaks after 100 kB: the same call resumes with a Range request."""
    path = weights.resolve_sam_checkpoint(TYPE, progress=False)
    assert path.read_bytes() == PAYLOAD and not path.with_name(NAME + ".part").exists()
    first, second = server.requests
    assert first["range"] is None
    kept = int(re.fullmatch(r"bytes=(\d+)-", second["range"]).group(1))
    assert 0 < kept <= 100_000  # only the rest was fetched


def test_resume_a_previous_process_download(env, server):
    """A .part left by a killed process is continued, not restarted."""
    part = sam_path(env).with_name(NAME + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:123_456])
    assert weights.resolve_sam_checkpoint(TYPE, progress=False).read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == ["bytes=123456-"]


def test_complete_part_is_not_fetched_again(env, server):
    part = sam_path(env).with_name(NAME + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD)
    assert weights.resolve_sam_checkpoint(TYPE, progress=False).read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [f"bytes={len(PAYLOAD)}-"]  # answered 416: complete


@pytest.mark.parametrize("server", [{"ignore_range": True}], indirect=True)
def test_server_without_ranges_starts_over(env, server):
    part = sam_path(env).with_name(NAME + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:1000])
    assert weights.resolve_sam_checkpoint(TYPE, progress=False).read_bytes() == PAYLOAD
    assert len(server.requests) == 1


@pytest.mark.parametrize("server", [{"fail": 1}], indirect=True)
def test_server_error_is_retried(env, server):
    assert weights.resolve_sam_checkpoint(TYPE, progress=False).read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_missing_file_is_not_retried(env, server, monkeypatch):
    monkeypatch.setenv("HYBRIDGL_SAM_BASE_URL", server.url + "/nowhere")
    with pytest.raises(OSError, match="HTTP 404"):
        weights.resolve_sam_checkpoint(TYPE, progress=False)
    assert len(server.requests) == 1


def test_checksum_mismatch_is_refused_and_leaves_no_file(env, server, monkeypatch):
    monkeypatch.setenv("HYBRIDGL_SAM_SHA256", "0" * 64)
    with pytest.raises(weights.ChecksumError, match="checksum mismatch") as info:
        weights.resolve_sam_checkpoint(TYPE, progress=False)
    assert isinstance(info.value, ValueError) and "removed" in str(info.value)
    assert list(sam_path(env).parent.iterdir()) == []  # neither the file nor a .part
    # the argument wins over the environment
    assert weights.resolve_sam_checkpoint(TYPE, progress=False, sha256=PAYLOAD_SHA).read_bytes() == PAYLOAD


def test_official_checksum_and_size_are_enforced(env, server, monkeypatch):
    """Without an override the table's size and SHA-256 apply: the fake file is refused."""
    monkeypatch.delenv("HYBRIDGL_SAM_SHA256")
    with pytest.raises(weights.ChecksumError, match="expected 375042383: not the expected file"):
        weights.resolve_sam_checkpoint(TYPE, progress=False)
    assert list(sam_path(env).parent.iterdir()) == [] and len(server.requests) == 1  # refused before fetching
    # a cached file of the wrong size is a damaged copy, not the checkpoint
    sam_path(env).write_bytes(b"truncated")
    with pytest.raises(FileNotFoundError, match="damaged"):
        weights.resolve_sam_checkpoint(TYPE, offline=True)


def test_checkpoint_url_downloads_into_the_cache(env, server):
    url = f"{server.url}/{NAME}"
    path = weights.resolve_sam_checkpoint(TYPE, url, progress=False)
    assert path == sam_path(env) and path.read_bytes() == PAYLOAD
    other = weights.resolve_sam_checkpoint(TYPE, url, cache_dir=env / "elsewhere", progress=False)
    assert other == env / "elsewhere" / "sam" / NAME  # cache_dir is a models root, like MODEL_DIR


# -- offline ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HYBRIDGL_OFFLINE"])
def test_offline_never_connects(env, server, monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    with pytest.raises(FileNotFoundError, match=r"offline.*python -m hybridgl\.weights download --sam vit_b"):
        weights.resolve_sam_checkpoint(TYPE)
    with pytest.raises(FileNotFoundError, match=r"offline.*download --clip openai/clip-vit-base-patch16"):
        weights.resolve_clip("openai/clip-vit-base-patch16")
    with pytest.raises(FileNotFoundError, match="offline"):
        weights.download_clip("openai/clip-vit-base-patch16")
    with pytest.raises(FileNotFoundError, match="download --stanza"):
        weights.download_stanza()
    assert server.requests == []
    assert not sam_path(env).parent.exists() or list(sam_path(env).parent.iterdir()) == []


def test_offline_argument_overrides_the_environment(env, server):
    with pytest.raises(FileNotFoundError):
        weights.resolve_sam_checkpoint(TYPE, offline=True)
    assert server.requests == []


# -- local paths and CLIP ---------------------------------------------------------------------------

def test_local_paths_pass_through(env, tmp_path):
    assert weights.resolve_clip(str(TINY_CLIP_DIR)) == str(TINY_CLIP_DIR)
    assert weights.resolve_clip(str(TINY_CLIP_DIR), offline=True) == str(TINY_CLIP_DIR)
    with pytest.raises(FileNotFoundError, match="CLIP directory not found"):
        weights.resolve_clip(str(tmp_path / "no" / "such" / "dir"))
    ckpt = tmp_path / "mine.pth"
    ckpt.write_bytes(b"x")
    assert weights.resolve_sam_checkpoint("vit_h", ckpt) == ckpt
    assert weights.resolve_sam_checkpoint("vit_h", str(ckpt), offline=True) == ckpt
    with pytest.raises(FileNotFoundError):
        weights.resolve_sam_checkpoint("vit_h", tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="no official checkpoint"):
        weights.resolve_sam_checkpoint("vit_x")


def test_clip_downloaded_earlier_is_found_by_its_id(env):
    target = weights.clip_local_dir("org/tiny")
    target.parent.mkdir(parents=True)
    os.symlink(TINY_CLIP_DIR, target)
    assert weights.resolve_clip("org/tiny", offline=True) == str(target)
    assert weights.resolve_clip("org/tiny", cache_dir=env / "models") == str(target)


def test_download_clip_prefers_safetensors(env, monkeypatch):
    """snapshot_download is asked for config, tokenizer and safetensors only; a repository without
    safetensors gets its pytorch_model.bin in a second call."""
    import fnmatch

    import huggingface_hub

    repos = {"org/new": ["config.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                         "model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"],
             "org/old": ["config.json", "vocab.json", "merges.txt", "pytorch_model.bin", "tf_model.h5"]}
    calls = []

    def fake_snapshot_download(repo_id, local_dir=None, allow_patterns=None, **kwargs):
        assert kwargs["endpoint"] == "http://127.0.0.1:9"  # HF_ENDPOINT as set now, not at import
        calls.append((repo_id, Path(local_dir), list(allow_patterns)))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for name in repos[repo_id]:
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (Path(local_dir) / name).write_text(name)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    new = weights.download_clip("org/new")
    assert new == env / "models" / "clip" / "org--new"
    assert sorted(p.name for p in new.iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                     "tokenizer_config.json", "vocab.json"]
    assert len(calls) == 1
    old = weights.download_clip("org/old")
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "merges.txt", "pytorch_model.bin", "vocab.json"]
    assert calls[-1][2] == ["pytorch_model.bin"]
    calls.clear()
    assert weights.resolve_clip("org/new") == str(new) and calls == []  # present: nothing fetched


def test_download_stanza_passes_the_sources(env, monkeypatch):
    import stanza

    calls = []
    monkeypatch.setattr(stanza, "download", lambda lang, **kw: calls.append((lang, kw)))
    monkeypatch.setenv("STANZA_RESOURCES_URL", "http://127.0.0.1:1/resources")
    monkeypatch.setenv("STANZA_MODEL_URL", "http://127.0.0.1:1/models/{filename}")
    assert weights.download_stanza() == env / "models" / "stanza"
    ((lang, kw),) = calls
    assert lang == "en" and kw["model_dir"] == str(env / "models" / "stanza")
    assert kw["processors"] == "tokenize,pos,lemma,depparse"
    assert kw["resources_url"] == "http://127.0.0.1:1/resources"
    assert kw["model_url"] == "http://127.0.0.1:1/models/{filename}"
    # once the models are there, nothing is downloaded
    fake_stanza_install(env / "models" / "stanza")
    calls.clear()
    weights.download_stanza()
    assert calls == []


# the English part of stanza's resources.json, as its downloader reads it: the default package of each
# processor and the models each depends on (files en/<processor>/<package>.pt)
CHARLM_DEPENDENCIES = [{"model": "pretrain", "package": "conll17"}, {"model": "forward_charlm", "package": "1billion"},
                       {"model": "backward_charlm", "package": "1billion"}]
STANZA_RESOURCES = {"en": {
    "lang_name": "English",
    "packages": {"default": {"tokenize": "combined", "mwt": "combined", "pos": "combined_charlm",
                             "lemma": "combined_nocharlm", "depparse": "combined_charlm", "ner": "ontonotes_charlm"}},
    "tokenize": {"combined": {"md5": "0"}}, "mwt": {"combined": {"md5": "0"}},
    "pos": {"combined_charlm": {"md5": "0", "dependencies": CHARLM_DEPENDENCIES}},
    "lemma": {"combined_nocharlm": {"md5": "0"}},
    "depparse": {"combined_charlm": {"md5": "0", "dependencies": CHARLM_DEPENDENCIES}},
    "ner": {"ontonotes_charlm": {"md5": "0", "dependencies": CHARLM_DEPENDENCIES}},
    "pretrain": {"conll17": {"md5": "0"}},
    "forward_charlm": {"1billion": {"md5": "0"}}, "backward_charlm": {"1billion": {"md5": "0"}}}}
STANZA_FILES = ["tokenize/combined.pt", "mwt/combined.pt", "pos/combined_charlm.pt", "lemma/combined_nocharlm.pt",
                "depparse/combined_charlm.pt", "pretrain/conll17.pt", "forward_charlm/1billion.pt",
                "backward_charlm/1billion.pt"]  # what `stanza.download(processors=...)` fetches (no ner)


def fake_stanza_install(directory: Path) -> None:
    (directory / "en").mkdir(parents=True, exist_ok=True)
    (directory / "resources.json").write_text(json.dumps(STANZA_RESOURCES))
    for name in STANZA_FILES:
        (directory / "en" / name).parent.mkdir(exist_ok=True)
        (directory / "en" / name).write_bytes(b"x" * 1000)


# -- check ------------------------------------------------------------------------------------------

def test_check_reports_present_and_missing_with_sizes(env, server):
    rows = weights.check(TYPE, "openai/clip-vit-base-patch16", stanza=True)
    assert [(r["what"], r["present"], r["bytes"]) for r in rows] == [
        ("SAM vit_b", False, 0), ("CLIP openai/clip-vit-base-patch16", False, 0), ("stanza en", False, 0)]
    weights.resolve_sam_checkpoint(TYPE, progress=False)
    fake_stanza_install(weights.stanza_dir())
    sam, clip, stanza_row = weights.check(TYPE, str(TINY_CLIP_DIR), stanza=True, verify=True)
    assert sam["present"] and sam["bytes"] == len(PAYLOAD) and sam["note"] == "sha256 ok"
    assert sam["path"] == str(sam_path(env))
    assert clip["present"] and clip["bytes"] > 19_000_000 and clip["path"] == str(TINY_CLIP_DIR)
    assert stanza_row["present"] and stanza_row["bytes"] > 6000
    table = weights.format_rows([sam, clip])
    assert "SAM vit_b" in table and "present" in table and "0.5 MB" in table
    assert server.requests and all(r["path"] == "/" + NAME for r in server.requests)


def test_check_notes_partial_and_damaged_files(env, monkeypatch):
    monkeypatch.delenv("HYBRIDGL_SAM_SHA256")
    path = weights.sam_dir() / weights.SAM_CHECKPOINTS["vit_h"].filename
    path.parent.mkdir(parents=True)
    path.with_name(path.name + ".part").write_bytes(b"x" * 10)
    (row,) = weights.check("vit_h", None, stanza=False)
    assert not row["present"] and "partial download: 10 bytes" in row["note"]
    assert row["expected_bytes"] == 2_564_550_879
    path.write_bytes(b"x" * 10)
    (row,) = weights.check("vit_h", None, stanza=False)
    assert not row["present"] and "wrong size" in row["note"]


# -- the command line -------------------------------------------------------------------------------

def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "hybridgl.weights", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_download_and_check(env, server):
    missing = cli("check", "--sam", TYPE, "--clip", "none")
    assert missing.returncode == 1 and "MISSING" in missing.stdout and NAME in missing.stdout
    got = cli("download", "--sam", TYPE, "--clip", str(TINY_CLIP_DIR), "--quiet")
    assert got.returncode == 0, got.stderr
    assert re.search(r"SAM vit_b\s+present\s+0\.5 MB", got.stdout), got.stdout
    assert re.search(r"CLIP .*tiny-clip\s+present\s+21\.0 MB", got.stdout), got.stdout
    present = cli("--check", "--sam", TYPE, "--clip", "none", "--verify")
    assert present.returncode == 0 and "sha256 ok" in present.stdout
    assert len(server.requests) == 1
    sam_path(env).write_bytes(b"\0" * len(PAYLOAD))  # corrupted, same size: only --verify sees it
    assert cli("check", "--sam", TYPE, "--clip", "none").returncode == 0
    corrupted = cli("check", "--sam", TYPE, "--clip", "none", "--verify")
    assert corrupted.returncode == 1 and "sha256 MISMATCH" in corrupted.stdout
    repaired = cli("download", "--sam", TYPE, "--clip", "none", "--verify", "-q")
    assert repaired.returncode == 0 and sam_path(env).read_bytes() == PAYLOAD and len(server.requests) == 2
    # another models root, and offline: nothing is fetched, the error says what to do
    other = env / "seeded"
    offline = cli("download", "--sam", TYPE, "--clip", "none", "--model-dir", str(other),
                  env_extra={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and "offline" in offline.stderr and str(other / "sam" / NAME) in offline.stderr
    assert len(server.requests) == 2 and not other.exists()
    seeded = cli("download", "--sam", TYPE, "--clip", "none", "--model-dir", str(other), "-q")
    assert seeded.returncode == 0 and (other / "sam" / NAME).read_bytes() == PAYLOAD
    usage = cli("check", "--sam", "vit_x")
    assert usage.returncode == 2 and "unknown SAM type" in usage.stderr


def _load_at_once(loaders: int) -> tuple[list, list]:
    """(paths, errors) of `loaders` threads resolving the SAM checkpoint at the same time."""
    results, errors = [], []

    def load():
        try:
            results.append(weights.resolve_sam_checkpoint(TYPE, progress=False))
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(loaders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_concurrent_downloads_fetch_once(env, server):
    """Two loaders sharing MODEL_DIR (the backend and a batch job): one download, both get the file."""
    results, errors = _load_at_once(3)
    assert not errors and results == [sam_path(env)] * 3
    assert sam_path(env).read_bytes() == PAYLOAD and len(server.requests) == 1


@pytest.fixture
def nfs_flock(monkeypatch):
    """flock as on an NFS mount: refused on a directory (NFSv4 keeps no open state for one, ENOLCK)."""
    import errno
    import fcntl
    import stat

    real = fcntl.flock

    def flock(fd, operation):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.ENOLCK, "No locks available")
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)


def test_downloads_into_a_model_dir_on_nfs(env, server, nfs_flock):
    """docs/ray.md puts MODEL_DIR on NFS for the Ray workers, where flock on the directory is refused:
    the download raised OSError (ENOLCK) before fetching a byte. A POSIX lock on a lock file (which NFS
    carries to the server) now excludes the other loaders, threads of one process included."""
    results, errors = _load_at_once(3)
    assert not errors and results == [sam_path(env)] * 3, errors
    assert sam_path(env).read_bytes() == PAYLOAD and len(server.requests) == 1


def test_on_nfs_another_process_downloading_is_waited_for(env, server, nfs_flock, caplog):
    """Another node (a process here) holding the lock file's POSIX lock: the download waits for it."""
    import logging

    folder = sam_path(env).parent
    folder.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\nfcntl.lockf(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\nsys.stdin.readline()", str(folder / weights.LOCK_FILE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = []
        worker = threading.Thread(target=lambda: done.append(weights.resolve_sam_checkpoint(TYPE, progress=False)))
        with caplog.at_level(logging.INFO, logger="hybridgl.weights"):
            worker.start()
            worker.join(3)
            assert worker.is_alive() and not server.requests  # waiting on the other process
            holder.stdin.write("\n")
            holder.stdin.flush()
            worker.join(60)
        assert done == [sam_path(env)] and len(server.requests) == 1
        assert "another process is downloading" in caplog.text
    finally:
        holder.kill()
        holder.wait()


def test_clip_in_the_hugging_face_cache_is_used_offline(env, monkeypatch):
    """A model already in HF_HOME's hub cache (e.g. from an earlier transformers run) is found offline."""
    repo = env / "hf" / "hub" / "models--org--cached"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        (snapshot / name).write_bytes((TINY_CLIP_DIR / name).read_bytes() if name != "model.safetensors" else b"w")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.resolve_clip("org/cached") == str(snapshot)
    (row,) = weights.check(None, "org/cached", stanza=False)
    assert row["present"] and row["path"] == str(snapshot)


def test_clip_without_its_tokenizer_files_is_not_complete(env, tmp_path, monkeypatch):
    """config.json and weights without vocab.json/merges.txt (a snapshot cut short, or a Hugging Face
    cache filled by CLIPModel.from_pretrained alone) used to count as a complete CLIP; transformers then
    builds a 2-token tokenizer without an error and every expression encodes to the same garbage ids."""
    partial = tmp_path / "partial-clip"
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):
        (partial / name).write_bytes((TINY_CLIP_DIR / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="incomplete.*vocab.json"):
        weights.resolve_clip(str(partial))
    target = weights.clip_local_dir("org/cut")  # a download into MODEL_DIR cut before the tokenizer
    target.parent.mkdir(parents=True)
    os.symlink(partial, target)
    repo = env / "hf" / "hub" / "models--org--cut"  # the same files in the Hugging Face cache
    snapshot = repo / "snapshots" / ("b" * 40)
    snapshot.parent.mkdir(parents=True)
    os.symlink(partial, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    with pytest.raises(FileNotFoundError, match="offline"):
        weights.resolve_clip("org/cut", offline=True)
    (row,) = weights.check(None, "org/cut", stanza=False)
    assert not row["present"]
    (partial / "tokenizer.json").write_text("{}")  # a fast tokenizer file stands in for vocab + merges
    assert weights.resolve_clip("org/cut", offline=True) == str(target)


def test_parser_reads_stanza_where_download_puts_it(env, monkeypatch):
    """MODEL_DIR / STANZA_RESOURCES_DIR with '~' (no shell expanded it): `download --stanza` filled
    $HOME/..., the parser looked in a literal './~/...' and found nothing."""
    from hybridgl.parsing import stanza_resources_dir

    monkeypatch.setenv("HOME", str(env))
    monkeypatch.setenv("MODEL_DIR", "~/models")
    assert stanza_resources_dir() == weights.stanza_dir() == env / "models" / "stanza"
    monkeypatch.setenv("STANZA_RESOURCES_DIR", "~/stanza")
    assert stanza_resources_dir() == weights.stanza_dir() == env / "stanza"


def test_verify_accepts_an_upper_case_checksum(env, server, monkeypatch):
    """HYBRIDGL_SAM_SHA256 in upper case: the download accepted the file, `check --verify` called it a
    MISMATCH and `download --verify` deleted the good file and fetched it again."""
    monkeypatch.setenv("HYBRIDGL_SAM_SHA256", PAYLOAD_SHA.upper())
    weights.resolve_sam_checkpoint(TYPE, progress=False)
    (row,) = weights.check(TYPE, None, stanza=False, verify=True)
    assert row["present"] and row["note"] == "sha256 ok"


def test_stanza_leftover_of_a_killed_download_is_not_complete(env):
    """stanza downloads each file into a temporary directory beside it; a killed download leaves
    that directory (with a partial file) behind, which made the processor's directory look filled."""
    directory = weights.stanza_dir()
    fake_stanza_install(directory)
    assert weights._stanza_complete(directory)
    depparse = directory / "en" / "depparse"
    (depparse / "combined_charlm.pt").unlink()
    (depparse / "tmpab12cd").mkdir()
    (depparse / "tmpab12cd" / "combined_charlm.pt").write_bytes(b"x" * 10)
    assert not weights._stanza_complete(directory)


def test_stanza_missing_dependency_is_not_complete(env, monkeypatch):
    """The check looked for the four processors' directories only: a dependency they load (the
    pretrained vectors, a character LM) whose folder was never created passed as a complete install,
    so nothing fetched it and the parser failed when loading. Every file resources.json makes the
    pipeline need is required now; without it the install is reported incomplete and fetched again."""
    import shutil

    import stanza

    directory = weights.stanza_dir()
    fake_stanza_install(directory)
    assert weights._stanza_complete(directory)
    shutil.rmtree(directory / "en" / "forward_charlm")
    assert not weights._stanza_complete(directory)
    (row,) = weights.check(None, None, stanza=True)
    assert not row["present"] and "en/forward_charlm/1billion.pt" in row["note"], row
    calls = []
    monkeypatch.setattr(stanza, "download", lambda lang, **kw: calls.append(lang))
    weights.download_stanza()
    assert calls == ["en"]
    fake_stanza_install(directory)
    (directory / "en" / "pretrain" / "conll17.pt").unlink()  # a dependency's file alone is missing
    (directory / "en" / "pretrain" / "other.pt").write_bytes(b"x")
    assert not weights._stanza_complete(directory)
    (directory / "resources.json").write_text("{")  # unreadable: fetched again too
    assert not weights._stanza_complete(directory)


def test_hf_endpoint_with_a_trailing_slash(env, monkeypatch):
    """HF_ENDPOINT=https://mirror/ (as Hugging Face itself accepts it: it strips the slash) was passed
    on as is, and every request went to https://mirror//api/models/... (a 404 on many mirrors)."""
    import huggingface_hub

    endpoints = []

    def fake_snapshot_download(repo_id, local_dir=None, allow_patterns=None, **kwargs):
        endpoints.append(kwargs["endpoint"])
        raise OSError("stop here")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/ ")
    with pytest.raises(OSError, match="stop here"):
        weights.download_clip("org/name")
    assert endpoints == ["http://127.0.0.1:9"]


def test_a_presigned_checkpoint_url_keeps_its_signature_out_of_logs_and_errors(server, caplog):
    """HYBRIDGL_SAM_CHECKPOINT may be a presigned URL: its query string (the signature) appeared in
    the download's log lines and error messages, and in the backend's logged settings."""
    from backend.settings import Settings

    url = f"{server.url}/{NAME}?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA"
    caplog.set_level("INFO", logger="hybridgl")
    with pytest.raises(OSError) as e:  # the test server knows no such query: 404
        weights.resolve_sam_checkpoint(TYPE, url)
    assert f"{server.url}/{NAME}" in str(e.value)
    assert "s3cr3t" not in str(e.value) and "s3cr3t" not in caplog.text and "AKIA" not in caplog.text
    described = Settings(sam_checkpoint=url).describe()
    assert described["sam_checkpoint"] == f"{server.url}/{NAME}"
    assert weights.shown("https://user:pw@host:8443/a/b.pth?sig=1#x") == "https://host:8443/a/b.pth"


def test_two_checkpoint_urls_with_the_same_file_name_are_cached_apart(env, monkeypatch):
    """A checkpoint of one's own was cached under its URL's file name alone: after switching from
    .../v1/model.pth to .../v2/model.pth the first file was found and loaded, silently. A URL whose
    file name is not an official one is now cached under that name plus a hash of the URL (its
    query string, a presigned signature that changes, left out)."""
    class Files(QuietHandler):
        def do_GET(self):
            self.send_body(self.path.split("?")[0].encode() * 1000)

    monkeypatch.delenv("HYBRIDGL_SAM_SHA256")  # files of one's own: no checksum known
    with LocalServer(Files) as srv:
        first = weights.resolve_sam_checkpoint(TYPE, f"{srv.url}/v1/model.pth?sig=a", progress=False)
        again = weights.resolve_sam_checkpoint(TYPE, f"{srv.url}/v1/model.pth?sig=b", progress=False)
        second = weights.resolve_sam_checkpoint(TYPE, f"{srv.url}/v2/model.pth", progress=False)
    assert first == again != second and first.parent == second.parent == sam_path(env).parent
    assert first.name.startswith("model-") and first.suffix == ".pth"
    assert first.read_bytes() == b"/v1/model.pth" * 1000 and second.read_bytes() == b"/v2/model.pth" * 1000
