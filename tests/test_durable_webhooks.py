"""Annotators' corrections survive the backend process: kill -9 and SIGTERM of the production server
(docker/start.sh: gunicorn, one worker, tiny models) lose no webhook event.

A stdlib server on 127.0.0.1 plays Label Studio's GET /api/predictions, slowly, so that a backlog of
events is still waiting when the process is stopped.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib import error, request
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from local_http import LocalServer, QuietHandler

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from harness import free_port  # noqa: E402
from serve_tiny import tiny_environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "docker" / "start.sh"
TOKEN = "durable-token-0123"
LOOKUP_DELAY = 0.1  # seconds per prediction lookup: 50 events take about 5 s to handle


def region(rows: int) -> dict:
    mask = np.zeros((8, 10), np.uint8)
    mask[:rows] = 255
    return {"id": "r", "type": "brushlabels", "from_name": "mask", "to_name": "image", "original_width": 10,
            "original_height": 8, "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["Target"]}}


class SlowPredictions(LocalServer):
    """GET /api/predictions?task=ID: one prediction of `version` covering the top 4 rows, after a delay."""

    def __init__(self):
        self.version = None
        outer = self

        class Handler(QuietHandler):
            def do_GET(self):
                time.sleep(LOOKUP_DELAY)
                url = urlparse(self.path)
                if self.headers.get("Authorization") != f"Token {TOKEN}" or url.path != "/api/predictions":
                    return self.send_error(404)
                task = int(parse_qs(url.query)["task"][0])
                self.send_body(json.dumps([{"id": task, "model_version": outer.version, "score": 0.8,
                                            "result": [region(4)]}]).encode())

        super().__init__(Handler)


def http(url: str, body: dict | None = None, timeout: float = 10) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Server:
    """docker/start.sh on the tiny models, MODEL_DIR kept across restarts."""

    def __init__(self, work: Path, label_studio: str):
        self.work, self.port = work, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HYBRIDGL_", "LABEL_STUDIO_"))},
                    **tiny_environment(work), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "PORT": str(self.port), "THREADS": "4",
                    "MODEL_DIR": str(work / "model-dir"), "HYBRIDGL_SKIP_DOWNLOAD": "1", "LOG_LEVEL": "WARNING",
                    "LABEL_STUDIO_URL": label_studio, "LABEL_STUDIO_API_KEY": TOKEN}
        self.proc: subprocess.Popen | None = None

    def start(self) -> dict:
        self.log = open(self.work / "server.log", "ab")
        self.proc = subprocess.Popen(["bash", str(START)], env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 180
        while True:
            assert self.proc.poll() is None, (self.work / "server.log").read_text(errors="replace")[-3000:]
            try:
                return http(self.url + "/health")
            except (error.URLError, ConnectionError, OSError):
                assert time.time() < deadline, "the backend did not start"
                time.sleep(0.3)

    def signal(self, sig: int, timeout: float = 60) -> None:
        os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout)
        self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)

    def stored(self) -> tuple[int, int]:
        """(corrections recorded, events still queued) in MODEL_DIR/quality.sqlite3."""
        db = sqlite3.connect(self.work / "model-dir" / "quality.sqlite3")
        try:
            return (db.execute("SELECT COUNT(*) FROM corrections").fetchone()[0],
                    db.execute("SELECT COUNT(*) FROM webhook_events").fetchone()[0])
        finally:
            db.close()


def annotation(i: int) -> dict:
    return {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": i},
            "annotation": {"id": i, "task": i, "result": [region(2)]}}


@pytest.fixture
def stack(tmp_path):
    ls = SlowPredictions()
    server = Server(tmp_path, ls.url)
    try:
        yield ls, server
    finally:
        server.stop()
        ls.close()


def send(server: Server, ids: range) -> None:
    for i in ids:
        assert http(server.url + "/webhook", annotation(i))["quality"] == "queued"


def test_kill_9_loses_no_correction_and_the_backlog_resumes_on_start(stack):
    ls, server = stack
    ls.version = server.start()["model_version"]
    send(server, range(1, 51))
    server.signal(signal.SIGKILL)  # every event was answered "queued"; most are not handled yet
    recorded, queued = server.stored()
    assert recorded + queued == 50 and queued > 0
    server.start()
    deadline = time.time() + 120
    while http(server.url + "/metrics")["quality"]["count"] < 50:
        assert time.time() < deadline, f"backlog not resumed: {server.stored()}"
        time.sleep(0.3)
    quality = http(server.url + "/metrics")["quality"]
    assert (quality["count"], quality["mIoU"]) == (50, 0.5) and server.stored() == (50, 0)


def test_sigterm_drains_the_backlog_before_exit(stack):
    ls, server = stack
    ls.version = server.start()["model_version"]
    send(server, range(1, 51))
    recorded, queued = server.stored()
    assert queued > 0  # still work to do when docker stop arrives
    server.signal(signal.SIGTERM)
    assert server.proc.returncode == 0 and server.stored() == (50, 0)
