"""Is the score a useful confidence? AUROC, reliability, a threshold per target precision, plots.

A prediction is "good" when its IoU with the ground truth is at least `good_iou` (0.5 by
default). Label Studio users review low-score tasks first, so the question is: above which
score are the predictions good often enough to trust without review?

- `auroc`: the probability that a random good prediction scores higher than a random bad one
  (ties count one half); None when all predictions are good or all are bad.
- `threshold_for_precision`: the lowest threshold t such that the predictions with score >= t
  are good at least `precision` of the time (the most coverage at that precision).
- `reliability_bins`: predictions binned by score: share good and mean IoU per bin, and the
  expected calibration error of the score as a probability of "good".

The plots are drawn with Pillow only (no matplotlib).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_TARGETS = (0.8, 0.9, 0.95)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` for the binary `labels` (Mann-Whitney U, ties 1/2)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks (1-based) over groups of tied scores
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def threshold_for_precision(scores: Sequence[float], ious: Sequence[float], precision: float,
                            good_iou: float = 0.5) -> dict:
    """The lowest score threshold whose accepted set (score >= t) has precision >= `precision`."""
    s = np.asarray(scores, dtype=np.float64)
    good = np.asarray(ious, dtype=np.float64) >= good_iou
    n, n_good = len(s), int(good.sum())
    out = {"target_precision": float(precision), "threshold": None, "precision": None,
           "coverage": 0.0, "recall": 0.0, "accepted": 0}
    if n == 0:
        return out
    order = np.argsort(-s, kind="mergesort")
    s_sorted, good_sorted = s[order], good[order]
    cum_good = np.cumsum(good_sorted)
    # a threshold can only sit at the last element of a group of tied scores
    last_of_group = np.append(s_sorted[1:] != s_sorted[:-1], True)
    idx = np.flatnonzero(last_of_group)
    accepted = idx + 1
    prec = cum_good[idx] / accepted
    ok = np.flatnonzero(prec >= precision - 1e-12)
    if ok.size == 0:
        return out
    best = idx[ok[-1]]  # the most accepted predictions that still keep the precision
    k = best + 1
    out.update(threshold=float(s_sorted[best]), precision=float(cum_good[best] / k), coverage=float(k / n),
               recall=float(cum_good[best] / n_good) if n_good else 0.0, accepted=int(k))
    return out


def reliability_bins(scores: Sequence[float], ious: Sequence[float], n_bins: int = 10,
                     good_iou: float = 0.5) -> dict:
    """Equal-width score bins over [0, 1]: count, mean score, share good, mean IoU; and the ECE."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    iou = np.asarray(ious, dtype=np.float64)
    good = iou >= good_iou
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.minimum((s * n_bins).astype(int), n_bins - 1)
    bins, ece, n = [], 0.0, len(s)
    for b in range(n_bins):
        sel = which == b
        c = int(sel.sum())
        entry = {"low": float(edges[b]), "high": float(edges[b + 1]), "count": c,
                 "mean_score": float(s[sel].mean()) if c else None,
                 "good_rate": float(good[sel].mean()) if c else None,
                 "mean_iou": float(iou[sel].mean()) if c else None}
        if c:
            ece += c / n * abs(entry["good_rate"] - entry["mean_score"])
        bins.append(entry)
    return {"bins": bins, "ece": float(ece) if n else None}


def calibration_report(scores: Sequence[float], ious: Sequence[float], good_iou: float = 0.5,
                       targets: Sequence[float] = DEFAULT_TARGETS, n_bins: int = 10) -> dict:
    s = np.asarray(scores, dtype=np.float64)
    iou = np.asarray(ious, dtype=np.float64)
    rel = reliability_bins(s, iou, n_bins, good_iou)
    return {
        "good_iou": good_iou,
        "n": int(len(s)),
        "good_rate": float((iou >= good_iou).mean()) if len(s) else None,
        "auroc": auroc(s, iou >= good_iou),
        "ece": rel["ece"],
        "thresholds": [threshold_for_precision(s, iou, t, good_iou) for t in targets],
        "reliability": rel["bins"],
    }


# ---------------------------------------------------------------------------------------------
# Plots (Pillow)

_W, _H = 640, 480
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 50, 60


def _font(size: int = 14):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _axes(title: str, xlabel: str, ylabel: str, ymax: float, yticks: Sequence[float], ylabels: Sequence[str]):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (_W, _H), "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = _LEFT, _H - _BOTTOM, _W - _RIGHT, _TOP
    font, small = _font(16), _font(12)
    d.text((_W / 2, 18), title, fill="black", font=font, anchor="mm")
    d.text(((x0 + x1) / 2, _H - 18), xlabel, fill="black", font=small, anchor="mm")
    # y label written vertically
    label = Image.new("RGBA", (300, 20), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((150, 10), ylabel, fill="black", font=small, anchor="mm")
    label = label.rotate(90, expand=True)
    img.paste(label, (6, int((y0 + y1) / 2 - label.size[1] / 2)), label)
    for t, text in zip(yticks, ylabels):
        y = y0 - (y0 - y1) * t / ymax
        d.line([(x0, y), (x1, y)], fill=(230, 230, 230))
        d.text((x0 - 6, y), text, fill="black", font=small, anchor="rm")
    for i in range(11):
        x = x0 + (x1 - x0) * i / 10
        d.line([(x, y0), (x, y0 + 4)], fill="black")
        d.text((x, y0 + 8), f"{i / 10:.1f}", fill="black", font=small, anchor="mt")
    d.rectangle([x0, y1, x1, y0], outline="black")
    return img, d, (x0, y0, x1, y1)


def plot_reliability(report: dict, path: str | Path, title: str = "Score reliability") -> Path:
    """Bars: share of predictions with IoU >= good_iou per score bin; dots: mean IoU; dashed:
    perfect calibration. The count of each bin is written above it."""
    img, d, (x0, y0, x1, y1) = _axes(
        f"{title} (AUROC {report['auroc']:.3f})" if report.get("auroc") is not None else title,
        "score", f"share with IoU >= {report['good_iou']:g} (bars), mean IoU (dots)", 1.0,
        [i / 5 for i in range(6)], [f"{i / 5:.1f}" for i in range(6)])
    small = _font(11)

    def px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * x, y0 - (y0 - y1) * y

    # the diagonal, dashed
    steps = 40
    for i in range(0, steps, 2):
        d.line([px(i / steps, i / steps), px((i + 1) / steps, (i + 1) / steps)], fill=(150, 150, 150), width=2)
    for b in report["reliability"]:
        if not b["count"]:
            continue
        left, right = px(b["low"], 0)[0] + 3, px(b["high"], 0)[0] - 3
        top = px(0, b["good_rate"])[1]
        d.rectangle([left, top, right, y0], fill=(70, 130, 200), outline=(30, 70, 140))
        cx = (left + right) / 2
        d.text((cx, min(top, y0) - 4), str(b["count"]), fill="black", font=small, anchor="mb")
        mx, my = px((b["low"] + b["high"]) / 2, b["mean_iou"])
        d.ellipse([mx - 4, my - 4, mx + 4, my + 4], fill=(220, 90, 40))
    path = Path(path)
    img.save(path)
    return path


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least `raw` (and at least 1: counts are integers)."""
    raw = max(raw, 1.0)
    base = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * base >= raw:
            return float(m * base)
    return float(10 * base)


def plot_iou_histogram(ious: Sequence[float], path: str | Path, hybrid_ious: Sequence[float] | None = None,
                       n_bins: int = 20, title: str = "IoU per expression",
                       labels: tuple[str, str] = ("full method", "hybrid features only")) -> Path:
    """Histogram of the per-expression IoU (filled: `ious`, labels[0]; outline: `hybrid_ious`, labels[1])."""
    iou = np.clip(np.asarray(ious, dtype=np.float64), 0.0, 1.0)
    counts = np.histogram(iou, bins=n_bins, range=(0.0, 1.0))[0]
    hyb = None
    if hybrid_ious is not None and len(hybrid_ious):
        hyb = np.histogram(np.clip(np.asarray(hybrid_ious, dtype=np.float64), 0, 1), bins=n_bins, range=(0.0, 1.0))[0]
    peak = max(int(counts.max()) if len(counts) else 0, int(hyb.max()) if hyb is not None else 0, 1)
    step = _nice_step(peak / 5)
    top = float(step * math.ceil(peak / step))
    ticks = np.arange(0, top + step / 2, step)
    img, d, (x0, y0, x1, y1) = _axes(f"{title} (n = {len(iou)})", "IoU", "expressions", float(top),
                                     list(ticks), [f"{t:.0f}" for t in ticks])
    width = (x1 - x0) / n_bins
    for i, c in enumerate(counts):
        if c:
            h = (y0 - y1) * c / top
            d.rectangle([x0 + i * width + 1, y0 - h, x0 + (i + 1) * width - 1, y0], fill=(70, 130, 200))
    if hyb is not None:
        for i, c in enumerate(hyb):
            if c:
                h = (y0 - y1) * c / top
                d.rectangle([x0 + i * width + 3, y0 - h, x0 + (i + 1) * width - 3, y0], outline=(220, 90, 40), width=2)
        small = _font(12)
        d.rectangle([x1 - 170, y1 + 8, x1 - 156, y1 + 22], fill=(70, 130, 200))
        d.text((x1 - 150, y1 + 15), labels[0], fill="black", font=small, anchor="lm")
        d.rectangle([x1 - 170, y1 + 28, x1 - 156, y1 + 42], outline=(220, 90, 40), width=2)
        d.text((x1 - 150, y1 + 35), labels[1], fill="black", font=small, anchor="lm")
    path = Path(path)
    img.save(path)
    return path
