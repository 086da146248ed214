"""The Label Studio model: tasks in, brush-label predictions out (the label-studio-ml 2.x shape).

Thin by design: read the config and the task, fetch the image, call hybridgl, encode the mask.
`HybridGLBackend.predict_tasks` is the reusable path (batch pre-annotation, quality store): it
takes any image fetcher and returns one `TaskOutcome` per task; `predict` is Label Studio's view of it.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import sys
import threading
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from hybridgl import HybridGL
from hybridgl.distributed import DeviceFailure, is_device_failure
from hybridgl.pipeline import PreparedView, Segmentation

from .images import ImageFetcher, LabelStudioConnection, decode_image, header_safe
from .outbound import ForbiddenTarget, parse_target
from .labeling import Hints, Interface, TaskError, config_version, parse_config, read_context, task_expression
from .settings import Settings

log = logging.getLogger("backend")

# fetch(url, task_id) -> the image file's bytes; raises TaskError for that task
Fetch = Callable[[str, Any], bytes]
# cancelled() -> True when nobody waits for the answer any more (the client went away)
Cancelled = Callable[[], bool]

# Failures of the task's own data (its image or its expression): recorded in Label Studio as an
# empty prediction scored 0 (HybridGLBackend.failure_prediction). The other kinds (Label Studio
# unreachable, a refused token, a bad config, too many tasks, an internal error) are not the task's
# fault or are transient: no prediction is stored, so a later retrieval tries again. A device
# failure (a sticky CUDA error) is no task's outcome at all: predict_task raises DeviceFailure.
TASK_FAILURES = frozenset({"missing_image", "bad_image", "fetch", "forbidden", "no_expression",
                           "bad_expression", "bad_task"})


# Label Studio's webhook actions, counted by name in /metrics (any other: webhook.other)
WEBHOOK_ACTIONS = frozenset({
    "PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED", "TASKS_CREATED", "TASKS_DELETED",
    "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
    "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED", "REVIEW_CREATED", "REVIEW_UPDATED",
    "REVIEWS_DELETED", "START_TRAINING"})


def alternative_version(version: str, rank: int) -> str:
    """The model_version of the rank-th mask (rank >= 2). Label Studio's Data Manager score and its
    uncertainty sampling read only the predictions of the project's model_version: the
    alternatives stay out of them, so a task's score is its best mask's confidence, undiluted; in
    the editor the suffix (with the score Label Studio shows beside it) tells the masks apart."""
    return f"{version}-rank{rank}"


_OUR_SUFFIX = re.compile(r"(-cfg[0-9a-f]{8})?(-rank[0-9]+)?")


def labelling_config_of(version: str, model_version: str) -> str:
    """The config part ("-cfg..." or "") of one of our versions (is_our_version holds)."""
    return _OUR_SUFFIX.fullmatch(version, len(model_version)).group(1) or ""


def is_our_version(version: Any, model_version: str) -> bool:
    """The best mask's version or one of its alternatives', for any labelling config (or none: the
    versions before config_version)."""
    return isinstance(version, str) and version.startswith(model_version) and \
        _OUR_SUFFIX.fullmatch(version, len(model_version)) is not None


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """bool [H,W] -> Label Studio's brush RLE (RGBA, 0/255), row-major at the mask's size."""
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle(np.ascontiguousarray(mask, dtype=bool).astype(np.uint8) * 255)


class Counters:
    """Thread-safe counts (and summed seconds) for /metrics."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter = Counter()
        self.seconds: Counter = Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def time(self, key: str, seconds: float) -> None:
        with self._lock:
            self.seconds[key] += seconds

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def seconds_snapshot(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 3) for k, v in self.seconds.items()}


@dataclass
class TaskOutcome:
    """What happened to one task.

    predictions: Label Studio prediction dicts ({"result", "score", "model_version"}), best first;
      one with an empty result when the image has no mask proposal; when the task failed, the empty
      failure prediction (score 0) for a failure of the task's own data (TASK_FAILURES), else [].
    error: why the task failed (its kind is counted in /metrics), else None.
    segmentation: hybridgl's answer (score, ranking, parse), when the model ran.
    """

    task_id: Any
    predictions: list[dict] = field(default_factory=list)
    error: TaskError | None = None
    expression: str | None = None
    segmentation: Segmentation | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_label_studio(self) -> dict | list[dict]:
        """One /predict `results` entry: a prediction, a list of them, or an error.

        Alternatives come worst first and the best mask last: the editor lists the most recently
        created prediction first (and pre-fills it when no prediction has the project's version).
        A failed task's entry is its failure prediction with the error beside it, which Label
        Studio stores (so the task is not asked again on every opening); without one, an error
        without `result`, for which Label Studio stores nothing (a later retrieval retries).
        """
        if self.error is not None:
            error = {"error": str(self.error), "kind": self.error.kind, "task": self.task_id}
            return {**self.predictions[0], **error} if self.predictions else error
        return self.predictions[0] if len(self.predictions) == 1 else self.predictions[::-1]


class HybridGLBackend:
    """One per process: holds the loaded model, the prepared-image LRU and the GPU lock.

    device_failure: None while the device works; once a task met a device failure (a sticky CUDA
    error: every later CUDA call of this process fails too), why, and every later model pass raises
    DeviceFailure at once. The process must then be replaced (the HTTP app ends it, see _wsgi)."""

    def __init__(self, model: HybridGL, settings: Settings | None = None):
        self.model = model
        self.settings = settings or Settings.from_env()
        self.fetcher = ImageFetcher(self.settings)
        self.counters = Counters()
        self.started = time.time()
        self.gpu_lock = threading.Lock()  # one forward pass at a time, whatever the server's threads
        self._views: OrderedDict[str, PreparedView] = OrderedDict()
        self._views_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._connections: dict[str, LabelStudioConnection] = {}  # per Label Studio project, from /setup
        self._last_connection: LabelStudioConnection | None = None
        self._schemas: OrderedDict[str, str] = OrderedDict()  # labelling configs /setup sent, per project
        self.busy = 0
        self.device_failure: str | None = None
        # the model's version (/health), the same whatever HYBRIDGL_ALTERNATIVES (the best mask does
        # not change with it); a config's best masks carry config_version(...) of it, the alternatives
        # alternative_version(...) of that
        self.model_version = model.model_version

    # -- label-studio-ml 2.x surface ----------------------------------------------------------------
    def setup(self, hostname: str | None = None, access_token: str | None = None, project: Any = None,
              schema: str | None = None, **_: Any) -> dict:
        """Remember where Label Studio is (per project); never loads anything. Returns the version.

        The environment's token only ever goes to LABEL_STUDIO_URL's origin. A project is bound to the
        origin of its first /setup; another origin may take it over only with the token it was bound
        with, or by being LABEL_STUDIO_URL's origin (SetupError otherwise)."""
        key = project_key(project)
        if isinstance(access_token, str) and len(access_token) > MAX_TOKEN_CHARS:
            raise SetupError(400, f"access_token longer than {MAX_TOKEN_CHARS} characters")
        if isinstance(access_token, str) and access_token and not header_safe(access_token):
            raise SetupError(400, "access_token holds whitespace, control or non-ASCII characters that no HTTP "
                                  "header can carry")
        with self._state_lock:
            if hostname or access_token:
                conn = self._setup_connection(hostname, access_token)
                if key is not None:
                    bound = self._connections.get(key)
                    if bound is not None and bound.origin != conn.origin and bound.token != conn.token and \
                            conn.origin != self.fetcher.default.origin:
                        raise SetupError(409, f"project {key} is already connected to Label Studio at {bound.url}; "
                                              "a /setup from another host needs the same token")
                    # a binding is never evicted (a flushed one could be claimed by another host): new
                    # projects are refused past the bound instead
                    if bound is None and len(self._connections) >= MAX_PROJECTS:
                        raise SetupError(503, f"this backend already holds the connections of {MAX_PROJECTS} "
                                              "projects; restart it to forget them")
                    self._connections[key] = conn
                self._last_connection = conn
            if key is not None and isinstance(schema, str) and schema.strip():
                self._schemas.pop(key, None)  # a newer config replaces it, even one too long to keep
                if len(schema) <= MAX_SCHEMA_CHARS:
                    self._schemas[key] = schema
                    # in bytes too: a character outside the BMP makes Python keep 4 bytes per character
                    evict_oldest(self._schemas, MAX_SCHEMAS, MAX_SCHEMA_BYTES, sys.getsizeof)
                else:
                    log.warning("setup: project %s's labelling config (%d characters) is longer than %d: not kept, "
                                "/predict must carry it", key, len(schema), MAX_SCHEMA_CHARS)
            if not (isinstance(schema, str) and schema.strip()):
                schema = self._schemas.get(key) if key is not None else None
        # the version /predict gives this config's predictions: Label Studio asks only for tasks without one
        try:
            return {"model_version": config_version(self.model_version, parse_config(schema))}
        except TaskError:  # no config, or one we cannot predict for (/predict says so per task)
            return {"model_version": self.model_version}

    def _setup_connection(self, hostname: str | None, access_token: str | None) -> LabelStudioConnection:
        env = self.fetcher.default
        url = (hostname or env.url or "").rstrip("/") or None
        if url is not None:
            try:
                parse_target(url)
            except ForbiddenTarget as exc:
                raise SetupError(400, f"hostname: {exc}") from None
        conn = LabelStudioConnection(url, access_token)
        if not access_token and env.origin is not None and conn.origin == env.origin:
            conn = LabelStudioConnection(url, env.token)  # the environment's token, for its own origin only
        return conn

    def predict(self, tasks: list[dict], context: dict | None = None, label_config: str | None = None,
                project: Any = None, cancelled: Cancelled | None = None, **_: Any) -> list[dict | list[dict]]:
        """Label Studio's /predict: one entry per task, in order (see TaskOutcome.to_label_studio).
        cancelled(): checked before each model pass; once True the remaining tasks are skipped."""
        if not (isinstance(label_config, str) and label_config.strip()) and project_key(project) is not None:
            with self._state_lock:
                label_config = self._schemas.get(project_key(project))
        try:
            if label_config is not None and not isinstance(label_config, str):
                raise TaskError("config", "label_config must be a string of XML")
            interface = parse_config(label_config)
        except TaskError as exc:
            self.counters.add(f"errors.{exc.kind}", len(tasks))
            log.warning("predict: %s (%d tasks: %s)", exc, len(tasks), _ids(tasks))
            return [{"error": str(exc), "kind": exc.kind, "task": _task_id(t)} for t in tasks]
        connections = self.connections_for(project)
        return [o.to_label_studio() for o in self.predict_tasks(
            tasks, interface, context=context, fetch=lambda url, task_id: self.fetch(url, task_id, connections),
            cancelled=cancelled)]

    def webhook(self, payload: dict) -> dict:
        """Label Studio sends every project event here; counted, otherwise ignored (zero-shot model)."""
        action = payload.get("action") if isinstance(payload.get("action"), str) else None
        # the sender chooses the action: only Label Studio's own get a count each (bounded /metrics)
        self.counters.add(f"webhook.{action if action in WEBHOOK_ACTIONS else 'other' if action else 'unknown'}")
        return {"status": "ok", "action": action}

    # -- image access -----------------------------------------------------------------------------
    def connections_for(self, project: Any = None) -> list[LabelStudioConnection]:
        """Label Studio connections to try, in order: the project's /setup (a webhook's numeric project id
        finds the `id.timestamp` one), then the environment. A request without a project, or for a
        project no /setup named while LABEL_STUDIO_URL is unset, tries the last /setup first.
        (A /setup hostname can be unreachable from here, e.g. `localhost` seen from a container.)"""
        env = self.fetcher.default
        key = project_key(project)
        with self._state_lock:
            first = self._connections.get(key) if key is not None else None
            if first is None and (key is None or env.origin is None):
                first = self._last_connection
        out = [c for c in (first, env) if c is not None and c.url]
        if first is not None and env.url and first.origin != env.origin and not env.token:
            out[out.index(env)] = LabelStudioConnection(env.url, first.token)  # same Label Studio, its token
        unique = list(dict.fromkeys(out))
        return unique or [env]

    def fetch(self, url: str, task_id: Any, connections: Sequence[LabelStudioConnection] | None = None) -> bytes:
        return fetch_image(self.fetcher, url, task_id, list(connections or self.connections_for()))

    # -- the reusable path --------------------------------------------------------------------------
    def predict_tasks(self, tasks: Sequence[dict], interface: Interface, context: dict | None = None,
                      fetch: Fetch | None = None, alternatives: int | None = None,
                      cancelled: Cancelled | None = None) -> list[TaskOutcome]:
        """Predict every task (in order); one bad task never fails the others.

        fetch(url, task_id) -> bytes: where images come from (default: Label Studio, as configured);
        alternatives: predictions per task (default HYBRIDGL_ALTERNATIVES; an interactive context gets 1).
        """
        fetch = fetch or (lambda url, task_id: self.fetch(url, task_id))
        if len(tasks) > self.settings.max_tasks:
            err = TaskError("too_many_tasks", f"{len(tasks)} tasks in one request exceed HYBRIDGL_MAX_TASKS="
                                              f"{self.settings.max_tasks}: select fewer tasks")
            self.counters.add(f"errors.{err.kind}", len(tasks))
            log.warning("predict: %s", err)
            return [TaskOutcome(_task_id(t), error=err) for t in tasks]
        return [self.predict_task(task, interface, context, fetch, alternatives, cancelled) for task in tasks]

    def predict_task(self, task: dict, interface: Interface, context: dict | None = None,
                     fetch: Fetch | None = None, alternatives: int | None = None,
                     cancelled: Cancelled | None = None) -> TaskOutcome:
        """The task's outcome: its predictions, or its error (TaskError, or "internal" for a bug).

        Raises DeviceFailure instead when the device failed (hybridgl.distributed.is_device_failure:
        a sticky CUDA error), or had failed before (`device_failure`): not the task's failure, and
        every later task of this process would fail too. The callers stop (a single-process run),
        exit so that a fresh process takes over (a Ray model actor; the HTTP backend), never go on."""
        task_id = _task_id(task)
        started = time.time()
        outcome = TaskOutcome(task_id)
        try:
            if cancelled is not None and cancelled():
                raise TaskError("client_gone", "the client closed the connection: task not computed")
            self._predict_task(task, interface, context, fetch or (lambda url, tid: self.fetch(url, tid)),
                               alternatives, outcome, cancelled)
            self.counters.add("tasks.ok")
        except TaskError as exc:
            outcome.error = exc
            outcome.predictions = [self.failure_prediction(exc, interface)] \
                if exc.kind in TASK_FAILURES and context is None else []
            self.counters.add(f"errors.{exc.kind}")
            log.warning("task %s: %s: %s", task_id, exc.kind, exc)
        except Exception as exc:  # a bug or an unexpected input must not fail the batch
            if is_device_failure(exc):  # ... but a broken GPU must stop it
                failure = self.device_failed(exc, task_id)
                if failure is exc:  # the model refused to run: the device had failed before
                    raise
                raise failure from exc
            outcome.error, outcome.predictions = TaskError("internal", f"internal error: {exc.__class__.__name__}"), []
            self.counters.add("errors.internal")
            log.exception("task %s: internal error", task_id)
        outcome.seconds = time.time() - started
        return outcome

    def device_failed(self, exc: BaseException, task_id: Any = None) -> DeviceFailure:
        """Records a device failure (`device_failure`: the first one's) and returns the DeviceFailure to
        raise: `exc` itself when it is one, else a new one saying where the device failed."""
        with self._state_lock:
            first = self.device_failure is None
            if first:
                where = f" (task {task_id})" if task_id is not None else ""
                self.device_failure = f"device failure on {self.model.device}{where}: {type(exc).__name__}: {exc}"
        self.counters.add("errors.device")
        if first:
            log.critical("%s: this process can no longer run the model", self.device_failure)
        if isinstance(exc, DeviceFailure):
            return exc
        return DeviceFailure(f"{self.device_failure}: this process can no longer run the model")

    def _predict_task(self, task: dict, interface: Interface, context: dict | None, fetch: Fetch,
                      alternatives: int | None, outcome: TaskOutcome, cancelled: Cancelled | None = None) -> None:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise TaskError("bad_task", "a task must be an object with a 'data' object")
        url = task["data"].get(interface.image_field)
        if url is None:
            raise TaskError("missing_image", f"task data has no '{interface.image_field}' field")
        outcome.expression = expression = task_expression(task, interface, context, self.settings.max_text_chars)
        t0 = time.time()
        raw = fetch(url, outcome.task_id)
        image = decode_image(raw, self.settings.max_image_pixels)
        self.counters.time("fetch", time.time() - t0)
        hints = read_context(context, interface, image.shape[:2])
        view = self.prepared(raw, image, cancelled)
        indices = candidate_indices(view, hints)
        t0 = time.time()
        with self._model(cancelled):
            seg = self.model.segment(view.subset(indices) if indices is not None else view, expression)
        self.counters.time("segment", time.time() - t0)
        outcome.segmentation = seg
        h, w = view.output_size
        if seg.mask is None:  # no proposal at all: an empty prediction, scored 0 (sorts first for review)
            self.counters.add("predictions.empty")
            version = config_version(self.model_version, interface)
            outcome.predictions = [{"result": [], "score": 0.0, "model_version": version}]
            return
        # the editor shows one suggestion for an interactive request (Label Studio sends a context
        # object there, possibly empty; batch retrieval sends none); batch retrieval gets alternatives
        k = 1 if context is not None else (alternatives or self.settings.alternatives)
        to_view = (lambda i: int(indices[i])) if indices is not None else int
        outcome.predictions = [self.prediction(view.full_size(view.masks[to_view(r["index"])]), r["score"],
                                               interface, h, w, rank)
                               for rank, r in enumerate(seg.ranking[:k], start=1)]
        self.counters.add("predictions", len(outcome.predictions))

    def prediction(self, mask: np.ndarray, score: float, interface: Interface, h: int, w: int,
                   rank: int = 1) -> dict:
        """One Label Studio prediction holding one brush region at the image's original size;
        the rank-th mask of the ranking (rank > 1: an alternative, with its own model_version)."""
        region = {
            "id": uuid.uuid4().hex[:10], "from_name": interface.brush_name, "to_name": interface.image_name,
            "type": "brushlabels", "original_width": int(w), "original_height": int(h), "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [interface.label]},
            "score": float(score), "readonly": False,
        }
        version = config_version(self.model_version, interface)
        version = version if rank == 1 else alternative_version(version, rank)
        return {"result": [region], "score": float(score), "model_version": version}

    def failure_prediction(self, error: TaskError, interface: Interface) -> dict:
        """The empty prediction, scored 0, that records a task HybridGL cannot predict in Label Studio:
        the task sorts first in the Data Manager's score column, the review queue serves it first,
        and Label Studio does not ask again on every opening. `reason` says why (Label Studio keeps
        only result, score and model_version; the reason is logged, counted and reported)."""
        return {"result": [], "score": 0.0, "model_version": config_version(self.model_version, interface),
                "reason": f"{error.kind}: {error}"}

    # -- the prepared-image cache ---------------------------------------------------------------------
    def prepared(self, raw: bytes, image: np.ndarray, cancelled: Cancelled | None = None) -> PreparedView:
        """The image-only work, once per distinct image content (LRU of HYBRIDGL_CACHE_IMAGES entries)."""
        key = hashlib.sha256(raw).hexdigest()
        view = self._cached(key)
        if view is not None:
            self.counters.add("cache.hits")
            return view
        with self._model(cancelled):
            view = self._cached(key)  # another thread may have prepared it while this one waited
            if view is not None:
                self.counters.add("cache.hits")
                return view
            if getattr(self.model, "sam", None) is None:
                raise TaskError("no_sam", "this backend runs without SAM (HYBRIDGL_SAM_MODEL=none): "
                                          "it has no mask proposals for images")
            t0 = time.time()
            view = self.model.prepare(image)
            self.counters.time("prepare", time.time() - t0)
            # cached before the model is released: a request waiting for it for the same image finds it
            if self.settings.cache_images and view_bytes(view) <= self.settings.cache_mb * 2**20:
                with self._views_lock:
                    self._views[key] = view
                    evict_oldest(self._views, self.settings.cache_images, self.settings.cache_mb * 2**20, view_bytes)
        self.counters.add("cache.misses")
        return view

    def _cached(self, key: str) -> PreparedView | None:
        with self._views_lock:
            view = self._views.get(key)
            if view is not None:
                self._views.move_to_end(key)
            return view

    def cache_size(self) -> int:
        with self._views_lock:
            return len(self._views)

    @contextlib.contextmanager
    def _model(self, cancelled: Cancelled | None = None):
        """Hold the model (one pass at a time); a client that left while this waited gets nothing computed,
        and nothing runs on a device that failed (DeviceFailure)."""
        with self._busy(), self.gpu_lock:
            if self.device_failure is not None:
                raise DeviceFailure(f"{self.device_failure}: this process can no longer run the model")
            if cancelled is not None and cancelled():
                raise TaskError("client_gone", "the client closed the connection while the task waited for the model")
            yield

    @contextlib.contextmanager
    def _busy(self):
        """Counts the requests waiting for or holding the model (shown by /metrics)."""
        with self._state_lock:
            self.busy += 1
        try:
            yield
        finally:
            with self._state_lock:
                self.busy -= 1

def fetch_image(fetcher: ImageFetcher, url: str, task_id: Any, connections: Sequence[LabelStudioConnection]) -> bytes:
    """The image bytes, trying each Label Studio connection while the failure is about reaching it."""
    for i, conn in enumerate(connections):
        try:
            return fetcher.fetch(url, task_id, conn)
        except TaskError as exc:
            if exc.kind not in ("unreachable", "auth", "no_label_studio") or i == len(connections) - 1:
                raise
            log.info("task %s: %s; trying %s", task_id, exc, connections[i + 1].url)
    raise TaskError("no_label_studio", "no Label Studio connection")


def view_bytes(view: PreparedView) -> int:
    """Memory a prepared view holds (image, masks on the host and, once used, on the device, features)."""
    masks = view.masks.nbytes
    return int(view.image.nbytes + 2 * masks + view.features.numel() * view.features.element_size()
               + (view.tokens.numel() * view.tokens.element_size() if view.tokens is not None else 0))


# What /setup may make the backend hold (anyone who reaches /setup can call it; BASIC_AUTH_* guards it).
MAX_PROJECTS = 10_000  # projects' Label Studio connections
MAX_SCHEMAS = 1_000  # labelling configs, the most recently set up projects'
MAX_SCHEMA_CHARS = 1 << 20  # a longer config is not kept (Label Studio sends it with /predict too)
MAX_SCHEMA_BYTES = 256 << 20  # ... and the kept configs' memory together (the oldest are dropped past it)
MAX_TOKEN_CHARS = 16_384


class SetupError(ValueError):
    """A /setup the backend refuses (HTTP status, message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def evict_oldest(entries: OrderedDict, max_entries: int, max_bytes: int, size: Callable[[Any], int]) -> None:
    """Drop the oldest entries while there are more than `max_entries` or their sizes add up to more
    than `max_bytes`; the newest stays whatever its size."""
    total = sum(map(size, entries.values()))
    while len(entries) > max_entries or (len(entries) > 1 and total > max_bytes):
        total -= size(entries.popitem(last=False)[1])


def project_key(project: Any) -> str | None:
    """Label Studio names a project `id.timestamp` in /setup and /predict, and `id` in webhooks."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or isinstance(project, bool) or str(project).strip() == "":
        return None
    return str(project).strip().split(".")[0]


def _task_id(task: Any) -> Any:
    return task.get("id") if isinstance(task, dict) else None


def _ids(tasks: Sequence[Any]) -> str:
    ids = [str(_task_id(t)) for t in tasks[:20]]
    return ", ".join(ids) + (", ..." if len(tasks) > 20 else "")


def candidate_indices(view: PreparedView, hints: Hints) -> np.ndarray | None:
    """The proposals the annotator's clicks allow: those containing every positive point and no
    negative one, then, with a drawn box, those whose boxes overlap it best (IoU >= 0.5, else the
    single best). None when nothing restricts the choice."""
    if not hints.restricts:
        return None
    keep = np.arange(len(view))
    h, w = view.size
    sy, sx = h / view.output_size[0], w / view.output_size[1]  # hints are in the original image's pixels

    def pixel(point: tuple[float, float]) -> tuple[int, int]:
        return min(max(int(point[1] * sy), 0), h - 1), min(max(int(point[0] * sx), 0), w - 1)

    for point in hints.points:
        y, x = pixel(point)
        keep = keep[view.masks[keep, y, x]]
    if hints.points and len(keep) == 0:
        raise TaskError("no_candidate", "no mask proposal contains the clicked point(s)")
    for point in hints.negative_points:
        y, x = pixel(point)
        keep = keep[~view.masks[keep, y, x]]
    if len(keep) == 0:
        raise TaskError("no_candidate", "no mask proposal is left after the negative point(s)")
    if hints.box is not None:
        boxes = view.boxes_xywh[keep].astype(np.float64)
        bx, by, bw, bh = hints.box[0] * sx, hints.box[1] * sy, hints.box[2] * sx, hints.box[3] * sy
        ix = np.clip(np.minimum(boxes[:, 0] + boxes[:, 2], bx + bw) - np.maximum(boxes[:, 0], bx), 0, None)
        iy = np.clip(np.minimum(boxes[:, 1] + boxes[:, 3], by + bh) - np.maximum(boxes[:, 1], by), 0, None)
        inter = ix * iy
        iou = inter / np.maximum(boxes[:, 2] * boxes[:, 3] + bw * bh - inter, 1e-9)
        if iou.max() <= 0:
            raise TaskError("no_candidate", "no mask proposal overlaps the drawn rectangle")
        keep = keep[iou >= 0.5] if (iou >= 0.5).any() else keep[[int(iou.argmax())]]
    return keep
