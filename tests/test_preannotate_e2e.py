"""End to end: `python -m backend.preannotate` on a real Label Studio 1.23.2, and /metrics from
annotators' corrections arriving through Label Studio's webhook.

Needs .venv-ls (tests/e2e/setup_ls.sh). Skipped without it, except when HYBRIDGL_REQUIRE_E2E=1.
The command runs as its own process configured the production way (the environment of
tests/e2e/serve_tiny.py: the tiny models through the backend's own loader), so its model_version is
the one of the backend process that receives the webhooks.
"""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from backend.labeling import config_version, parse_config
from tiny_models import GOLDEN_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from harness import ROOT, Backend, LabelStudio, require_label_studio  # noqa: E402
from serve_tiny import command_environment  # noqa: E402

pytestmark = pytest.mark.e2e

CONFIG_IMAGE_ONLY = '<View><Image name="image" value="$image"/></View>'
CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <Text name="expr" value="$text"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Target" background="#00c000"/>
  </BrushLabels>
</View>"""
SCENES = ["p00_cup_left_of_plate", "p01_red_ball", "p02_bird_above_tree", "p05_apple_in_bowl", "p07_chair_in_middle"]
EXPRESSIONS = ["the object on the left", "the red thing", "the biggest one", "the thing in the middle"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Label Studio, our backend (MODEL_DIR in a temp dir), and the environment for the command."""
    require_label_studio()
    work = tmp_path_factory.mktemp("preannotate")
    env = command_environment(work, work / "cli-model-dir")
    started = []
    try:
        started.append(Backend(work, "backend", env={"MODEL_DIR": str(work / "backend-model-dir")}))
        ls = LabelStudio(work)
        started.append(ls)
        backend = started[0].wait()
        yield ls, backend, env, work
    finally:
        for server in reversed(started):
            server.stop()


def new_project(ls: LabelStudio, broken: bool = True) -> tuple[int, list[int], list[int]]:
    """4 expressions on each of 5 images (20 tasks); with `broken`, plus a task whose image is
    missing and one without an expression. Returns (project, good task ids, broken task ids)."""
    project = ls.api("POST", "/api/projects", {"title": "preannotate e2e", "label_config": CONFIG_IMAGE_ONLY})["id"]
    urls = [ls.upload(project, f"{s}.png", (GOLDEN_DIR / s / "image.png").read_bytes()) for s in SCENES]
    ls.api("PATCH", f"/api/projects/{project}", {"label_config": CONFIG})
    data = [{"image": url, "text": text} for text in EXPRESSIONS for url in urls]  # images interleaved
    good = ls.api("POST", f"/api/projects/{project}/import?return_task_ids=true", data)["task_ids"]
    bad = []
    if broken:
        bad = ls.api("POST", f"/api/projects/{project}/import?return_task_ids=true",
                     [{"image": urls[0].rsplit("/", 1)[0] + "/missing.png", "text": "the cup"},
                      {"image": urls[1], "text": "  "}])["task_ids"]
    return project, good, bad


def preannotate(ls: LabelStudio, env: dict, project: int, *extra: str, wait: bool = True):
    args = [sys.executable, "-m", "backend.preannotate", "--url", ls.url, "--api-key", ls.token,
            "--project", str(project), "--json", *extra]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return finish(proc, 240) if wait else proc


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait (bounded) for a started command: (exit status, stdout, stderr); killed if still running."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def summary_of(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def predictions_by_task(ls: LabelStudio, project: int) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for p in ls.api("GET", f"/api/predictions?project={project}"):
        out.setdefault(p["task"], []).append(p)
    return out


def version_of(backend: Backend) -> str:
    return json.load(urlopen(backend.url + "/health", timeout=10))["model_version"]


def decode(region: dict) -> np.ndarray:
    h, w = region["original_height"], region["original_width"]
    return np.asarray(decode_rle(region["value"]["rle"])).reshape(h, w, 4)[:, :, 3] > 0


def metrics(backend: Backend) -> dict:
    return json.load(urlopen(backend.url + "/metrics", timeout=10))


def test_preannotate_a_project_then_rerun_adds_nothing(stack):
    ls, backend, env, work = stack
    project, good, bad = new_project(ls)
    report = work / "report"

    ml = ls.api("POST", "/api/ml", {"url": backend.url, "project": project, "title": "hybridgl"})  # Connect Model
    assert ls.api("GET", f"/api/projects/{project}")["model_version"] == "hybridgl"  # the title: no score shows
    version = ls.api("GET", f"/api/ml/{ml['id']}")["model_version"]  # the backend's /setup, for this config
    assert version == config_version(version_of(backend), parse_config(CONFIG))
    rc, out, err = preannotate(ls, env, project, "--batch", "6", "--report", str(report), "--sampling", "uncertainty")
    assert rc == 1, err[-3000:]  # some tasks failed, the rest were done
    s = summary_of(out)
    assert s["model_version"] == version  # same configuration, same version as the backend
    # the broken tasks get their failure prediction (empty, score 0) too
    assert (s["total"], s["done"], s["predictions"], s["skipped"], s["failed"]) == (22, 20, 22, 0, 2), s
    assert s["prepared_images"] == 5  # one SAM pass per image for its 4 expressions
    missing, no_text = bad
    assert s["failures"][str(missing)].split(":")[0] in ("fetch", "missing_image")
    assert s["failures"][str(no_text)].startswith("no_expression")
    assert f"failed task {missing}:" in out and f"failed task {no_text}:" in out
    assert "ETA" in err or "task/s" in err or "s/task" in err  # the progress bar

    preds = predictions_by_task(ls, project)
    assert sorted(preds) == sorted(good + bad)
    for task_id in bad:
        (pred,) = preds[task_id]
        assert (pred["result"], pred["score"], pred["model_version"]) == ([], 0.0, version)
    # ready for review with no manual step: the project reads our version, so the Data Manager's
    # score column holds each task's best score (failures 0) and Uncertainty sampling serves the lowest
    settings = ls.api("GET", f"/api/projects/{project}")
    assert (settings["model_version"], settings["sampling"]) == (version, "Uncertainty sampling")
    listed = ls.api("GET", f"/api/tasks?project={project}&fields=all&page_size=100")["tasks"]
    assert {t["id"]: t["predictions_score"] for t in listed} == {t: preds[t][0]["score"] for t in good + bad}
    first = ls.api("GET", f"/api/projects/{project}/next")
    assert first["id"] in bad and first["predictions"][0]["score"] == 0.0
    for task_id in good:
        (pred,) = preds[task_id]  # exactly one each
        assert pred["model_version"] == version and 0.0 <= pred["score"] <= 1.0
        (region,) = pred["result"]
        assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", "mask", "image")
        assert region["value"]["brushlabels"] == ["Target"]
        assert region["original_width"] > 0

    # the review report: tasks by ascending score, the failures after them, and a histogram
    with open(report / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 22
    scored = [r for r in rows if r["status"] == "predicted"]
    assert [int(r["task_id"]) for r in scored] == [
        t for _, t in sorted((round(preds[t][0]["score"], 6), t) for t in good)]
    assert all(r["expression"] in EXPRESSIONS and r["image"].startswith("/data/upload/") for r in scored)
    assert all(float(r["margin"]) >= 0 for r in scored)
    assert [(r["status"], r["score"]) for r in rows[:2]] == [("failed", "0.000000")] * 2  # they sort first
    with Image.open(report / "score_histogram.png") as im:
        assert im.size == (640, 400)

    # a rerun (or a resumed run) adds no duplicates, and does not retry the recorded failures
    rc, out, err = preannotate(ls, env, project, "--no-progress")
    s = summary_of(out)
    assert (s["done"], s["predictions"], s["skipped"], s["failed"], s["prepared_images"]) == (0, 0, 22, 0, 0), s
    assert {t: len(p) for t, p in predictions_by_task(ls, project).items()} == {t: 1 for t in good + bad}

    # corrections: the connected backend (Label Studio added its /webhook) sees annotations
    before = metrics(backend)["quality"]
    assert before["count"] == 0 and before["mIoU"] is None

    exact, partial = good[0], good[1]
    ann1 = ls.api("POST", f"/api/tasks/{exact}/annotations",
                  {"result": preds[exact][0]["result"], "parent_prediction": preds[exact][0]["id"]})
    q = wait_for_quality(backend, 1)
    assert q["mIoU"] == pytest.approx(1.0) and q["oIoU"] == pytest.approx(1.0)

    # the annotator keeps only the top half of our mask on another task
    region = preds[partial][0]["result"][0]
    h, w = region["original_height"], region["original_width"]
    ours = decode(region)
    theirs = ours.copy()
    theirs[h // 2:] = False
    if not ours.any():  # an empty prediction: the annotator paints the top-left quarter instead
        theirs[: h // 2, : w // 2] = True
    corrected = {**region, "id": "fixed", "value": {**region["value"],
                                                   "rle": mask2rle(theirs.astype(np.uint8) * 255)}}
    ls.api("POST", f"/api/tasks/{partial}/annotations", {"result": [corrected]})
    q = wait_for_quality(backend, 2)
    inter, union = int((ours & theirs).sum()), int((ours | theirs).sum())
    iou = inter / union if union else 1.0
    assert q["mIoU"] == pytest.approx((1.0 + iou) / 2, abs=1e-6)
    full = int(decode(preds[exact][0]["result"][0]).sum())
    assert q["oIoU"] == pytest.approx((full + inter) / (full + union), abs=1e-3)
    buckets = [b for b in q["by_score"] if b["count"]]
    assert sum(b["count"] for b in buckets) == 2
    for task_id in (exact, partial):
        score = preds[task_id][0]["score"]
        assert any(b["score_from"] <= score <= b["score_to"] for b in buckets)

    # an update replaces the pair: the first annotation now erases everything -> IoU 0
    ls.api("PATCH", f"/api/annotations/{ann1['id']}", {"result": []})
    deadline = time.time() + 30
    while time.time() < deadline and metrics(backend)["quality"]["mIoU"] != pytest.approx(iou / 2, abs=1e-6):
        time.sleep(0.3)
    q = metrics(backend)["quality"]
    assert q["count"] == 2 and q["mIoU"] == pytest.approx(iou / 2, abs=1e-6), q
    assert metrics(backend)["counts"].get("quality.recorded") == 3


def wait_for_quality(backend: Backend, count: int, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        q = metrics(backend)["quality"]
        if q["count"] >= count:
            return q
        time.sleep(0.3)
    raise AssertionError(f"/metrics never counted {count} corrections: {metrics(backend)}\n"
                         f"{backend.process.tail()}")


def test_interrupted_run_resumes_without_duplicates(stack):
    ls, backend, env, _ = stack
    project, good, _ = new_project(ls, broken=False)
    proc = preannotate(ls, env, project, "--batch", "2", "--no-progress", wait=False)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if len(ls.api("GET", f"/api/predictions?project={project}")) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)  # like Ctrl-C or `docker stop`
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    s = summary_of(out)
    assert s["interrupted"] and 2 <= s["done"] < 20 and s["done"] + s["not_reached"] == 20, s
    partial = predictions_by_task(ls, project)
    assert 2 <= len(partial) < 20 and all(len(p) == 1 for p in partial.values())

    rc, out, err = preannotate(ls, env, project, "--no-progress")
    assert rc == 0, err[-3000:]
    s = summary_of(out)
    assert s["skipped"] == len(partial) and s["done"] == 20 - len(partial) and s["failed"] == 0, s
    assert {t: len(p) for t, p in predictions_by_task(ls, project).items()} == {t: 1 for t in good}


def test_a_rerun_after_the_labelling_config_was_edited_predicts_again(stack):
    """Renaming the BrushLabels tag hides the stored predictions in Label Studio (they name the old
    tag): the rerun must predict the tasks again under the new config's version, not skip them."""
    ls, _, env, _ = stack
    project, good, _ = new_project(ls, broken=False)
    rc, out, err = preannotate(ls, env, project, "--no-progress")
    assert rc == 0, err[-3000:]
    first = summary_of(out)
    ls.api("PATCH", f"/api/projects/{project}", {"label_config": CONFIG.replace('name="mask"', 'name="brush"')})
    rc, out, err = preannotate(ls, env, project, "--no-progress")
    assert rc == 0, err[-3000:]
    s = summary_of(out)
    assert (s["done"], s["skipped"], s["failed"]) == (20, 0, 0) and s["model_version"] != first["model_version"], s
    assert ls.api("GET", f"/api/projects/{project}")["model_version"] == s["model_version"]
    for task_id, preds in predictions_by_task(ls, project).items():  # the project's version: the renamed tag
        (new,) = [p for p in preds if p["model_version"] == s["model_version"]]
        assert [r["from_name"] for r in new["result"]] == ["brush"], (task_id, new)
