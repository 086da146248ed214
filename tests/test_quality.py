"""Quality from corrections, in-process: mask comparison, the SQLite store, the tracker, and the
/webhook -> /metrics path of the real app, with a stdlib HTTP server playing Label Studio's
/api/predictions (token-checked) so that the real lookup code runs. The same path against a real
Label Studio is in tests/test_preannotate_e2e.py.
"""
from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from backend import quality
from backend._wsgi import create_app
from backend.model import HybridGLBackend
from backend.preannotate import histogram_png, margin_of, write_report, Row
from backend.quality import QualityError, QualityStore, QualityTracker, compare
from backend.settings import Settings

from local_http import LocalServer, QuietHandler

TOKEN = "quality-token-0123"
H, W = 8, 10


def region(mask: np.ndarray, label="Target", name="mask") -> dict:
    return {"id": "r", "type": "brushlabels", "from_name": name, "to_name": "image", "original_width": W,
            "original_height": H, "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255),
                                            "brushlabels": [label]}}


def box(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_compare_masks():
    ours = box(0, 4, 0, 10)  # 40 pixels
    assert compare([region(ours)], [region(ours)])["iou"] == 1.0
    half = compare([region(box(0, 2, 0, 10))], [region(ours)])
    assert (half["iou"], half["intersection"], half["union"]) == (0.5, 20, 40)
    # the annotation's regions of our tag and label are united; others are not ours to compare
    two = compare([region(box(0, 2, 0, 10)), region(box(2, 4, 0, 10)), region(box(4, 8, 0, 10), label="Other"),
                   region(box(4, 8, 0, 10), name="other_tag")], [region(ours)])
    assert two["iou"] == 1.0 and two["annotated_pixels"] == 40
    assert compare([], [region(ours)])["iou"] == 0.0  # the annotator erased our mask
    assert compare([], [])["iou"] == 1.0  # nothing there, and we proposed nothing
    assert compare([region(ours)], [])["iou"] == 0.0  # we proposed nothing, the annotator painted
    bigger = region(np.ones((H + 1, W), bool))
    bigger["original_height"] = H + 1
    with pytest.raises(QualityError) as e:
        compare([bigger], [region(ours)])
    assert e.value.kind == "size_mismatch"


def test_store_metrics_update_and_persistence(tmp_path):
    store = QualityStore(tmp_path / "q.sqlite3")
    n = lambda i, u: {"iou": i / u, "intersection": i, "union": u, "annotated_pixels": u, "predicted_pixels": i}
    store.record(1, 10, 3, "v1", 100, 0.95, n(9, 10), "ANNOTATION_CREATED")
    store.record(2, 11, 3, "v1", 101, 0.15, n(1, 30), "ANNOTATION_CREATED")
    store.record(3, 12, 3, "v0", 102, 0.5, n(0, 5), "ANNOTATION_CREATED")
    m = store.metrics("v1")
    assert m["count"] == 2 and m["mIoU"] == pytest.approx((0.9 + 1 / 30) / 2) and m["oIoU"] == pytest.approx(10 / 40)
    assert m["other_versions"] == {"v0": 1}
    buckets = {(b["score_from"], b["score_to"]): b for b in m["by_score"]}
    assert len(buckets) == 10 and buckets[(0.9, 1.0)]["count"] == 1 and buckets[(0.1, 0.2)]["count"] == 1
    assert buckets[(0.9, 1.0)]["mIoU"] == pytest.approx(0.9) and buckets[(0.5, 0.6)]["mIoU"] is None
    store.record(2, 11, 3, "v1", 101, 0.15, n(30, 30), "ANNOTATION_UPDATED")  # an update replaces the pair
    again = QualityStore(tmp_path / "q.sqlite3").metrics("v1")  # ... and it survives a restart
    assert again["count"] == 2 and again["mIoU"] == pytest.approx(0.95)
    store.forget(1)
    assert store.metrics("v1")["count"] == 1


def test_tracker_picks_our_prediction(tmp_path):
    ours, other = box(0, 4, 0, 10), box(4, 8, 0, 10)
    predictions = {7: [{"id": 1, "model_version": "v1", "score": 0.9, "result": [region(other)]},
                       {"id": 2, "model_version": "v1", "score": 0.4, "result": [region(ours)]},
                       {"id": 3, "model_version": "someone-else", "score": 1.0, "result": [region(ours)]}],
                   8: [{"id": 4, "model_version": "someone-else", "score": 1.0, "result": []}]}
    tracker = QualityTracker(QualityStore(tmp_path / "q.sqlite3"), "v1", lambda task, project: predictions[task])

    def payload(ann_id, task, result, **extra):
        return {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "task": {"id": task},
                "annotation": {"id": ann_id, "task": task, "result": result, **extra}}

    # the parent prediction when it is ours, else our best-scored one
    assert tracker.process(payload(1, 7, [region(ours)], parent_prediction=2))["iou"] == 1.0
    assert tracker.process(payload(2, 7, [region(ours)]))["iou"] == 0.0
    assert tracker.process(payload(3, 8, [region(ours)])) is None  # no prediction of ours
    assert tracker.process(payload(4, 7, [region(ours)], was_cancelled=True)) is None
    rows = tracker.store.rows("v1")
    assert [(r["annotation_id"], r["prediction_id"], r["score"]) for r in rows] == [(1, 2, 0.4), (2, 1, 0.9)]


def test_a_recorded_event_leaves_the_backlog_in_the_same_transaction(tmp_path):
    """kill -9 right after a correction is stored must not leave its event queued too (it would be
    counted twice until replayed): the store's row and the event's removal commit together."""
    ours = box(0, 5, 0, 10)
    predictions = {7: [{"id": 1, "model_version": "v1", "score": 0.9, "result": [region(ours)]}]}
    store = QualityStore(tmp_path / "q.sqlite3")
    tracker = QualityTracker(store, "v1", lambda task, project: predictions[task])
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "task": {"id": 7},
             "annotation": {"id": 11, "task": 7, "result": [region(ours)]}}
    event_id = store.enqueue(event)
    assert tracker.process(event, event_id)["iou"] == 1.0
    # what another process (the next start) sees before `handled` runs: recorded, not queued
    assert [r["annotation_id"] for r in QualityStore(tmp_path / "q.sqlite3").rows()] == [11]
    assert QualityStore(tmp_path / "q.sqlite3").backlog_size() == 0
    # an event that records nothing stays queued until the worker marks it handled
    other = store.enqueue({**event, "task": {"id": 8}, "annotation": {"id": 12, "task": 8, "result": []}})
    predictions[8] = []
    assert tracker.process(store.backlog()[0][1], other) is None
    assert store.backlog_size() == 1


def test_tracker_compares_with_the_alternative_the_annotator_started_from(tmp_path):
    best, alternative = box(0, 4, 0, 10), box(4, 8, 0, 10)
    predictions = {7: [{"id": 1, "model_version": "v1-rank2", "score": 0.3, "result": [region(alternative)]},
                       {"id": 2, "model_version": "v1", "score": 0.6, "result": [region(best)]},
                       {"id": 3, "model_version": "v1-rankx", "score": 0.9, "result": [region(best)]}]}
    tracker = QualityTracker(QualityStore(tmp_path / "q.sqlite3"), "v1", lambda task, project: predictions[task])
    payload = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "task": {"id": 7},
               "annotation": {"id": 5, "task": 7, "result": [region(alternative)], "parent_prediction": 1}}
    assert tracker.process(payload)["iou"] == 1.0  # the rank-2 mask, one of ours, was accepted as it was
    payload["annotation"].update(id=6, parent_prediction=3)  # not one of ours: our best mask counts
    assert tracker.process(payload)["iou"] == 0.0
    rows = tracker.store.rows("v1")
    assert [(r["annotation_id"], r["prediction_id"], r["score"]) for r in rows] == [(5, 1, 0.3), (6, 2, 0.6)]


class FakePredictions(LocalServer):
    """Label Studio's GET /api/predictions?task=ID, token-checked."""

    def __init__(self, predictions: dict[int, list]):
        outer = self
        self.seen: list[str] = []

        class Handler(QuietHandler):
            def do_GET(self):
                outer.seen.append(self.path)
                url = urlparse(self.path)
                if self.headers.get("Authorization") != f"Token {TOKEN}":
                    return self.send_error(401)
                if url.path != "/api/predictions":
                    return self.send_error(404)
                self.send_body(json.dumps(predictions.get(int(parse_qs(url.query)["task"][0]), [])).encode())

        super().__init__(Handler)


@pytest.fixture(scope="module")
def model():
    from tiny_models import tiny_hybridgl

    return tiny_hybridgl(sam=False)


def test_webhook_to_metrics_through_the_app(model, tmp_path):
    backend = HybridGLBackend(model, Settings(model_dir=tmp_path / "model-dir"))
    version = backend.model_version
    ours = box(0, 4, 0, 10)
    server = FakePredictions({5: [{"id": 9, "model_version": version, "score": 0.72, "result": [region(ours)]}]})
    try:
        c = create_app(backend).test_client()
        empty = c.get("/metrics").get_json()["quality"]
        assert empty["count"] == 0 and empty["mIoU"] is None and len(empty["by_score"]) == 10
        assert not (tmp_path / "model-dir").exists()  # reading /metrics creates nothing
        # Label Studio's /setup gives the URL and token the lookup uses
        c.post("/setup", json={"hostname": server.url, "access_token": TOKEN, "project": 3})
        answer = c.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3}, "task": {"id": 5},
                                          "annotation": {"id": 1, "task": 5, "result": [region(box(0, 2, 0, 10))]}})
        assert answer.get_json()["quality"] == "queued"
        assert quality.tracker_for(backend).wait(10)
        q = c.get("/metrics").get_json()["quality"]
        assert (q["count"], q["mIoU"], q["oIoU"]) == (1, 0.5, 0.5)
        assert [b["count"] for b in q["by_score"]][7] == 1
        assert server.seen == ["/api/predictions?task=5"]
        assert (tmp_path / "model-dir" / "quality.sqlite3").is_file()
        # other events are counted as before and leave the numbers alone
        assert c.post("/webhook", json={"action": "PROJECT_UPDATED"}).get_json().get("quality") is None
        c.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}]})
        assert c.get("/metrics").get_json()["quality"]["count"] == 0
    finally:
        server.close()


def test_report_files(tmp_path):
    rows = [Row(3, "/a.png", "the cup", 0.8, 0.5, "predicted"), Row(1, "/b.png", "the lamp", 0.2, 0.01, "predicted"),
            Row(2, "/c.png", "", None, None, "failed", "missing_image: gone"), Row(4, "/a.png", "x", 0.5, None, "existing")]
    write_report(tmp_path, rows, "v1")
    lines = (tmp_path / "scores.csv").read_text().splitlines()
    assert lines[0] == "task_id,image,expression,score,margin,status,reason"
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "4", "3", "2"]
    from PIL import Image

    with Image.open(tmp_path / "score_histogram.png") as im:
        assert im.size == (640, 400)
    histogram_png(tmp_path / "empty.png", [], 10, "none")
    assert margin_of(None) is None


@pytest.mark.parametrize("token", [TOKEN, "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln"])
def test_an_event_that_finds_label_studio_away_stays_queued_until_it_is_back(model, tmp_path, token):
    """A webhook acknowledged as queued is not lost when Label Studio cannot be reached for the lookup
    (a restart; both services started together after a crash): it stays in the backlog and is scored
    once Label Studio answers. With a personal access token the failed refresh is `unreachable` too,
    not an internal error."""
    import socket

    with socket.socket() as s:  # a port nothing listens on: Label Studio is away
        s.bind(("127.0.0.1", 0))
        away = f"http://127.0.0.1:{s.getsockname()[1]}"
    backend = HybridGLBackend(model, Settings(model_dir=tmp_path, label_studio_url=away,
                                              label_studio_api_key=token, fetch_timeout=2.0))
    tracker = quality.tracker_for(backend)
    lookups = []
    tracker.predictions_of = lambda task_id, project: lookups.append(task_id) or quality.label_studio_lookup(
        backend)(task_id, project)
    assert tracker.submit({"action": "ANNOTATION_CREATED", "task": {"id": 5},
                           "annotation": {"id": 1, "task": 5, "result": [region(box(0, 2, 0, 10))]}})
    try:
        deadline = time.time() + 10
        while not lookups and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        counts = backend.counters.snapshot()
        assert counts.get("quality.internal", 0) == 0 and counts.get("quality.retried", 0) >= 1, counts
        assert counts.get("quality.unreachable", 0) == 0, counts  # not given up: not counted as such
        assert tracker.store.backlog_size() == 1, "the event was dropped while Label Studio was away"
        version = backend.model_version
        tracker.predictions_of = lambda task_id, project: [
            {"id": 9, "model_version": version, "score": 0.5, "result": [region(box(0, 4, 0, 10))]}]
        assert tracker.wait(quality.RETRY_SECONDS + 10)  # Label Studio is back: scored on the next try
        assert [r["annotation_id"] for r in tracker.store.rows()] == [1]
    finally:
        tracker.drain(1)


def test_a_label_studio_that_stays_away_blocks_neither_other_projects_nor_the_queue_forever(model, tmp_path, monkeypatch):
    """While one project's Label Studio cannot be reached, its events wait, but the other projects'
    events behind them are scored (the backlog used to stop at the first unreachable event); an
    event still unreachable after KEEP_UNREACHABLE_SECONDS is given up (counted, logged)."""
    monkeypatch.setattr(quality, "RETRY_SECONDS", 0.2)
    backend = HybridGLBackend(model, Settings(model_dir=tmp_path))
    tracker = quality.tracker_for(backend)
    version = backend.model_version
    tried = []

    def predictions_of(task_id, project):
        tried.append(task_id)
        if project == 1:
            raise QualityError("unreachable", "connection refused", retry=True)
        return [{"id": 9, "model_version": version, "score": 0.5, "result": [region(box(0, 4, 0, 10))]}]

    tracker.predictions_of = predictions_of
    event = lambda i, project: {"action": "ANNOTATION_CREATED", "project": {"id": project}, "task": {"id": i},
                                "annotation": {"id": i, "task": i, "result": [region(box(0, 2, 0, 10))]}}
    try:
        for i in range(1, 4):  # project 1's event first, then two of project 2
            assert tracker.submit(event(i, 1 if i == 1 else 2))
        deadline = time.time() + 10
        while len(tracker.store.rows()) < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert sorted(r["annotation_id"] for r in tracker.store.rows()) == [2, 3]
        assert tracker.store.backlog_size() == 1  # project 1's event waits for its Label Studio
        assert tried.count(1) >= 1 and tried.count(2) == 1 and tried.count(3) == 1
        monkeypatch.setattr(quality, "KEEP_UNREACHABLE_SECONDS", 0.0)  # now it has waited too long
        assert tracker.wait(5), "the event that stayed unreachable was never given up"
        assert sorted(r["annotation_id"] for r in tracker.store.rows()) == [2, 3]
    finally:
        tracker.drain(1)


def test_without_a_parent_the_tracker_compares_with_the_latest_configs_best_mask(tmp_path):
    """After a labelling-config edit a task holds our predictions for the old config (which Label Studio
    no longer shows) beside the new ones; an annotation that names no parent is compared with the
    best mask of the latest config's predictions, not with a better-scored stale one."""
    old, new = box(0, 4, 0, 10), box(4, 8, 0, 10)
    predictions = {7: [{"id": 1, "model_version": "v1-cfg0000aaaa", "score": 0.9, "result": [region(old, name="m")]},
                       {"id": 2, "model_version": "v1-cfg0000aaaa-rank2", "score": 0.8, "result": [region(new, name="m")]},
                       {"id": 5, "model_version": "v1-cfg1111bbbb", "score": 0.6, "result": [region(new)]},
                       {"id": 6, "model_version": "v1-cfg1111bbbb-rank2", "score": 0.5, "result": [region(old)]}]}
    tracker = QualityTracker(QualityStore(tmp_path / "q.sqlite3"), "v1", lambda task, project: predictions[task])
    payload = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "task": {"id": 7},
               "annotation": {"id": 9, "task": 7, "result": [region(new)]}}
    assert tracker.process(payload)["iou"] == 1.0
    payload["annotation"].update(id=10, parent_prediction=2)  # a parent of ours still counts, whatever its config
    tracker.process(payload)
    rows = tracker.store.rows("v1")
    assert [(r["annotation_id"], r["prediction_id"]) for r in rows] == [(9, 5), (10, 2)]
