"""Reading a Label Studio labelling config and a task: where the image, the expression and the label are."""
from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache


class TaskError(Exception):
    """A problem with one task (or its project's config): reported for that task, never a 500.

    kind: a short machine-readable category counted in /metrics.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Interface:
    image_name: str  # the Image tag's name (to_name of our regions)
    image_field: str  # the task data key holding the image URL
    brush_name: str  # the BrushLabels tag's name (from_name of our regions)
    label: str  # the brush label our regions carry
    text_field: str | None  # the task data key holding the expression (a Text tag)
    textarea_names: tuple[str, ...]  # TextArea tags whose text, in context, replaces the expression


def config_version(model_version: str, interface: Interface) -> str:
    """The model_version of the predictions made for a labelling config: the model's, then `-cfg` and
    a short hash of what the predictions depend on in the config (the tags they name, the label they
    carry, the data fields they read). After an edit of those, the stored predictions no longer show
    in Label Studio (another from_name, to_name or label): with another version, Retrieve
    Predictions and a rerun of backend.preannotate predict those tasks again."""
    parts = [interface.image_name, interface.image_field, interface.brush_name, interface.label, interface.text_field]
    return f"{model_version}-cfg{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8]}"


def _field(value: str | None) -> str | None:
    if value and value.startswith("$"):
        return value[1:]
    return None


CACHED_CONFIG_CHARS = 1 << 20  # longer configs are parsed every time rather than held by the cache


def parse_config(xml: str | None) -> Interface:
    """Find Image + BrushLabels (toName = that image) + a Text or TextArea in a labelling config."""
    if xml is not None and len(xml) > CACHED_CONFIG_CHARS:
        return _parse_config(xml)
    return _cached_config(xml)


def _parse_config(xml: str | None) -> Interface:
    if not xml or not xml.strip():
        raise TaskError("config", "no labelling config in the request")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise TaskError("config", f"the labelling config is not valid XML: {exc}") from exc
    tags = list(root.iter())
    images = [t for t in tags if t.tag == "Image" and t.get("name") and _field(t.get("value"))]
    if not images:
        raise TaskError("config", "the labelling config has no <Image name=... value=\"$field\"/>")
    brushes = [t for t in tags if t.tag == "BrushLabels"]
    image_names = {t.get("name") for t in images}

    def targets(tag) -> list[str]:  # toName may list several objects: "img1,img2"
        return [n.strip() for n in (tag.get("toName") or "").split(",") if n.strip() in image_names]

    brush = next((b for b in brushes if targets(b)), None)
    if brush is None:
        raise TaskError("config", "the labelling config has no <BrushLabels> whose toName is an Image")
    image = next(t for t in images if t.get("name") == targets(brush)[0])
    labels = [lab.get("value") for lab in brush.iter("Label") if lab.get("value")]
    if not labels:
        raise TaskError("config", f"<BrushLabels name=\"{brush.get('name')}\"> has no <Label value=...>")
    chosen = brush.get("hybridgl_label") or labels[0]  # a config attribute may pick another label
    if chosen not in labels:
        raise TaskError("config", f"hybridgl_label=\"{chosen}\" is not a Label of <BrushLabels>")
    texts = [t for t in tags if t.tag == "Text" and _field(t.get("value"))]
    preferred = brush.get("hybridgl_text")
    text_field = preferred or (_field(texts[0].get("value")) if texts else None)
    textareas = tuple(t.get("name") for t in tags if t.tag == "TextArea" and t.get("name"))
    if text_field is None and not textareas:
        raise TaskError("config", "the labelling config has no <Text value=\"$field\"/> (or TextArea) "
                                  "holding the referring expression")
    return Interface(image.get("name"), _field(image.get("value")), brush.get("name"), chosen, text_field,
                     textareas)


_cached_config = lru_cache(maxsize=64)(_parse_config)


@dataclass(frozen=True)
class Hints:
    """What the annotator gave interactively, in pixels of the (EXIF-transposed) image."""

    text: str | None = None  # a TextArea prompt: replaces the task's expression
    points: tuple[tuple[float, float], ...] = ()  # positive keypoints (x, y): candidates must contain all
    negative_points: tuple[tuple[float, float], ...] = ()  # negative keypoints: candidates must contain none
    box: tuple[float, float, float, float] | None = None  # a rectangle (x, y, w, h): best-overlapping candidates

    @property
    def restricts(self) -> bool:
        return bool(self.points or self.negative_points or self.box is not None)


def _percent(value: dict, key: str, scale: int) -> float:
    try:
        v = float(value[key])
    except (KeyError, TypeError, ValueError):
        raise TaskError("bad_context", f"an interactive region lacks a numeric '{key}'") from None
    v = v / 100 * scale  # a finite percentage can still overflow here (1e308 % of the width)
    if v != v or abs(v) == float("inf"):
        raise TaskError("bad_context", f"an interactive region has a non-finite '{key}'")
    return v


def _textarea_text(region: dict, interface: Interface) -> str | None:
    if interface.textarea_names and region.get("from_name") not in interface.textarea_names:
        return None
    value = region.get("value") if isinstance(region.get("value"), dict) else {}
    parts = value.get("text") or []
    joined = " ".join(p for p in (parts if isinstance(parts, list) else [parts]) if isinstance(p, str))
    return joined.strip() or None


def context_text(context: dict | None, interface: Interface) -> str | None:
    """The TextArea text of an interactive request (the last non-empty one), else None."""
    if not isinstance(context, dict) or not isinstance(context.get("result"), list):
        return None
    text = None
    for region in context["result"]:
        if isinstance(region, dict) and region.get("type") == "textarea":
            text = _textarea_text(region, interface) or text
    return text


def read_context(context: dict | None, interface: Interface, size: tuple[int, int]) -> Hints:
    """Smart-tool regions and TextArea text from an interactive request; size = (H, W) of the image.

    Coordinates in the context are percentages of the original (displayed) image size.
    """
    if not isinstance(context, dict) or not isinstance(context.get("result"), list):
        return Hints()
    h, w = size
    text = box = None
    points: list[tuple[float, float]] = []
    negatives: list[tuple[float, float]] = []
    for region in context["result"]:
        if not isinstance(region, dict):
            continue
        value = region.get("value") if isinstance(region.get("value"), dict) else {}
        kind = region.get("type")
        if kind == "textarea":
            text = _textarea_text(region, interface) or text
        elif kind in ("keypointlabels", "keypoint"):
            xy = (_percent(value, "x", w), _percent(value, "y", h))
            (negatives if region.get("is_positive", True) is False else points).append(xy)
        elif kind in ("rectanglelabels", "rectangle"):
            box = (_percent(value, "x", w), _percent(value, "y", h),
                   _percent(value, "width", w), _percent(value, "height", h))
    return Hints(text, tuple(points), tuple(negatives), box)


def task_expression(task: dict, interface: Interface, context: dict | None, max_chars: int) -> str:
    """The referring expression: the TextArea text of an interactive request, else the task's Text field."""
    text = context_text(context, interface)
    if text is None and interface.text_field is not None:
        text = (task.get("data") or {}).get(interface.text_field)
    if text is None:
        where = (f"data field '{interface.text_field}' missing" if interface.text_field
                 else "the config has no <Text> field and no TextArea text came with the request")
        raise TaskError("no_expression", f"task {task.get('id')} has no expression ({where})")
    if not isinstance(text, str):
        raise TaskError("bad_expression", f"task {task.get('id')}: the expression is a {type(text).__name__}, "
                                          "not text")
    if not text.strip():
        raise TaskError("no_expression", f"task {task.get('id')} has an empty expression")
    if len(text) > max_chars:
        raise TaskError("bad_expression", f"task {task.get('id')}: expression of {len(text)} characters "
                                          f"exceeds HYBRIDGL_MAX_TEXT_CHARS={max_chars}")
    return " ".join(text.split())
