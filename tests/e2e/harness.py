"""A real Label Studio and our backend as processes on 127.0.0.1, for end-to-end tests.

Every wait is bounded; every server is stopped by its own PID (process group) at the end.
Pitfalls handled (see docs): legacy tokens enabled on the first start, local ML URLs allowed,
the prefixed env names, a free port picked first.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib import error, request

import pytest

ROOT = Path(__file__).resolve().parents[2]
LS_VENV = ROOT / ".venv-ls"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


class Process:
    """A server process in its own process group, stopped by PID."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, url: str, timeout: float, what: str) -> None:
        """Wait for url to answer 200; if it does not, stop the process and show its last log lines."""
        try:
            wait_http(url, timeout, self.proc)
        except Exception:
            log = self.tail()
            self.stop()
            raise RuntimeError(f"{what} did not start:\n{log}")


def readme_config() -> str:
    """The labelling config the README gives (its first ```xml block), verbatim."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("```xml\n", 1)[1].split("```", 1)[0]
    return "\n".join(line.strip() for line in block.splitlines()).strip()


def require_label_studio() -> None:
    """Skip without .venv-ls, except under HYBRIDGL_REQUIRE_E2E=1 (CI), where it is a failure."""
    if (LS_VENV / "bin" / "label-studio").exists():
        return
    message = "Label Studio is not installed in .venv-ls (run tests/e2e/setup_ls.sh)"
    if os.environ.get("HYBRIDGL_REQUIRE_E2E") == "1":
        pytest.fail(message + "; HYBRIDGL_REQUIRE_E2E=1 makes this a failure")
    pytest.skip(message)


class LabelStudio:
    """`label-studio start` on a throw-away data dir, plus a tiny API client (stdlib only)."""

    def __init__(self, work: Path, start_timeout: float = 240):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = uuid.uuid4().hex
        data = work / "ls-data"
        data.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "HEARTEX_"))}
        for name in ("HOST", "PORT", "USERNAME", "PASSWORD"):  # LS would read these unprefixed names too
            env.pop(name, None)
        env.update({
            "LABEL_STUDIO_BASE_DATA_DIR": str(data), "LABEL_STUDIO_HOST": self.url,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false", "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false", "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_SENTRY_DSN": "", "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
        })
        self._start = ([str(LS_VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host",
                        "127.0.0.1", "--port", str(self.port), "--data-dir", str(data), "--username",
                        "e2e@example.com", "--password", "e2e-password-123", "--user-token", self.token,
                        "--enable-legacy-api-token"], env, work)
        self.restart(start_timeout)

    def restart(self, start_timeout: float = 240) -> None:
        """(Re)start on the same port, data and token (after `stop()`: Label Studio coming back)."""
        args, env, work = self._start
        self.process = Process(args, env, work / "label-studio.log")
        self.process.wait_ready(self.url + "/health", start_timeout, "Label Studio")

    def stop(self) -> None:
        self.process.stop()

    def api(self, method: str, path: str, body=None, raw: bytes | None = None, content_type: str | None = None,
            timeout: float = 120):
        headers = {"Authorization": f"Token {self.token}"}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        req = request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with request.urlopen(req, timeout=timeout) as r:
                text = r.read().decode()
        except error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from exc
        return json.loads(text) if text else None

    def upload(self, project: int, name: str, data: bytes) -> str:
        """Upload a file (multipart) without creating a task; returns its /data/upload/... URL."""
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        out = self.api("POST", f"/api/projects/{project}/import?commit_to_project=false", raw=body,
                       content_type=f"multipart/form-data; boundary={boundary}")
        ids = out["file_upload_ids"]
        files = self.api("GET", f"/api/projects/{project}/file-uploads?ids={json.dumps(ids)}")
        return "/data/" + files[0]["file"]


class Backend:
    """tests/e2e/serve_tiny.py (the production app factory on the tiny models) as its own process.

    The process starts at once; `wait()` blocks (bounded) until /health answers, so several
    backends can start in parallel.
    """

    def __init__(self, work: Path, name: str = "backend", args: list[str] | None = None, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HYBRIDGL_", "LABEL_STUDIO_"))}
        full_env.update(env or {})
        self.process = Process([sys.executable, str(ROOT / "tests" / "e2e" / "serve_tiny.py"), "--host",
                                "127.0.0.1", "--port", str(self.port), *(args or [])], full_env, work / f"{name}.log")

    def wait(self, timeout: float = 180) -> "Backend":
        self.process.wait_ready(self.url + "/health", timeout, "the backend")
        return self

    def stop(self) -> None:
        self.process.stop()
