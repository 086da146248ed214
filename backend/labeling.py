"""Reading a Label Studio labelling config and a task: where the image, the expression and the label are."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass


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


def _field(value: str | None) -> str | None:
    if value and value.startswith("$"):
        return value[1:]
    return None


def parse_config(xml: str | None) -> Interface:
    """Find Image + BrushLabels (toName = that image) + a Text or TextArea in a labelling config."""
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
    brush = next((b for b in brushes if b.get("toName") in image_names), None)
    if brush is None:
        raise TaskError("config", "the labelling config has no <BrushLabels> whose toName is an Image")
    image = next(t for t in images if t.get("name") == brush.get("toName"))
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


@dataclass(frozen=True)
class Hints:
    """What the annotator gave interactively: expression text, a positive point, a box (pixels)."""

    text: str | None = None
    point: tuple[float, float] | None = None  # (x, y)
    box: tuple[float, float, float, float] | None = None  # (x, y, w, h)


def read_context(context: dict | None, interface: Interface, size: tuple[int, int]) -> Hints:
    """Smart-tool regions and TextArea text from an interactive request; size = (H, W) of the image."""
    if not context or not isinstance(context.get("result"), list):
        return Hints()
    h, w = size
    text = point = box = None
    for region in context["result"]:
        value = region.get("value") or {}
        kind = region.get("type")
        if kind == "textarea" and (not interface.textarea_names or region.get("from_name") in interface.textarea_names):
            parts = value.get("text") or []
            joined = " ".join(p for p in (parts if isinstance(parts, list) else [parts]) if isinstance(p, str))
            text = joined.strip() or text
        elif kind in ("keypointlabels", "keypoint") and region.get("is_positive", True) is not False:
            point = (float(value["x"]) / 100 * w, float(value["y"]) / 100 * h)
        elif kind in ("rectanglelabels", "rectangle"):
            box = (float(value["x"]) / 100 * w, float(value["y"]) / 100 * h,
                   float(value["width"]) / 100 * w, float(value["height"]) / 100 * h)
    return Hints(text, point, box)


def task_expression(task: dict, interface: Interface, hints: Hints, max_chars: int) -> str:
    text = hints.text
    if text is None and interface.text_field is not None:
        text = (task.get("data") or {}).get(interface.text_field)
    if text is None:
        raise TaskError("no_expression", f"task {task.get('id')} has no expression "
                                         f"(data field '{interface.text_field}' missing)")
    if not isinstance(text, str) or not text.strip():
        raise TaskError("no_expression", f"task {task.get('id')} has an empty expression")
    if len(text) > max_chars:
        raise TaskError("bad_expression", f"task {task.get('id')}: expression of {len(text)} characters "
                                          f"exceeds HYBRIDGL_MAX_TEXT_CHARS={max_chars}")
    return text.strip()
