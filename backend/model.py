"""The Label Studio model: tasks in, brush-label predictions out (the label-studio-ml 2.x shape).

Thin by design: read the config and the task, fetch the image, call hybridgl, encode the mask.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections import Counter, OrderedDict
from typing import Any

import numpy as np

from hybridgl import HybridGL
from hybridgl.pipeline import PreparedView

from .images import ImageFetcher
from .labeling import Hints, Interface, TaskError, parse_config, read_context, task_expression
from .settings import Settings

log = logging.getLogger("backend")


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """bool [H,W] -> Label Studio's brush RLE (RGBA, 0/255)."""
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle(mask.astype(np.uint8) * 255)


class Counters:
    """Thread-safe counts for /metrics."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter = Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class HybridGLBackend:
    """One per process: holds the loaded model, the prepared-image LRU and the GPU lock."""

    def __init__(self, model: HybridGL, settings: Settings | None = None):
        self.model = model
        self.settings = settings or Settings.from_env()
        self.fetcher = ImageFetcher(self.settings)
        self.counters = Counters()
        self.gpu_lock = threading.Lock()  # one forward pass at a time, whatever the server's threads
        self._views: OrderedDict[str, PreparedView] = OrderedDict()
        self._views_lock = threading.Lock()
        version = model.model_version
        if self.settings.alternatives > 1:
            version += f"-alt{self.settings.alternatives}"
        self.model_version = version

    # -- label-studio-ml 2.x surface ----------------------------------------------------------------
    def setup(self, hostname: str | None = None, access_token: str | None = None, **_: Any) -> dict:
        self.fetcher.set_label_studio(hostname, access_token)
        return {"model_version": self.model_version}

    def predict(self, tasks: list[dict], context: dict | None = None, label_config: str | None = None,
                **_: Any) -> list[dict | list[dict]]:
        """One entry per task, in order: a prediction, a list of them (alternatives), or, for a task
        that failed, {"error": ...} without a result (Label Studio stores nothing for it)."""
        try:
            interface = parse_config(label_config)
        except TaskError as exc:
            self.counters.add(f"errors.{exc.kind}", len(tasks))
            log.warning("predict: %s (%d tasks)", exc, len(tasks))
            return [{"error": str(exc), "kind": exc.kind} for _ in tasks]
        return [self.predict_task(task, interface, context) for task in tasks]

    # -- one task ---------------------------------------------------------------------------------
    def predict_task(self, task: dict, interface: Interface, context: dict | None = None) -> dict | list[dict]:
        task_id = task.get("id")
        try:
            out = self._predict_task(task, interface, context)
            self.counters.add("tasks.ok")
            return out
        except TaskError as exc:
            self.counters.add(f"errors.{exc.kind}")
            log.warning("task %s: %s: %s", task_id, exc.kind, exc)
            return {"error": str(exc), "kind": exc.kind, "task": task_id}
        except Exception as exc:  # a bug or an unexpected input must not fail the batch
            self.counters.add("errors.internal")
            log.exception("task %s: internal error", task_id)
            return {"error": f"internal error: {exc.__class__.__name__}", "kind": "internal", "task": task_id}

    def _predict_task(self, task: dict, interface: Interface, context: dict | None) -> dict | list[dict]:
        data = task.get("data") or {}
        url = data.get(interface.image_field)
        if url is None:
            raise TaskError("missing_image", f"task data has no '{interface.image_field}' field")
        raw, image = self.fetcher.load(url, task.get("id"))
        hints = read_context(context, interface, image.shape[:2])
        expression = task_expression(task, interface, hints, self.settings.max_text_chars)
        view = self.prepared(raw, image)
        indices = candidate_indices(view, hints)
        with self.gpu_lock:
            seg = self.model.segment(view.subset(indices) if indices is not None else view, expression)
        to_view = (lambda i: int(indices[i])) if indices is not None else (lambda i: int(i))  # noqa: E731
        self.counters.add("predictions")
        h, w = view.size
        if seg.mask is None:
            return {"result": [], "score": 0.0, "model_version": self.model_version}
        # the editor shows one suggestion for an interactive request; batch retrieval gets alternatives
        k = 1 if context else self.settings.alternatives
        choices = [(to_view(r["index"]), r["score"]) for r in seg.ranking[:k]]
        predictions = [self.prediction(view.masks[i], score, interface, h, w) for i, score in choices]
        return predictions[0] if k == 1 else predictions

    def prediction(self, mask: np.ndarray, score: float, interface: Interface, h: int, w: int) -> dict:
        region = {
            "id": uuid.uuid4().hex[:10], "from_name": interface.brush_name, "to_name": interface.image_name,
            "type": "brushlabels", "original_width": int(w), "original_height": int(h), "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [interface.label]},
            "score": float(score), "readonly": False,
        }
        return {"result": [region], "score": float(score), "model_version": self.model_version}

    def prepared(self, raw: bytes, image: np.ndarray) -> PreparedView:
        """The image-only work, once per distinct image content (LRU)."""
        key = hashlib.sha256(raw).hexdigest()
        with self._views_lock:
            if key in self._views:
                self._views.move_to_end(key)
                self.counters.add("cache.hits")
                return self._views[key]
        with self.gpu_lock:
            view = self.model.prepare(image)
        self.counters.add("cache.misses")
        if self.settings.cache_images:
            with self._views_lock:
                self._views[key] = view
                while len(self._views) > self.settings.cache_images:
                    self._views.popitem(last=False)
        return view


def candidate_indices(view: PreparedView, hints: Hints) -> np.ndarray | None:
    """Proposals allowed by a clicked point (those containing it) or a drawn box (those whose
    box overlaps it best: IoU >= 0.5, else the single best); None when there is no hint."""
    if hints.point is None and hints.box is None:
        return None
    keep = np.arange(len(view))
    if hints.point is not None:
        h, w = view.size
        x = min(max(int(hints.point[0]), 0), w - 1)
        y = min(max(int(hints.point[1]), 0), h - 1)
        keep = keep[view.masks[keep, y, x]]
        if len(keep) == 0:
            raise TaskError("no_candidate", "no mask proposal contains the clicked point")
    if hints.box is not None and len(keep):
        boxes = view.boxes_xywh[keep].astype(np.float64)
        bx, by, bw, bh = hints.box
        ix = np.clip(np.minimum(boxes[:, 0] + boxes[:, 2], bx + bw) - np.maximum(boxes[:, 0], bx), 0, None)
        iy = np.clip(np.minimum(boxes[:, 1] + boxes[:, 3], by + bh) - np.maximum(boxes[:, 1], by), 0, None)
        inter = ix * iy
        iou = inter / (boxes[:, 2] * boxes[:, 3] + bw * bh - inter + 1e-9)
        if iou.max() <= 0:
            raise TaskError("no_candidate", "no mask proposal overlaps the drawn rectangle")
        keep = keep[iou >= 0.5] if (iou >= 0.5).any() else keep[[int(iou.argmax())]]
    return keep
