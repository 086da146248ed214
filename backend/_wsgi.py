"""The HTTP app Label Studio talks to: /health, /setup, /predict, /webhook, /metrics.

`create_app()` loads the models once (from the environment) and returns a Flask app; production
runs `gunicorn backend._wsgi:app` with one worker and threads, never --preload (CUDA does not
survive fork). `app` is created on first access, so importing this module loads nothing.
"""
from __future__ import annotations

import hmac
import logging
import os
import time
from typing import Any

from flask import Flask, jsonify, request

from .model import HybridGLBackend
from .settings import Settings

log = logging.getLogger("backend")


def load_backend(settings: Settings) -> HybridGLBackend:
    """The models, loaded once per process from the settings."""
    from hybridgl import HybridGL

    sam = None if settings.sam_model.lower() == "none" else settings.sam_model
    model = HybridGL.from_pretrained(clip=settings.clip_model, sam=sam, sam_checkpoint=settings.sam_checkpoint,
                                     parser=settings.parser, device=settings.device, config=settings.config)
    return HybridGLBackend(model, settings)


def create_app(backend: HybridGLBackend | None = None, settings: Settings | None = None) -> Flask:
    settings = settings or (backend.settings if backend else Settings.from_env())
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.time()
    backend = backend or load_backend(settings)
    log.info("backend ready in %.1f s: %s on %s, parser %s", time.time() - started, backend.model_version,
             backend.model.device, backend.model.parser_name)
    app = Flask("hybridgl-backend")
    app.config["backend"] = backend

    @app.before_request
    def basic_auth():
        user, password = settings.basic_auth_user, settings.basic_auth_pass
        if not user:
            return None
        auth = request.authorization
        if auth and hmac.compare_digest(auth.username or "", user) and hmac.compare_digest(auth.password or "", password or ""):
            return None
        return jsonify({"error": "authentication required"}), 401, {"WWW-Authenticate": 'Basic realm="hybridgl"'}

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify({"status": "UP", "model_class": type(backend).__name__, "model_version": backend.model_version,
                        "device": str(backend.model.device), "parser": backend.model.parser_name})

    @app.post("/setup")
    def setup():
        payload = request.get_json(silent=True) or {}
        return jsonify(backend.setup(hostname=payload.get("hostname"), access_token=payload.get("access_token")))

    @app.post("/predict")
    def predict():
        payload = request.get_json(silent=True)
        if not isinstance(payload, dict) or not isinstance(payload.get("tasks"), list):
            return jsonify({"error": "expected JSON {\"tasks\": [...], \"label_config\": ...}"}), 400
        params = payload.get("params") or {}
        config = payload.get("label_config") or payload.get("schema")
        results = backend.predict(payload["tasks"], context=params.get("context"), label_config=config)
        return jsonify({"results": results, "model_version": backend.model_version})

    @app.post("/webhook")
    def webhook():
        payload: dict[str, Any] = request.get_json(silent=True) or {}
        action = payload.get("action", "")
        backend.counters.add(f"webhook.{action or 'unknown'}")
        return jsonify({"status": "ok", "action": action})

    @app.get("/metrics")
    def metrics():
        return jsonify({"model_version": backend.model_version, "counts": backend.counters.snapshot()})

    return app


def __getattr__(name: str):
    if name == "app":  # `gunicorn backend._wsgi:app`: built once per worker process, on first access
        global app
        app = create_app()
        return app
    raise AttributeError(name)
