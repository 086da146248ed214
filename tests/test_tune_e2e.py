"""End to end on a real Label Studio 1.23.2: annotators review part of a project, `python -m
hybridgl tune` learns from their masks, and `backend.preannotate --unreviewed` re-predicts the
rest with the tuned model (a new model_version) while the reviewed tasks stay untouched.

The annotators' masks follow the method with alpha = 0 (the default is 0.6). Needs .venv-ls.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from hybridgl import HybridGLConfig
from hybridgl.pipeline import load_image
from hybridgl.tuning.candidates import CandidateCache
from hybridgl.tuning.rescore import choose
from tiny_models import GOLDEN_DIR, PERMISSIVE, tiny_hybridgl

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from harness import ROOT, LabelStudio, require_label_studio  # noqa: E402
from serve_tiny import tiny_environment  # noqa: E402

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Text name="expr" value="$text"/>
  <BrushLabels name="mask" toName="image"><Label value="Target"/></BrushLabels>
</View>"""
SCENES = ["p00_cup_left_of_plate", "p01_red_ball", "p02_bird_above_tree", "p05_apple_in_bowl", "p07_chair_in_middle"]
EXPRESSIONS = ["the object on the left", "the red thing", "the bigger one", "the thing in the middle",
               "the cup right of the plate"]
HIDDEN = {"alpha": 0.0}
REVIEWED_SCENES = 4  # the last scene's tasks stay unreviewed


def region(mask: np.ndarray) -> dict:
    h, w = mask.shape
    return {"id": "r1", "from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": w,
            "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": ["Target"]}}


def run(args: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_tune_on_reviewed_tasks_then_repredict_only_the_unreviewed(tmp_path):
    require_label_studio()
    permissive = tmp_path / "permissive.json"
    permissive.write_text(json.dumps(PERMISSIVE))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYBRIDGL_", "LABEL_STUDIO_"))}
    env.update(tiny_environment(tmp_path))
    env.update({"HYBRIDGL_CONFIG": str(permissive), "MODEL_DIR": str(tmp_path / "model-dir"), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})
    ls = LabelStudio(tmp_path)
    try:
        project = ls.api("POST", "/api/projects", {"title": "tune e2e",
                                                   "label_config": '<View><Image name="image" value="$image"/></View>'})["id"]
        urls = [ls.upload(project, f"{s}.png", (GOLDEN_DIR / s / "image.png").read_bytes()) for s in SCENES]
        ls.api("PATCH", f"/api/projects/{project}", {"label_config": CONFIG})
        pairs = [(s, text) for s in range(len(SCENES)) for text in EXPRESSIONS]
        ids = ls.api("POST", f"/api/projects/{project}/import?return_task_ids=true",
                     [{"image": urls[s], "text": text} for s, text in pairs])["task_ids"]
        # what an earlier pre-annotation left: one prediction of another version on every task
        for task_id in ids:
            ls.api("POST", "/api/predictions", {"task": task_id, "model_version": "earlier", "score": 0.5,
                                                "result": []})

        # annotators review the first scenes; their masks are the method's choice with alpha = 0
        model = tiny_hybridgl()
        assert model.config == HybridGLConfig.from_file(permissive)
        cache = CandidateCache(model, tmp_path / "tune" / "cache")  # tune below finds these prepared
        hidden = model.config.replace(**HIDDEN)
        reviewed, unreviewed = {}, []
        for task_id, (s, text) in zip(ids, pairs):
            if s >= REVIEWED_SCENES:
                unreviewed.append(task_id)
                continue
            key, cand = cache.image(SCENES[s], lambda s=s: load_image(GOLDEN_DIR / SCENES[s] / "image.png"))
            gt = cand.masks[choose(cand, cache.expression(key, cand, text), hidden).index]
            reviewed[task_id] = ls.api("POST", f"/api/tasks/{task_id}/annotations", {"result": [region(gt)]})["id"]

        out = tmp_path / "tune"
        tune = run(["-m", "hybridgl", "tune", "--url", ls.url, "--api-key", ls.token, "--project", str(project),
                    "--out", str(out), "--folds", "4", "--configs", "80", "--min-images", "4",
                    "--min-expressions", "16", "--bootstrap", "500", "--no-progress"], env)
        assert tune.returncode == 0, tune.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert report["n_expressions"] == len(reviewed) and report["n_images"] == REVIEWED_SCENES
        assert report["source"]["cache"]["misses"] == 0  # every image and expression came from the cache
        assert report["recommended"] is True, report["verdict"]
        assert report["held_out"]["tuned"]["mIoU"] > report["held_out"]["defaults"]["mIoU"]
        overrides = out / "overrides.toml"
        assert f"--project {project} --unreviewed" in report["repredict"]
        assert "re-predict the unreviewed tasks" in tune.stdout

        # re-predict with the tuned model: only the unreviewed tasks, under a new version
        again = run(["-m", "backend.preannotate", "--url", ls.url, "--api-key", ls.token, "--project",
                     str(project), "--unreviewed", "--json", "--no-progress"],
                    {**env, "HYBRIDGL_CONFIG": str(overrides)})
        assert again.returncode == 0, again.stderr[-3000:]
        summary = json.loads(again.stdout.strip().splitlines()[-1])
        assert (summary["done"], summary["reviewed"], summary["failed"]) == (len(unreviewed), len(reviewed), 0)
        version = summary["model_version"]
        assert not version.startswith(model.model_version)  # the tuned config is a new model_version
        predictions: dict[int, list[dict]] = {}
        for p in ls.api("GET", f"/api/predictions?project={project}"):
            predictions.setdefault(p["task"], []).append(p)
        for task_id in unreviewed:
            assert sorted(p["model_version"] for p in predictions[task_id]) == sorted(["earlier", version])
        for task_id, annotation_id in reviewed.items():
            assert [p["model_version"] for p in predictions[task_id]] == ["earlier"]
            annotations = ls.api("GET", f"/api/tasks/{task_id}/annotations")
            assert [a["id"] for a in annotations] == [annotation_id]
    finally:
        ls.stop()
