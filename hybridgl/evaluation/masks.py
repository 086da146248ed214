"""Binary masks <-> COCO RLE, and COCO / PhraseCut polygons -> masks, at full resolution.

COCO RLE here is always the compressed JSON form `{"size": [H, W], "counts": "<str>"}` that
pycocotools writes (column-major runs). pycocotools is imported on first use.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _mask_api():
    try:
        from pycocotools import mask as mask_api
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the evaluation harness needs pycocotools: pip install pycocotools") from exc
    return mask_api


def _api_decode(rles) -> np.ndarray:
    # pycocotools 2.0.x under numpy 2 warns about __array__(copy=...) inside decode; harmless
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*__array__.*")
        return _mask_api().decode(rles)


def encode(mask: np.ndarray) -> dict[str, Any]:
    """bool [H,W] -> {"size": [H, W], "counts": str}."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    rle = _mask_api().encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def empty_rle(height: int, width: int) -> dict[str, Any]:
    return encode(np.zeros((height, width), dtype=bool))


def _as_c_rle(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    size = [int(rle["size"][0]), int(rle["size"][1])]
    if isinstance(counts, list):  # uncompressed RLE (e.g. COCO crowd annotations)
        return _mask_api().frPyObjects({"size": size, "counts": counts}, *size)
    return {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed or uncompressed) -> bool [H,W]."""
    return _api_decode(_as_c_rle(rle)).astype(bool)


def area(rle: dict[str, Any]) -> int:
    return int(_mask_api().area(_as_c_rle(rle)))


def rle_intersection_union(pred: dict[str, Any] | None, gt: dict[str, Any]) -> tuple[int, int]:
    """|P & G| and |P | G| computed on the RLEs (no decoding); pred None is an empty mask."""
    g = _as_c_rle(gt)
    api = _mask_api()
    if pred is None:
        return 0, int(api.area(g))
    p = _as_c_rle(pred)
    if list(p["size"]) != list(g["size"]):
        raise ValueError(f"prediction size {p['size']} differs from ground truth size {g['size']}")
    inter = int(api.area(api.merge([p, g], intersect=True)))
    union = int(api.area(api.merge([p, g], intersect=False)))
    return inter, union


def coco_segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO annotation's `segmentation` (a list of polygons [x1,y1,x2,y2,...] or an RLE) ->
    bool [H,W], the union of its parts, decoded with pycocotools as the refer API does."""
    api = _mask_api()
    if isinstance(segmentation, list):
        # fewer than 3 points enclose nothing; pycocotools would read a 4-number polygon heading the
        # list as boxes and fail (TypeError) on the whole annotation
        segmentation = [p for p in segmentation if not isinstance(p, (list, tuple)) or len(p) >= 6]
        if not segmentation:
            return np.zeros((height, width), dtype=bool)
        decoded = _api_decode(api.frPyObjects(segmentation, height, width))  # [H,W,K], as refer's getMask
        return decoded.reshape(height, width, -1).any(axis=2)
    if isinstance(segmentation, dict):
        return decode(segmentation)
    raise ValueError(f"unknown segmentation format: {type(segmentation).__name__}")


def polygons_to_mask_pil(polygons: Sequence[Sequence[Sequence[float]]], height: int, width: int) -> np.ndarray:
    """PhraseCut's own rasterisation (its `polygons_to_mask`): each polygon a list of [x, y]
    points, truncated to int, filled with its outline by Pillow; the union of all of them."""
    from PIL import Image, ImageDraw

    out = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        if len(polygon) < 2:
            continue
        points = [(int(x), int(y)) for x, y in polygon]
        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).polygon(points, outline=1, fill=1)
        out |= np.asarray(canvas, dtype=bool)
    return out
