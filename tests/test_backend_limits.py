"""The HTTP side's bounds and races, in-process on the tiny models: what /metrics may grow by,
and the prepared-image cache under concurrent requests."""
from __future__ import annotations

import base64
import threading

import pytest

from backend.images import decode_image
from backend.model import HybridGLBackend
from backend.settings import Settings

from test_backend import IMAGE_A, make_client
from tiny_models import tiny_hybridgl


@pytest.fixture(scope="module")
def model():
    return tiny_hybridgl(sam=True)


def test_webhook_actions_do_not_grow_the_metrics_without_bound(model):
    """Anyone who reaches /webhook chooses its `action`: each distinct one was a new /metrics count
    for the life of the process (memory and the size of every /metrics answer)."""
    backend, c = make_client(model)
    for i in range(200):
        assert c.post("/webhook", json={"action": f"MADE_UP_{i}_" + "X" * 1000}).status_code == 200
    c.post("/webhook", json={"action": "ANNOTATION_CREATED"})
    counts = c.get("/metrics").get_json()["counts"]
    webhook = {k: v for k, v in counts.items() if k.startswith("webhook.")}
    assert webhook == {"webhook.other": 200, "webhook.ANNOTATION_CREATED": 1}


def test_two_requests_for_a_new_image_prepare_it_once(model):
    """The second request for an image waits for the model while the first prepares it, then finds
    it in the cache. The view used to be cached only after the model was released: a request that
    took the model in between prepared the same image again (SAM twice)."""
    backend = HybridGLBackend(model, Settings())
    image = decode_image(IMAGE_A, 10**8)
    add, second = backend.counters.add, []

    def add_then_let_the_second_in(key, n=1):
        add(key, n)
        if key == "cache.misses" and not second:  # the first has prepared the view and left the model
            second.append(threading.Thread(target=backend.prepared, args=(IMAGE_A, image)))
            second[0].start()
            second[0].join(10)

    backend.counters.add = add_then_let_the_second_in
    first = backend.prepared(IMAGE_A, image)
    second[0].join(60)
    counts = backend.counters.snapshot()
    assert counts["cache.misses"] == 1 and counts["cache.hits"] == 1
    assert backend.prepared(IMAGE_A, image) is first


def test_setup_tokens_cannot_push_the_configured_secrets_out_of_the_log_redactor(model):
    """The redactor keeps the most recent /setup tokens (256); the environment's secrets shared that
    LRU, so 256 /setup calls with new tokens made the logs show LABEL_STUDIO_API_KEY again."""
    from backend import logsafe

    secrets = {"label_studio_api_key": "env-api-key-0123456789", "basic_auth_user": "u",
               "basic_auth_pass": "env-basic-pass-987", "webhook_secret": "env-webhook-secret-42"}
    _, c = make_client(model, **secrets)
    auth = {"Authorization": "Basic " + base64.b64encode(b"u:env-basic-pass-987").decode()}
    for i in range(logsafe.REDACTOR.keep + 10):
        assert c.post("/setup", json={"access_token": f"setup-token-{i:06d}"}, headers=auth).status_code == 200
    last = f"setup-token-{logsafe.REDACTOR.keep + 9:06d}"
    line = logsafe.REDACTOR.redact(" ".join(secrets.values()) + " " + last)
    assert "env-" not in line
    assert last not in line


def test_setup_and_webhook_bodies_are_bounded_below_predict(model):
    """/setup and /webhook took bodies up to /predict's 128 MB without an admission bound (each server
    thread could hold one, parsed): they are limited to SIDE_REQUEST_BYTES; /predict keeps its limit."""
    from backend import _wsgi

    _, c = make_client(model)
    big = {"action": "ANNOTATION_CREATED", "pad": "x" * (_wsgi.SIDE_REQUEST_BYTES + 1)}
    for path in ("/setup", "/webhook"):
        r = c.post(path, json=big)
        assert r.status_code == 413, (path, r.status_code)
    assert c.post("/webhook", json={"action": "ANNOTATION_CREATED", "pad": "x" * 1000}).status_code == 200
    r = c.post("/predict", json={"tasks": [], "label_config": "<View/>", "pad": "x" * (_wsgi.SIDE_REQUEST_BYTES + 1)})
    assert r.status_code != 413
