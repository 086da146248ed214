"""Deployment: the Dockerfile and compose files say what they must, and the backend starts exactly as
the image starts it (docker/start.sh -> gunicorn) and serves /health and /predict with the tiny models.

There is no Docker engine on these machines, so the files are checked as text/YAML and the start
script is run directly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib import request

import pytest
import yaml

from tiny_models import GOLDEN_DIR, PERMISSIVE, TINY_CLIP_DIR, save_tiny_sam

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from harness import free_port, wait_http  # noqa: E402


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: {"__reset__": True})


def compose(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


def env_map(service: dict) -> dict:
    return dict(item.split("=", 1) for item in service["environment"])


def test_compose_services():
    doc = compose("docker-compose.yml")
    ls, backend = doc["services"]["label-studio"], doc["services"]["backend"]
    assert ls["image"].startswith("heartexlabs/label-studio")
    assert "8080:8080" in ls["ports"] and any(v.endswith(":/label-studio/data") for v in ls["volumes"])
    assert backend["build"] == "." and "9090:9090" in backend["ports"]
    env = env_map(backend)
    assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"  # not localhost inside Docker
    assert env["LABEL_STUDIO_API_KEY"] == "${LABEL_STUDIO_API_KEY}" and env["MODEL_DIR"] == "/data/models"
    (device,) = backend["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "models:/data/models" in backend["volumes"] and {"models", "label-studio-data"} <= set(doc["volumes"])
    assert env_map(ls)["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"


def test_cpu_override_drops_the_gpu():
    cpu = compose("docker-compose.cpu.yml")["services"]["backend"]
    assert cpu["deploy"] == {"__reset__": True}
    assert env_map(cpu)["DEVICE"] == "cpu"


def test_env_example_covers_compose_variables():
    example = (ROOT / ".env.example").read_text()
    names = set(re.findall(r"\$\{(\w+)", (ROOT / "docker-compose.yml").read_text()))
    defined = set(re.findall(r"^(\w+)=", example, re.M))
    assert names <= defined, names - defined


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert "pip install -r requirements.txt" in text
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*127\.0\.0\.1:\$\{PORT\}/health", text, re.M)
    assert 'CMD ["/app/start.sh"]' in text and "COPY docker/start.sh /app/start.sh" in text
    start = (ROOT / "docker" / "start.sh").read_text()
    gunicorn = next(line for line in start.splitlines() if "gunicorn" in line and "exec" in line)
    assert "--workers 1" in gunicorn and "--threads" in gunicorn and "--timeout 0" in gunicorn
    assert "--preload" not in start.split("exec gunicorn")[1] and "backend._wsgi:app" in start


def test_backend_starts_as_the_image_starts_it(tmp_path):
    """docker/start.sh with the tiny models: gunicorn (1 worker, threads) serves /health and /predict."""
    if shutil.which("gunicorn", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("gunicorn is not installed")
    checkpoint = save_tiny_sam(tmp_path / "tiny_sam.pth")
    (tmp_path / "config.json").write_text(json.dumps(PERMISSIVE))
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "PORT": str(port), "THREADS": "4",
           "MODEL_DIR": str(tmp_path / "models"), "HYBRIDGL_SKIP_DOWNLOAD": "1", "DEVICE": "cpu",
           "HYBRIDGL_CLIP_MODEL": str(TINY_CLIP_DIR), "HYBRIDGL_SAM_MODEL": "tiny_models:build_tiny_sam",
           "HYBRIDGL_SAM_CHECKPOINT": str(checkpoint), "HYBRIDGL_CONFIG": str(tmp_path / "config.json"),
           "HYBRIDGL_PARSER": "rules", "HYBRIDGL_ALLOWED_HOSTS": "127.0.0.1"}
    log = open(tmp_path / "gunicorn.log", "wb")
    proc = subprocess.Popen(["bash", str(ROOT / "docker" / "start.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, proc)
        health = json.load(request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5))
        assert health["status"] == "UP" and health["parser"] == "rules" and health["device"] == "cpu"
        # an image served by a local file server, fetched through the allow-list
        image = GOLDEN_DIR / "p00_cup_left_of_plate" / "image.png"
        files = subprocess.Popen([sys.executable, "-m", "http.server", str(free_port_for := free_port()),
                                  "--bind", "127.0.0.1", "--directory", str(image.parent)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{free_port_for}/image.png", 30)
            body = {"tasks": [{"id": 1, "data": {"image": f"http://127.0.0.1:{free_port_for}/image.png",
                                                 "text": "the cup"}}],
                    "label_config": "<View><Image name='image' value='$image'/><Text name='t' value='$text'/>"
                                    "<BrushLabels name='m' toName='image'><Label value='A'/></BrushLabels></View>"}
            req = request.Request(f"http://127.0.0.1:{port}/predict", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"}, method="POST")
            (result,) = json.load(request.urlopen(req, timeout=120))["results"]
            assert result["model_version"] == health["model_version"]
            assert result["result"][0]["value"]["brushlabels"] == ["A"]
        finally:
            files.terminate()
            files.wait(10)
        time.sleep(0.2)
        text = (tmp_path / "gunicorn.log").read_text(errors="replace")
        assert "Using worker: gthread" in text and text.count("Booting worker") == 1
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        log.close()
