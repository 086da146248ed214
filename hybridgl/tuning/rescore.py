"""The pipeline's choice for any configuration of the searched parameters, from cached candidates.

`choose` runs the text- and config-dependent half of `HybridGL.segment` (Eq. 3-5, 8-9 and the
score) with the same functions on the cached intermediates, so for the same config it picks the
same proposal with the same scores (tests/test_tuning.py checks it against the pipeline).
Intermediates shared by many configurations are memoised per expression.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import calibration, guidance, scoring
from ..config import HybridGLConfig
from .candidates import ExpressionCandidates, ImageCandidates, prior_kind


@dataclass
class Choice:
    """index: the chosen proposal (None without proposals); candidates: I [k1] in p order;
    F: fused scores [k1]; shares: raw scores [k1]; order: candidates by F, best first;
    semantic: p over all proposals [N] (float64); relation, direction: what guided the choice."""

    index: int | None
    candidates: np.ndarray
    F: np.ndarray
    shares: np.ndarray
    order: np.ndarray
    semantic: np.ndarray
    relation: str
    direction: str

    @property
    def score(self) -> float:
        return float(self.shares[self.order[0]]) if self.index is not None else 0.0

    def features(self, image: ImageCandidates) -> np.ndarray:
        """calibration.candidate_features of the k1 candidates, in candidate (p) order."""
        I = self.candidates
        return calibration.candidate_features(self.F, self.shares, self.semantic[I], image.quality[I],
                                              image.area[I], self.relation, self.direction)

    def chosen_features(self, image: ImageCandidates) -> np.ndarray:
        """The chosen candidate's features [len(FEATURES)]."""
        return self.features(image)[self.order[0]]


def _memo(expr: ExpressionCandidates, key: tuple, make):
    memo = expr.__dict__.setdefault("_memo", {})
    if key not in memo:
        memo[key] = make()
    return memo[key]


def choose(image: ImageCandidates, expr: ExpressionCandidates, cfg: HybridGLConfig) -> Choice:
    parse = expr.parse
    relation = parse.relation if cfg.use_relation else "none"
    direction = parse.direction if cfg.use_position_prior else "none"
    if len(image) == 0:
        empty = np.zeros(0)
        return Choice(None, empty.astype(np.int64), empty, empty, empty.astype(np.int64), empty, relation, direction)
    w = cfg.sentence_weight

    def semantic():
        feats = torch.from_numpy(image.features)
        mixed = w * torch.from_numpy(expr.sentence) + (1 - w) * torch.from_numpy(expr.noun_phrase)
        p = scoring.semantic_score(feats, mixed, expr.logit_scale).softmax(dim=0)
        q = None
        if expr.neg is not None:
            q = scoring.semantic_score(feats, torch.from_numpy(expr.neg), expr.logit_scale).softmax(dim=0)
        return p, q, p.double().numpy()

    p, q, p_np = _memo(expr, ("p", w), semantic)

    def relation_probs():
        I = scoring.top_k(p, cfg.k1)
        J = scoring.top_k(q, cfg.k2) if q is not None else I
        partner = q.double().numpy() if q is not None else p_np
        R = guidance.relation_guidance(image.boxes, p_np, I, J, partner, relation)
        return I, torch.from_numpy(R).softmax(dim=0).numpy().astype(np.float32)

    I, P = _memo(expr, ("P", w, cfg.k1, cfg.k2 if q is not None else 0, relation), relation_probs)
    black = guidance.black_level(relation, cfg)
    kind = prior_kind(parse.direction, cfg.use_position_prior, cfg.vertical_prior)

    def guidance_scores():
        m_in, m_out = expr.means[(cfg.use_coherence, kind)]
        return guidance.guidance_from_means(torch.from_numpy(m_in), torch.from_numpy(m_out), black).numpy()

    G = _memo(expr, ("G", cfg.use_coherence, kind, black), guidance_scores)
    F_ = scoring.final_score(P, G[I], cfg.alpha)
    order = np.argsort(-F_, kind="stable")
    shares = scoring.confidence(F_, cfg.score_temperature)
    return Choice(int(I[order[0]]), I, F_, shares, order, p_np, relation, direction)
