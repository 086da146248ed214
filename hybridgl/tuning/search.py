"""Honest selection: k-fold cross-validation over images, a bootstrap interval of the gain.

Every candidate configuration is re-scored on every expression once (`choice_table`); a fold's
configuration is the best on the other folds' images (mIoU, ties to the earlier candidate, so
the defaults win a tie), and is measured only on its own fold's images. The pooled held-out
IoUs of the defaults and of the fold-chosen configurations give the gain, and resampling whole
images (a cluster bootstrap: expressions on one image are not independent) its interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..config import HybridGLConfig
from .candidates import ExpressionCandidates, ImageCandidates
from .rescore import Choice, choose


@dataclass
class Item:
    """One reviewed expression: its image's group id (folds never split a group), its candidates,
    and per proposal the pixel intersection and union with the annotator's mask ([N] each)."""

    sample_id: Any
    image_id: Any
    image: ImageCandidates
    expr: ExpressionCandidates
    intersection: np.ndarray
    union: np.ndarray
    gt_pixels: int

    def counts(self, index: int | None) -> tuple[int, int]:
        """(I, U) of choosing proposal `index`; None is an empty prediction."""
        if index is None:
            return 0, self.gt_pixels
        return int(self.intersection[index]), int(self.union[index])


def overlap_counts(masks, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel intersection and union of every proposal (bool [H,W] each) with one mask [H,W]: int64 [N] each."""
    gt = np.asarray(gt, dtype=bool)
    inter, union = [], []
    for m in masks:
        if m.shape != gt.shape:
            raise ValueError(f"the annotation is {gt.shape[1]}x{gt.shape[0]} but the image is "
                             f"{m.shape[1]}x{m.shape[0]}")
        i = int((m & gt).sum())
        inter.append(i)
        union.append(int(m.sum()) + int(gt.sum()) - i)
    return np.array(inter, dtype=np.int64), np.array(union, dtype=np.int64)


@dataclass
class Table:
    """counts[c, e] = (I, U) of configuration c on item e: int64 [C, E, 2]; choices[c][e]."""

    configs: list[HybridGLConfig]
    choices: list[list[Choice]]
    counts: np.ndarray

    def ious(self, c: int | np.ndarray) -> np.ndarray:
        i, u = self.counts[c, ..., 0], self.counts[c, ..., 1]
        return np.where(u > 0, i / np.maximum(u, 1), 0.0)


def choice_table(items: Sequence[Item], configs: Sequence[HybridGLConfig]) -> Table:
    choices = [[choose(it.image, it.expr, cfg) for it in items] for cfg in configs]
    counts = np.array([[it.counts(ch.index) for it, ch in zip(items, row)] for row in choices],
                      dtype=np.int64).reshape(len(configs), len(items), 2)
    return Table(list(configs), choices, counts)


def assign_folds(image_ids: Sequence[Any], k: int, seed: int = 0) -> np.ndarray:
    """Fold of each item [E]: the distinct images shuffled and dealt round-robin into k folds."""
    distinct = list(dict.fromkeys(image_ids))
    order = np.random.default_rng(seed).permutation(len(distinct))
    fold_of = {distinct[j]: pos % k for pos, j in enumerate(order)}
    return np.array([fold_of[i] for i in image_ids], dtype=np.int64)


def miou(table: Table, rows: np.ndarray | slice, cols: np.ndarray) -> np.ndarray:
    """Mean IoU over items `cols` of each configuration in `rows`."""
    return table.ious(rows)[..., cols].mean(axis=-1)


def best_config(table: Table, cols: np.ndarray) -> int:
    """The configuration with the best mIoU on items `cols`; the first of equals (defaults first)."""
    scores = miou(table, slice(None), cols)
    return int(np.flatnonzero(scores >= scores.max() - 1e-12)[0])


def cross_validate(table: Table, folds: np.ndarray) -> np.ndarray:
    """The configuration chosen for each fold on the other folds: int [k]."""
    k = int(folds.max()) + 1
    return np.array([best_config(table, np.flatnonzero(folds != f)) for f in range(k)], dtype=np.int64)


def metrics(counts: np.ndarray) -> dict:
    """mIoU and oIoU (percent) of (I, U) pairs [E, 2]."""
    i, u = counts[:, 0].astype(np.float64), counts[:, 1].astype(np.float64)
    ious = np.where(u > 0, i / np.maximum(u, 1), 0.0)
    return {"n": int(len(counts)), "mIoU": 100 * float(ious.mean()) if len(counts) else 0.0,
            "oIoU": 100 * float(i.sum() / u.sum()) if u.sum() > 0 else 0.0}


def bootstrap_gain(before: np.ndarray, after: np.ndarray, groups: Sequence[Any], n: int = 2000,
                   seed: int = 0, level: float = 0.95) -> dict:
    """Percentile interval of the mIoU and oIoU gain (points) resampling whole images.

    before, after: (I, U) [E, 2] of the same items; groups: the image of each item.
    """
    ids = {g: j for j, g in enumerate(dict.fromkeys(groups))}
    g = np.array([ids[x] for x in groups], dtype=np.int64)
    m = len(ids)

    def per_image(values: np.ndarray) -> np.ndarray:
        return np.bincount(g, weights=values, minlength=m)

    iou = lambda c: np.where(c[:, 1] > 0, c[:, 0] / np.maximum(c[:, 1], 1), 0.0)  # noqa: E731
    sums = np.stack([per_image(np.ones(len(g))), per_image(iou(after) - iou(before)),
                     per_image(after[:, 0]), per_image(after[:, 1]), per_image(before[:, 0]),
                     per_image(before[:, 1])])  # [6, m]
    rng = np.random.default_rng(seed)
    weights = np.stack([np.bincount(rng.integers(0, m, m), minlength=m) for _ in range(n)])  # [n, m]
    s = weights @ sums.T  # [n, 6]
    with np.errstate(invalid="ignore", divide="ignore"):
        gain_m = 100 * s[:, 1] / s[:, 0]
        gain_o = 100 * (s[:, 2] / s[:, 3] - s[:, 4] / s[:, 5])
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2

    def interval(x: np.ndarray) -> list[float]:
        x = x[np.isfinite(x)]
        return [float(np.quantile(x, lo)), float(np.quantile(x, hi))] if x.size else [0.0, 0.0]

    return {"level": level, "resamples": n, "mIoU_gain": interval(gain_m), "oIoU_gain": interval(gain_o)}
