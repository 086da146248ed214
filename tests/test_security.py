"""Attacks on the backend, each reproduced on 127.0.0.1 with real local servers and shown refused:
server-side request forgery (parser differentials, private and metadata addresses, redirects, DNS
rebinding), the Label Studio token sent elsewhere through /setup, basic auth and webhooks, secrets in
the logs, and malformed input (deep JSON, NUL bytes, interactive requests, missing weights)."""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib import error, request

import pytest

from backend import quality
from backend._wsgi import create_app
from backend.model import HybridGLBackend
from backend.outbound import AddressPolicy, ForbiddenTarget, parse_target
from backend.settings import Settings, SettingsError

from local_http import LocalServer, QuietHandler
from test_backend import CONFIG, IMAGE_A, PAT, TOKEN, FakeLabelStudio, make_client, predict, task
from test_quality import TOKEN as QUALITY_TOKEN, FakePredictions, box, region
from tiny_models import tiny_hybridgl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from harness import free_port  # noqa: E402
from serve_tiny import tiny_environment  # noqa: E402


class Recorder(LocalServer):
    """Answers every GET with an image (or a redirect to `redirect_to`), recording path and Authorization."""

    def __init__(self, redirect_to: str | None = None):
        self.hits: list[tuple[str, str | None]] = []
        self.redirect_to = redirect_to
        outer = self

        class Handler(QuietHandler):
            def do_GET(self):
                outer.hits.append((self.path, self.headers.get("Authorization")))
                if outer.redirect_to and not self.path.startswith("/final"):
                    self.send_response(302)
                    self.send_header("Location", outer.redirect_to)
                    self.end_headers()
                    return
                self.send_body(IMAGE_A)

        super().__init__(Handler)


@pytest.fixture(scope="module")
def model():
    return tiny_hybridgl(sam=True)


@pytest.fixture()
def secret():
    server = Recorder()  # what an attacker wants to reach: an internal service on loopback
    yield server
    server.close()


def image_task(i: int, url: str) -> dict:
    return {"id": i, "data": {"image": url, "text": "the cup"}}


# -- 1. server-side request forgery -------------------------------------------------------------------------
def test_parser_differential_urls_are_refused_before_any_connection(model, secret):
    """`http://A\\@B/` is host A for requests and urllib3 but B for urllib.parse: the check must see A."""
    allowed = Recorder()
    try:
        port = allowed.url.rsplit(":", 1)[1]
        hidden = secret.url.split("//")[1]  # 127.0.0.1:<port> of the internal service
        _, c = make_client(model, allowed_hosts=("localhost",), allowed_networks=("127.0.0.0/8",))
        urls = [f"http://{hidden}\\@localhost:{port}/a.png", f"http://{hidden}\\\\@localhost:{port}/a.png",
                f"http://user:pw@localhost:{port}/a.png", f"http://{hidden}@localhost:{port}/a.png",
                f"http://{hidden}\t@localhost:{port}/a.png", f"http://localhost:{port}\\@{hidden}/a.png"]
        results = predict(c, [image_task(i, u) for i, u in enumerate(urls)])
        for url, result in zip(urls, results):
            assert result.get("kind") == "forbidden", (url, result)
        assert secret.hits == [] and allowed.hits == []
        (ok,) = predict(c, [image_task(9, f"http://localhost:{port}/a.png")])  # the legitimate URL still works
        assert "error" not in ok and allowed.hits == [("/a.png", None)]
        # the same differential behind a redirect from an allowed host
        allowed.redirect_to = f"http://{hidden}\\@localhost:{port}/final.png"
        (r,) = predict(c, [image_task(10, f"http://localhost:{port}/start.png")])
        assert r["kind"] == "forbidden" and secret.hits == []
    finally:
        allowed.close()


def test_non_public_and_metadata_addresses_are_refused_even_with_a_wildcard(model, secret):
    port = secret.url.rsplit(":", 1)[1]
    _, c = make_client(model, allowed_hosts=("*",))
    urls = [f"http://127.0.0.1:{port}/a.png", f"http://localhost:{port}/a.png", f"http://0x7f.1:{port}/a.png",
            f"http://2130706433:{port}/a.png", f"http://[::ffff:127.0.0.1]:{port}/a.png",
            "http://169.254.169.254/latest/meta-data/iam/", "http://[fd00:ec2::254]/latest/meta-data/",
            f"http://0.0.0.0:{port}/a.png"]
    results = predict(c, [image_task(i, u) for i, u in enumerate(urls)])
    for url, result in zip(urls, results):
        assert result.get("kind") == "forbidden", (url, result)
    assert "metadata" in results[5]["error"] and "metadata" in results[6]["error"]
    assert secret.hits == []
    # allowing every network still never includes the metadata service
    _, c = make_client(model, allowed_hosts=("*",), allowed_networks=("0.0.0.0/0", "::/0"))
    ok, metadata = predict(c, [image_task(1, f"http://127.0.0.1:{port}/a.png"),
                               image_task(2, "http://169.254.169.254/latest/meta-data/")])
    assert "error" not in ok and metadata["kind"] == "forbidden" and len(secret.hits) == 1


def test_address_policy():
    wide = AddressPolicy.from_settings(["*"], ["0.0.0.0/0", "::/0"])
    for address in ("169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"):
        with pytest.raises(ForbiddenTarget, match="metadata"):
            wide.check_address("x", ipaddress.ip_address(address))
    AddressPolicy.from_settings([], ["169.254.169.254"]).check_address("x", ipaddress.ip_address("169.254.169.254"))
    strict = AddressPolicy.from_settings(["*"], [])
    strict.check_address("x", ipaddress.ip_address("8.8.8.8"))
    for address in ("10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "169.254.1.1", "::1", "fe80::1",
                    "fc00::1", "224.0.0.1", "0.0.0.0"):
        with pytest.raises(ForbiddenTarget, match="non-public"):
            strict.check_address("x", ipaddress.ip_address(address))
    with pytest.raises(ValueError, match="not an IP network"):
        AddressPolicy.from_settings([], ["10.0.0.0/33"])
    with pytest.raises(SettingsError, match="HYBRIDGL_ALLOWED_NETWORKS"):
        Settings(allowed_networks=("nope",))
    assert parse_target("HTTP://Ex.AMPLE.com:8080/a?b#c").origin == ("http", "ex.ample.com", 8080)
    assert parse_target("https://[::1]/x").origin == ("https", "::1", 443)
    for bad in ("ftp://x/y", "http://a\\@b/", "http://a@b/", "//x/y", "http:///x"):
        with pytest.raises(ForbiddenTarget):
            parse_target(bad)


def test_redirects_out_of_label_studio_are_checked_and_carry_no_token(model, secret):
    """A presign (or any Label Studio) redirect to an internal or metadata address is refused."""
    ls = FakeLabelStudio({"a.png": IMAGE_A})
    try:
        handler = ls.httpd.RequestHandlerClass
        original = handler.do_GET

        def do_GET(self):  # /data/upload/x/<n>.redirect -> the address in the table
            if self.path.endswith(".redirect"):
                targets = {"internal": secret.url + "/final.png", "metadata": "http://169.254.169.254/latest/"}
                self.send_response(302)
                self.send_header("Location", targets[self.path.split("/")[-1].split(".")[0]])
                self.end_headers()
                return
            original(self)

        handler.do_GET = do_GET
        _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN)
        internal, metadata, ok = predict(c, [task(1, "internal.redirect"), task(2, "metadata.redirect"), task(3)])
        assert internal["kind"] == "forbidden" and "non-public" in internal["error"]
        assert metadata["kind"] == "forbidden" and "metadata" in metadata["error"]
        assert "error" not in ok and secret.hits == []
        # allowed explicitly (e.g. MinIO on a private network), the hop is taken, without the token
        _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN,
                           allowed_networks=("127.0.0.1/32",))
        (r,) = predict(c, [task(4, "internal.redirect")])
        assert "error" not in r and secret.hits == [("/final.png", None)]
    finally:
        ls.close()


def test_dns_rebinding_cannot_switch_the_address_after_the_check(model, secret, monkeypatch):
    """A name that resolves to a public address when checked and to 127.0.0.1 afterwards: the
    connection goes only to the address that was checked, so the internal service is never reached."""
    port = int(secret.url.rsplit(":", 1)[1])
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host, *args, **kwargs):  # the attacker's DNS server, which this machine cannot run
        if host != "rebind.example":
            return real(host, *args, **kwargs)
        lookups.append(host)
        address = "8.8.8.8" if len(lookups) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, args[0] if args else port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    _, c = make_client(model, allowed_hosts=("rebind.example",), fetch_timeout=2)
    (first,) = predict(c, [image_task(1, f"http://rebind.example:{port}/a.png")])
    assert first["kind"] in ("unreachable", "fetch") and lookups == ["rebind.example"]  # one lookup, checked
    (second,) = predict(c, [image_task(2, f"http://rebind.example:{port}/a.png")])
    assert second["kind"] == "forbidden" and "127.0.0.1" in second["error"]
    assert secret.hits == []


# -- 2. the Label Studio token goes to Label Studio only ---------------------------------------------------
def test_setup_cannot_send_the_environment_token_to_another_host(model):
    ls, attacker = FakeLabelStudio({"a.png": IMAGE_A}), Recorder()
    try:
        for project in (None, "3.1700000000"):
            _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN)
            assert c.post("/setup", json={"hostname": attacker.url, "project": project}).status_code == 200
            (r,) = c.post("/predict", json={"tasks": [task(1)], "label_config": CONFIG,
                                            "project": project}).get_json()["results"]
            assert attacker.hits and all(auth is None for _, auth in attacker.hits)
        # without LABEL_STUDIO_URL the environment's token is never sent anywhere
        attacker.hits.clear()
        _, c = make_client(model, label_studio_api_key=TOKEN)
        c.post("/setup", json={"hostname": attacker.url, "project": "4.1"})
        c.post("/predict", json={"tasks": [task(1)], "label_config": CONFIG, "project": "4.1"})
        assert attacker.hits and all(auth is None for _, auth in attacker.hits)
    finally:
        ls.close()
        attacker.close()


def test_setup_cannot_take_over_another_projects_connection(model):
    ls, attacker = FakeLabelStudio({"a.png": IMAGE_A}), Recorder()
    try:
        _, c = make_client(model)
        assert c.post("/setup", json={"project": "3.1700000000", "hostname": ls.url, "access_token": TOKEN,
                                      "schema": CONFIG}).status_code == 200
        for project in ("3.1700000000", "3.1800000000", 3):
            r = c.post("/setup", json={"project": project, "hostname": attacker.url, "access_token": "mine"})
            assert r.status_code == 409 and "already connected" in r.get_json()["error"]
        r = c.post("/predict", json={"tasks": [task(1)], "project": "3.1700000000"}).get_json()["results"][0]
        assert "error" not in r and attacker.hits == []
        # the same Label Studio under another name proves itself with the token it was bound with
        alias = ls.url.replace("127.0.0.1", "localhost")
        assert c.post("/setup", json={"project": "3.1700000000", "hostname": alias,
                                      "access_token": TOKEN}).status_code == 200
        # LABEL_STUDIO_URL's origin is trusted: it takes back a project an attacker claimed first
        _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN)
        c.post("/setup", json={"project": "5.1", "hostname": attacker.url, "access_token": "mine"})
        assert c.post("/setup", json={"project": "5.1", "hostname": ls.url, "access_token": TOKEN}).status_code == 200
        attacker.hits.clear()
        r = c.post("/predict", json={"tasks": [task(1)], "label_config": CONFIG, "project": "5.1"})
        assert "error" not in r.get_json()["results"][0] and attacker.hits == []
        # a hostname with user info or a backslash is refused
        for bad in (f"http://u:p@{ls.url[7:]}", ls.url + "\\@evil"):
            assert c.post("/setup", json={"project": "6.1", "hostname": bad}).status_code == 400
    finally:
        ls.close()
        attacker.close()


# -- 3. basic auth and webhooks ----------------------------------------------------------------------------
def test_basic_auth_needs_both_settings():
    for pair in ({"basic_auth_user": "ls"}, {"basic_auth_pass": "pw"}):
        with pytest.raises(SettingsError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together"):
            Settings(**pair)


def test_webhooks_work_with_basic_auth_through_a_secret(model, tmp_path):
    import base64

    backend = HybridGLBackend(model, Settings(basic_auth_user="ls", basic_auth_pass="pw", webhook_secret="hook-s3cret",
                                              model_dir=tmp_path))
    c = create_app(backend).test_client()
    event = {"action": "PROJECT_UPDATED"}
    assert c.post("/webhook", json=event).status_code == 401
    assert c.post("/webhook", json=event, headers={"X-Webhook-Secret": "wrong"}).status_code == 401
    assert c.post("/webhook", json=event, headers={"X-Webhook-Secret": "hook-s3cret"}).status_code == 200
    assert c.post("/webhook?secret=hook-s3cret", json=event).status_code == 200
    basic = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    assert c.post("/webhook", json=event, headers=basic).status_code == 200
    # the secret opens the webhook only
    assert c.post("/predict?secret=hook-s3cret", json={"tasks": []}).status_code == 401
    assert c.get("/metrics", headers={"X-Webhook-Secret": "hook-s3cret"}).status_code == 401
    assert backend.counters.snapshot()["webhook.PROJECT_UPDATED"] == 3
    # without basic auth, a configured secret is still required on /webhook
    c = create_app(HybridGLBackend(model, Settings(webhook_secret="hook-s3cret", model_dir=tmp_path))).test_client()
    assert c.post("/webhook", json=event).status_code == 401 and c.get("/health").status_code == 200


# -- 10. malformed input ------------------------------------------------------------------------------------
def test_deeply_nested_json_is_a_400_and_the_server_keeps_serving(model):
    _, c = make_client(model)
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("/predict", "/setup", "/webhook"):
        r = c.post(path, data=deep, content_type="application/json")
        assert r.status_code == 400 and "nested too deeply" in r.get_json()["error"], path
    assert c.get("/health").status_code == 200


def test_nul_byte_in_a_local_files_path_is_a_task_error(model, tmp_path):
    (tmp_path / "a.png").write_bytes(IMAGE_A)
    _, c = make_client(model, local_files_root=tmp_path)
    bad, ok = predict(c, [image_task(1, "/data/local-files/?d=a.png%00.jpg"), image_task(2, "/data/local-files/?d=a.png")])
    assert bad["kind"] == "forbidden" and "NUL" in bad["error"] and "error" not in ok


def test_webhook_numeric_project_finds_the_setup_connection(model, tmp_path):
    backend = HybridGLBackend(model, Settings(model_dir=tmp_path))
    server = FakePredictions({5: [{"id": 9, "model_version": backend.model_version, "score": 0.7,
                                   "result": [region(box(0, 4, 0, 10))]}]})
    try:
        c = create_app(backend).test_client()
        c.post("/setup", json={"hostname": server.url, "access_token": QUALITY_TOKEN, "project": "3.1700000000"})
        c.post("/setup", json={"hostname": "http://127.0.0.1:9", "project": None})  # another, unreachable
        c.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3}, "task": {"id": 5},
                                 "annotation": {"id": 1, "task": 5, "result": [region(box(0, 4, 0, 10))]}})
        assert quality.tracker_for(backend).wait(20)
        assert c.get("/metrics").get_json()["quality"]["count"] == 1 and server.seen == ["/api/predictions?task=5"]
    finally:
        server.close()


def test_request_values_cannot_forge_log_lines(model):
    """Task ids (and project ids, image URLs, webhook fields) went into log lines as given: a task id
    with a newline wrote a line of the attacker's choosing into the log. Every record's control
    characters are escaped by the filter on the handlers, so each record stays one line."""
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    forged = "7\n2024-01-01 00:00:00,000 ERROR backend: forged\r\x1b[2K"
    try:
        _, c = make_client(model)  # create_app installs the filter on the root's handlers, this one too
        (result,) = predict(c, [{"id": forged, "data": "not an object"}])
        assert result["kind"] == "bad_task" and result["task"] == forged  # the answer keeps the id as sent
    finally:
        root.removeHandler(handler)
    lines = [ln for ln in stream.getvalue().splitlines() if "forged" in ln]
    assert len(lines) == 1 and lines[0].split(" ", 3)[2:3] == ["WARNING"], stream.getvalue()
    assert "task 7\\n2024-01-01 00:00:00,000 ERROR backend: forged\\r\\x1b[2K: bad_task" in lines[0]


def test_batch_and_ray_worker_logs_cannot_be_forged_either(tmp_path, monkeypatch):
    """The escaping filter was installed by the server only: `python -m backend.preannotate` and the
    Ray workers it starts (no log configuration: Python's last-resort handler) logged task ids raw."""
    import io
    import logging

    import label_studio_sdk

    from backend import preannotate
    from test_preannotate_run import FakeBackend, FakeLS, tasks

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    monkeypatch.setattr(label_studio_sdk, "LabelStudio", lambda base_url, api_key: FakeLS(tasks(1)))
    backend = FakeBackend()
    backend.settings = Settings(model_dir=tmp_path)
    try:
        assert preannotate.main(["--url", "http://ls.invalid", "--api-key", "k", "--project", "1", "--no-progress"],
                                backend=backend) == 0
        logging.getLogger("backend").warning("task %s: bad_task", "7\nERROR forged")
    finally:
        root.removeHandler(handler)
    assert "task 7\\nERROR forged: bad_task\n" in stream.getvalue()

    code = ("import sys; from backend.ray_preannotate import _build; from backend.settings import Settings\n"
            "from test_backend import CONFIG\n"
            "_build(Settings.from_env()).predict([{'id': sys.argv[1], 'data': 'x'}], label_config=CONFIG)")
    env = {**tiny_environment(tmp_path), "MODEL_DIR": str(tmp_path / "models"), "OMP_NUM_THREADS": "1"}
    out = _run_server([sys.executable, "-c", code, "7\nERROR forged"], env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [ln for ln in out.stderr.splitlines() if "forged" in ln] == \
        ["task 7\\nERROR forged: bad_task: a task must be an object with a 'data' object"], out.stderr[-3000:]


def test_interactive_request_with_an_empty_context_gets_one_prediction(model):
    ls = FakeLabelStudio({"a.png": IMAGE_A})
    try:
        _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN, alternatives=3)
        (batch,) = predict(c, [task(1)])  # Retrieve Predictions: no context, the alternatives
        assert isinstance(batch, list) and len(batch) == 3
        (one,) = predict(c, [task(1)], context={})  # the editor's interactive call, nothing clicked yet
        assert isinstance(one, dict) and one["score"] == max(p["score"] for p in batch)
    finally:
        ls.close()


# -- processes: start-up refusals and the logs --------------------------------------------------------------
def _run_server(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HYBRIDGL_", "BASIC_AUTH_", "LABEL_STUDIO_"))}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**base, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **env})


GUNICORN = [sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:0", "--workers", "1", "backend._wsgi:app"]


@pytest.mark.parametrize("server", ["python -m backend", "gunicorn"])
def test_start_refusals_are_one_clear_line(server, tmp_path):
    args = [sys.executable, "-m", "backend", "--port", "0"] if server == "python -m backend" else GUNICORN
    tiny = tiny_environment(tmp_path)
    half_auth = _run_server(args, {**tiny, "BASIC_AUTH_USER": "ls"})
    no_weights = _run_server(args, {"MODEL_DIR": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1",
                                    "HF_HOME": str(tmp_path / "hf"), "HYBRIDGL_PARSER": "rules"})
    for out, line in ((half_auth, "error: BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together"),
                      (no_weights, "error: the models could not be loaded: ")):
        text = out.stdout + out.stderr
        assert out.returncode != 0 and line in text and "Traceback" not in text, text[-3000:]
        assert sum(ln.startswith("error:") for ln in text.splitlines()) == 1
    assert "offline mode" in no_weights.stderr


def _post(url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 120):
    data = json.dumps(body).encode() if body is not None else None
    req = request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("server", ["docker/start.sh", "python -m backend"])
def test_no_query_string_or_token_in_any_log(server, tmp_path):
    """The production start (gunicorn with its access log) and the development server, at DEBUG:
    presigned-URL signatures, a webhook secret and tokens appear in no line of their output."""
    files = Recorder()
    ls = FakeLabelStudio({"a.png": IMAGE_A})
    port = free_port()
    secrets = {"sig": "SIGNATURE0123456789", "hook": "HOOKSECRET0123456789", "setup": "SETUPTOKEN0123456789",
               "query": "QUERYTOKEN0123456789"}
    env = {**tiny_environment(tmp_path), "PORT": str(port), "LOG_LEVEL": "DEBUG", "THREADS": "2",
           "HYBRIDGL_SKIP_DOWNLOAD": "1", "MODEL_DIR": str(tmp_path / "models"),
           "HYBRIDGL_ALLOWED_HOSTS": "127.0.0.1", "HYBRIDGL_WEBHOOK_SECRET": secrets["hook"],
           "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HYBRIDGL_", "BASIC_AUTH_", "LABEL_STUDIO_"))}
    args = ["bash", str(ROOT / "docker" / "start.sh")] if server == "docker/start.sh" else \
        [sys.executable, "-m", "backend", "--port", str(port)]
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True,
                            env={**base, **env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text(errors="replace")
            try:
                request.urlopen(url + "/health", timeout=5).close()
                break
            except (error.URLError, ConnectionError, OSError):
                assert time.time() < deadline, "the backend did not start"
                time.sleep(0.5)
        assert _post(f"{url}/health?token={secrets['query']}")[0] == 200
        assert _post(f"{url}/setup", {"hostname": ls.url, "access_token": secrets["setup"], "project": "1.1"})[0] == 200
        signed = f"{files.url}/a.png?X-Amz-Signature={secrets['sig']}&X-Amz-Credential=AKIA"
        status, body = _post(f"{url}/predict?token={secrets['query']}", {
            "tasks": [image_task(1, signed), image_task(2, f"{files.url}/missing.png?sig={secrets['sig']}"),
                      task(3)], "label_config": CONFIG, "project": "2.1"})
        assert status == 200 and len(json.loads(body)["results"]) == 3
        assert _post(f"{url}/webhook?secret={secrets['hook']}", {"action": "PROJECT_UPDATED"})[0] == 200
        assert files.hits  # the signed URL was really fetched
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)
        log.close()
        files.close()
        ls.close()
    text = (tmp_path / "server.log").read_text(errors="replace")
    assert "/predict" in text and "/webhook" in text and "DEBUG" in text  # the requests were logged
    for secret in (*secrets.values(), TOKEN):
        assert secret not in text, [line for line in text.splitlines() if secret in line]


def test_setup_state_is_bounded(model, monkeypatch):
    """/setup kept every project's labelling config (up to the 128 MB request limit each) and
    connection for ever: a stream of /setup calls for new project ids grew the process without
    bound. Configs are kept for the MAX_SCHEMAS most recent projects (a forgotten one only means
    /predict must carry its label_config, as Label Studio's does) and only up to MAX_SCHEMA_CHARS;
    connections, which bind a project to its Label Studio and so cannot be evicted (an attacker
    could flush a binding and then claim the project), are refused past MAX_PROJECTS; tokens are
    refused past MAX_TOKEN_CHARS."""
    from backend import model as model_module

    monkeypatch.setattr(model_module, "MAX_SCHEMAS", 2)
    monkeypatch.setattr(model_module, "MAX_PROJECTS", 3)
    ls = FakeLabelStudio({"a.png": IMAGE_A})
    try:
        _, c = make_client(model)
        for p in (1, 2, 3):
            assert c.post("/setup", json={"project": f"{p}.1", "hostname": ls.url, "access_token": TOKEN,
                                          "schema": CONFIG}).status_code == 200
        kinds = [c.post("/predict", json={"tasks": [task(1)], "project": f"{p}.1"}).get_json()["results"][0]
                 .get("kind") for p in (1, 2, 3)]
        assert kinds == ["config", None, None]  # project 1's config was the oldest
        r = c.post("/setup", json={"project": "4.1", "hostname": ls.url, "access_token": TOKEN})
        assert r.status_code == 503 and "3 projects" in r.get_json()["error"]
        assert c.post("/setup", json={"project": "1.2", "hostname": ls.url, "access_token": TOKEN,
                                      "schema": CONFIG}).status_code == 200  # a known project: fine
        assert c.post("/predict", json={"tasks": [task(1)], "project": "1.2"}).get_json()["results"][0] \
            .get("kind") is None
        huge = CONFIG + "<!--" + "x" * model_module.MAX_SCHEMA_CHARS + "-->"
        assert c.post("/setup", json={"project": "2.1", "schema": huge}).status_code == 200
        r = c.post("/predict", json={"tasks": [task(1)], "project": "2.1"}).get_json()["results"][0]
        assert r["kind"] == "config"  # not kept (and the previous one was replaced: it is stale)
        r = c.post("/setup", json={"project": "3.1", "hostname": ls.url,
                                   "access_token": "t" * (model_module.MAX_TOKEN_CHARS + 1)})
        assert r.status_code == 400 and "access_token" in r.get_json()["error"]
    finally:
        ls.close()


def test_kept_configs_are_bounded_in_memory_not_only_in_count(model, monkeypatch):
    """MAX_SCHEMAS configs of MAX_SCHEMA_CHARS each: 1 GB of ASCII, 4 GB where a character outside
    the BMP makes Python store 4 bytes per character. The kept configs' memory is bounded too
    (MAX_SCHEMA_BYTES, oldest dropped first); the latest is always kept."""
    import sys

    from backend import model as model_module

    monkeypatch.setattr(model_module, "MAX_SCHEMA_BYTES", 13 << 20)
    backend, c = make_client(model)
    wide = CONFIG + "<!--" + "\U0001F600" * (model_module.MAX_SCHEMA_CHARS - len(CONFIG) - 7) + "-->"
    assert len(wide) <= model_module.MAX_SCHEMA_CHARS and sys.getsizeof(wide) > 4 << 20
    for p in range(6):
        assert c.post("/setup", json={"project": f"{p}.1", "schema": wide}).status_code == 200
    kept = backend._schemas
    assert sum(sys.getsizeof(v) for v in kept.values()) <= 13 << 20
    assert list(kept) == ["3", "4", "5"]
    assert c.post("/setup", json={"project": "6.1", "schema": CONFIG}).status_code == 200  # small ones fit
    assert list(kept) == ["3", "4", "5", "6"]
    assert c.post("/setup", json={"project": "7.1", "schema": wide}).status_code == 200
    assert list(kept) == ["4", "5", "6", "7"]


def test_label_studio_on_a_link_local_address_is_refused(model, tmp_path):
    """Label Studio's origin is trusted (it often lives on a private address), so a /setup could
    name the cloud metadata or credential service (169.254.0.0/16) as a project's Label Studio and
    the backend sent it GETs (with that /setup's token) for task images and webhook lookups. Such
    an address is refused at connect time; Label Studio on loopback still works."""
    _, c = make_client(model, fetch_timeout=2.0)
    for i, (host, token) in enumerate((("http://169.254.169.254", "mine"), ("http://169.254.170.2:80", PAT),
                                       ("http://[fe80::1]:8080", "mine"))):  # PAT: its refresh is refused too
        project = f"{90 + i}.1"
        assert c.post("/setup", json={"project": project, "hostname": host, "access_token": token,
                                      "schema": CONFIG}).status_code == 200
        t0 = time.time()
        r = c.post("/predict", json={"tasks": [task(1)], "project": project}).get_json()["results"][0]
        assert r["kind"] == "forbidden" and ("169.254" in r["error"] or "fe80" in r["error"]), r
        assert time.time() - t0 < 1.5  # refused before connecting, not timed out
    backend = HybridGLBackend(model, Settings(model_dir=tmp_path, label_studio_url="http://169.254.169.254",
                                              label_studio_api_key=TOKEN))
    with pytest.raises(quality.QualityError) as e:
        quality.label_studio_lookup(backend)(1, None)
    assert e.value.kind == "forbidden"
    ls = FakeLabelStudio({"a.png": IMAGE_A})
    try:
        _, c = make_client(model)
        c.post("/setup", json={"project": "9.1", "hostname": ls.url, "access_token": TOKEN})
        r = c.post("/predict", json={"tasks": [task(1)], "label_config": CONFIG, "project": "9.1"})
        assert "error" not in r.get_json()["results"][0]
    finally:
        ls.close()


def test_an_exception_message_in_a_traceback_cannot_forge_log_lines():
    """A traceback keeps its lines, but an exception's message was written as it stood: an image URL or
    task id with a newline in the message of a logged exception (log.exception, exc_info=True) started a
    line of the attacker's choosing. Each message of the chain (cause, context, notes) is now one line."""
    import io
    import logging

    from backend.logsafe import RedactingFilter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.forged.traceback")
    logger.addHandler(handler)
    logger.propagate = False
    forged = "2024-01-01 00:00:00,000 ERROR backend: forged"
    try:
        try:
            try:
                raise OSError(f"cannot read http://h/a.png\n{forged}")
            except OSError as exc:
                err = ValueError(f"task 7\n{forged} cause")
                err.add_note(f"note\n{forged} note")
                raise err from exc
        except ValueError:
            logger.exception("task %s failed", 7)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert not [ln for ln in text.splitlines() if ln.startswith("2024-01-01")], text
    for line in ("OSError: cannot read http://h/a.png\\n" + forged, "ValueError: task 7\\n" + forged + " cause",
                 "note\\n" + forged + " note"):
        assert line in text.splitlines(), text
    assert "The above exception was the direct cause of the following exception:" in text.splitlines()
    assert text.count("Traceback (most recent call last):") == 2


def test_ray_serve_replicas_own_log_is_filtered_too(monkeypatch):
    """In a Ray Serve replica, Serve writes its own records (a replica call's exception, with the
    request's data in its message) through the "ray.serve" logger's handlers, which do not propagate
    to the root: `install` covered the root's, gunicorn's and werkzeug's handlers only."""
    import io
    import logging

    from backend import logsafe

    serve_logger = logging.getLogger("ray.serve")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    monkeypatch.setattr(serve_logger, "handlers", [handler])
    monkeypatch.setattr(serve_logger, "propagate", False)
    redactor = logsafe.RedactingFilter(["serve-secret-1"])
    logsafe.install(redactor)
    try:
        serve_logger.error("replica call failed: task 7\nERROR forged, token serve-secret-1")
    finally:
        for h in [*logging.getLogger().handlers, logging.lastResort]:
            if h is not None:
                h.removeFilter(redactor)
    assert stream.getvalue() == "replica call failed: task 7\\nERROR forged, token [redacted]\n"


def test_a_bad_hybridgl_config_is_refused_before_any_model_loads(tmp_path):
    """HYBRIDGL_CONFIG's values were checked only when the model was built, after the weights were
    found (or downloaded: gigabytes) and loaded: without them, the weights were the error reported, and
    with them a wrong value surfaced minutes later. The settings now check it first, in one line."""
    with pytest.raises(SettingsError, match=r"HYBRIDGL_CONFIG: use_relation must be true or false"):
        Settings(config='{"use_relation": "false"}')
    with pytest.raises(SettingsError, match=r"HYBRIDGL_CONFIG: score_temperature must be finite"):
        Settings(config='{"score_temperature": NaN}')
    toml = tmp_path / "bad.toml"
    toml.write_text("[hybridgl]\nk1 = 0\n")
    with pytest.raises(SettingsError, match=r"HYBRIDGL_CONFIG: k1 and k2 must be at least 1"):
        Settings(config=str(toml))
    out = _run_server([sys.executable, "-m", "backend", "--port", "0"],
                      {"MODEL_DIR": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                       "HYBRIDGL_PARSER": "rules", "HYBRIDGL_CONFIG": '{"alpha": 2}'})
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "error: HYBRIDGL_CONFIG: alpha must lie in [0, 1]" in text, text[-3000:]
    assert "loading models" not in text and "Traceback" not in text
