"""oIoU, mIoU and precision@IoU, as the paper reports them (spec section 12).

For each expression the prediction P and the ground truth G are binary masks at the image's
full resolution; I = |P & G| and U = |P | G| in pixels.

- oIoU ("overall", "cumulative") = sum(I) / sum(U) over all expressions, in percent;
- mIoU = mean over expressions of I / U, in percent, where an expression whose union is empty
  (no prediction and empty ground truth) counts as IoU 0;
- precision@t = share of expressions with IoU >= t, in percent.

A missing prediction (no mask proposal) is an empty mask: I = 0, U = |G|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)

# The paper's Table 1 / Table 2 (oIoU, mIoU), spec section 12.
PAPER_RESULTS: dict[tuple[str, str], tuple[float, float]] = {
    ("refcoco", "val"): (41.81, 49.48),
    ("refcoco", "testA"): (44.52, 53.37),
    ("refcoco", "testB"): (38.5, 45.19),
    ("refcoco+", "val"): (35.74, 43.40),
    ("refcoco+", "testA"): (41.43, 49.13),
    ("refcoco+", "testB"): (30.9, 37.17),
    ("refcocog", "val"): (42.47, 51.25),
    ("refcocog", "test"): (42.97, 51.59),
    ("phrasecut", "test"): (38.39, 36.98),
}

# "Hybrid features only" (Table 3, G2L, val split).
PAPER_HYBRID_ONLY: dict[tuple[str, str], tuple[float, float]] = {
    ("refcoco", "val"): (31.71, 40.27),
    ("refcoco+", "val"): (34.44, 43.40),
    ("refcocog", "val"): (39.12, 48.64),
}


def paper_numbers(dataset: str | None, split: str | None) -> dict[str, tuple[float, float] | None]:
    key = ((dataset or "").lower(), split or "")
    return {"full": PAPER_RESULTS.get(key), "hybrid_only": PAPER_HYBRID_ONLY.get(key)}


def intersection_union(pred: np.ndarray | None, gt: np.ndarray) -> tuple[int, int]:
    """Pixel counts |P & G| and |P | G|; `pred` None means an empty prediction."""
    gt = np.asarray(gt, dtype=bool)
    if pred is None:
        return 0, int(gt.sum())
    pred = np.asarray(pred, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def iou_from_counts(intersection: int, union: int) -> float:
    """I / U, and 0 when the union is empty (the spec's convention for mIoU)."""
    return float(intersection) / float(union) if union > 0 else 0.0


def mask_iou(pred: np.ndarray | None, gt: np.ndarray) -> float:
    return iou_from_counts(*intersection_union(pred, gt))


@dataclass
class IoUAccumulator:
    """Adds expressions one at a time; `result()` gives the metrics in percent."""

    thresholds: tuple[float, ...] = PRECISION_THRESHOLDS
    sum_i: int = 0
    sum_u: int = 0
    ious: list[float] = field(default_factory=list)

    def add(self, intersection: int, union: int) -> float:
        intersection, union = int(intersection), int(union)
        if intersection < 0 or union < intersection:
            raise ValueError(f"bad counts: intersection {intersection}, union {union}")
        self.sum_i += intersection
        self.sum_u += union
        iou = iou_from_counts(intersection, union)
        self.ious.append(iou)
        return iou

    def add_masks(self, pred: np.ndarray | None, gt: np.ndarray) -> float:
        return self.add(*intersection_union(pred, gt))

    def __len__(self) -> int:
        return len(self.ious)

    def result(self) -> dict:
        n = len(self.ious)
        ious = np.asarray(self.ious, dtype=np.float64)
        out = {
            "oIoU": 100.0 * self.sum_i / self.sum_u if self.sum_u > 0 else 0.0,
            "mIoU": 100.0 * float(ious.mean()) if n else 0.0,
            "n": n,
            "intersection": self.sum_i,
            "union": self.sum_u,
        }
        out["precision"] = {f"{t:g}": (100.0 * float((ious >= t).mean()) if n else 0.0)
                            for t in self.thresholds}
        return out


def summarize(counts: Iterable[tuple[int, int]]) -> dict:
    """Metrics of (intersection, union) pairs, one pair per expression."""
    acc = IoUAccumulator()
    for i, u in counts:
        acc.add(i, u)
    return acc.result()


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.2f}"


def format_table(metrics: dict, dataset: str | None = None, split: str | None = None) -> str:
    """A plain-text table of our oIoU / mIoU beside the paper's (where the paper has the split)."""
    paper = paper_numbers(dataset, split)
    title = f"{dataset or 'dataset'} {split or ''}".strip() + f"  (n = {metrics.get('n', 0)})"
    rows = [("HybridGL (full)", metrics, paper["full"])]
    if metrics.get("hybrid_only"):
        rows.append(("hybrid features only", metrics["hybrid_only"], paper["hybrid_only"]))
    lines = [title,
             f"{'method':<22} {'oIoU':>7} {'paper':>7} {'delta':>7}   {'mIoU':>7} {'paper':>7} {'delta':>7}"]
    for name, ours, ref in rows:
        o, m = ours.get("oIoU"), ours.get("mIoU")
        po, pm = (ref if ref else (None, None))
        do = None if po is None else o - po
        dm = None if pm is None else m - pm
        lines.append(f"{name:<22} {_fmt(o):>7} {_fmt(po):>7} {_fmt(do):>7}   {_fmt(m):>7} {_fmt(pm):>7} {_fmt(dm):>7}")
    prec = metrics.get("precision")
    if prec:
        lines.append("precision@IoU (full): " + ", ".join(f"{k}: {v:.2f}" for k, v in prec.items()))
    return "\n".join(lines)
