"""The backend on Ray Serve: N model replicas behind the one URL Label Studio is given.

    python -m backend.serve --replicas 2 [--address auto] [--host 0.0.0.0] [--port 9090]
    serve run backend.serve:app                                  # 1 replica with 1 GPU
    serve run backend.serve:build replicas=4 gpus_per_replica=1  # or a Serve config file

    HTTP -> Serve proxy -> HybridGLIngress (no model, a small CPU share)
                             GET / and /health: answered here, with the same auth rule
                             anything else -> DeploymentHandle -> HybridGLModel replicas

Each model replica holds the gunicorn app itself, `create_app()`'s Flask app, and serves each
request through WSGI in-process: same routes, auth, answers and per-task errors. The settings are
read once (`Settings.from_env()`) where the app is built and given to every replica; the variables
that the weights loader reads in its own process (MODEL_DIR, HF_*, ...) travel in the replicas'
runtime environment. This module only carries requests: no model code.

Bounds: a replica serves HYBRIDGL_MAX_QUEUE predicts (its own `Admission` answers 503 past it),
plus a few threads for /metrics, /setup and /webhook; when every replica is full, at most
HYBRIDGL_MAX_QUEUE more requests wait at the ingress, and the next get 503 with Retry-After.
/health never waits for a model. A client that leaves (Serve cancels its call) gets the rest of
its tasks skipped, as with gunicorn. A /setup is answered by one replica; the ingress keeps the
last successful one per project and every replica replays those it missed before its next request.
Limits (per-replica image cache, /metrics): docs/ray.md.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import os
import signal
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.test import EnvironBuilder, run_wsgi_app

from hybridgl import distributed

from .admission import CLIENT_GONE
from .settings import Settings, SettingsError

APP_NAME = "hybridgl"
MODEL, INGRESS = "HybridGLModel", "HybridGLIngress"
REPLICA_HEADER = "X-HybridGL-Replica"  # which model replica answered (logs, tests)
SIDE_THREADS = 4  # per replica, beyond HYBRIDGL_MAX_QUEUE: /metrics, /setup, /webhook never wait for predicts
MAX_SETUPS = 1000  # projects whose last /setup every replica replays (the oldest are dropped past it)
MAX_SETUP_BYTES = 64 << 20  # ... and the bytes of their bodies together (each change puts the whole log)
SETUP_FIELDS = ("hostname", "access_token", "project", "schema")  # what the backend's /setup reads
INGRESS_LIMIT = 256  # requests in the ingress at once (it only awaits); past that many more, the proxy says 503
# read by the weights loader and logging in the replica's own process (not part of Settings)
FORWARDED_ENV = ("MODEL_DIR", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HYBRIDGL_OFFLINE", "HYBRIDGL_SAM_SHA256",
                 "HYBRIDGL_SAM_BASE_URL", "STANZA_RESOURCES_DIR", "LOG_LEVEL")
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass
class WsgiRequest:
    """An HTTP request as plain values, from the ingress to a model replica."""

    method: str
    path: str
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    remote_addr: str = ""

    def environ(self) -> dict:
        env = EnvironBuilder(path=self.path, method=self.method, query_string=self.query, headers=self.headers,
                             data=self.body).get_environ()
        env["REMOTE_ADDR"] = self.remote_addr
        return env


def _call_wsgi(app: Flask, environ: dict) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) of one request served by `app` in this process."""
    app_iter, status, headers = run_wsgi_app(app, environ, buffered=True)
    body = b"".join(app_iter)
    return int(status.split()[0]), [(k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP], body


def _health_request(settings: Settings) -> WsgiRequest:
    headers = []
    if settings.basic_auth_user:
        token = base64.b64encode(f"{settings.basic_auth_user}:{settings.basic_auth_pass}".encode()).decode()
        headers.append(("Authorization", f"Basic {token}"))
    return WsgiRequest("GET", "/health", headers=headers)


class ModelReplica:
    """One model replica: `create_app()`'s Flask app, called through WSGI on a pool of threads."""

    def __init__(self, settings: Settings, threads: int):
        from ray import serve

        from hybridgl.distributed import hide_unassigned_gpus

        from ._wsgi import create_app

        hide_unassigned_gpus()  # a replica given no GPU loads the model on the CPU, not on GPU 0
        # a device failure ends this replica's process (Serve then starts a new replica): the app calls
        # exit_process when _call_wsgi closes its 503, before the replica returns it, so the SIGTERM waits
        self.app = create_app(settings=settings, exit_process=_terminate_soon)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="wsgi")
        self.replica = serve.get_replica_context().replica_tag
        self.applied, self.setup_lock = 0, threading.Lock()  # the last /setup of the ingress's log replayed here

    def _serve(self, latest: int, log: list, environ: dict) -> tuple[int, list, bytes]:
        with self.setup_lock:  # the /setup calls other replicas answered, in order, before this request
            if latest > self.applied:  # the log is read from the object store only when behind
                import ray

                for seq, setup in ray.get(log[0]):
                    if seq > self.applied:
                        _call_wsgi(self.app, setup.environ())  # a refusal (409) here was answered there already
                        self.applied = seq
        return _call_wsgi(self.app, environ)

    async def call(self, request: WsgiRequest, latest: int = 0,
                   log: list = ()) -> tuple[int, list[tuple[str, str]], bytes, str]:
        """Serve `request` after replaying the /setup log up to `latest` (log: [ObjectRef of the
        ingress's log], in a list so that Ray passes the reference, not the log, with every call)."""
        gone = threading.Event()
        environ = request.environ()
        environ[CLIENT_GONE] = gone.is_set
        work = asyncio.get_running_loop().run_in_executor(self.pool, self._serve, latest, list(log), environ)
        try:
            status, headers, body = await asyncio.shield(work)
        except asyncio.CancelledError:  # the client left (Serve cancels the call): skip its remaining tasks
            gone.set()
            raise
        return status, headers, body, self.replica


def _terminate_soon(delay: float = 2.0) -> None:
    """A model replica's `exit_process`: SIGTERM to its own process after `delay` seconds (Ray ends the
    actor, Serve replaces the replica), so that the answer in hand still goes back to the ingress."""
    from ._wsgi import terminate_self

    timer = threading.Timer(delay, terminate_self)
    timer.daemon = True
    timer.start()


def _front_app(settings: Settings, health: bytes) -> Flask:
    """The ingress's own routes: / and /health (a model replica's answer), behind the same auth."""
    from ._wsgi import authorize

    app = Flask("hybridgl-ingress")
    app.before_request(functools.partial(authorize, settings))

    @app.get("/")
    @app.get("/health")
    def health_route():
        return Response(health, mimetype="application/json")

    return app


def _json(status: int, error: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": error, "status": status} if status == 413 else {"error": error}, status,
                        headers=headers)


class Ingress:
    """The one URL: answers /health itself, hands everything else to a model replica."""

    async def __init__(self, model, settings: Settings):
        self.model, self.settings = model, settings
        # /setup reaches one replica: the successful ones (the last per project) are kept in the object
        # store, every request carries a reference and the latest sequence number, and a replica that
        # is behind replays those it has not seen before serving it
        self.setups: OrderedDict[Any, tuple[int, WsgiRequest]] = OrderedDict()
        self.setup_seq = 0
        self.setup_log: list = []  # [ObjectRef of list(self.setups.values())], put once per change
        # the same /health body as the gunicorn app; asked once, so it never waits behind a predict
        status, _, body, _ = await model.call.remote(_health_request(settings))
        if status != 200:
            raise RuntimeError(f"a model replica's /health answered {status}: {body[:200]!r}")
        self.front = _front_app(settings, body)

    async def __call__(self, request):
        from starlette.responses import Response as StarletteResponse
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
                   if k.decode("latin-1").lower() not in _HOP_BY_HOP]  # the body arrives whole: no chunking
        wsgi = WsgiRequest(request.method, request.url.path, request.url.query, headers,
                           remote_addr=request.client.host if request.client else "")
        if request.method in ("GET", "HEAD") and wsgi.path in ("/", "/health"):
            status, headers, body = _call_wsgi(self.front, wsgi.environ())
            return StarletteResponse(body, status, headers=dict(headers))
        wsgi.body = await _read_body(request)
        if wsgi.body is None:
            return _json(413, RequestEntityTooLarge.description)
        retry = {"Retry-After": str(self.settings.retry_after)}
        try:
            status, headers, body, replica = await self.model.call.remote(wsgi, self.setup_seq, self.setup_log)
        except BackPressureError:
            return _json(503, "busy: every model replica is full and HYBRIDGL_MAX_QUEUE requests wait for one; "
                              "retry later", retry)
        except (RayActorError, ActorUnavailableError, DeploymentUnavailableError) as exc:
            return _json(503, f"a model replica is unavailable ({type(exc).__name__}); retry later", retry)
        if wsgi.method == "POST" and wsgi.path == "/setup" and status == 200:
            self._remember_setup(wsgi)
        return StarletteResponse(body, status, headers={**dict(headers), REPLICA_HEADER: replica})

    def _remember_setup(self, setup: WsgiRequest) -> None:
        try:
            payload = json.loads(setup.body)
        except (ValueError, RecursionError):
            payload = None
        payload = payload if isinstance(payload, dict) else {}
        project = payload.get("project")
        # only what the backend reads is replayed: any other field (padding) would be kept and copied
        # into the object store with every later /setup
        setup = replace(setup, body=json.dumps({k: payload[k] for k in SETUP_FIELDS if k in payload}).encode())
        import ray

        from .model import evict_oldest, project_key

        key = project_key(project)  # "id.timestamp" in /setup: the id names the project
        self.setup_seq += 1
        self.setups.pop(key, None)
        self.setups[key] = (self.setup_seq, setup)  # the log stays in replay order
        evict_oldest(self.setups, MAX_SETUPS, MAX_SETUP_BYTES, lambda entry: len(entry[1].body))
        self.setup_log = [ray.put(list(self.setups.values()))]


async def _read_body(request) -> bytes | None:
    """The request body, None past the gunicorn app's limit (checked while reading, not after)."""
    from ._wsgi import MAX_REQUEST_BYTES

    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class ServeOptions:
    """How many model replicas, and what each reserves.

    replicas: default one per GPU of the cluster (divided by gpus_per_replica), else 1.
    gpus_per_replica: default 1 when the cluster has GPUs (or is not known yet), else 0.
    cpus_per_replica: CPUs reserved per model replica (fractions for small machines).
    ingress_cpus: the ingress's share (it holds no model).
    """

    replicas: int | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0
    ingress_cpus: float = 0.1

    def resources(self, cluster: dict[str, float] | None) -> tuple[int, float, float]:
        """(replicas, gpus, cpus per replica); cluster None (not connected yet): 1 GPU each by default."""
        if cluster is None:
            gpus = 1.0 if self.gpus_per_replica is None else self.gpus_per_replica
            return self.replicas or 1, gpus, self.cpus_per_replica
        return distributed.RayOptions(actors=self.replicas, gpus_per_actor=self.gpus_per_replica,
                                      cpus_per_actor=self.cpus_per_replica).resources(cluster)


def for_replicas(settings: Settings, options: ServeOptions) -> tuple[Settings, ServeOptions]:
    """The settings and options the replicas run with: DEVICE as each replica sees its GPUs
    (`distributed.for_actors`: an index of this machine's dropped, no GPU reserved on "cpu")."""
    device, actor = distributed.for_actors(settings.device, distributed.RayOptions(gpus_per_actor=options.gpus_per_replica))
    return replace(settings, device=device), replace(options, gpus_per_replica=actor.gpus_per_actor)


def build_app(settings: Settings | None = None, options: ServeOptions = ServeOptions(),
              cluster: dict[str, float] | None = None):
    """The Serve application: the ingress bound to the model deployment (settings: the environment's)."""
    from ray import serve

    settings = settings or Settings.from_env()
    settings.hybridgl_config()  # a bad HYBRIDGL_CONFIG fails here, not in every replica
    settings, options = for_replicas(settings, options)
    replicas, gpus, cpus = options.resources(cluster)
    threads = settings.max_queue + SIDE_THREADS
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    model = serve.deployment(
        ModelReplica, name=MODEL, num_replicas=replicas,
        ray_actor_options={"num_gpus": gpus, "num_cpus": cpus, **({"runtime_env": {"env_vars": env}} if env else {})},
        max_ongoing_requests=threads, max_queued_requests=settings.max_queue,
        max_constructor_retry_count=3,  # missing weights: fail the deployment, not 20 loads later
    ).bind(settings, threads)
    ingress = serve.deployment(
        Ingress, name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": options.ingress_cpus},
        max_ongoing_requests=INGRESS_LIMIT, max_queued_requests=INGRESS_LIMIT,
        backpressure_config={"retry_after_s": settings.retry_after},
    )
    return ingress.bind(model, settings)


def build(args: dict[str, Any]):
    """`serve run backend.serve:build replicas=2 gpus_per_replica=0.5 cpus_per_replica=4 ingress_cpus=0.1`."""
    kinds = {"replicas": int, "gpus_per_replica": float, "cpus_per_replica": float, "ingress_cpus": float}
    unknown = set(args) - set(kinds)
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; known: {sorted(kinds)}")
    return build_app(options=ServeOptions(**{k: kinds[k](v) for k, v in args.items()}))


def __getattr__(name: str):
    if name == "app":  # `serve run backend.serve:app`: built on first access, from the environment
        global app
        app = build_app()
        return app
    raise AttributeError(name)


def _why(serve) -> str:
    """The last line of each failed deployment's error (e.g. the loader's SettingsError), if Serve has one."""
    try:
        deployments = serve.status().applications[APP_NAME].deployments
    except Exception:  # noqa: BLE001 - only an addition to the message
        return ""
    lines = [f"\n  {name}: {d.message.strip().splitlines()[-1]}" for name, d in deployments.items()
             if d.message and d.message.strip()]
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default=None,
                    help="Ray cluster to join: auto, HOST:PORT or ray://HOST:10001 (default: start a local one)")
    ap.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 9090), help="default $PORT or 9090")
    ap.add_argument("--replicas", type=int, default=None, help="model replicas (default: one per GPU, else 1)")
    ap.add_argument("--gpus-per-replica", type=float, default=None,
                    help="default 1 with GPUs, else 0; 0.5 puts two replicas on a GPU")
    ap.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs reserved per model replica (default 1)")
    ap.add_argument("--ingress-cpus", type=float, default=0.1, help="CPUs reserved for the ingress (default 0.1)")
    args = ap.parse_args(argv)
    if (args.replicas is not None and args.replicas < 1) or (args.gpus_per_replica or 0) < 0 or \
            args.cpus_per_replica < 0 or args.ingress_cpus < 0:
        ap.error("--replicas must be at least 1 and the resources not negative")
    options = ServeOptions(args.replicas, args.gpus_per_replica, args.cpus_per_replica, args.ingress_cpus)
    try:
        settings = Settings.from_env()
        settings.hybridgl_config()
        settings, options = for_replicas(settings, options)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from ray import serve
    except ImportError:
        print("error: needs Ray Serve: pip install 'hybridgl[ray]' (or -r requirements-ray.txt)", file=sys.stderr)
        return 2
    try:
        with distributed.cluster(distributed.RayOptions(address=args.address)) as resources:
            serve.start(http_options={"host": args.host, "port": args.port})
            replicas, gpus, cpus = options.resources(resources)
            try:
                serve.run(build_app(settings, options, resources), name=APP_NAME, route_prefix="/")
            except RuntimeError as exc:  # a replica could not start (weights, settings): Serve says why
                print(f"error: the deployment failed: {exc}{_why(serve)}", file=sys.stderr)
                serve.delete(APP_NAME)
                return 1
            print(f"serving http://{args.host}:{args.port} with {replicas} model replicas "
                  f"({gpus:g} GPU, {cpus:g} CPU each)", flush=True)
            stop = threading.Event()  # after ray.init, which installs its own SIGTERM handler
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            while not stop.wait(1):
                pass
            serve.delete(APP_NAME)  # a cluster that was joined keeps running, without this app
    except distributed.RayUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
