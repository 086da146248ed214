"""The backend as production starts it: configuration from the environment, the model loader,
`python -m backend` and gunicorn as real processes on 127.0.0.1 (tiny models; where their GPU must
fail, a torch hook the tiny SAM's builder registers does it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib import error, request

import pytest

from backend._wsgi import load_backend
from backend.settings import Settings, SettingsError
from tiny_models import PERMISSIVE, tiny_hybridgl

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from harness import free_port  # noqa: E402
from serve_tiny import tiny_environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    return tiny_environment(tmp_path_factory.mktemp("tiny-env"))


def settings_from(monkeypatch, env: dict[str, str]) -> Settings:
    for name in list(os.environ):
        if name.startswith(("HYBRIDGL_", "LABEL_STUDIO_", "BASIC_AUTH_")) or name in ("DEVICE", "MODEL_DIR"):
            monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings.from_env()


def test_settings_from_environment(monkeypatch, tmp_path):
    s = settings_from(monkeypatch, {})
    assert (s.clip_model, s.sam_model, s.parser, s.alternatives, s.cache_images) == \
        ("openai/clip-vit-base-patch16", "vit_h", "auto", 1, 16)
    assert s.label_studio_url is None and s.allowed_hosts == () and s.local_files_root is None
    s = settings_from(monkeypatch, {
        "HYBRIDGL_ALTERNATIVES": "3", "HYBRIDGL_CACHE_IMAGES": "0", "HYBRIDGL_ALLOWED_HOSTS": "Images.Example.com, cdn.x",
        "LABEL_STUDIO_URL": "http://ls:8080/", "LABEL_STUDIO_API_KEY": "k", "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
        "HYBRIDGL_MAX_IMAGE_MB": "2", "MODEL_DIR": str(tmp_path), "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p",
        "HYBRIDGL_CONFIG": '{"alpha": 0.5}'})
    assert (s.alternatives, s.cache_images, s.allowed_hosts) == (3, 0, ("images.example.com", "cdn.x"))
    assert (s.label_studio_url, s.label_studio_api_key, s.local_files_root) == ("http://ls:8080", "k", tmp_path)
    assert s.max_image_bytes == 2 * 2**20 and s.model_dir == tmp_path and s.hybridgl_config() == {"alpha": 0.5}
    assert s.describe()["label_studio_api_key"] == "***" and s.describe()["basic_auth_pass"] == "***"
    toml = tmp_path / "overrides.toml"
    toml.write_text("alpha = 0.5\n")
    assert settings_from(monkeypatch, {"HYBRIDGL_CONFIG": str(toml)}).hybridgl_config() == str(toml)
    for name, value, message in [("HYBRIDGL_ALTERNATIVES", "0", "at least 1"), ("HYBRIDGL_CACHE_IMAGES", "x", "integer"),
                                 ("HYBRIDGL_FETCH_TIMEOUT", "-1", "positive")]:
        with pytest.raises(SettingsError, match=message):
            settings_from(monkeypatch, {name: value})
    with pytest.raises(SettingsError, match="not valid JSON"):
        settings_from(monkeypatch, {"HYBRIDGL_CONFIG": "{alpha"}).hybridgl_config()
    with pytest.raises(SettingsError, match="no such file"):
        settings_from(monkeypatch, {"HYBRIDGL_CONFIG": str(tmp_path / "nope.json")}).hybridgl_config()


def test_settings_refuse_a_timeout_that_is_not_finite(monkeypatch):
    """nan and inf passed the `<= 0` check; every image fetch then failed (socket.settimeout)."""
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(SettingsError, match="HYBRIDGL_FETCH_TIMEOUT"):
            settings_from(monkeypatch, {"HYBRIDGL_FETCH_TIMEOUT": value})
    assert settings_from(monkeypatch, {"HYBRIDGL_FETCH_TIMEOUT": "2.5"}).fetch_timeout == 2.5


def test_settings_model_dir_is_the_weights_model_dir(monkeypatch, tmp_path):
    """MODEL_DIR=~/models (no shell expanded it): the backend's files went to a literal './~/models'
    while hybridgl.weights put the weights in $HOME/models."""
    from hybridgl import weights

    monkeypatch.setenv("HOME", str(tmp_path))
    s = settings_from(monkeypatch, {"MODEL_DIR": "~/models "})
    assert s.model_dir == weights.model_dir() == tmp_path / "models"


def test_production_loader_and_model_version(monkeypatch, tiny_env, tmp_path):
    """load_backend builds the models from the environment; the version is stable for the same
    weights and config and changes when either changes; the number of alternatives leaves the best
    mask, so its version, unchanged (the alternatives carry their own)."""
    backend = load_backend(settings_from(monkeypatch, tiny_env))
    assert backend.model.parser_name == "rules" and str(backend.model.device) == "cpu"
    assert backend.model.config.pred_iou_thresh == PERMISSIVE["pred_iou_thresh"]
    same = load_backend(settings_from(monkeypatch, tiny_env))
    assert same.model_version == backend.model_version == tiny_hybridgl(sam=True).model_version
    other_config = load_backend(settings_from(monkeypatch, {**tiny_env, "HYBRIDGL_CONFIG": json.dumps(
        {**PERMISSIVE, "alpha": 0.25})}))
    from tiny_models import save_tiny_sam

    other_sam = load_backend(settings_from(monkeypatch, {
        **tiny_env, "HYBRIDGL_SAM_CHECKPOINT": str(save_tiny_sam(tmp_path / "seed1.pt", seed=1))}))
    alternatives = load_backend(settings_from(monkeypatch, {**tiny_env, "HYBRIDGL_ALTERNATIVES": "2"}))
    versions = {backend.model_version, other_config.model_version, other_sam.model_version}
    assert len(versions) == 3 and alternatives.model_version == backend.model_version
    no_sam = load_backend(settings_from(monkeypatch, {**tiny_env, "HYBRIDGL_SAM_MODEL": "none"}))
    assert no_sam.model.sam is None
    from backend.labeling import parse_config
    from test_backend import CONFIG, IMAGE_A

    (outcome,) = no_sam.predict_tasks([{"id": 1, "data": {"image": "x.png", "text": "the cup"}}],
                                      parse_config(CONFIG), fetch=lambda url, task_id: IMAGE_A)
    assert outcome.error.kind == "no_sam" and "HYBRIDGL_SAM_MODEL=none" in str(outcome.error)


def get(url: str, timeout: float = 5.0):
    with request.urlopen(url, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def serve(args: list[str], env: dict, timeout: float = 120):
    """Start a server process, wait (bounded) for /health, return (process, url)."""
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("HYBRIDGL_")},
                                 **env, "PORT": str(port), "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"server exited {proc.returncode}: {log.read().decode()[-3000:]}")
        try:
            return proc, url, get(url + "/health")
        except (error.URLError, ConnectionError, OSError):
            time.sleep(0.3)
    stop(proc)
    raise AssertionError("server did not answer /health in time")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)


@pytest.mark.parametrize("how", ["python -m backend", "gunicorn"])
def test_server_processes_start_from_the_environment(how, tiny_env):
    if how == "gunicorn":
        args = [str(Path(sys.executable).parent / "gunicorn"), "--bind", "127.0.0.1:$PORT", "--workers", "1",
                "--threads", "4", "--timeout", "0", "backend._wsgi:app"]
        args = ["sh", "-c", " ".join(args)]
    else:
        args = [sys.executable, "-m", "backend", "--host", "127.0.0.1"]
    proc, url, (status, health) = serve(args, {**tiny_env, "BASIC_AUTH_USER": "", "LOG_LEVEL": "WARNING"})
    try:
        assert status == 200 and health["status"] == "UP" and health["parser"] == "rules"
        assert health["model_version"] == tiny_hybridgl(sam=True).model_version
        req = request.Request(url + "/setup", data=b"{}", headers={"Content-Type": "application/json"}, method="POST")
        t0 = time.time()
        with request.urlopen(req, timeout=5) as r:
            assert json.loads(r.read()) == {"model_version": health["model_version"]}
        assert time.time() - t0 < 3
    finally:
        stop(proc)


def test_a_bad_setting_stops_the_start_with_a_clear_message(tiny_env):
    out = subprocess.run([sys.executable, "-m", "backend", "--port", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, **tiny_env, "HYBRIDGL_ALTERNATIVES": "zero"})
    assert out.returncode == 2 and "HYBRIDGL_ALTERNATIVES='zero' is not an integer" in out.stderr


def post(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict, dict]:
    req = request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                          method="POST")
    try:
        with request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


@pytest.mark.parametrize("how", ["gunicorn", "python -m backend"])
def test_a_device_failure_ends_the_process_and_a_fresh_one_serves(how, tiny_env, tmp_path):
    """The process whose GPU failed (a sticky CUDA error, raised once by a hook on the tiny CLIP) answers
    that /predict 503 and ends itself: gunicorn's worker exits and gunicorn starts a fresh one, which
    serves; `python -m backend` exits with status 0, for its supervisor (Docker's restart policy) to
    start it again."""
    from test_backend import CONFIG, IMAGE_A
    from tiny_models import CUDA_ERROR, GPU_FAILS_ONCE_MARKER

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(IMAGE_A)
    env = {**tiny_env, "HYBRIDGL_SAM_MODEL": "tiny_models:tiny_sam_builder_on_a_gpu_that_fails_once",
           GPU_FAILS_ONCE_MARKER: str(tmp_path / "gpu-failed"), "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path / "images"),
           "MODEL_DIR": str(tmp_path / "model-dir"), "BASIC_AUTH_USER": "", "LOG_LEVEL": "WARNING"}
    if how == "gunicorn":
        args = ["sh", "-c", " ".join([str(Path(sys.executable).parent / "gunicorn"), "--bind", "127.0.0.1:$PORT",
                                      "--workers", "1", "--threads", "4", "--timeout", "0", "backend._wsgi:app"])]
    else:
        args = [sys.executable, "-m", "backend", "--host", "127.0.0.1"]
    body = {"tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=a.png", "text": "the cup"}}],
            "label_config": CONFIG}
    proc, url, (status, health) = serve(args, env)
    try:
        assert status == 200 and health["status"] == "UP"
        status, answer, headers = post(url + "/predict", body)
        assert status == 503 and answer["status"] == "DEVICE_FAILURE" and CUDA_ERROR in answer["error"], answer
        assert "Retry-After" in headers
        if how == "python -m backend":
            assert proc.wait(30) == 0  # ended itself (SIGTERM: the interpreter's exit path)
            return
        deadline = time.time() + 120
        while time.time() < deadline:  # the old worker's 503 DEVICE_FAILURE, then the new worker's UP
            try:
                status, health = get(url + "/health")
                if status == 200:
                    break
            except error.HTTPError as exc:
                assert exc.code == 503 and json.loads(exc.read())["status"] == "DEVICE_FAILURE"
            except (error.URLError, ConnectionError, OSError):
                pass
            assert proc.poll() is None, "gunicorn itself exited"
            time.sleep(0.3)
        assert status == 200 and health["status"] == "UP", "no fresh worker answered in time"
        status, answer, _ = post(url + "/predict", body)
        assert status == 200 and "error" not in answer["results"][0], answer
    finally:
        stop(proc)
