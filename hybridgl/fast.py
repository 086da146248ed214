"""The fast mode: hybrid features in low precision, exact float32 wherever a decision is close.

`prepare` runs the 2N-image hybrid-feature pass under autocast (`low_precision`: float16 on a
GPU, bfloat16 on a CPU where it measured faster than float32, or the config's `dtype`; none,
float32 at once, on a CPU where bfloat16 is not faster) and measures its error on a few probe masks also computed in
float32 (where that error is as large as the distances between masks' features, low precision
could decide nothing, and the features are computed in float32 straight away). `LowPrecision`
keeps what is known: which rows are still low precision, the error bounds measured on the probes
(times a safety factor, since the probes are a sample) and the probes' exact features.

A semantic score S_i = logit_scale * cos(v_i, t) then lies within `LowPrecision.score_bounds` of
the exact one, for any text, up to a shift common to every mask that no choice sees. `contested`
propagates these bounds through the method (softmax, relation guidance, softmax, Eq. 9) and
names the masks whose error could change a choice (the candidate sets I and J, the semantic and
the final argmax). `segment` computes exactly those masks' features in float32, decides again,
and only where that is not enough computes every remaining mask exactly.

A float32 feature is the exact mode's only when computed in the exact mode's own pass (the same
batch of `feature_batch_size` masks): another batch rounds its last bits differently, and where
masks tie (duplicate proposals) those bits decide. So every float32 row that enters a decision
comes from `hybrid_feature_rows` (whole passes of the prepared view's masks); the probes' float32
features, computed in a pass of their own, only measure the error.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import HybridGLConfig
from .hybrid_features import hybrid_feature_rows, hybrid_features
from .kernels import linear
from .precision import ieee_float32


# bfloat16 is used on a CPU only where it measured at least this much faster than float32
BFLOAT16_GAIN = 1.3


@torch.no_grad()
def bfloat16_speedup(repeats: int = 5) -> float:
    """float32 time / bfloat16 autocast time of a linear layer shaped like one of CLIP ViT-B/16's
    (a pass of 2 masks' 197 tokens, 768 -> 768) on this CPU: the best of `repeats` each, ~50 ms.

    Measured, not read from the CPU's feature flags, because the flags do not predict it: with
    AMX bfloat16 is 2-3x faster for CLIP's hybrid-feature pass; an AVX2 CPU emulates it (4.8x
    slower, an AVX2 EPYC); AVX512-BF16 was 1.65x slower on a Xeon without AMX; on an AMD EPYC
    with AVX-512 (Zen 5), torch 2.14, 1.8x faster than float32 on oneDNN (this layer; the
    hybrid-feature pass 1.9x), 3.5-4x faster than float32 on MKL.
    """
    import time

    layer = nn.Linear(768, 768)
    x = torch.randn(2 * 197, 768)
    times = {}
    for low in (False, True):
        # float32 as the exact mode computes it (hybridgl.kernels: oneDNN, 2x MKL on an AMD EPYC)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            linear(layer, x)  # the first call selects and caches the kernels
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                linear(layer, x)
                best = min(best, time.perf_counter() - start)
        times[low] = best
    return times[False] / max(times[True], 1e-9)


def low_precision(config: HybridGLConfig, device: torch.device, cpu_speedup: float | None = None) -> str | None:
    """The fast mode's autocast dtype: `config.dtype` where it names a low one (the user's choice),
    else float16 on a GPU, bfloat16 on a CPU where it measured at least BFLOAT16_GAIN times faster
    than float32 (`cpu_speedup`, from `bfloat16_speedup`); None where no low precision is faster:
    the features are then float32 at once."""
    if config.dtype != "float32":
        return config.dtype
    if device.type == "cuda":
        return "float16"
    if device.type == "cpu" and (cpu_speedup is None or cpu_speedup < BFLOAT16_GAIN):
        return None
    return "bfloat16"


def exact_config(config: HybridGLConfig) -> HybridGLConfig:
    """The config of the fast mode's float32 passes (its `dtype` names the low precision)."""
    return config.replace(dtype="float32")


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


@dataclass
class LowPrecision:
    """What the fast mode knows about a view's low-precision features (N masks).

    low: bool [N], rows still in low precision; spread: the bound between low rows (half the
    largest difference between the probes' errors on unit features, times the safety factor);
    size: the bound of one low row against an exact one (the largest probe error, times the
    safety factor). source, origin: the masks whose passes define the exact features and each
    row's index among them; None for a prepared view (its own masks, in order), set for a
    `PreparedView.subset`, whose exact rows are its parent's (the exact mode copies them).
    """

    low: np.ndarray
    spread: float
    size: float
    decided: bool = False  # the view's first expression has been answered (`FastHistory.record`)
    source: np.ndarray | None = field(default=None, repr=False)
    origin: np.ndarray | None = None

    def score_bounds(self, logit_scale: float) -> np.ndarray:
        """e [N]: |S_low_i - S_i - c| <= e_i for every mask and any text, for one shift c.

        Among low rows alone the shared part of the errors cancels (c absorbs it), so `spread`
        bounds them; once some rows are exact (c = 0) a low row's whole error counts (`size`).
        """
        if self.low.all():
            return np.full(len(self.low), logit_scale * self.spread)
        return np.where(self.low, logit_scale * self.size, 0.0)

    def subset(self, idx: np.ndarray, masks: np.ndarray) -> "LowPrecision":
        """The rows `idx` of a view whose masks are `masks`."""
        return LowPrecision(self.low[idx].copy(), self.spread, self.size,
                            source=masks if self.source is None else self.source,
                            origin=np.asarray(idx, np.int64) if self.origin is None else self.origin[idx])

    def exact_rows(self, clip: nn.Module, image: np.ndarray, masks: np.ndarray, rows: np.ndarray,
                   config: HybridGLConfig, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        """Float32 features of `rows` of the view (masks: its masks) as the exact mode has them, bit
        for bit, with those of every other low row computed in the same passes: (row indices, [R,D])."""
        config = exact_config(config)
        if self.source is None:
            return hybrid_feature_rows(clip, image, masks, rows, config, device)
        done, features = hybrid_feature_rows(clip, image, self.source, self.origin[rows], config, device)
        hit = np.flatnonzero(np.isin(self.origin, done))
        pick = torch.from_numpy(np.searchsorted(done, self.origin[hit])).to(features.device)
        return hit, features[pick]


# A low-precision pass counts as wasted when the image's first expression still needed float32
# features for this share of its masks; after `fast_patience` wasted images in a row the fast mode
# computes float32 at once, and tries low precision again every REPROBE_EVERY-th image.
WASTED = 0.9
REPROBE_EVERY = 8


class FastHistory:
    """Whether the low-precision pass has been paying off on a model's recent images (thread-safe).

    The fast mode cannot know before the first expression whether low precision will tell the
    masks apart: on weights or images where it never does (every decision a near tie, as with
    random weights), its pass costs ~40 % of a float32 one on top of the float32 one. After
    `patience` such images in a row, prepare computes float32 features at once (what the exact
    mode costs) and measures again every REPROBE_EVERY-th image. patience 0: never skip.
    Only speed depends on this history; every answer is the exact mode's either way.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self._wasted = 0
        self._skipped = 0
        self._lock = threading.Lock()

    def skip_low_precision(self) -> bool:
        with self._lock:
            if not self.patience or self._wasted < self.patience:
                return False
            self._skipped += 1
            if self._skipped >= REPROBE_EVERY:
                self._skipped = 0
                return False
            return True

    def record(self, share_exact: float) -> None:
        """The share of an image's masks in float32 once its first expression was answered."""
        with self._lock:
            self._wasted = self._wasted + 1 if share_exact >= WASTED else 0


@torch.no_grad()
@ieee_float32
def fast_features(clip: nn.Module, image: np.ndarray, masks: np.ndarray, config: HybridGLConfig,
                  device: torch.device, dtype: str | None) -> tuple[torch.Tensor, LowPrecision | None]:
    """Hybrid features [N,D] in low precision `dtype` and what is known of their error (None: exact).

    The probes are computed in both precisions first. Where the low precision's error reaches
    half the largest distance between the probes' unit features, it cannot tell even those masks
    apart for some text and every decision would fall back: the features are then computed in
    float32 at once, in the exact mode's passes (what the fast mode costs over the exact one is
    the probes' two passes). Otherwise every mask's feature is the low-precision one (the probes'
    too, so that one bound holds for all rows); the probes' float32 features, from a pass of
    their own, are not the exact mode's to the last bit and serve the measurement only.
    """
    n = len(masks)
    config = exact_config(config)
    if n <= config.fast_probes or dtype is None:  # nothing to gain: compute them exactly
        return hybrid_features(clip, image, masks, config, device), None
    low_config = config.replace(dtype=dtype)
    probes = probe_indices(masks, config.fast_probes)
    exact = hybrid_features(clip, image, masks[probes], config, device)
    low = hybrid_features(clip, image, masks[probes], low_config, device)
    unit = F.normalize(exact, dim=-1)
    delta = F.normalize(low, dim=-1) - unit
    spread = feature_error(delta) * config.fast_safety
    size = delta.norm(dim=-1).max().item() * config.fast_safety
    if not (math.isfinite(spread) and math.isfinite(size)) or spread >= torch.cdist(unit, unit).max().item() / 2:
        return hybrid_features(clip, image, masks, config, device), None  # (an overflow measures nothing)
    rest = np.setdiff1d(np.arange(n), probes)
    features = torch.empty(n, exact.shape[1], dtype=exact.dtype, device=exact.device)
    features[torch.from_numpy(probes).to(exact.device)] = low
    features[torch.from_numpy(rest).to(exact.device)] = hybrid_features(clip, image, masks[rest], low_config, device)
    return features, LowPrecision(np.ones(n, bool), spread, size)


def prepare_features(clip: nn.Module, image: np.ndarray, masks: np.ndarray, config: HybridGLConfig,
                     device: torch.device, history: FastHistory, dtype: str | None
                     ) -> tuple[torch.Tensor, LowPrecision | None]:
    """The fast mode's hybrid features of one image: float32 at once where no low precision is
    faster (`dtype` None, see `low_precision`) or `history` says it has not been paying off, else
    `fast_features` (an image whose probes alone show that low precision cannot tell masks apart
    counts as wasted)."""
    if dtype is None or history.skip_low_precision():
        return hybrid_features(clip, image, masks, exact_config(config), device), None
    features, low = fast_features(clip, image, masks, config, device, dtype)
    if low is None and len(masks) > config.fast_probes:
        history.record(1.0)
    return features, low


F_ROUNDING = 8 * float(np.finfo(np.float32).eps)  # a float32 final score's rounding, relative to the largest


def _top_k_contested(S: np.ndarray, e: np.ndarray, k: int) -> np.ndarray:
    """Masks whose error could move them across the boundary of the k largest S (empty: sure)."""
    if k >= len(S):
        return np.zeros(0, np.int64)
    order = np.argsort(-S, kind="stable")
    top, rest = order[:k], order[k:]
    floor, ceiling = (S[top] - e[top]).min(), (S[rest] + e[rest]).max()
    if floor > ceiling:
        return np.zeros(0, np.int64)
    return np.concatenate([top[S[top] - e[top] <= ceiling], rest[S[rest] + e[rest] >= floor]])


def _log_sum_exp_shift(p: np.ndarray, e: np.ndarray) -> float:
    """A bound on |LSE(S + d) - LSE(S)| over |d_j| <= e_j, from the low-precision softmax p of S.

    The shift is log sum_j p*_j exp(d_j) (p* the exact softmax), at most log(1 + sum_j p*_j
    (exp(e_j) - 1)) either way, with p*_j <= p_j exp(e_j + max e); and never more than max e.
    Masks whose probability is small (the usual low-precision rows once candidates are exact)
    move it little.
    """
    e_max = float(e.max())
    grow = np.exp(np.minimum(e + e_max, 700.0)) * np.expm1(np.minimum(e, 700.0))
    return min(e_max, math.log1p(float(np.sum(np.asarray(p, np.float64) * grow))))


def contested(explain: dict[str, np.ndarray], e: np.ndarray, config: HybridGLConfig) -> np.ndarray:
    """Masks whose score error could change a choice of a segmentation (empty: every choice is sure).

    e [N]: each mask's bound on |S_low - S - c| (`LowPrecision.score_bounds`), for S and S_neg
    alike. The choices: the semantic argmax, the candidates I (top k1 of S) and partners J (top k2
    of S_neg), and the final argmax of F = (1 - alpha) P + alpha G over I (G is exact). log p_i
    moves by at most a_i = e_i + the normaliser's shift, R_i (sums of products of p_i and a
    partner's probability, or of p_i alone) by a factor within exp(+-(a_i + max_J a')), P =
    softmax(R) by a factor within exp(+-2 max|dR|), so F_i by at most (1 - alpha) P_i (exp(2
    max|dR|) - 1), plus its float32 rounding (F_ROUNDING). Where F's argmax is not sure, the
    candidates that could still win and the partners J are named.
    """
    e = np.asarray(e, dtype=np.float64)
    S = np.asarray(explain["S"], dtype=np.float64)
    S_neg = np.asarray(explain["S_neg"], np.float64) if "S_neg" in explain else None
    # a low-precision overflow (inf or NaN features: float16 on a GPU) or an unknown bound: every
    # comparison below would be False and call the choice sure; those masks are disputed first
    broken = ~np.isfinite(S) | ~np.isfinite(e) | (~np.isfinite(S_neg) if S_neg is not None else False)
    if broken.any():
        return np.flatnonzero(broken).astype(np.int64)
    parts = [_top_k_contested(S, e, 1), _top_k_contested(S, e, int(explain["k1"]))]
    if S_neg is not None:
        parts.append(_top_k_contested(S_neg, e, int(explain["k2"])))
    F_ = np.asarray(explain["F"], dtype=np.float64)
    if len(F_) > 1:
        I, J = np.asarray(explain["topk_I"]), np.asarray(explain["J_used"])
        a = e + _log_sum_exp_shift(explain["p"], e)
        a_partner = e + _log_sum_exp_shift(explain["q"], e) if "q" in explain else a
        b = np.minimum(a[I] + a_partner[J].max(), 700.0)
        dR = float(np.max(np.asarray(explain["R"], np.float64) * np.expm1(b)))
        dF = (1 - config.alpha) * np.asarray(explain["P"], np.float64) * math.expm1(min(2 * dR, 700.0))
        # F is float32 in both modes, from softmaxes whose normalisers sum different rows: their last
        # bits may differ even where the bound above is ~0 (the low rows have almost no probability)
        dF += F_ROUNDING * float(np.abs(F_).max())
        top = int(np.argsort(-F_, kind="stable")[0])
        rivals = np.delete(F_ + dF, top)
        if F_[top] - dF[top] <= rivals.max():
            parts += [I[F_ + dF >= F_[top] - dF[top]], J]
    return np.unique(np.concatenate(parts)).astype(np.int64)


def decision_is_safe(explain: dict[str, np.ndarray], eps: float | np.ndarray, config: HybridGLConfig) -> bool:
    """True when no score error within eps (one bound, or one per mask) can change a choice."""
    return not len(contested(explain, np.broadcast_to(eps, np.shape(explain["S"])), config))
