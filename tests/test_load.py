"""Load and faults: /health while the model is busy, backpressure on /predict, clients that left.

The server here is Werkzeug's threaded server on a real socket (127.0.0.1), so that closed
connections and concurrent requests are what a deployment sees; the model is held busy by taking
its lock, and nothing of ours is mocked. Timings are never asserted (bench/bench_load.py measures).
"""
from __future__ import annotations

import json
import socket
import threading
import time
from urllib import error, request

import pytest
from werkzeug.serving import make_server

from backend._wsgi import create_app
from backend.model import HybridGLBackend
from backend.settings import Settings

from test_backend import CONFIG, TOKEN, FakeLabelStudio, IMAGE_A, IMAGE_B, task
from tiny_models import tiny_hybridgl


@pytest.fixture(scope="module")
def model():
    return tiny_hybridgl(sam=True)


@pytest.fixture(scope="module")
def ls():
    server = FakeLabelStudio({"a.png": IMAGE_A, "b.png": IMAGE_B})
    yield server
    server.close()


class Served:
    """create_app(backend) on Werkzeug's threaded server, on a free port of 127.0.0.1."""

    def __init__(self, backend: HybridGLBackend):
        self.backend = backend
        self.server = make_server("127.0.0.1", 0, create_app(backend), threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def call(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def wait_until(condition, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def body(*ids: int) -> dict:
    return {"tasks": [task(i) for i in ids], "label_config": CONFIG}


def test_predicts_past_the_queue_get_503_and_health_answers_while_the_model_is_busy(model, ls):
    backend = HybridGLBackend(model, Settings(label_studio_url=ls.url, label_studio_api_key=TOKEN, cache_images=0,
                                              max_queue=2, retry_after=7))
    served = Served(backend)
    answers: dict[int, tuple] = {}
    try:
        with backend.gpu_lock:  # the model is busy: admitted predicts wait for it
            waiting = [threading.Thread(target=lambda i=i: answers.__setitem__(i, call(served.url + "/predict",
                                                                                       body(i))))
                       for i in range(2)]
            for t in waiting:
                t.start()
            wait_until(lambda: backend.busy == 2, what="two predicts waiting for the model")
            # the queue is full: more predicts are refused at once, telling when to come back
            for i in range(10, 16):
                status, headers, answer = call(served.url + "/predict", body(i))
                assert status == 503 and headers["Retry-After"] == "7" and "HYBRIDGL_MAX_QUEUE" in answer["error"]
            # /health, /metrics, /setup and /webhook are answered while the model is held
            status, _, health = call(served.url + "/health")
            assert status == 200 and health["status"] == "UP"
            status, _, metrics = call(served.url + "/metrics")
            assert status == 200 and metrics["busy"] == 2 and metrics["counts"]["requests.predict_refused"] == 6
            assert call(served.url + "/setup", {})[0] == 200
            assert call(served.url + "/webhook", {"action": "PROJECT_UPDATED"})[0] == 200
            assert not answers  # nothing was computed while the model was held
        for t in waiting:
            t.join(120)
        assert [answers[i][0] for i in range(2)] == [200, 200]
        assert all("result" in answers[i][2]["results"][0] for i in range(2))
        # the slots were given back: the next predict is admitted
        status, _, answer = call(served.url + "/predict", body(20))
        assert status == 200 and "result" in answer["results"][0]
    finally:
        served.close()


def test_a_client_that_went_away_gets_nothing_computed(model, ls):
    """A predict whose client closed the connection while it waited for the model is not computed:
    neither SAM (prepare) nor the expression (segment) runs for any of its tasks."""
    backend = HybridGLBackend(model, Settings(label_studio_url=ls.url, label_studio_api_key=TOKEN, cache_images=0))
    served = Served(backend)
    try:
        payload = json.dumps(body(1, 2, 3)).encode()
        with backend.gpu_lock:
            sock = socket.create_connection(("127.0.0.1", served.server.server_port), timeout=10)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            wait_until(lambda: backend.busy == 1, what="the predict to wait for the model")
            sock.close()  # Label Studio gives up (its 100 s limit)
            time.sleep(0.1)
        wait_until(lambda: backend.counters.snapshot().get("errors.client_gone") == 3, what="3 tasks skipped")
        counts = backend.counters.snapshot()
        assert "cache.misses" not in counts and "tasks.ok" not in counts and "prepare" not in \
            backend.counters.seconds_snapshot()
        # a client that stays gets its answer
        status, _, answer = call(served.url + "/predict", body(4))
        assert status == 200 and "result" in answer["results"][0]
    finally:
        served.close()
