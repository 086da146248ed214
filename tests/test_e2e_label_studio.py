"""End to end: a real Label Studio 1.23.2 asks our backend (separate processes) for predictions.

Needs .venv-ls (tests/e2e/setup_ls.sh). Skipped without it, except when HYBRIDGL_REQUIRE_E2E=1
(as in CI), where a missing Label Studio is a failure.

Two backends run, both `tests/e2e/serve_tiny.py` (the production app factory on the tiny models):
the default one (one prediction per task, interactive on) and one with HYBRIDGL_ALTERNATIVES=2.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from backend.labeling import config_version, parse_config
from tiny_models import GOLDEN_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from harness import Backend, LabelStudio, readme_config, require_label_studio  # noqa: E402

pytestmark = pytest.mark.e2e

CONFIG_IMAGE_ONLY = '<View><Image name="image" value="$image"/></View>'
CONFIG = readme_config()  # the labelling config of the README, verbatim
# a config attribute chooses the label; the expression sits in another field
CONFIG_ALT = """<View>
  <Image name="photo" value="$picture"/>
  <Text name="ref" value="$referring"/>
  <BrushLabels name="seg" toName="photo" hybridgl_label="Object">
    <Label value="Background"/><Label value="Object"/>
  </BrushLabels>
</View>"""
IMAGE_A = (GOLDEN_DIR / "p00_cup_left_of_plate" / "image.png").read_bytes()
IMAGE_B = (GOLDEN_DIR / "p07_chair_in_middle" / "image.png").read_bytes()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_label_studio()
    work = tmp_path_factory.mktemp("e2e")
    started = []
    try:  # the backends start while Label Studio does
        started.append(Backend(work, "backend"))
        started.append(Backend(work, "backend-alt2", ["--alternatives", "2"]))
        ls = LabelStudio(work)
        started.append(ls)
        default, alt2 = (b.wait() for b in started[:2])
        yield ls, default, alt2
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture(scope="module")
def library():
    """The library on the same tiny models, single-threaded like the backend process."""
    from tiny_models import tiny_hybridgl

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tiny_hybridgl(sam=True)
    finally:
        torch.set_num_threads(threads)


def decode(region) -> np.ndarray:
    h, w = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def new_project(ls: LabelStudio, config: str, images: dict[str, bytes]) -> tuple[int, dict[str, str]]:
    """A project with `config` and the images uploaded (direct upload needs a one-field config first)."""
    project = ls.api("POST", "/api/projects", {"title": "hybridgl e2e", "label_config": CONFIG_IMAGE_ONLY})["id"]
    urls = {name: ls.upload(project, name, data) for name, data in images.items()}
    ls.api("PATCH", f"/api/projects/{project}", {"label_config": config})
    return project, urls


def retrieve(ls: LabelStudio, project: int, task_ids: list[int]) -> dict:
    return ls.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                  {"selectedItems": {"all": False, "included": task_ids}})


def predictions_of(ls: LabelStudio, task: int) -> list[dict]:
    return ls.api("GET", f"/api/predictions?task={task}")


def test_label_studio_retrieves_our_predictions(stack, library):
    ls, backend, _ = stack
    project, urls = new_project(ls, CONFIG, {"scene_a.png": IMAGE_A, "scene_b.png": IMAGE_B})
    url_a, url_b = urls["scene_a.png"], urls["scene_b.png"]
    texts = ["the cup to the left of the plate", "the plate", "the chair in the middle", "the lamp"]
    images = [url_a, url_a, url_b, url_a.rsplit("/", 1)[0] + "/missing.png"]  # two tasks share scene_a
    task_ids = ls.api("POST", f"/api/projects/{project}/import?return_task_ids=true",
                      [{"data": {"image": img, "text": t}} for img, t in zip(images, texts)])["task_ids"]
    assert len(task_ids) == 4

    ml = ls.api("POST", "/api/ml", {"url": backend.url, "project": project, "title": "hybridgl",
                                    "is_interactive": True})
    assert ml["state"] == "CO", ml
    health = json.load(urlopen(backend.url + "/health", timeout=10))
    version = config_version(health["model_version"], parse_config(CONFIG))  # its predictions' for CONFIG
    assert ls.api("GET", f"/api/ml/{ml['id']}")["model_version"] == version  # from /setup

    retrieve(ls, project, task_ids)
    predictions = {t: predictions_of(ls, t) for t in task_ids}
    for t, image, text in zip(task_ids[:3], (IMAGE_A, IMAGE_A, IMAGE_B), texts[:3]):
        assert len(predictions[t]) == 1, predictions[t]
        pred = predictions[t][0]
        assert pred["model_version"] == version
        (region,) = pred["result"]
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Target"]
        assert (region["from_name"], region["to_name"], region["image_rotation"]) == ("mask", "image", 0)
        # the RLE Label Studio stored is exactly the library's mask for the same input, at the image's size
        w, h = Image.open(io.BytesIO(image)).size
        assert (region["original_width"], region["original_height"]) == (w, h)
        seg = library.segment(library.prepare(Image.open(io.BytesIO(image))), text)
        np.testing.assert_array_equal(decode(region), seg.mask)
        assert pred["score"] == pytest.approx(seg.score, abs=1e-6)
        assert region["score"] == pytest.approx(seg.score, abs=1e-6)
    # the task whose image is missing gets the failure prediction: empty, score 0, stored once
    (failed,) = predictions[task_ids[3]]
    assert (failed["result"], failed["score"], failed["model_version"]) == ([], 0.0, version)
    assert ls.api("GET", f"/api/tasks/{task_ids[0]}")["total_predictions"] == 1

    # Connect Model made the project's version the model's title, which no prediction carries: Label
    # Studio's Data Manager has no score; the one setting of docs/review.md (the project's version =
    # the backend's, as Settings -> Annotation saves it) fills it with each task's score, failures 0
    def dm_scores():
        return {t["id"]: t["predictions_score"]
                for t in ls.api("GET", f"/api/tasks?project={project}&fields=all&page_size=100")["tasks"]}

    assert ls.api("GET", f"/api/projects/{project}")["model_version"] == "hybridgl"
    assert set(dm_scores().values()) == {None}
    ls.api("PATCH", f"/api/projects/{project}", {"model_version": version})
    assert dm_scores() == pytest.approx({t: predictions[t][0]["score"] for t in task_ids})
    assert dm_scores()[task_ids[3]] == 0.0

    # a second retrieval adds no duplicate
    retrieve(ls, project, task_ids)
    for t in task_ids:
        assert len(predictions_of(ls, t)) == 1

    # the backend counted the failure by kind, and served the shared image from its cache
    metrics = json.load(urlopen(backend.url + "/metrics", timeout=10))
    counts = metrics["counts"]
    # Label Studio 1.23 answers 500 (not 404) for a missing upload: counted as a failed fetch
    assert counts.get("errors.fetch", 0) + counts.get("errors.missing_image", 0) >= 1
    assert counts.get("cache.hits", 0) >= 1 and counts.get("cache.misses", 0) == 2
    assert counts.get("tasks.ok") == 3

    # interactive: Label Studio forwards the editor's TextArea text and clicked point
    view = library.prepare(Image.open(io.BytesIO(IMAGE_A)))
    coverage = view.masks.sum(axis=0)
    y, x = np.argwhere((coverage > 0) & (coverage < len(view)))[0]  # a pixel inside some proposals only
    allowed = [i for i in range(len(view)) if view.masks[i, y, x]]
    expected = view.masks[allowed[library.segment(view.subset(allowed), "the plate").index]]
    h, w = view.size
    context = {"result": [
        {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["the plate"]}},
        {"type": "keypointlabels", "from_name": "point", "to_name": "image", "original_width": w,
         "original_height": h, "image_rotation": 0, "is_positive": True,
         "value": {"x": 100 * (x + 0.5) / w, "y": 100 * (y + 0.5) / h, "width": 0.5, "keypointlabels": ["Click the object"]}},
    ]}
    out = ls.api("POST", f"/api/ml/{ml['id']}/interactive-annotating", {"task": task_ids[0], "context": context})
    assert "errors" not in out, out
    (region,) = out["data"]["result"]
    np.testing.assert_array_equal(decode(region), expected)
    assert len(predictions_of(ls, task_ids[0])) == 1  # interactive suggestions are not stored


def test_alternatives_and_config_attributes(stack, library):
    ls, _, backend = stack
    project, urls = new_project(ls, CONFIG_ALT, {"scene_b.png": IMAGE_B})
    (task,) = ls.api("POST", f"/api/projects/{project}/import?return_task_ids=true",
                     [{"data": {"picture": urls["scene_b.png"], "referring": "the chair"}}])["task_ids"]
    ml = ls.api("POST", "/api/ml", {"url": backend.url, "project": project, "title": "hybridgl-alt2",
                                    "is_interactive": False})
    assert ml["state"] == "CO", ml
    model_version = json.load(urlopen(backend.url + "/health", timeout=10))["model_version"]
    assert model_version == library.model_version  # the same whatever the alternatives
    version = config_version(model_version, parse_config(CONFIG_ALT))  # the best mask's

    retrieve(ls, project, [task])
    preds = predictions_of(ls, task)
    assert len(preds) == 2  # the best mask and the next ranked one, as separate predictions
    view = library.prepare(Image.open(io.BytesIO(IMAGE_B)))
    seg = library.segment(view, "the chair")
    # stored worst first (the editor lists the newest first); the alternative has its own version
    assert [p["model_version"] for p in sorted(preds, key=lambda p: p["id"])] == [version + "-rank2", version]
    for pred in preds:
        (region,) = pred["result"]
        assert (region["from_name"], region["to_name"]) == ("seg", "photo")
        assert region["value"]["brushlabels"] == ["Object"]
    got = sorted((round(p["score"], 6), decode(p["result"][0]).tobytes()) for p in preds)
    want = sorted((round(r["score"], 6), view.masks[r["index"]].tobytes()) for r in seg.ranking[:2])
    assert got == want
    retrieve(ls, project, [task])
    assert len(predictions_of(ls, task)) == 2
