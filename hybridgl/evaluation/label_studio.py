"""How good was pre-annotation? Our predictions vs the annotators' final masks in a Label Studio export.

Input: a Label Studio JSON export (Export -> JSON, the full format): a list of tasks, each with
`data`, `annotations` (the annotators' results) and `predictions` (what the ML backend sent,
with `score` and `model_version`). Per task:

- ground truth: the task's latest annotation that was not cancelled; the union of its
  `brushlabels` regions (`value.rle`, Label Studio's brush RLE, decoded with label-studio-sdk)
  and `polygonlabels` regions (`value.points` in percent of the image size);
- prediction: the latest prediction (of `model_version`, when given), the union of its regions
  the same way, its `score` (else the highest region score, else 0);
- tasks without a usable annotation are left out and counted; a task whose prediction is
  missing or empty counts as an empty prediction (IoU 0), as on the benchmarks.

label-studio-sdk is imported only here, and only when a brush region is decoded.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from . import masks as mask_utils
from .metrics import intersection_union

log = logging.getLogger("hybridgl.evaluation")

TEXT_KEYS = ("text", "expression", "prompt", "caption", "sentence", "phrase", "query")
IMAGE_KEYS = ("image", "img", "image_url", "url")


def _decode_brush(rle: list[int], height: int, width: int) -> np.ndarray:
    try:
        from label_studio_sdk.converter.brush import decode_rle
    except ImportError as exc:
        raise ImportError("reading Label Studio brush masks needs label-studio-sdk: "
                          "pip install label-studio-sdk") from exc
    flat = np.asarray(decode_rle(rle), dtype=np.uint8)
    if flat.size != height * width * 4:
        raise ValueError(f"brush RLE holds {flat.size} values, expected {height}x{width}x4")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def _polygon_mask(points: list[list[float]], height: int, width: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (width, height), 0)
    if len(points) >= 3:
        ImageDraw.Draw(canvas).polygon([(x * width / 100.0, y * height / 100.0) for x, y in points],
                                       outline=1, fill=1)
    return np.asarray(canvas, dtype=bool)


def region_size(result: list[dict]) -> tuple[int, int] | None:
    for region in result or []:
        h, w = region.get("original_height"), region.get("original_width")
        if h and w:
            return int(h), int(w)
    return None


def result_to_mask(result: list[dict], height: int, width: int, from_name: str | None = None,
                   label: str | None = None) -> tuple[np.ndarray, int]:
    """Union of the brush and polygon regions of a Label Studio result; and how many there were."""
    out = np.zeros((height, width), dtype=bool)
    used = 0
    for region in result or []:
        kind = region.get("type")
        value = region.get("value") or {}
        if from_name is not None and region.get("from_name") != from_name:
            continue
        labels = value.get("brushlabels") or value.get("polygonlabels") or value.get("labels") or []
        if label is not None and label not in labels:
            continue
        rh, rw = region.get("original_height") or height, region.get("original_width") or width
        if (int(rh), int(rw)) != (height, width):
            raise ValueError(f"a region is {rw}x{rh} but the task's image is {width}x{height}")
        if kind in ("brushlabels", "brush") and value.get("format", "rle") == "rle" and value.get("rle"):
            out |= _decode_brush(value["rle"], height, width)
            used += 1
        elif kind in ("polygonlabels", "polygon") and value.get("points"):
            out |= _polygon_mask(value["points"], height, width)
            used += 1
    return out, used


def _latest(items: list[dict]) -> dict | None:
    def key(item: dict) -> tuple:
        return (str(item.get("updated_at") or item.get("created_at") or ""), item.get("id") or 0)

    items = [i for i in items if isinstance(i, dict)]
    return max(items, key=key) if items else None


def _task_text(data: dict, text_key: str | None) -> str:
    if text_key:
        return str(data.get(text_key, ""))
    for k in TEXT_KEYS:
        if isinstance(data.get(k), str):
            return data[k]
    return ""


def _task_image(data: dict) -> Any:
    for k in IMAGE_KEYS:
        if k in data:
            return data[k]
    return None


def load_export(path: str | Path, model_version: str | None = None, from_name: str | None = None,
                label: str | None = None, text_key: str | None = None) -> tuple[list[dict], dict]:
    """predictions.jsonl-style lines (one per annotated task) and counts of what was left out."""
    return records_from_tasks(read_export(path), model_version, from_name, label, text_key)


def read_export(path: str | Path) -> list:
    """The tasks of a Label Studio JSON export file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Label Studio export not found: {path}")
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSON's and UTF-8's messages name a position, not the file
        raise ValueError(f"{path}: not a Label Studio JSON export ({exc})") from exc
    if isinstance(tasks, dict):  # a single task
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise ValueError(f"{path}: expected the JSON export, a list of tasks")
    return tasks


def records_from_tasks(tasks: list, model_version: str | None = None, from_name: str | None = None,
                       label: str | None = None, text_key: str | None = None) -> tuple[list[dict], dict]:
    """`load_export` on tasks already read (an export file, or a project through `LabelStudioProject`)."""
    records: list[dict] = []
    counts = {"tasks": len(tasks), "no_annotation": 0, "no_prediction": 0, "empty_prediction": 0,
              "unreadable": 0}
    versions: dict[str, int] = {}
    for task in tasks:
        if not isinstance(task, dict):
            counts["unreadable"] += 1
            continue
        predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
        for p in predictions:  # every version present in the export, annotated or not
            versions[str(p.get("model_version"))] = versions.get(str(p.get("model_version")), 0) + 1
        annotations = [a for a in task.get("annotations") or []
                       if isinstance(a, dict) and not a.get("was_cancelled")]
        annotation = _latest(annotations)
        if annotation is None:
            counts["no_annotation"] += 1
            continue
        if model_version is not None:
            predictions = [p for p in predictions if str(p.get("model_version")) == model_version]
        prediction = _latest(predictions)
        size = region_size(annotation.get("result")) or (region_size(prediction.get("result"))
                                                          if prediction else None)
        if size is None:
            data = task.get("data") or {}
            size = (data.get("height"), data.get("width")) if data.get("height") and data.get("width") else None
        if size is None:
            counts["unreadable"] += 1
            log.warning("task %s: no region tells the image size; left out", task.get("id"))
            continue
        h, w = size
        try:
            gt, _ = result_to_mask(annotation.get("result"), h, w, from_name, label)
            pred, n_regions = (result_to_mask(prediction.get("result"), h, w, from_name, label)
                               if prediction else (None, 0))
        except ValueError as exc:
            counts["unreadable"] += 1
            log.warning("task %s: %s; left out", task.get("id"), exc)
            continue
        reason = None
        if prediction is None:
            counts["no_prediction"] += 1
            reason = "no prediction"
        elif n_regions == 0:
            counts["empty_prediction"] += 1
            reason = "empty prediction"
        score = 0.0
        if prediction is not None:
            score = prediction.get("score")
            if score is None:
                region_scores = [r.get("score") for r in prediction.get("result") or [] if r.get("score") is not None]
                score = max(region_scores) if region_scores else 0.0
        i, u = intersection_union(pred, gt)
        data = task.get("data") or {}
        records.append({
            "sent_id": task.get("id"), "ref_id": task.get("id"), "image_id": _task_image(data),
            "sentence": _task_text(data, text_key),
            "mask": mask_utils.encode(pred if pred is not None else np.zeros((h, w), bool)),
            "score": float(score), "iou": i / u if u else 0.0, "intersection": i, "union": u,
            "gt": mask_utils.encode(gt),
            "annotation_id": annotation.get("id"),
            "prediction_id": prediction.get("id") if prediction else None,
            "model_version": prediction.get("model_version") if prediction else None,
            "reason": reason,
        })
    counts["model_versions"] = versions
    return records, counts


def evaluate_export(path: str | Path, out_dir: str | Path, model_version: str | None = None,
                    from_name: str | None = None, label: str | None = None, text_key: str | None = None,
                    good_iou: float = 0.5, targets=None, plots: bool = True) -> dict:
    from . import calibration
    from .runner import write_outputs

    records, counts = load_export(path, model_version, from_name, label, text_key)
    info = {"dataset": "label-studio", "split": None, "source": str(path), "model_version": model_version,
            "label_studio": counts}
    return write_outputs(records, out_dir, info, good_iou=good_iou,
                         targets=targets or calibration.DEFAULT_TARGETS, plots=plots, write_lines=True)


class LabelStudioProject:
    """A Label Studio project read over plain HTTP: its annotated tasks (the JSON export) and the
    tasks' images. api_key: a legacy token (`Authorization: Token`) or a personal access token
    (a JWT refresh token, exchanged at /api/token/refresh for a Bearer access token)."""

    def __init__(self, url: str, api_key: str, timeout: float = 60.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self._key = api_key
        self._headers: dict[str, str] | None = None

    def headers(self) -> dict[str, str]:
        import requests

        if self._headers is None:
            if self._key.count(".") == 2:  # a JWT: a personal access token
                r = requests.post(f"{self.url}/api/token/refresh", json={"refresh": self._key}, timeout=self.timeout)
                r.raise_for_status()
                self._headers = {"Authorization": f"Bearer {r.json()['access']}"}
            else:
                self._headers = {"Authorization": f"Token {self._key}"}
        return self._headers

    def get(self, path_or_url: str, **params):
        import requests

        url = path_or_url if path_or_url.startswith(("http://", "https://")) else self.url + path_or_url
        r = requests.get(url, headers=self.headers(), params=params or None, timeout=self.timeout)
        if r.status_code >= 400:
            raise ValueError(f"Label Studio at {self.url} answered HTTP {r.status_code} for "
                             f"{url.split('?')[0]}: {r.text[:200]}")
        return r

    def annotated_tasks(self, project: int) -> list:
        """The project's tasks with at least one annotation, as in its JSON export."""
        tasks = self.get(f"/api/projects/{int(project)}/export", exportType="JSON").json()
        if not isinstance(tasks, list):
            raise ValueError(f"project {project}: the export is not a list of tasks")
        return tasks

    def image(self, url: str) -> bytes:
        """A task's image: Label Studio paths (/data/...) and URLs on its host with the token."""
        from urllib.parse import urlparse

        if url.startswith("/") or urlparse(url).netloc == urlparse(self.url).netloc:
            return self.get(url).content
        import requests

        r = requests.get(url, timeout=self.timeout)
        r.raise_for_status()
        return r.content
