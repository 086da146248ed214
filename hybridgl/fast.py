"""The fast mode: hybrid features in low precision, exact float32 wherever a decision is close.

`prepare` runs the 2N-image hybrid-feature pass under autocast (bfloat16 on CPU, float16 on
GPU) and measures its error on a few probe masks also computed in float32 (where that error is
as large as the distances between masks' features, low precision could decide nothing, and
the features are computed in float32 straight away). The semantic scores S = logit_scale *
cos(v, t) then lie within eps = logit_scale * max ||d_i - d_j|| / 2 (d = v_low - v_exact on unit
vectors, any text) of the exact ones up to a shift that no choice sees (`feature_error`), times
a safety factor since the probes are a sample. `decision_is_safe`
propagates eps through the method (softmax, relation guidance, softmax, Eq. 9) and accepts the
low-precision answer only when no perturbation within eps can change a choice: the candidate
sets I and J, the semantic argmax and the final argmax. Otherwise the view's features are
recomputed in float32 once and the decision is made exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import HybridGLConfig
from .hybrid_features import hybrid_features


def low_precision(device: torch.device) -> str:
    """The autocast dtype of the fast mode: float16 on GPU, bfloat16 elsewhere."""
    return "float16" if device.type == "cuda" else "bfloat16"


def probe_indices(masks: np.ndarray, count: int) -> np.ndarray:
    """`count` masks spread over the range of mask areas (smallest to largest), as the error sample."""
    order = np.argsort(masks.reshape(len(masks), -1).sum(axis=1), kind="stable")
    return np.unique(order[np.linspace(0, len(order) - 1, count).round().astype(np.int64)])


def feature_error(delta: torch.Tensor) -> float:
    """The error that matters for the method's choices, from the probes' errors on unit features [P,D].

    Every choice depends on the semantic scores only through their differences (top-k, argmax
    and softmax ignore a shift common to all masks), and S_i - S_j moves by at most
    logit_scale * ||delta_i - delta_j|| for any text. So the low-precision scores are within
    logit_scale * max ||delta_i - delta_j|| / 2 of the exact ones shifted by a constant: half the
    largest difference between errors, not the largest error (errors shared by all masks cancel).
    """
    if len(delta) < 2:
        return delta.norm(dim=-1).max().item()
    return torch.cdist(delta, delta).max().item() / 2


@torch.no_grad()
def fast_features(clip: nn.Module, image: np.ndarray, masks: np.ndarray, config: HybridGLConfig,
                  device: torch.device) -> tuple[torch.Tensor, float | None]:
    """Hybrid features [N,D] in low precision and their error bound on unit vectors (None: exact).

    The probes are computed in both precisions first. Where the low precision's error reaches
    half the largest distance between the probes' unit features, it cannot tell even those masks
    apart for some text and every decision would fall back: the features are then computed in
    float32 at once (what the fast mode costs over the exact one is the probes' low-precision
    pass). Otherwise the other masks are computed in low precision; the probes keep their exact
    features.
    """
    n = len(masks)
    if n <= config.fast_probes:  # nothing to gain: compute them exactly
        return hybrid_features(clip, image, masks, config, device), None
    low_config = config.replace(dtype=low_precision(device))
    probes = probe_indices(masks, config.fast_probes)
    exact = hybrid_features(clip, image, masks[probes], config, device)
    unit = F.normalize(exact, dim=-1)
    error = feature_error(F.normalize(hybrid_features(clip, image, masks[probes], low_config, device), dim=-1)
                          - unit) * config.fast_safety
    spread = torch.cdist(unit, unit).max().item()
    rest = np.setdiff1d(np.arange(n), probes)
    precise = error >= spread / 2
    features = torch.empty(n, exact.shape[1], dtype=exact.dtype, device=exact.device)
    features[torch.from_numpy(probes).to(exact.device)] = exact
    features[torch.from_numpy(rest).to(exact.device)] = hybrid_features(
        clip, image, masks[rest], config if precise else low_config, device)
    return features, None if precise else error


def _boundary_margin(scores: np.ndarray, k: int) -> float:
    """Gap between the k-th and (k+1)-th largest score (inf when nothing lies beyond the k-th)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    return float(s[k - 1] - s[k]) if len(s) > k else math.inf


def decision_is_safe(explain: dict[str, np.ndarray], eps: float, config: HybridGLConfig) -> bool:
    """True when every choice of a segmentation stays the same for any S, S_neg moved by <= eps.

    p_i = softmax(S)_i moves by a factor within exp(+-2 eps), so R_i (sums of products of two
    such probabilities, or of one) by a factor within exp(+-4 eps); P = softmax(R) then moves by
    a factor within exp(+-2 max|dR|), and F = (1 - alpha) P + alpha G (G is exact) by at most
    (1 - alpha) max(P) (exp(2 max|dR|) - 1) per candidate.
    """
    S = explain["S"]
    if _boundary_margin(S, 1) <= 2 * eps or _boundary_margin(S, int(explain["k1"])) <= 2 * eps:
        return False
    if "S_neg" in explain and _boundary_margin(explain["S_neg"], int(explain["k2"])) <= 2 * eps:
        return False
    F_ = np.sort(np.asarray(explain["F"], dtype=np.float64))[::-1]
    if len(F_) < 2:
        return True
    # exponents capped: beyond exp(700) no gap is safe anyway, and math.expm1 would overflow
    dR = float(np.max(explain["R"])) * math.expm1(min(4 * eps, 700.0))
    dF = (1 - config.alpha) * float(np.max(explain["P"])) * math.expm1(min(2 * dR, 700.0))
    return F_[0] - F_[1] > 2 * dF
