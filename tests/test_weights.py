"""The weights downloader against a local HTTP server: download, resume, checksum, check, offline."""
from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hybridgl import weights

from tiny_models import TINY_CLIP_DIR

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = bytes(range(256)) * 2048  # 512 KiB fake checkpoint
NAME = weights.SAM_CHECKPOINTS["vit_b"].filename


class Server:
    """Serves PAYLOAD at /NAME with Range support; can cut the first response after `cut` bytes."""

    def __init__(self, cut: int | None = None):
        self.requests: list[dict] = []
        self.cut = cut
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if self.path != "/" + NAME:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                body = PAYLOAD[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut is not None:
                    body, outer.cut = body[:outer.cut], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.connection.shutdown(2)  # cut the connection mid-file
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HYBRIDGL_OFFLINE", raising=False)
    monkeypatch.setenv("HYBRIDGL_SAM_SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    return tmp_path


def test_download_then_cached(env, monkeypatch):
    server = Server()
    try:
        monkeypatch.setenv("HYBRIDGL_SAM_BASE_URL", server.url)
        path = weights.resolve_sam_checkpoint("vit_b", progress=False)
        assert path == env / "models" / "sam" / NAME and path.read_bytes() == PAYLOAD
        again = weights.resolve_sam_checkpoint("vit_b", progress=False)
        assert again == path and len(server.requests) == 1  # cached: no second request
    finally:
        server.close()


def test_resume_after_a_cut(env, monkeypatch):
    server = Server(cut=100_000)
    try:
        monkeypatch.setenv("HYBRIDGL_SAM_BASE_URL", server.url)
        with pytest.raises(Exception):
            weights.resolve_sam_checkpoint("vit_b", progress=False)
        part = env / "models" / "sam" / (NAME + ".part")
        kept = part.stat().st_size
        assert part.exists() and 0 < kept < len(PAYLOAD)
        path = weights.resolve_sam_checkpoint("vit_b", progress=False)
        assert path.read_bytes() == PAYLOAD and not part.exists()
        assert server.requests[-1]["range"] == f"bytes={kept}-"  # only the rest was fetched
    finally:
        server.close()


def test_checksum_mismatch_is_refused_and_leaves_no_file(env, monkeypatch):
    server = Server()
    try:
        monkeypatch.setenv("HYBRIDGL_SAM_BASE_URL", server.url)
        monkeypatch.setenv("HYBRIDGL_SAM_SHA256", "0" * 64)
        with pytest.raises(ValueError, match="checksum mismatch"):
            weights.resolve_sam_checkpoint("vit_b", progress=False)
        assert not list((env / "models" / "sam").iterdir())
    finally:
        server.close()


def test_offline_never_connects(env, monkeypatch):
    server = Server()
    try:
        monkeypatch.setenv("HYBRIDGL_SAM_BASE_URL", server.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(FileNotFoundError, match="hybridgl.weights download --sam vit_b"):
            weights.resolve_sam_checkpoint("vit_b", progress=False)
        with pytest.raises(FileNotFoundError, match="offline"):
            weights.resolve_clip("openai/clip-vit-base-patch16")
        assert server.requests == []
    finally:
        server.close()


def test_local_paths_pass_through(env, tmp_path):
    assert weights.resolve_clip(str(TINY_CLIP_DIR)) == str(TINY_CLIP_DIR)
    ckpt = tmp_path / "mine.pth"
    ckpt.write_bytes(b"x")
    assert weights.resolve_sam_checkpoint("vit_h", ckpt) == ckpt
    with pytest.raises(FileNotFoundError):
        weights.resolve_sam_checkpoint("vit_h", tmp_path / "absent.pth")
    # a CLIP placed in MODEL_DIR/clip by `download` is found by its id
    target = weights.clip_local_dir("org/tiny")
    target.parent.mkdir(parents=True)
    os.symlink(TINY_CLIP_DIR, target)
    assert weights.resolve_clip("org/tiny", offline=True) == str(target)


def test_cli_download_and_check(env, monkeypatch):
    server = Server()
    try:
        cli_env = {**os.environ, "PYTHONPATH": str(ROOT), "HYBRIDGL_SAM_BASE_URL": server.url}
        run = lambda *a: subprocess.run([sys.executable, "-m", "hybridgl.weights", *a], env=cli_env,  # noqa: E731
                                        capture_output=True, text=True, timeout=120)
        missing = run("check", "--sam", "vit_b", "--clip", "none")
        assert missing.returncode == 1 and "MISSING" in missing.stdout
        got = run("download", "--sam", "vit_b", "--clip", "none")
        assert got.returncode == 0, got.stderr
        assert "present" in got.stdout and "0.5 MB" in got.stdout
        present = run("--check", "--sam", "vit_b", "--clip", "none")
        assert present.returncode == 0 and "SAM vit_b  present" in present.stdout
        offline = subprocess.run([sys.executable, "-m", "hybridgl.weights", "download", "--sam", "vit_l",
                                  "--clip", "none"], env={**cli_env, "HF_HUB_OFFLINE": "1"},
                                 capture_output=True, text=True, timeout=120)
        assert offline.returncode == 2 and "offline" in offline.stderr
    finally:
        server.close()
