"""How good pre-annotation is on a team's own data: annotators' corrections against our predictions.

Label Studio posts ANNOTATION_CREATED / ANNOTATION_UPDATED to the backend's /webhook (it creates
that webhook itself when the ML backend is connected). For each, the tracker

1. takes the annotator's brush mask from the annotation (the union of its brush regions drawn
   with our prediction's tag and label),
2. finds our prediction for the task: it asks Label Studio (`GET /api/predictions?task=ID`, with
   the token of /setup or LABEL_STUDIO_API_KEY) and takes the annotation's parent prediction when
   it is one of ours, else our best-scored prediction of the backend's model_version (so
   predictions posted by `backend.preannotate` on another machine count too) for the latest
   labelling config the task was predicted for (an edit of the config leaves stale ones behind),
3. stores the pair's numbers (IoU, intersection, union, our score) in SQLite under MODEL_DIR
   (`MODEL_DIR/quality.sqlite3`, one row per annotation: an update replaces it).

`GET /metrics` shows them under "quality": running mIoU (mean of per-annotation IoU) and oIoU
(total intersection / total union), the count, and IoU by score bucket, for the current
model_version. Webhooks are handled on a background thread: Label Studio waits only 1 s
(WEBHOOK_TIMEOUT) for the answer, and the lookup calls back into Label Studio.

Durability: each event is written to the same SQLite file (table `webhook_events`) before the
webhook is answered, and deleted only once it has been handled. A SIGTERM (`docker stop`) drains the
backlog for up to DRAIN_SECONDS at exit; whatever is left, or everything after a kill -9, is handled
when the backend starts again (`resume`).
"""
from __future__ import annotations

import atexit
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import requests

from .labeling import TaskError
from .outbound import ForbiddenTarget
from .settings import Settings

log = logging.getLogger("backend.quality")

ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DB_NAME = "quality.sqlite3"
BUCKETS = 10  # score buckets of width 0.1 over [0, 1]

SCHEMA = """
CREATE TABLE IF NOT EXISTS corrections (
    annotation_id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL,
    project INTEGER,
    model_version TEXT NOT NULL,
    prediction_id INTEGER,
    score REAL,
    iou REAL NOT NULL,
    intersection INTEGER NOT NULL,
    union_pixels INTEGER NOT NULL,
    annotated_pixels INTEGER NOT NULL,
    predicted_pixels INTEGER NOT NULL,
    action TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS corrections_version ON corrections (model_version);
CREATE TABLE IF NOT EXISTS webhook_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    payload TEXT NOT NULL,
    received REAL NOT NULL
);
"""
DRAIN_SECONDS = 20.0  # within gunicorn's graceful timeout (30 s) of docker/start.sh
RETRY_SECONDS = 5.0  # while Label Studio cannot be reached, the backlog is tried again this often
KEEP_UNREACHABLE_SECONDS = 7 * 24 * 3600.0  # ... for at most this long after an event arrived


def sqlite_id(value: Any) -> bool:
    """Whether a payload's id is one the store can hold: an integer (not a bool) in SQLite's 64-bit range."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def project_of(payload: dict) -> Any:
    """The project a webhook names (Label Studio sends it as an object; older ones in the annotation)."""
    project = payload.get("project")
    annotation = payload.get("annotation") if isinstance(payload.get("annotation"), dict) else {}
    return project.get("id") if isinstance(project, dict) else annotation.get("project", project)


class QualityError(Exception):
    """Why one webhook could not be scored (counted in /metrics as quality.<kind>)."""

    def __init__(self, kind: str, message: str, retry: bool = False):
        super().__init__(message)
        self.kind = kind
        self.retry = retry  # Label Studio could not be reached: the event stays queued for a later try


# -- masks ------------------------------------------------------------------------------------------
def _brush_regions(result: Any) -> list[dict]:
    if not isinstance(result, list):
        return []
    return [r for r in result if isinstance(r, dict) and r.get("type") == "brushlabels"
            and isinstance(r.get("value"), dict) and r["value"].get("rle")]


def region_mask(region: dict, max_pixels: int | None = None) -> np.ndarray:
    """One brush region (Label Studio RLE of RGBA) -> bool [H,W].

    The RLE's header declares how many bytes it decodes to, and a few kilobytes of runs can declare
    4 GiB: the declared length must be the region's H*W*4, and H*W at most `max_pixels`, before
    anything is decoded (the annotation's RLE comes from the webhook's sender)."""
    from label_studio_sdk.converter.brush import decode_rle

    try:
        h, w = int(region["original_height"]), int(region["original_width"])
        rle = region["value"]["rle"]
        if h <= 0 or w <= 0 or (max_pixels is not None and h * w > max_pixels):
            raise QualityError("bad_mask", f"a brush region of {w}x{h} pixels is refused (at most {max_pixels} pixels)")
        declared = int.from_bytes(bytes(v & 0xFF for v in rle[:4]), "big")  # decode_rle's first 32 bits
        if len(rle) < 4 or declared != h * w * 4:
            raise QualityError("bad_mask", f"a brush region's RLE declares {declared} values, not the "
                                           f"{h * w * 4} of its {w}x{h} pixels")
        flat = decode_rle(rle)
        return np.asarray(flat).reshape(h, w, 4)[:, :, 3] > 0
    except QualityError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed region is the payload's problem
        raise QualityError("bad_mask", f"a brush region could not be decoded ({exc.__class__.__name__})") from exc


def union_mask(regions: list[dict], size: tuple[int, int] | None,
               max_pixels: int | None = None) -> tuple[np.ndarray | None, tuple[int, int] | None]:
    """The union of brush regions (None, size when there are none)."""
    mask = None
    for region in regions:
        m = region_mask(region, max_pixels)
        if size is not None and m.shape != size:
            raise QualityError("size_mismatch", f"brush masks of sizes {m.shape} and {size} cannot be compared")
        size = m.shape
        mask = m if mask is None else (mask | m)
    return mask, size


def compare(annotation_result: Any, prediction_result: Any, max_pixels: int | None = None) -> dict[str, Any]:
    """IoU of the annotator's mask with our prediction's.

    The annotator's mask is the union of the brush regions with our prediction's from_name and
    label (all brush regions when our prediction is empty). An annotation without such a region
    means "nothing there": IoU 0 against a non-empty prediction; two empty masks agree (IoU 1).
    max_pixels: the most pixels a brush region may have (larger ones are refused undecoded).
    """
    ours = _brush_regions(prediction_result)
    theirs = _brush_regions(annotation_result)
    if ours:
        names = {r.get("from_name") for r in ours}
        labels = {lab for r in ours for lab in (r["value"].get("brushlabels") or [])}
        theirs = [r for r in theirs if r.get("from_name") in names
                  and (not labels or set(r["value"].get("brushlabels") or []) & labels)]
    predicted, size = union_mask(ours, None, max_pixels)
    annotated, size = union_mask(theirs, size, max_pixels)
    a = int(annotated.sum()) if annotated is not None else 0
    p = int(predicted.sum()) if predicted is not None else 0
    if annotated is not None and predicted is not None:
        inter = int(np.logical_and(annotated, predicted).sum())
    else:
        inter = 0
    union = a + p - inter
    return {"iou": inter / union if union else 1.0, "intersection": inter, "union": union,
            "annotated_pixels": a, "predicted_pixels": p}


# -- the store --------------------------------------------------------------------------------------
class QualityStore:
    """SQLite under MODEL_DIR: one row per annotation compared with our prediction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock, self._db:
            self._db.executescript(SCHEMA)

    def record(self, annotation_id: int, task_id: int, project: int | None, model_version: str,
               prediction_id: int | None, score: float | None, numbers: dict[str, Any], action: str,
               event_id: int | None = None) -> None:
        """Store one comparison; the webhook event it came from (event_id) leaves the backlog in the
        same transaction, so a kill at any moment leaves it either recorded or queued, never both."""
        with self._lock, self._db:
            if event_id is not None:
                self._db.execute("DELETE FROM webhook_events WHERE id = ?", (event_id,))
            self._db.execute(
                "INSERT OR REPLACE INTO corrections (annotation_id, task_id, project, model_version, prediction_id,"
                " score, iou, intersection, union_pixels, annotated_pixels, predicted_pixels, action, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (annotation_id, task_id, project, model_version, prediction_id, score, numbers["iou"],
                 numbers["intersection"], numbers["union"], numbers["annotated_pixels"],
                 numbers["predicted_pixels"], action, time.time()))

    def enqueue(self, payload: dict) -> int:
        """Persist one webhook event (committed when this returns); its id in the backlog."""
        with self._lock, self._db:
            return int(self._db.execute("INSERT INTO webhook_events (payload, received) VALUES (?, ?)",
                                        (json.dumps(payload), time.time())).lastrowid)

    def backlog(self, limit: int = 100, after: int = 0) -> list[tuple[int, dict, float]]:
        """The oldest unhandled events after id `after`, (id, payload, received), in arrival order."""
        with self._lock:
            rows = list(self._db.execute("SELECT id, payload, received FROM webhook_events WHERE id > ? "
                                         "ORDER BY id LIMIT ?", (after, limit)))
        return [(int(i), json.loads(p), float(t)) for i, p, t in rows]

    def backlog_size(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM webhook_events").fetchone()[0])

    def handled(self, event_id: int) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM webhook_events WHERE id = ?", (event_id,))

    def forget(self, annotation_id: int) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM corrections WHERE annotation_id = ?", (annotation_id,))

    def rows(self, model_version: str | None = None) -> list[sqlite3.Row]:
        with self._lock:
            query = "SELECT * FROM corrections" + (" WHERE model_version = ?" if model_version else "")
            return list(self._db.execute(query + " ORDER BY annotation_id", (model_version,) if model_version else ()))

    def metrics(self, model_version: str, buckets: int = BUCKETS) -> dict[str, Any]:
        with self._lock:
            versions = {r[0]: r[1] for r in
                        self._db.execute("SELECT model_version, COUNT(*) FROM corrections GROUP BY model_version")}
        return quality_metrics(self.rows(model_version), model_version, versions, buckets)


def quality_metrics(rows: list, model_version: str, versions: dict[str, int] | None = None,
                    buckets: int = BUCKETS) -> dict[str, Any]:
    """mIoU, oIoU, count and IoU by score bucket for one model_version (other versions: counts)."""
    out = {"model_version": model_version, **summarize(rows), "by_score": []}
    for i in range(buckets):
        lo, hi = i / buckets, (i + 1) / buckets
        inside = [r for r in rows if r["score"] is not None
                  and (lo <= r["score"] < hi or (i == buckets - 1 and r["score"] >= hi))]
        out["by_score"].append({"score_from": round(lo, 4), "score_to": round(hi, 4), **summarize(inside)})
    out["other_versions"] = {v: n for v, n in (versions or {}).items() if v != model_version}
    return out


def summarize(rows: list) -> dict[str, Any]:
    if not rows:
        return {"count": 0, "mIoU": None, "oIoU": None}
    inter = sum(r["intersection"] for r in rows)
    union = sum(r["union_pixels"] for r in rows)
    return {"count": len(rows), "mIoU": round(float(np.mean([r["iou"] for r in rows])), 6),
            "oIoU": round(inter / union, 6) if union else 1.0}


# -- the tracker ------------------------------------------------------------------------------------
# predictions_of(task_id, project) -> Label Studio's predictions of that task (dicts)
Lookup = Callable[[int, Any], list]


class QualityTracker:
    """Scores annotation webhooks on one background thread, from the store's persisted backlog;
    `process` does one synchronously."""

    def __init__(self, store: QualityStore, model_version: str, predictions_of: Lookup, counters=None,
                 max_pixels: int | None = Settings.max_image_pixels):
        self.store = store
        self.max_pixels = max_pixels  # of a brush mask (HYBRIDGL_MAX_IMAGE_PIXELS: ours are no larger)
        self.model_version = model_version
        self.predictions_of = predictions_of
        self.counters = counters
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def _count(self, key: str) -> None:
        if self.counters is not None:
            self.counters.add(key)

    def submit(self, payload: dict) -> bool:
        """Queue an annotation webhook; False for other actions (ignored)."""
        action = payload.get("action")
        if action == "ANNOTATIONS_DELETED":
            for item in payload.get("annotations") or []:
                if isinstance(item, dict) and sqlite_id(item.get("id")):
                    self.store.forget(item["id"])
            return False
        if action not in ACTIONS:
            return False
        self.store.enqueue(payload)  # durable before the webhook is answered
        self.start()
        return True

    def start(self) -> None:
        """Run the worker (idempotent): it handles the persisted backlog, then each new event.
        At interpreter exit (SIGTERM through gunicorn) the backlog is drained for DRAIN_SECONDS."""
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._work, name="quality-webhooks", daemon=True)
                self._thread.start()
                atexit.register(self.drain)
        self._wake.set()

    def wait(self, timeout: float = 30) -> bool:
        """Until the persisted backlog is empty (tests, shutdown); False on timeout."""
        deadline = time.time() + timeout
        while self.store.backlog_size() and time.time() < deadline:
            time.sleep(0.05)
        return not self.store.backlog_size()

    def drain(self, timeout: float = DRAIN_SECONDS) -> bool:
        """Handle the backlog for up to `timeout` seconds, then stop the worker; what is left stays
        persisted for the next start. True when nothing was left."""
        if self._thread is None or not self._thread.is_alive():
            return not self.store.backlog_size()
        left = self.store.backlog_size()
        if left:
            log.info("webhooks: draining %d queued events (up to %.0f s)", left, timeout)
        done = self.wait(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        if not done:
            log.warning("webhooks: %d events left for the next start", self.store.backlog_size())
        return done

    def _work(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            if not self._pass():
                self._wake.wait(1.0)

    def _pass(self) -> bool:
        """Go once through the backlog in arrival order; False when it was empty. A project whose
        Label Studio cannot be reached keeps its events (in order) for the next pass, RETRY_SECONDS
        later, while other projects' events go on; one unreachable for KEEP_UNREACHABLE_SECONDS
        since it arrived is given up."""
        away: set[str] = set()
        after, seen = 0, False
        while events := self.store.backlog(after=after):
            seen = True
            for event_id, payload, received in events:
                after = event_id
                if self._stop.is_set():
                    return True
                key = json.dumps(project_of(payload))
                if key in away:
                    continue
                try:
                    self.process(payload, event_id,
                                 keep_if_away=time.time() - received < KEEP_UNREACHABLE_SECONDS)
                except QualityError as exc:  # Label Studio away: this project's events stay queued
                    away.add(key)
                    log.info("webhooks: %s; project %s's events kept, tried again in %.0f s", exc, key,
                             RETRY_SECONDS)
                    continue
                self.store.handled(event_id)  # events that recorded nothing (the others are gone already)
        if away:
            self._stop.wait(RETRY_SECONDS)
        return seen

    def process(self, payload: dict, event_id: int | None = None, keep_if_away: bool = False) -> dict | None:
        """Score one annotation webhook (the backlog's event `event_id`, if it is one); returns the
        stored numbers, or None (counted by kind). keep_if_away: re-raise the QualityError of a
        Label Studio that could not be reached (the caller keeps the event for a later try)."""
        try:
            out = self._process(payload, event_id)
            self._count("quality.recorded")
            return out
        except QualityError as exc:
            if keep_if_away and exc.retry:  # kept for a later try: counted once it is settled
                self._count("quality.retried")
                raise
            self._count(f"quality.{exc.kind}")
            log.info("webhook %s not scored: %s", payload.get("action"), exc)
        except Exception:  # noqa: BLE001 - a webhook must never take the backend down
            self._count("quality.internal")
            log.exception("webhook %s: internal error", payload.get("action"))
        return None

    def _process(self, payload: dict, event_id: int | None) -> dict:
        annotation = payload.get("annotation")
        if not isinstance(annotation, dict) or not sqlite_id(annotation.get("id")):
            raise QualityError("bad_payload", "the webhook carries no annotation with an id")
        if annotation.get("was_cancelled"):
            self.store.forget(annotation["id"])
            raise QualityError("skipped_annotation", f"annotation {annotation['id']} was skipped by the annotator")
        task = payload.get("task") if isinstance(payload.get("task"), dict) else {}
        task_id = task.get("id", annotation.get("task"))
        if not sqlite_id(task_id):
            raise QualityError("bad_payload", "the webhook names no task")
        project = project_of(payload)
        from .model import is_our_version, labelling_config_of

        # the annotation's parent may be an alternative (its own version); else the best mask is ours
        predictions = [p for p in self.predictions_of(task_id, project)
                       if isinstance(p, dict) and is_our_version(p.get("model_version"), self.model_version)]
        if not predictions:
            raise QualityError("no_prediction", f"task {task_id} has no prediction of {self.model_version}")
        parent = annotation.get("parent_prediction")
        ours = next((p for p in predictions if parent is not None and p.get("id") == parent), None)
        if ours is None:  # our best mask, for the latest labelling config: an edit leaves stale ones behind
            latest = labelling_config_of(max(predictions, key=lambda p: p.get("id") or 0)["model_version"],
                                         self.model_version)
            ours = max((p for p in predictions if labelling_config_of(p["model_version"], self.model_version) == latest),
                       key=lambda p: (p.get("score") or 0.0, -(p.get("id") or 0)))
        numbers = compare(annotation.get("result"), ours.get("result"), self.max_pixels)
        score = ours.get("score")
        self.store.record(annotation["id"], task_id, project if sqlite_id(project) else None,
                          self.model_version, ours.get("id"), float(score) if score is not None else None,
                          numbers, str(payload.get("action")), event_id)
        log.info("annotation %s of task %s: IoU %.3f with our prediction %s (score %s)", annotation["id"],
                 task_id, numbers["iou"], ours.get("id"), score)
        return numbers


def label_studio_lookup(backend) -> Lookup:
    """Our predictions of a task, from Label Studio, with the backend's connections (/setup, env)."""

    def predictions_of(task_id: int, project: Any) -> list:
        last: Exception | None = None
        for conn in backend.connections_for(project):
            if not conn.url:
                continue
            try:
                try:
                    headers = backend.fetcher.auth.header(conn.url, conn.token)
                except TaskError as exc:  # a personal access token's refresh failed
                    raise QualityError(exc.kind if exc.kind in ("unreachable", "forbidden") else "auth", str(exc),
                                       retry=exc.kind == "unreachable") from None
                try:
                    r = backend.fetcher.ls_session.get(f"{conn.url}/api/predictions", params={"task": task_id},
                                                       headers=headers, timeout=backend.settings.fetch_timeout)
                except ForbiddenTarget as exc:
                    raise QualityError("forbidden", str(exc)) from None
                if r.status_code in (401, 403):
                    raise QualityError("auth", f"Label Studio refused the predictions lookup (HTTP {r.status_code})")
                r.raise_for_status()
                data = r.json()
                return data if isinstance(data, list) else data.get("results", [])
            except (requests.RequestException, ValueError, QualityError) as exc:
                last = exc
        if isinstance(last, QualityError):
            raise last
        raise QualityError("unreachable", f"could not read task {task_id}'s predictions from Label Studio "
                                          f"({last.__class__.__name__ if last else 'no Label Studio connection'})",
                           retry=isinstance(last, (requests.ConnectionError, requests.Timeout)))

    return predictions_of


def concerns(payload: dict) -> bool:
    """Whether a webhook is about an annotation the tracker handles (created, updated, deleted)."""
    action = payload.get("action")
    if action in ACTIONS:
        return isinstance(payload.get("annotation"), dict)
    return action == "ANNOTATIONS_DELETED" and isinstance(payload.get("annotations"), list)


_trackers_lock = threading.Lock()


def tracker_for(backend) -> QualityTracker:
    """The backend's tracker, created on first use (its store under MODEL_DIR)."""
    with _trackers_lock:
        tracker = getattr(backend, "_quality_tracker", None)
        if tracker is None:
            store = QualityStore(Path(backend.settings.model_dir) / DB_NAME)
            tracker = QualityTracker(store, backend.model_version, label_studio_lookup(backend), backend.counters,
                                     max_pixels=backend.settings.max_image_pixels)
            backend._quality_tracker = tracker
        return tracker


def resume(backend) -> int:
    """At start-up: handle the webhook events a previous run left (kill -9, a drain cut short).
    Returns how many there were; creates nothing when there is no store yet."""
    if not (Path(backend.settings.model_dir) / DB_NAME).exists():
        return 0
    tracker = tracker_for(backend)
    left = tracker.store.backlog_size()
    if left:
        log.info("webhooks: resuming %d events queued before the last stop", left)
        tracker.start()
    return left


def metrics_for(backend) -> dict[str, Any]:
    """The "quality" part of /metrics (an "error" instead when the store cannot be opened).
    Reading creates nothing: without a store yet, the numbers are empty."""
    try:
        if getattr(backend, "_quality_tracker", None) is None and \
                not (Path(backend.settings.model_dir) / DB_NAME).exists():
            return quality_metrics([], backend.model_version)
        return tracker_for(backend).store.metrics(backend.model_version)
    except (OSError, sqlite3.Error) as exc:
        return {"error": f"quality store unavailable: {exc}"}
