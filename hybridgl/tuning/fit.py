"""Logistic calibration of the score: P(IoU >= 0.5 | candidate features), fitted by Newton's method.

Features are standardised for the fit (with a small L2 penalty, so separable or tiny data still
give finite coefficients) and the scaling folded back, so the stored coefficients apply to the
raw features of hybridgl/calibration.py. Constant features are left out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import calibration


@dataclass(frozen=True)
class Calibration:
    features: tuple[str, ...]
    coef: tuple[float, ...]  # intercept first

    def __call__(self, table: np.ndarray) -> np.ndarray:
        """P(good) of candidate_features rows [n, len(FEATURES)] -> [n]."""
        return calibration.probability(table, self.features, self.coef)

    def to_config(self) -> dict:
        return {"calibration_features": list(self.features), "calibration_coef": list(self.coef)}


def fit_logistic(table: np.ndarray, good: np.ndarray, names=tuple(calibration.FEATURES), l2: float = 1.0,
                 iterations: int = 50) -> Calibration:
    """table: candidate_features rows [n, len(FEATURES)]; good: bool [n]."""
    y = np.asarray(good, dtype=np.float64)
    X_all = calibration.select(np.asarray(table, dtype=np.float64), names)
    keep = [j for j in range(X_all.shape[1]) if np.ptp(X_all[:, j]) > 1e-12]
    names = tuple(names[j] for j in keep)
    X = X_all[:, keep]
    mean, std = X.mean(axis=0), X.std(axis=0)
    Z = np.hstack([np.ones((len(y), 1)), (X - mean) / np.where(std > 0, std, 1)])
    w = np.zeros(Z.shape[1])
    penalty = np.full(Z.shape[1], l2)
    penalty[0] = 1e-6  # the intercept is (almost) free
    for _ in range(iterations):
        prob = calibration.sigmoid(Z @ w)
        grad = Z.T @ (prob - y) + penalty * w
        hess = (Z * (prob * (1 - prob))[:, None]).T @ Z + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    scale = np.where(std > 0, std, 1)
    coef = np.concatenate([[w[0] - np.sum(w[1:] * mean / scale)], w[1:] / scale])
    return Calibration(names, tuple(float(c) for c in coef))
