"""Semantic score (Eq. 3), candidate sets, final fusion (Eq. 9) and the reported confidence."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .precision import ieee_float32


@ieee_float32
def semantic_score(features: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """S_i = logit_scale * cos(v_i, t): features [N,D], text [D] -> [N]."""
    return logit_scale * (F.normalize(features, dim=-1) @ F.normalize(text, dim=-1))


def top_k(scores: torch.Tensor, k: int) -> np.ndarray:
    """Indices of the k largest scores, largest first (torch.topk order). k is clamped to N per call."""
    k = min(k, scores.numel())
    return torch.topk(scores, k).indices.cpu().numpy().astype(np.int64)


def final_score(P: np.ndarray, G: np.ndarray, alpha: float) -> np.ndarray:
    """F_i = (1 - alpha) * P_i + alpha * G_i over the candidates (raw G, as the reference code)."""
    return ((1 - alpha) * P + alpha * G).astype(np.float32)


def confidence(F_: np.ndarray, temperature: float) -> np.ndarray:
    """Each candidate's share of softmax(F / temperature) over the candidate set, in [0, 1].

    The chosen mask's share is the prediction's score: near 1 when the fused evidence clearly
    singles it out, near 1/k1 when the candidates are tied (an uncertain choice).
    """
    z = F_.astype(np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()
