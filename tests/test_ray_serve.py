"""The backend on Ray Serve (backend/serve.py): a local Ray cluster on 127.0.0.1 started and stopped
here, two model replicas with half a CPU each, the tiny models, HTTP on a free port.

Through Serve, /health and /predict must answer exactly what the plain Flask app (create_app)
answers for the same requests, with the same auth; /health must answer while every replica is
held by a predict; predicts past the bound get 503 with Retry-After; bad tasks get their own
errors; requests reach both replicas. The replicas are held busy by a Label Studio whose images
("slow-*.png") are not sent until the test opens a gate; nothing of ours is mocked.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib import error, request

import pytest
import torch

from ray_local import driver_environment, ray, ray_address  # noqa: F401 (ray_address: a fixture)

from backend._wsgi import create_app
from backend.labeling import config_version, parse_config
from backend.serve import APP_NAME, INGRESS, MODEL, REPLICA_HEADER, ServeOptions, build_app, for_replicas
from backend.settings import Settings
from test_backend import CONFIG, IMAGE_A, IMAGE_B, TOKEN, FakeLabelStudio, task
from tiny_models import PERMISSIVE, TINY_CLIP_DIR, save_tiny_sam

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from harness import free_port  # noqa: E402

if os.environ.get("HYBRIDGL_REQUIRE_E2E") == "1":  # CI installs the extra: a missing Serve is a failure there
    from ray import serve
else:
    serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (bash scripts/setup.sh --ray)")

USER, PASSWORD, HOOK_SECRET = "annotator", "serve-pass-1", "hook-secret-1"
RETRY_AFTER = 7


class GatedFiles(dict):
    """Label Studio's files; any "slow-*.png" is IMAGE_A, sent only once `gate` is set."""

    def __init__(self, files: dict[str, bytes]):
        super().__init__(files)
        self.gate = threading.Event()

    def __contains__(self, name) -> bool:
        return name.startswith("slow-") or super().__contains__(name)

    def __getitem__(self, name: str) -> bytes:
        if name.startswith("slow-"):
            self.gate.wait(120)
            return IMAGE_A
        return super().__getitem__(name)


@pytest.fixture(scope="module")
def ls():
    server = FakeLabelStudio(GatedFiles({"a.png": IMAGE_A, "b.png": IMAGE_B, "broken.png": IMAGE_A[:300]}))
    yield server
    server.files.gate.set()
    server.close()


@pytest.fixture(scope="module")
def settings(ls, tmp_path_factory):
    work = tmp_path_factory.mktemp("ray-serve")
    return Settings(clip_model=str(TINY_CLIP_DIR), sam_model="tiny_models:tiny_sam_builder",
                    sam_checkpoint=str(save_tiny_sam(work / "tiny-sam.pt")), config=json.dumps(PERMISSIVE),
                    parser="rules", device="cpu", model_dir=work / "model-dir", label_studio_url=ls.url,
                    label_studio_api_key=TOKEN, basic_auth_user=USER, basic_auth_pass=PASSWORD,
                    webhook_secret=HOOK_SECRET, max_queue=1, retry_after=RETRY_AFTER)


@pytest.fixture(scope="module")
def url(ray_address, settings):  # noqa: F811
    """The Serve application (2 model replicas) on a free port; Serve is shut down at the end."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(settings, ServeOptions(replicas=2, cpus_per_replica=0.5, ingress_cpus=0.1),
                    ray.cluster_resources())
    started = threading.Thread(target=serve.run, args=(app,), kwargs={"name": APP_NAME, "route_prefix": "/"},
                               daemon=True)
    started.start()
    started.join(300)  # serve.run returns once every replica answers; bounded here
    try:
        assert not started.is_alive(), "the Serve application did not start within 300 s"
        wait_healthy(f"http://127.0.0.1:{port}", 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def flask_client(settings):
    """The plain app (create_app) with the same settings, in this process: the reference answers."""
    return create_app(settings=settings).test_client()


def auth(user: str = USER, password: str = PASSWORD) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def call(url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 120):
    """(status, headers, JSON answer) of a GET (no body) or POST."""
    data = json.dumps(body).encode() if body is not None else None
    req = request.Request(url, data=data, headers={**({"Content-Type": "application/json"} if data else {}),
                                                     **(headers or {})})
    try:
        with request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def flask_call(client, path: str, body: dict | None = None, headers: dict | None = None):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the replicas (Ray gives an actor with under 1 CPU one thread)
    try:
        r = client.post(path, json=body, headers=headers) if body is not None else client.get(path, headers=headers)
    finally:
        torch.set_num_threads(torch_threads)
    return r.status_code, r.headers, r.get_json()


def body(tasks: list[dict]) -> dict:
    return {"tasks": tasks, "label_config": CONFIG, "project": "1.1700000000"}


def without_region_ids(answer: dict) -> dict:
    answer = json.loads(json.dumps(answer))
    for prediction in answer["results"]:
        for region in prediction["result"]:
            assert len(region.pop("id")) == 10
    return answer


TASKS = [task(1, "a.png", "the cup to the left of the plate"), task(2, "b.png", "the chair in the middle"),
         task(3, "a.png", "the plate"), task(4, "missing.png"), task(5, "broken.png"),
         {"id": 6, "data": {"image": "/data/upload/1/a.png"}}]


def environment_of(settings: Settings) -> dict[str, str]:
    """The environment variables that make Settings.from_env() read `settings` (the fields used here)."""
    return {"HYBRIDGL_CLIP_MODEL": settings.clip_model, "HYBRIDGL_SAM_MODEL": settings.sam_model,
            "HYBRIDGL_SAM_CHECKPOINT": settings.sam_checkpoint, "HYBRIDGL_CONFIG": settings.config,
            "HYBRIDGL_PARSER": settings.parser, "DEVICE": settings.device, "MODEL_DIR": str(settings.model_dir),
            "LABEL_STUDIO_URL": settings.label_studio_url, "LABEL_STUDIO_API_KEY": settings.label_studio_api_key,
            "BASIC_AUTH_USER": settings.basic_auth_user, "BASIC_AUTH_PASS": settings.basic_auth_pass,
            "HYBRIDGL_WEBHOOK_SECRET": settings.webhook_secret, "HYBRIDGL_MAX_QUEUE": str(settings.max_queue),
            "HYBRIDGL_RETRY_AFTER": str(settings.retry_after), "HF_HUB_OFFLINE": "1", "LOG_LEVEL": "WARNING"}


def test_the_command_serves_the_environment_and_stops_on_sigterm(ray_address, settings, flask_client):  # noqa: F811
    """`python -m backend.serve --address ...` joins the cluster, serves the environment's settings on
    --port, and on SIGTERM removes its application and exits 0; a bad setting stops it at once (2),
    weights that cannot be loaded once the replicas fail (1), saying why."""
    env = driver_environment({**{k: v for k, v in os.environ.items()
                                 if not k.startswith(("HYBRIDGL_", "LABEL_STUDIO_", "BASIC_AUTH_"))},
                              **environment_of(settings),
                              "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})
    bad = subprocess.run([sys.executable, "-m", "backend.serve", "--address", ray_address], cwd=ROOT, env={
        **env, "HYBRIDGL_MAX_QUEUE": "0"}, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "HYBRIDGL_MAX_QUEUE=0 must be at least 1" in bad.stderr
    try:  # weights a replica cannot load: the deployment fails, and the command says why
        bad = subprocess.run([sys.executable, "-m", "backend.serve", "--address", ray_address, "--port",
                              str(free_port()), "--replicas", "1", "--cpus-per-replica", "0.5"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300,
                             env={**env, "HYBRIDGL_SAM_CHECKPOINT": str(ROOT / "no-such-checkpoint.pt")})
    finally:
        serve.shutdown()  # the Serve instance it started (its proxy on that port)
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert "the deployment failed" in bad.stderr and "SAM checkpoint not found" in bad.stderr.split("error:")[-1]
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "backend.serve", "--address", ray_address, "--port", str(port),
                             "--replicas", "1", "--cpus-per-replica", "0.5"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        health = wait_healthy(f"http://127.0.0.1:{port}", 300, lambda: f"exit {proc.poll()}: {tail(log)}")
        assert (200, health) == flask_call(flask_client, "/health", headers=auth())[::2]
        status, headers, answer = call(f"http://127.0.0.1:{port}/predict", body(TASKS[:2]), auth())
        assert status == 200 and headers[REPLICA_HEADER]
        assert without_region_ids(answer) == without_region_ids(flask_call(flask_client, "/predict", body(TASKS[:2]),
                                                                            auth())[2])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, tail(log)
        assert "serving http://127.0.0.1:%d with 1 model replicas" % port in tail(log)
        assert APP_NAME not in serve.status().applications  # removed; the cluster itself keeps running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        serve.shutdown()  # the Serve instance that command started (its proxy on --port)


def test_serve_run_builds_the_application_from_arguments(ray_address, settings, flask_client):  # noqa: F811
    """`serve run backend.serve:build replicas=1 ...` (Serve's own CLI, as a config file or KubeRay
    imports it) deploys the same application, with the environment's settings."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})  # `serve run` deploys onto this Serve
    env = driver_environment({**{k: v for k, v in os.environ.items()
                                 if not k.startswith(("HYBRIDGL_", "LABEL_STUDIO_", "BASIC_AUTH_"))},
                              **environment_of(settings),
                              "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})
    try:
        out = subprocess.run([str(Path(sys.executable).parent / "serve"), "run", "--non-blocking", "--address",
                              ray_address, "--name", APP_NAME, "backend.serve:build", "replicas=1",
                              "gpus_per_replica=0", "cpus_per_replica=0.5"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        health = wait_healthy(f"http://127.0.0.1:{port}", 120)
        assert (200, health) == flask_call(flask_client, "/health", headers=auth())[::2]
        deployments = serve.status().applications[APP_NAME].deployments
        assert set(deployments) == {MODEL, INGRESS}
        assert call(f"http://127.0.0.1:{port}/metrics")[0] == 401  # the environment's basic auth
    finally:
        serve.shutdown()


def wait_healthy(url: str, timeout: float, why=lambda: "") -> dict:
    """/health's answer once it is 200 (the proxy may answer 404 before the application's route is in place)."""
    deadline = time.time() + timeout
    while True:
        try:
            status, _, health = call(url + "/health", headers=auth(), timeout=5)
            if status == 200:
                return health
        except (OSError, ValueError):
            pass
        assert time.time() < deadline, f"no /health from {url} in {timeout} s {why()}"
        time.sleep(0.5)


def tail(log) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-3000:]


def test_health_and_predict_answer_what_the_flask_app_answers(url, flask_client):
    status, headers, health = call(url + "/health", headers=auth())
    assert status == 200 and (status, health) == flask_call(flask_client, "/health", headers=auth())[::2]
    assert health["status"] == "UP" and health["parser"] == "rules" and health["device"] == "cpu"
    assert call(url + "/", headers=auth())[2] == health

    status, headers, answer = call(url + "/predict", body(TASKS), auth())
    expected = flask_call(flask_client, "/predict", body(TASKS), auth())
    assert status == expected[0] == 200 and headers[REPLICA_HEADER]
    # masks (RLE), scores, model_version, per-task errors: all equal (region ids are random per answer)
    assert without_region_ids(answer) == without_region_ids(expected[2])
    results = answer["results"]
    assert [("error" in r) for r in results] == [False, False, False, True, True, True]
    assert [r.get("kind") for r in results[3:]] == ["missing_image", "bad_image", "no_expression"]
    assert all(r["model_version"] == config_version(health["model_version"], parse_config(CONFIG)) for r in results)
    assert results[0]["result"][0]["value"]["format"] == "rle" and results[0]["score"] > 0
    # the bad tasks hurt nothing: the next request is served
    status, _, again = call(url + "/predict", body([task(7, "b.png", "the chair")]), auth())
    assert status == 200 and "error" not in again["results"][0]
    # other routes go through the replicas' app too
    status, _, setup = call(url + "/setup", {"project": "1.1700000000"}, auth())
    assert (status, setup) == flask_call(flask_client, "/setup", {"project": "1.1700000000"}, auth())[::2]
    status, _, missing = call(url + "/nothing-here", headers=auth())
    assert (status, missing) == flask_call(flask_client, "/nothing-here", headers=auth())[::2] and status == 404


def test_auth_is_the_flask_apps(url, flask_client):
    for path in ("/health", "/", "/metrics"):
        status, headers, answer = call(url + path)
        assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="hybridgl"'
        assert (status, answer) == flask_call(flask_client, path)[::2]
        assert call(url + path, headers=auth(password="wrong"))[0] == 401
        assert call(url + path, headers=auth())[0] == 200
    assert call(url + "/predict", body(TASKS[:1]))[0] == 401
    # Label Studio's webhook: the secret instead of basic auth
    status, _, hook = call(url + "/webhook", {"action": "PROJECT_UPDATED"}, {"X-Webhook-Secret": HOOK_SECRET})
    assert status == 200 and hook == {"status": "ok", "action": "PROJECT_UPDATED"}
    assert call(url + "/webhook", {"action": "PROJECT_UPDATED"}, {"X-Webhook-Secret": "wrong"})[0] == 401


def test_requests_reach_both_replicas(url):
    replicas = {call(url + "/metrics", headers=auth())[1][REPLICA_HEADER] for _ in range(30)}
    assert len(replicas) == 2


def test_health_answers_while_every_replica_is_busy_and_past_the_bound_predict_gets_503(url, ls):
    gate = ls.files.gate
    gate.clear()
    answers: dict[int, tuple] = {}
    # every replica takes HYBRIDGL_MAX_QUEUE=1 predict; they wait for images that are not sent yet
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(
        i, call(url + "/predict", body([task(100 + i, f"slow-{i}.png", "the cup")]), auth(), timeout=200)))
        for i in range(6)]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 120
        while len(answers) < 4 and time.time() < deadline:
            time.sleep(0.05)
        refused = {i: a for i, a in answers.items()}
        assert len(refused) >= 4, f"past 2 replicas x 1 predict, the rest must be refused at once: {answers}"
        for status, headers, answer in refused.values():
            assert status == 503 and headers["Retry-After"] == str(RETRY_AFTER) and "busy" in answer["error"]
        # the replicas are held; /health is answered by the ingress meanwhile
        status, _, health = call(url + "/health", headers=auth(), timeout=30)
        assert status == 200 and health["status"] == "UP"
        assert not gate.is_set() and len(answers) == len(refused)
    finally:
        gate.set()
    for t in threads:
        t.join(200)
    admitted = [a for i, a in answers.items() if i not in refused]
    assert len(answers) == 6 and len(admitted) == 2
    assert all(status == 200 and "error" not in a["results"][0] for status, _, a in admitted)
    assert len({headers[REPLICA_HEADER] for _, headers, _ in admitted}) == 2  # one per replica
    # the slots were given back
    status, _, answer = call(url + "/predict", body([task(200, "a.png", "the cup")]), auth())
    assert status == 200 and "error" not in answer["results"][0]


def replica_counts(url: str) -> dict[str, dict]:
    """Each replica's /metrics counts (asked until both replicas answered, bounded)."""
    counts: dict[str, dict] = {}
    for _ in range(60):
        _, headers, metrics = call(url + "/metrics", headers=auth())
        counts[headers[REPLICA_HEADER]] = metrics["counts"]
        if len(counts) == 2:
            break
    assert len(counts) == 2
    return counts


def test_a_client_that_left_gets_nothing_computed(url, ls):
    """Serve cancels the call of a client that closed its connection; the replica then skips the
    request's tasks (errors.client_gone), as the gunicorn app does."""
    def total(key: str) -> int:
        return sum(c.get(key, 0) for c in replica_counts(url).values())

    gone_before, ok_before = total("errors.client_gone"), total("tasks.ok")
    gate = ls.files.gate
    gate.clear()
    try:
        payload = json.dumps(body([task(300 + i, f"slow-gone-{i}.png", "the cup") for i in range(3)])).encode()
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + b"Authorization: " + auth()["Authorization"].encode() + b"\r\n"
                     + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        deadline = time.time() + 60  # the first task's image is being fetched: the predict holds its replica
        while not any(path.startswith("/data/upload/1/slow-gone-") for path, _ in list(ls.log)):
            assert time.time() < deadline, "the predict did not reach Label Studio"
            time.sleep(0.05)
        sock.close()  # Label Studio gives up (its 100 s limit)
        time.sleep(2)  # Serve notices the closed connection and cancels the call
    finally:
        gate.set()
    deadline = time.time() + 120
    while total("errors.client_gone") - gone_before < 3:
        assert time.time() < deadline, "the tasks of the client that left were not skipped"
        time.sleep(0.5)
    assert total("tasks.ok") == ok_before  # none was computed
    status, _, answer = call(url + "/predict", body([task(310, "b.png", "the chair")]), auth())
    assert status == 200 and "error" not in answer["results"][0]


def test_a_setup_answered_by_one_replica_reaches_every_replica(url):
    """Label Studio's /setup (its host, token and labelling config for a project) reaches one
    replica; predicts for that project must work on every replica (here: the images exist only on
    the /setup's Label Studio, and the predicts carry no label_config)."""
    other = FakeLabelStudio({"only-there.png": IMAGE_B})
    project = "2.1700000000"
    try:
        status, _, answer = call(url + "/setup", {"project": project, "hostname": other.url, "access_token": TOKEN,
                                                  "schema": CONFIG}, auth())
        assert status == 200 and "model_version" in answer
        seen: set[str] = set()
        for i in range(40):
            status, headers, answer = call(url + "/predict", {"tasks": [task(400 + i, "only-there.png", "the chair")],
                                                              "project": project}, auth())
            assert status == 200 and "error" not in answer["results"][0], answer
            seen.add(headers[REPLICA_HEADER])
            if len(seen) == 2:
                break
        assert len(seen) == 2
    finally:
        other.close()


def test_the_replicas_use_the_gpu_ray_assigns_them_and_reserve_none_on_cpu():
    """DEVICE=cuda:1 (this machine's second GPU) names no GPU in a replica given one (its cuda:0);
    DEVICE=cpu reserves no GPU per replica unless asked."""
    settings, options = for_replicas(Settings(device="cuda:1"), ServeOptions())
    assert (settings.device, options) == ("cuda", ServeOptions())
    settings, options = for_replicas(Settings(device="cpu"), ServeOptions())
    assert (settings.device, options.resources({"CPU": 8.0, "GPU": 2.0})) == ("cpu", (1, 0.0, 1.0))
    assert for_replicas(Settings(device="cpu"), ServeOptions(gpus_per_replica=1.0))[1].gpus_per_replica == 1.0
