"""End to end: a real Label Studio 1.23.2 connected to the backend on Ray Serve (backend/serve.py):
two model replicas on a local Ray cluster (127.0.0.1) started here, behind one URL with basic auth.

The backend has no LABEL_STUDIO_URL: the images are read with the host and token of Label Studio's
own /setup, which one replica answers, so the predictions that the other replica makes need the
/setup replay too. Label Studio must store, for every task, the library's mask and score.
"""
from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from ray_local import ray, ray_address  # noqa: F401 (ray_address: a fixture)
from test_e2e_label_studio import CONFIG, IMAGE_A, IMAGE_B, decode, library, new_project, predictions_of, retrieve  # noqa: F401
from test_ray_serve import auth, call, wait_healthy

from backend.labeling import config_version, parse_config
from backend.serve import APP_NAME, ServeOptions, build_app
from backend.settings import Settings
from harness import LabelStudio, free_port, require_label_studio
from tiny_models import PERMISSIVE, TINY_CLIP_DIR, save_tiny_sam

pytestmark = pytest.mark.e2e

USER, PASSWORD = "annotator", "serve-pass-1"  # test_ray_serve.auth()'s


@pytest.fixture(scope="module")
def stack(ray_address, tmp_path_factory):  # noqa: F811
    from ray import serve

    require_label_studio()
    work = tmp_path_factory.mktemp("serve-e2e")
    settings = Settings(clip_model=str(TINY_CLIP_DIR), sam_model="tiny_models:tiny_sam_builder",
                        sam_checkpoint=str(save_tiny_sam(work / "tiny-sam.pt")), config=json.dumps(PERMISSIVE),
                        parser="rules", device="cpu", model_dir=work / "model-dir", basic_auth_user=USER,
                        basic_auth_pass=PASSWORD)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = threading.Thread(target=serve.run, args=(build_app(settings, ServeOptions(
        replicas=2, cpus_per_replica=0.5), ray.cluster_resources()),), kwargs={"name": APP_NAME}, daemon=True)
    started.start()  # Serve starts while Label Studio does
    ls = None
    try:
        ls = LabelStudio(work)
        started.join(300)
        assert not started.is_alive(), "the Serve application did not start within 300 s"
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 60)
        yield ls, url
    finally:
        if ls is not None:
            ls.stop()
        serve.shutdown()


def test_label_studio_gets_predictions_through_serve(stack, library):
    ls, url = stack
    project, urls = new_project(ls, CONFIG, {"scene_a.png": IMAGE_A, "scene_b.png": IMAGE_B})
    texts = ["the cup to the left of the plate", "the plate", "the chair in the middle", "the chair",
             "the object on the left", "the thing in the middle"]
    images = [IMAGE_A, IMAGE_A, IMAGE_B, IMAGE_B, IMAGE_A, IMAGE_B]
    names = ["scene_a.png", "scene_a.png", "scene_b.png", "scene_b.png", "scene_a.png", "scene_b.png"]
    task_ids = ls.api("POST", f"/api/projects/{project}/import?return_task_ids=true",
                      [{"data": {"image": urls[n], "text": t}} for n, t in zip(names, texts)])["task_ids"]

    # without the credentials Label Studio cannot connect; with them it can
    with pytest.raises(RuntimeError, match="40"):
        ls.api("POST", "/api/ml", {"url": url, "project": project, "title": "hybridgl"})
    ml = ls.api("POST", "/api/ml", {"url": url, "project": project, "title": "hybridgl", "auth_method": "BASIC_AUTH",
                                    "basic_auth_user": USER, "basic_auth_pass": PASSWORD})
    assert ml["state"] == "CO", ml
    health = call(url + "/health", headers=auth())[2]

    for t in task_ids:  # one request per task, as the editor asks: they spread over the replicas
        retrieve(ls, project, [t])
    for t, image, text in zip(task_ids, images, texts):
        (pred,) = predictions_of(ls, t)
        assert pred["model_version"] == config_version(health["model_version"], parse_config(CONFIG))
        (region,) = pred["result"]
        seg = library.segment(library.prepare(Image.open(io.BytesIO(image))), text)
        np.testing.assert_array_equal(decode(region), seg.mask)
        assert pred["score"] == pytest.approx(seg.score, abs=1e-6)
    # the replicas computed them all between them (how many each: Serve's choice, printed)
    served = {}
    for _ in range(60):
        _, headers, metrics = call(url + "/metrics", headers=auth())
        served[headers["X-HybridGL-Replica"]] = metrics["counts"].get("tasks.ok", 0)
        if len(served) == 2:
            break
    print("tasks computed per replica:", served)
    assert len(served) == 2 and sum(served.values()) == len(task_ids)
