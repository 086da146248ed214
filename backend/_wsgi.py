"""The HTTP app Label Studio talks to: /health, /setup, /predict, /webhook, /metrics.

`create_app()` loads the models once (from the environment) and returns a Flask app; production
runs `gunicorn backend._wsgi:app` with one worker and threads, never --preload (CUDA does not
survive fork). `app` is created on first access, so importing this module loads nothing.

Device failure: after a sticky CUDA error every later CUDA call of the process fails, so the
process must be replaced, not kept answering. The /predict that met it gets 503 with a JSON error
(the GPU failed, the backend restarts); from then on /health answers 503 with status
"DEVICE_FAILURE" and the reason, and /predict 503 at once. Once that first answer is sent, the app
calls its `exit_process` (default: SIGTERM to its own pid): a gunicorn worker then exits gracefully
and gunicorn starts a fresh one; `python -m backend` exits (draining the webhook backlog) and its
supervisor (Docker's `restart: unless-stopped`) starts it again.
"""
from __future__ import annotations

import functools
import hmac
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from flask import Flask, abort, jsonify, request
from werkzeug.exceptions import HTTPException

from . import logsafe, quality
from .admission import Admission, client_gone
from .model import DeviceFailure, HybridGLBackend, SetupError
from .settings import Settings, SettingsError

log = logging.getLogger("backend")

MAX_REQUEST_BYTES = 128 * 1024 * 1024
# /setup (a labelling config) and /webhook (one annotation) need far less, and they pass no admission
# bound: 8 threads each holding a 128 MB body would be ~1 GB of parsed JSON
SIDE_REQUEST_BYTES = 16 * 1024 * 1024


def load_backend(settings: Settings | None = None) -> HybridGLBackend:
    """The models, loaded once per process from the settings (weights under MODEL_DIR)."""
    from hybridgl import HybridGL
    from hybridgl.allocator import keep_freed_memory

    keep_freed_memory()  # this process runs the method: freed tensors' memory kept for the next pass
    settings = settings or Settings.from_env()
    sam: Any = None if settings.sam_model.strip().lower() in ("none", "") else settings.sam_model
    try:
        model = HybridGL.from_pretrained(clip=settings.clip_model, sam=sam, sam_checkpoint=settings.sam_checkpoint,
                                         parser=settings.parser, device=settings.device,
                                         config=settings.hybridgl_config())
    except SettingsError:
        raise
    except (OSError, ValueError, ImportError, RuntimeError) as exc:  # missing or broken weights: say which
        raise SettingsError(f"the models could not be loaded: {exc}") from exc
    return HybridGLBackend(model, settings)


def configure_logging() -> None:
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("backend").setLevel(level)
    logsafe.install()


def authorize(settings: Settings):
    """Basic auth (BASIC_AUTH_USER/PASS) for every route; /webhook also takes the webhook secret.
    None lets the request in, else the 401 answer (a Flask before_request hook)."""
    user, password = settings.basic_auth_user, settings.basic_auth_pass
    if request.path == "/webhook" and settings.webhook_secret:
        # Label Studio creates its webhook without credentials: the secret (header or query) lets it in
        given = request.headers.get("X-Webhook-Secret") or request.args.get("secret") or ""
        if hmac.compare_digest(given.encode(), settings.webhook_secret.encode()):
            return None
        if not user:
            return jsonify({"error": "webhook secret required (X-Webhook-Secret header or ?secret=)"}), 401
    if not user:
        return None
    auth = request.authorization
    if auth and hmac.compare_digest((auth.username or "").encode(), user.encode()) and \
            hmac.compare_digest((auth.password or "").encode(), (password or "").encode()):
        return None
    return jsonify({"error": "authentication required"}), 401, {"WWW-Authenticate": 'Basic realm="hybridgl"'}


def terminate_self() -> None:
    """The default `exit_process`: SIGTERM to this process, which ends it gracefully (a gunicorn worker
    finishes its requests and exits, gunicorn starts a fresh one; `python -m backend` exits through
    the interpreter's exit path, which drains the webhook backlog, and its supervisor restarts it)."""
    os.kill(os.getpid(), signal.SIGTERM)


def create_app(backend: HybridGLBackend | None = None, settings: Settings | None = None,
               exit_process: Callable[[], None] | None = None) -> Flask:
    """The Flask app around one HybridGLBackend (loaded from the environment unless given).

    exit_process(): called once, after the answer to the request that met a device failure is sent,
    to end this process so that its supervisor starts a fresh one (default `terminate_self`; kept in
    app.config["exit_process"], where tests put a recorder)."""
    configure_logging()
    settings = settings or (backend.settings if backend else Settings.from_env())
    logsafe.REDACTOR.add(settings.label_studio_api_key, settings.basic_auth_pass, settings.webhook_secret,
                         pinned=True)
    started = time.time()
    if backend is None:
        log.info("loading models: %s", settings.describe())
        backend = load_backend(settings)
    log.info("backend ready in %.1f s: %s on %s, parser %s", time.time() - started, backend.model_version,
             backend.model.device, backend.model.parser_name)
    quality.resume(backend)  # webhook events a previous run persisted but did not handle
    app = Flask("hybridgl-backend")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.config["backend"] = backend
    app.config["exit_process"] = exit_process or terminate_self
    admission = Admission(settings.max_queue)
    exit_lock, exit_called = threading.Lock(), []  # exit_process is called once
    threads = os.environ.get("THREADS", "").strip()  # docker/start.sh's gunicorn threads
    if threads.isdigit() and int(threads) <= settings.max_queue:
        log.warning("THREADS=%s does not exceed HYBRIDGL_MAX_QUEUE=%d: /health can wait behind predicts",
                    threads, settings.max_queue)

    app.before_request(functools.partial(authorize, settings))

    @app.before_request
    def side_request_limit():
        if request.path in ("/setup", "/webhook"):
            request.max_content_length = SIDE_REQUEST_BYTES

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return jsonify({"error": exc.description, "status": exc.code}), exc.code

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):  # never reached by task problems; those are per task
        log.exception("unexpected error on %s %s", request.method, request.path)
        return jsonify({"error": f"internal error: {exc.__class__.__name__}"}), 500

    def device_unavailable():
        """503: the device failed (backend.device_failure), the process is being replaced."""
        return jsonify({"error": f"the GPU failed and this backend is restarting (a fresh process takes "
                                 f"over); retry in a moment. {backend.device_failure}",
                        "status": "DEVICE_FAILURE"}), 503, {"Retry-After": str(settings.retry_after)}

    def end_process() -> None:
        with exit_lock:
            if exit_called:
                return
            exit_called.append(time.time())
        log.critical("device failure: ending this process so that a fresh one takes over (%s)",
                     backend.device_failure)
        app.config["exit_process"]()

    @app.errorhandler(DeviceFailure)
    def device_failure(exc: DeviceFailure):  # predict_task's, on a sticky CUDA error
        if backend.device_failure is None:
            backend.device_failed(exc)
        response = app.make_response(device_unavailable())
        response.call_on_close(end_process)  # once the answer is sent (WSGI servers close every response)
        return response

    @app.get("/")
    @app.get("/health")
    def health():
        info = {"status": "UP", "model_class": type(backend).__name__, "model_version": backend.model_version,
                "device": str(backend.model.device), "parser": backend.model.parser_name}
        if backend.device_failure is not None:  # the process is ending: its supervisor starts a fresh one
            return jsonify({**info, "status": "DEVICE_FAILURE", "reason": backend.device_failure}), 503
        return jsonify(info)

    @app.post("/setup")
    def setup():
        payload = _json_body()
        payload = payload if isinstance(payload, dict) else {}
        token = _str(payload.get("access_token"))
        logsafe.REDACTOR.add(token)
        try:
            return jsonify(backend.setup(hostname=_str(payload.get("hostname")), access_token=token,
                                         project=payload.get("project"), schema=payload.get("schema")))
        except SetupError as exc:
            log.warning("setup refused: %s", exc)
            return jsonify({"error": str(exc)}), exc.status

    @app.post("/predict")
    def predict():
        if backend.device_failure is not None:  # nothing can run on this process's device any more
            backend.counters.add("requests.predict_device_failure")
            return device_unavailable()
        with admission.enter() as admitted:
            if not admitted:  # refused before reading the body: the threads stay free for /health
                backend.counters.add("requests.predict_refused")
                return jsonify({"error": f"busy: {admission.limit} predict requests already wait for the model "
                                         "(HYBRIDGL_MAX_QUEUE); retry later"}), 503, \
                    {"Retry-After": str(settings.retry_after)}
            return _predict()

    def _predict():
        payload = _json_body()
        if not isinstance(payload, dict) or not isinstance(payload.get("tasks"), list):
            return jsonify({"error": 'expected JSON {"tasks": [...], "label_config": "<View>...</View>"}'}), 400
        params = payload.get("params") if isinstance(payload.get("params"), dict) else {}
        context = params.get("context") if isinstance(params.get("context"), dict) else None
        started = time.time()
        results = backend.predict(payload["tasks"], context=context,
                                  label_config=payload.get("label_config") or payload.get("schema"),
                                  project=payload.get("project"), cancelled=client_gone(request.environ))
        backend.counters.add("requests.predict")
        log.info("predict: %d tasks in %.2f s%s", len(results), time.time() - started,
                 " (interactive)" if context is not None else "")
        return jsonify({"results": results, "model_version": backend.model_version})

    @app.post("/webhook")
    def webhook():
        payload = _json_body()
        payload = payload if isinstance(payload, dict) else {}
        answer = backend.webhook(payload)
        if quality.concerns(payload):  # annotator corrections, scored on a background thread
            try:
                answer["quality"] = "queued" if quality.tracker_for(backend).submit(payload) else "ignored"
            except (OSError, quality.sqlite3.Error) as exc:
                log.warning("webhook: quality store unavailable: %s", exc)
                answer["quality"] = "unavailable"
        return jsonify(answer)

    @app.get("/metrics")
    def metrics():
        return jsonify({"model_version": backend.model_version, "uptime_s": round(time.time() - backend.started, 1),
                        "busy": backend.busy, "cached_images": backend.cache_size(),
                        "counts": backend.counters.snapshot(), "seconds": backend.counters.seconds_snapshot(),
                        "quality": quality.metrics_for(backend)})

    return app


def _json_body() -> Any:
    """The request's JSON, None when it is not JSON; 400 when nested too deeply to parse."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        abort(400, "the JSON body is nested too deeply")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def __getattr__(name: str):
    if name == "app":  # `gunicorn backend._wsgi:app`: built once per worker process, on first access
        global app
        try:
            app = create_app()
        except SettingsError as exc:  # one clear line; exit code 3 makes gunicorn stop, not respawn
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(3)
        return app
    raise AttributeError(name)
