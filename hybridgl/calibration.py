"""A calibrated score: the probability that a candidate mask is right (IoU >= 0.5 with the truth).

The raw score (the candidate's share of softmax(F / T), `scoring.confidence`) ranks well but is
not a probability: on a team's own data a raw 0.9 may be right 60 % of the time. `python -m
hybridgl tune` fits a logistic model on the reviewed tasks (hybridgl/tuning/fit.py) and stores it
in the config (`calibration_features`, `calibration_coef`); the pipeline then reports

    P(good) = sigmoid(coef[0] + sum_k coef[k + 1] * x_k)

for every candidate, with x the features below, computed the same way here for the fit and
for the pipeline. Without coefficients the score stays the raw share.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Per candidate i of the k1 candidates (all known when the choice is made, nothing new to compute):
FEATURES = {
    "score": "the raw score: the candidate's share of softmax(F / score_temperature)",
    "margin": "F_i minus the best other candidate's F (negative for every candidate but the chosen)",
    "semantic": "p_i, the semantic probability of Eq. 3 over all proposals",
    "sam_iou": "SAM's predicted IoU of the proposal (0 for given masks)",
    "area": "the mask's share of the image's pixels",
    "relation": "1 when a relation word guided the choice (Eq. 4-5), else 0",
    "direction": "1 when a position prior guided the choice (Eq. 6-7), else 0",
}


def check_calibration(features: Sequence[str], coef: Sequence[float]) -> None:
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise ValueError(f"unknown calibration features {unknown}: known are {', '.join(FEATURES)}")
    if len(coef) != len(features) + 1:
        raise ValueError(f"calibration_coef needs {len(features) + 1} values (intercept first) for "
                         f"{len(features)} calibration_features, got {len(coef)}")
    if not all(np.isfinite(coef)):
        raise ValueError("calibration_coef must be finite numbers")


def candidate_features(F_: np.ndarray, shares: np.ndarray, semantic: np.ndarray, sam_iou: np.ndarray,
                       area: np.ndarray, relation: str, direction: str) -> np.ndarray:
    """The features of the k candidates: float64 [k, len(FEATURES)], columns in FEATURES' order.

    F_, shares, semantic, sam_iou, area: [k] aligned with the candidates; relation, direction:
    the ones that guided the choice ("none" when switched off or absent).
    """
    F_ = np.asarray(F_, dtype=np.float64)
    k = len(F_)
    margin = np.zeros(k)
    for i in range(k):
        others = np.delete(F_, i)
        margin[i] = F_[i] - others.max() if others.size else 0.0
    columns = {
        "score": np.asarray(shares, dtype=np.float64),
        "margin": margin,
        "semantic": np.asarray(semantic, dtype=np.float64),
        "sam_iou": np.nan_to_num(np.asarray(sam_iou, dtype=np.float64), nan=0.0),
        "area": np.asarray(area, dtype=np.float64),
        "relation": np.full(k, float(relation != "none")),
        "direction": np.full(k, float(direction != "none")),
    }
    return np.stack([columns[name] for name in FEATURES], axis=1) if k else np.zeros((0, len(FEATURES)))


def select(table: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The columns `names` of a candidate_features table: [k, len(names)]."""
    order = list(FEATURES)
    return table[:, [order.index(n) for n in names]]


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


def probability(table: np.ndarray, names: Sequence[str], coef: Sequence[float]) -> np.ndarray:
    """P(good) per row of a candidate_features table for a fitted (names, coef): float64 [k]."""
    coef = np.asarray(coef, dtype=np.float64)
    return sigmoid(coef[0] + select(table, names) @ coef[1:])
