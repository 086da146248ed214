"""Hostile or malformed input to /predict, /setup and /webhook that the other backend tests do not
cover: each gets a clear error for its task (or its webhook), never a 500, an "internal" error with
a traceback, a failure recorded as the task's own, or memory out of proportion to the request."""
from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from backend.images import decode_image
from backend.labeling import TaskError
from backend.quality import QualityError, QualityStore, QualityTracker, region_mask

from test_backend import CONFIG, IMAGE_A, TOKEN, FakeLabelStudio, make_client, predict, task
from test_quality import H, W, box, region
from tiny_models import tiny_hybridgl


@pytest.fixture(scope="module")
def model():
    return tiny_hybridgl(sam=True)


@pytest.fixture(scope="module")
def ls():
    server = FakeLabelStudio({"a.png": IMAGE_A, "odd.dds": _dds_with_unknown_pixel_format()})
    yield server
    server.close()


def _dds_with_unknown_pixel_format() -> bytes:
    """A DDS file whose pixel format flags (header offset 80) name no format: Pillow raises
    NotImplementedError for it, not OSError."""
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8)).save(buf, format="DDS")
    data = bytearray(buf.getvalue())
    data[80:84] = bytes(4)
    return bytes(data)


def test_an_image_pillow_cannot_decode_is_the_tasks_bad_image_not_an_internal_error(model, ls):
    with pytest.raises(TaskError) as e:
        decode_image(_dds_with_unknown_pixel_format(), 10**8)
    assert e.value.kind == "bad_image"
    _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN)
    odd, ok = predict(c, [task(1, "odd.dds"), task(2, "a.png")])
    assert odd["kind"] == "bad_image" and odd["result"] == [] and odd["score"] == 0.0  # recorded, not retried forever
    assert "error" not in ok


@pytest.mark.parametrize("value", [{"x": 1e308, "y": 50}, {"x": 50, "y": -1e308}])
def test_an_interactive_click_at_an_overflowing_coordinate_is_a_bad_context(model, ls, value):
    backend, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN)
    context = {"result": [{"type": "keypointlabels", "value": value, "is_positive": True}]}
    (r,) = predict(c, [task(1)], context=context)
    assert r["kind"] == "bad_context", r
    assert "errors.internal" not in backend.counters.snapshot()


@pytest.mark.parametrize("token", ["legacy-token\nX-Injected: 1", "t\u00f6ken-\u20ac-0123"])
def test_a_token_no_http_header_can_carry_is_refused_at_setup_and_never_recorded_as_the_tasks_failure(
        model, ls, token):
    backend, c = make_client(model, label_studio_url=ls.url)
    r = c.post("/setup", json={"project": "7.1", "hostname": ls.url, "access_token": token})
    assert r.status_code == 400 and "access_token" in r.get_json()["error"]
    # the same token from the environment: an auth problem (nothing stored, tried again), not the
    # task's failure (an empty prediction Label Studio would keep) nor an internal error
    backend, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=token)
    (r,) = predict(c, [task(1)])
    assert r["kind"] == "auth" and "result" not in r, r
    assert "errors.internal" not in backend.counters.snapshot()


@pytest.mark.parametrize("annotation_id", [2**63, -(2**63) - 1, 10**30])
def test_a_webhook_with_an_id_sqlite_cannot_hold_is_ignored_not_a_500(model, tmp_path, annotation_id):
    backend, c = make_client(model, model_dir=tmp_path)
    r = c.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": annotation_id}, {"id": 5}]})
    assert r.status_code == 200 and r.get_json()["status"] == "ok"
    tracker = QualityTracker(QualityStore(tmp_path / "q.sqlite3"), "v1", lambda task, project: [])
    payload = {"action": "ANNOTATION_CREATED", "task": {"id": 3}, "annotation": {"id": annotation_id, "result": []}}
    with pytest.raises(QualityError) as e:
        tracker._process(payload, None)
    assert e.value.kind == "bad_payload"
    assert c.get("/health").status_code == 200


def _rle_declaring(values: int) -> list[int]:
    """A Label Studio brush RLE whose header declares `values` bytes, filled by runs of 65536
    (27 bits each): a few kilobytes that decode_rle expands to `values` bytes."""
    bits = format(values, "032b") + format(7, "05b") + format(15, "04b") * 4
    bits += ("1" + "00" + "1" * 16 + "11111111") * (values // 65536)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]


def test_a_brush_rle_cannot_make_the_webhook_worker_allocate_what_its_size_does_not_say():
    """The annotation's RLE comes from the webhook's sender. 64 MiB declared in 3.5 kB for an 8x10
    mask: refused before decoding (an RLE of 1 MB declares 4 GiB the same way)."""
    bomb = region(box(0, 4, 0, 10))
    bomb["value"]["rle"] = _rle_declaring(64 << 20)
    assert len(bomb["value"]["rle"]) < 4000
    tracemalloc.start()
    try:
        with pytest.raises(QualityError) as e:
            region_mask(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.kind == "bad_mask"
    assert peak < 8 << 20, f"decoding allocated {peak / 2**20:.0f} MiB for an {H}x{W} mask"
    # ... and a size the header matches is still bounded by the pixels a mask may have
    huge = region(box(0, 4, 0, 10))
    huge["original_height"], huge["original_width"] = 16384, 16384
    huge["value"]["rle"] = _rle_declaring(16384 * 16384 * 4)[:64]  # the header is enough to refuse it
    with pytest.raises(QualityError) as e:
        region_mask(huge, max_pixels=60_000_000)
    assert e.value.kind == "bad_mask" and "pixels" in str(e.value)
    # an honest mask still decodes
    assert region_mask(region(box(0, 4, 0, 10)), max_pixels=60_000_000).sum() == 40


def test_the_ray_ingress_keeps_of_a_setup_only_what_the_backend_reads(monkeypatch):
    """The ingress replays every project's last successful /setup to replicas that missed it. It kept
    the whole body: 1000 projects x 16 MB of padding (any field) were 16 GB in the ingress, and every
    /setup put all of them into the object store again."""
    import json
    from collections import OrderedDict

    import ray

    from backend import serve

    puts = []
    monkeypatch.setattr(ray, "put", lambda value: puts.append(value) or value)
    ingress = object.__new__(serve.Ingress)  # no replica behind it: only its /setup log is exercised
    ingress.setups, ingress.setup_seq, ingress.setup_log = OrderedDict(), 0, []
    padding = "x" * (4 << 20)
    for i in range(4):
        setup = {"project": f"{i}.1", "hostname": "http://ls:8080", "access_token": "token-0123", "schema": CONFIG}
        ingress._remember_setup(serve.WsgiRequest("POST", "/setup", body=json.dumps({**setup, "padding": padding}).encode(),
                                                  headers=[("Content-Type", "application/json")]))
    kept = [request for _, request in ingress.setups.values()]
    assert sum(len(r.body) for r in kept) < 64 << 10, "the padding was kept"
    # what a replica replays is the same /setup as far as the backend can tell
    assert json.loads(kept[-1].body) == {"project": "3.1", "hostname": "http://ls:8080", "access_token": "token-0123",
                                         "schema": CONFIG}
    # ... and the log the replicas read is bounded in bytes, not only in projects (a 4 MB schema is
    # longer than the backend keeps, yet Label Studio may send one)
    for i in range(4, 40):
        ingress._remember_setup(serve.WsgiRequest("POST", "/setup", body=json.dumps(
            {"project": f"{i}.1", "schema": padding}).encode(), headers=[("Content-Type", "application/json")]))
    assert sum(len(r.body) for _, r in ingress.setups.values()) <= serve.MAX_SETUP_BYTES
    assert list(ingress.setups)[-1] == "39"  # the latest is kept
