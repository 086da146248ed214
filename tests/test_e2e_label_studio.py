"""End to end: a real Label Studio 1.23.2 asks our backend (a separate process) for predictions.

Needs .venv-ls (tests/e2e/setup_ls.sh). Skipped without it, except when HYBRIDGL_REQUIRE_E2E=1
(as in CI), where a missing Label Studio is a failure.
"""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from tiny_models import GOLDEN_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from harness import LS_VENV, Backend, LabelStudio  # noqa: E402

pytestmark = pytest.mark.e2e

CONFIG_IMAGE_ONLY = '<View><Image name="image" value="$image"/></View>'
CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <Header value="Referring expression:"/>
  <Text name="expr" value="$text"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Target" background="#00c000"/>
  </BrushLabels>
</View>"""
IMAGE_A = (GOLDEN_DIR / "p00_cup_left_of_plate" / "image.png").read_bytes()
IMAGE_B = (GOLDEN_DIR / "p07_chair_in_middle" / "image.png").read_bytes()


def require_label_studio() -> None:
    if (LS_VENV / "bin" / "label-studio").exists():
        return
    message = "Label Studio is not installed in .venv-ls (run tests/e2e/setup_ls.sh)"
    if os.environ.get("HYBRIDGL_REQUIRE_E2E") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_label_studio()
    work = tmp_path_factory.mktemp("e2e")
    ls = LabelStudio(work)
    backend = None
    try:
        backend = Backend(work)
        yield ls, backend
    finally:
        if backend is not None:
            backend.stop()
        ls.stop()


def decode(region) -> np.ndarray:
    h, w = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def library_mask(image: bytes, expression: str) -> np.ndarray:
    from tiny_models import tiny_hybridgl

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the backend process runs
    try:
        model = tiny_hybridgl(sam=True)
        return model.segment(model.prepare(Image.open(io.BytesIO(image))), expression).mask
    finally:
        torch.set_num_threads(threads)


def test_label_studio_retrieves_our_predictions(stack):
    ls, backend = stack
    project = ls.api("POST", "/api/projects", {"title": "hybridgl e2e", "label_config": CONFIG_IMAGE_ONLY})["id"]
    url_a = ls.upload(project, "scene_a.png", IMAGE_A)
    url_b = ls.upload(project, "scene_b.png", IMAGE_B)
    ls.api("PATCH", f"/api/projects/{project}", {"label_config": CONFIG})
    texts = ["the cup to the left of the plate", "the plate", "the chair in the middle", "the lamp"]
    images = [url_a, url_a, url_b, url_a.rsplit("/", 1)[0] + "/missing.png"]
    out = ls.api("POST", f"/api/projects/{project}/import?return_task_ids=true",
                 [{"data": {"image": img, "text": t}} for img, t in zip(images, texts)])
    task_ids = out["task_ids"]
    assert len(task_ids) == 4

    ml = ls.api("POST", "/api/ml", {"url": backend.url, "project": project, "title": "hybridgl",
                                    "is_interactive": False})
    assert ml["state"] == "CO", ml
    version = ls.api("GET", f"/api/ml/{ml['id']}")["model_version"]

    def retrieve():
        return ls.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                      {"selectedItems": {"all": False, "included": task_ids}})

    retrieve()
    predictions = {t: ls.api("GET", f"/api/predictions?task={t}") for t in task_ids}
    for t in task_ids[:3]:
        assert len(predictions[t]) == 1, predictions[t]
        pred = predictions[t][0]
        assert pred["model_version"] == version and 0 <= pred["score"] <= 1
        (region,) = pred["result"]
        assert region["value"]["brushlabels"] == ["Target"] and region["from_name"] == "mask"
    assert predictions[task_ids[3]] == []  # the task whose image is missing gets none

    # the RLE Label Studio stored is exactly the library's mask for the same input
    for t, image, text in zip(task_ids[:3], (IMAGE_A, IMAGE_A, IMAGE_B), texts[:3]):
        region = predictions[t][0]["result"][0]
        w, h = Image.open(io.BytesIO(image)).size
        assert (region["original_width"], region["original_height"]) == (w, h)
        np.testing.assert_array_equal(decode(region), library_mask(image, text))

    # a second retrieval adds no duplicate
    retrieve()
    for t in task_ids[:3]:
        assert len(ls.api("GET", f"/api/predictions?task={t}")) == 1
    assert ls.api("GET", f"/api/predictions?task={task_ids[3]}") == []

    # the backend counted the failure by kind, and served the shared image from its cache
    counts = json.load(urlopen(backend.url + "/metrics", timeout=10))["counts"]
    # Label Studio 1.23 answers 500 (not 404) for a missing upload: counted as a failed fetch
    assert counts.get("errors.fetch", 0) + counts.get("errors.missing_image", 0) >= 1
    assert counts.get("cache.hits", 0) >= 1
