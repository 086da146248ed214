"""Readers for the benchmark datasets, grouped by image (each image is prepared once).

refer-API layout (RefCOCO, RefCOCO+, RefCOCOg), as the refer toolkit and the reference code use it:

    DATA_ROOT/refcoco/refs(unc).p        DATA_ROOT/refcoco/instances.json
    DATA_ROOT/refcoco+/refs(unc).p       DATA_ROOT/refcoco+/instances.json
    DATA_ROOT/refcocog/refs(umd).p       DATA_ROOT/refcocog/instances.json
    COCO_IMAGES/COCO_train2014_000000xxxxxx.jpg   (default DATA_ROOT/images/mscoco/images/train2014)

`refs(*).p` is a pickled list of refs {ref_id, ann_id, image_id, split, sentences: [{sent_id,
raw, sent, tokens}], ...}; `instances.json` holds COCO `images` and `annotations`. Every sentence
of every ref of the split is one sample; its ground truth is the referred annotation's
segmentation (all its polygons, or its RLE) decoded with pycocotools at full resolution.

PhraseCut layout (VGPhraseCut_v0):

    DATA_ROOT/[VGPhraseCut_v0|phrasecut/]refer_<split>.json   list of {task_id, image_id, phrase,
                                                              Polygons, phrase_structure, ...}
    DATA_ROOT/[...]/image_data_split.json                     list of {image_id, width, height, split}
    DATA_ROOT/[...]/images/<image_id>.jpg

A task's ground truth is the union of all polygons of all its instances, rasterised as the
PhraseCut toolkit does (Pillow, integer vertices, outline included). Tasks without a
phrase_structure are left out, as the toolkit's loader (and so the reference code) does.
"""
from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import masks as mask_utils

log = logging.getLogger("hybridgl.evaluation")

REFER_DATASETS = ("refcoco", "refcoco+", "refcocog")
DATASETS = REFER_DATASETS + ("phrasecut",)
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


@dataclass
class Sample:
    """One expression: what the runner segments and scores."""

    sent_id: Any
    ref_id: Any
    image_id: Any
    sentence: str
    gt_key: Any  # which ground truth of the image (several sentences share one)

    @property
    def key(self) -> str:
        """The sample's identity in predictions.jsonl (JSON has no int keys)."""
        return str(self.sent_id)


@dataclass
class ImageGroup:
    """One image and all the samples on it. `ground_truths()` decodes their masks on demand
    (nothing is cached here: a whole split of masks would not fit in memory)."""

    image_id: Any
    path: Path
    height: int
    width: int
    samples: list[Sample]
    _gt_sources: dict[Any, Any] = field(default_factory=dict, repr=False)
    _gt_kind: str = "coco"

    def ground_truth(self, gt_key: Any) -> np.ndarray:
        source = self._gt_sources[gt_key]
        if self._gt_kind == "coco":
            return mask_utils.coco_segmentation_to_mask(source, self.height, self.width)
        if self._gt_kind == "phrasecut":
            return mask_utils.polygons_to_mask_pil(source, self.height, self.width)
        raise ValueError(f"unknown ground-truth kind {self._gt_kind!r}")

    def ground_truths(self) -> dict[Any, np.ndarray]:
        return {key: self.ground_truth(key) for key in dict.fromkeys(s.gt_key for s in self.samples)}

    def load_image(self) -> np.ndarray:
        return load_rgb(self.path, self.height, self.width)


@dataclass
class EvalDataset:
    name: str
    split: str
    groups: list[ImageGroup]
    skipped: dict[str, int] = field(default_factory=dict)
    split_by: str | None = None  # the refer split (RefCOCOg: umd or google): which refs "val" holds

    def __len__(self) -> int:
        return sum(len(g.samples) for g in self.groups)

    @property
    def num_images(self) -> int:
        return len(self.groups)

    def samples(self) -> Iterator[Sample]:
        for g in self.groups:
            yield from g.samples

    def limited(self, limit: int | None) -> "EvalDataset":
        """The first `limit` samples in image order (None or <= 0: all of them)."""
        if not limit or limit <= 0 or limit >= len(self):
            return self
        groups, left = [], limit
        for g in self.groups:
            if left <= 0:
                break
            take = g.samples[:left]
            groups.append(ImageGroup(g.image_id, g.path, g.height, g.width, take, g._gt_sources, g._gt_kind))
            left -= len(take)
        return EvalDataset(self.name, self.split, groups, dict(self.skipped), self.split_by)


def load_rgb(path: Path, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Read an image as uint8 RGB [H,W,3] at the annotation's size.

    EXIF orientation is applied (as the library does); if that does not give the annotated
    size, the raw pixel order is tried, and as a last resort the image is resized (bilinear),
    as the reference code does for PhraseCut.
    """
    from PIL import Image, ImageOps

    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as im:
        im.load()
        raw = im.convert("RGB")
        oriented = ImageOps.exif_transpose(im).convert("RGB")
    if height is None or width is None:
        return np.asarray(oriented, dtype=np.uint8).copy()
    for candidate in (oriented, raw):
        if candidate.size == (width, height):
            return np.asarray(candidate, dtype=np.uint8).copy()
    log.warning("%s is %dx%d but annotated as %dx%d: resized", path, raw.size[0], raw.size[1], width, height)
    return np.asarray(raw.resize((width, height), Image.BILINEAR), dtype=np.uint8).copy()


def _load_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        try:
            return pickle.load(f)
        except UnicodeDecodeError:  # pickled by Python 2
            f.seek(0)
            return pickle.load(f, encoding="latin1")


def default_coco_images(data_root: Path) -> Path:
    for candidate in (data_root / "images" / "mscoco" / "images" / "train2014",
                      data_root / "images" / "train2014", data_root / "train2014"):
        if candidate.is_dir():
            return candidate
    return data_root / "images" / "mscoco" / "images" / "train2014"


def load_refer(data_root: str | Path, dataset: str, split: str, coco_images: str | Path | None = None,
               split_by: str | None = None, sentence_field: str = "raw") -> EvalDataset:
    """RefCOCO / RefCOCO+ / RefCOCOg in the refer-API layout (see the module docstring)."""
    dataset = dataset.lower()
    if dataset not in REFER_DATASETS:
        raise ValueError(f"not a refer dataset: {dataset!r} (one of {', '.join(REFER_DATASETS)})")
    data_root = Path(data_root)
    ds_dir = data_root / dataset
    split_by = split_by or DEFAULT_SPLIT_BY[dataset]
    refs_path = ds_dir / f"refs({split_by}).p"
    instances_path = ds_dir / "instances.json"
    for p in (refs_path, instances_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: --data-root must hold {dataset}/refs({split_by}).p "
                                    f"and {dataset}/instances.json (the refer-API layout)")
    refs = _load_pickle(refs_path)
    with open(instances_path, encoding="utf-8") as f:
        instances = json.load(f)
    images = {img["id"]: img for img in instances["images"]}
    anns = {ann["id"]: ann for ann in instances["annotations"]}
    image_dir = Path(coco_images) if coco_images else default_coco_images(data_root)

    chosen = [r for r in refs if r.get("split") == split]
    if not chosen:
        splits = sorted({str(r.get("split")) for r in refs})
        raise ValueError(f"{refs_path} has no ref in split {split!r} (splits: {', '.join(splits)})")

    groups: dict[Any, ImageGroup] = {}
    for ref in chosen:
        image_id = ref["image_id"]
        ann = anns.get(ref["ann_id"])
        if ann is None:
            raise ValueError(f"ref {ref['ref_id']}: annotation {ref['ann_id']} not in {instances_path}")
        group = groups.get(image_id)
        if group is None:
            img = images.get(image_id)
            if img is None:
                raise ValueError(f"ref {ref['ref_id']}: image {image_id} not in {instances_path}")
            group = groups[image_id] = ImageGroup(image_id, image_dir / img["file_name"], int(img["height"]),
                                                  int(img["width"]), [], {}, "coco")
        group._gt_sources[ref["ref_id"]] = ann["segmentation"]
        for sent in ref["sentences"]:
            text = sent.get(sentence_field) or sent.get("sent") or sent.get("raw") or ""
            group.samples.append(Sample(sent["sent_id"], ref["ref_id"], image_id, str(text), ref["ref_id"]))
    return EvalDataset(dataset, split, list(groups.values()), split_by=split_by)


def find_phrasecut_root(data_root: str | Path, split: str) -> Path:
    data_root = Path(data_root)
    for candidate in (data_root, data_root / "VGPhraseCut_v0", data_root / "phrasecut",
                      data_root / "phrasecut" / "VGPhraseCut_v0", data_root / "data" / "VGPhraseCut_v0"):
        if (candidate / f"refer_{split}.json").is_file():
            return candidate
    raise FileNotFoundError(f"refer_{split}.json not found under {data_root} (tried ., VGPhraseCut_v0/, "
                            "phrasecut/, phrasecut/VGPhraseCut_v0/, data/VGPhraseCut_v0/)")


def load_phrasecut(data_root: str | Path, split: str, images_dir: str | Path | None = None,
                   require_structure: bool = True) -> EvalDataset:
    """PhraseCut (VGPhraseCut_v0) `refer_<split>.json` (see the module docstring)."""
    root = find_phrasecut_root(data_root, split)
    with open(root / f"refer_{split}.json", encoding="utf-8") as f:
        tasks = json.load(f)
    info: dict[Any, dict] = {}
    if (root / "image_data_split.json").is_file():
        with open(root / "image_data_split.json", encoding="utf-8") as f:
            info = {img["image_id"]: img for img in json.load(f)}
    image_dir = Path(images_dir) if images_dir else root / "images"

    by_image: dict[Any, list[dict]] = {}
    skipped = 0
    for task in tasks:
        if require_structure and "phrase_structure" in task and not task["phrase_structure"]:
            skipped += 1
            continue
        by_image.setdefault(task["image_id"], []).append(task)

    groups = []
    for image_id in sorted(by_image):  # the toolkit's loader sorts the image ids
        path = image_dir / f"{image_id}.jpg"
        meta = info.get(image_id)
        if meta is not None:
            height, width = int(meta["height"]), int(meta["width"])
        else:  # no image_data_split.json entry: the image's own size
            from PIL import Image

            with Image.open(path) as im:
                width, height = im.size
        group = ImageGroup(image_id, path, height, width, [], {}, "phrasecut")
        for task in by_image[image_id]:
            polygons = [poly for instance in task.get("Polygons", []) for poly in instance]
            group._gt_sources[task["task_id"]] = polygons
            group.samples.append(Sample(task["task_id"], task["task_id"], image_id, str(task["phrase"]),
                                        task["task_id"]))
        groups.append(group)
    return EvalDataset("phrasecut", split, groups, {"no_phrase_structure": skipped} if skipped else {})


def load_dataset(name: str, split: str, data_root: str | Path, coco_images: str | Path | None = None,
                 split_by: str | None = None) -> EvalDataset:
    name = name.lower()
    if name == "phrasecut":
        return load_phrasecut(data_root, split, images_dir=coco_images)
    if name in REFER_DATASETS:
        return load_refer(data_root, name, split, coco_images=coco_images, split_by=split_by)
    raise ValueError(f"unknown dataset {name!r}: one of {', '.join(DATASETS)}")
