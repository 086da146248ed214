"""The fast mode keeps every choice of the exact mode: the 8 golden cases and a full-size check.

Low-precision features alone change choices (the issue measured 2 of 8 golden cases with
bfloat16); the fast mode must reproduce every golden choice, falling back to float32 where a
decision is within the measured error of a tie.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridgl import HybridGL, HybridGLConfig
from hybridgl.fast import decision_is_safe, feature_error, probe_indices
from hybridgl.hybrid_features import hybrid_features

from test_golden import CASES, EXACT, load_case


@pytest.fixture(scope="module")
def fast_model(tiny_clip_pair):
    return HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu", config=HybridGLConfig(fast=True))


@pytest.fixture(scope="module")
def fast_results(fast_model):
    out = {}
    for name in CASES:
        data, image, parse = load_case(name)
        view = fast_model.prepare(image, proposals=data["masks"])
        low_precision = view.feature_error is not None
        seg = fast_model.segment(view, parse=parse)
        out[name] = (data, view, seg, low_precision)
    return out


@pytest.mark.parametrize("name", CASES)
def test_fast_mode_makes_the_golden_choices(fast_results, name):
    data, view, seg, low_precision = fast_results[name]
    assert low_precision  # prepare really ran in low precision (each case has more masks than probes)
    for key in EXACT:
        np.testing.assert_array_equal(seg.explain[key], data[key], err_msg=f"{name}: {key}")
    np.testing.assert_array_equal(seg.mask, data["masks"][int(data["pred_final"])])
    assert 0.0 <= seg.score <= 1.0


def test_fast_mode_uses_low_precision_where_it_decided(fast_results):
    """Decided on low-precision features: the numbers differ from the exact ones, the choices do not;
    fallen back: the features are the exact ones."""
    kept = [n for n, (_, view, _, _) in fast_results.items() if view.feature_error is not None]
    for name, (data, view, seg, _) in fast_results.items():
        diff = np.abs(seg.explain["hybrid_features"] - data["hybrid_features"]).max()
        if name in kept:
            assert diff > 1e-4, name
        else:
            assert diff <= 1e-4, name
    print(f"decided in low precision: {kept}")


def test_decision_is_safe_propagates_the_error():
    """A clear choice is safe for a small error and not for a large one; near ties never are."""
    explain = {"S": np.array([30.0, 20.0, 19.0, 10.0]), "k1": np.int64(3), "k2": np.int64(3),
               "R": np.array([0.6, 0.3, 0.1]), "P": np.array([0.5, 0.3, 0.2]), "F": np.array([0.9, 0.5, 0.4])}
    cfg = HybridGLConfig()
    assert decision_is_safe(explain, 0.1, cfg)
    assert not decision_is_safe(explain, 5.0, cfg)  # S's 3rd and 4th are 9 apart: 2 * 5 > 9
    assert not decision_is_safe({**explain, "F": np.array([0.9, 0.8999, 0.4])}, 0.1, cfg)
    with_neg = {**explain, "S_neg": np.array([1.0, 1.0, 1.0, 0.99])}
    assert not decision_is_safe(with_neg, 0.1, cfg)  # J's boundary is a tie
    # the bound on F: 2 (1 - alpha) max(P) (exp(2 max(R) (exp(4 eps) - 1)) - 1)
    eps = 0.01
    dF = (1 - cfg.alpha) * 0.5 * math.expm1(2 * 0.6 * math.expm1(4 * eps))
    assert decision_is_safe({**explain, "F": np.array([0.5 + 2 * dF + 1e-9, 0.5, 0.1])}, eps, cfg)
    assert not decision_is_safe({**explain, "F": np.array([0.5 + 2 * dF - 1e-9, 0.5, 0.1])}, eps, cfg)


def test_a_large_error_is_unsafe_not_an_overflow():
    explain = {"S": np.array([900.0, 0.0]), "k1": np.int64(1), "k2": np.int64(1),
               "R": np.array([1.0]), "P": np.array([1.0]), "F": np.array([0.9])}
    assert decision_is_safe(explain, 200.0, HybridGLConfig())  # one candidate: nothing to flip
    explain.update(S=np.array([900.0, 0.0, -900.0]), k1=np.int64(2), R=np.array([1.0, 0.5]),
                   P=np.array([0.6, 0.4]), F=np.array([0.9, 0.1]))
    assert not decision_is_safe(explain, 200.0, HybridGLConfig())


def test_probes_span_the_mask_areas():
    masks = np.zeros((5, 10, 10), bool)
    for i, area in enumerate([30, 5, 80, 50, 10]):
        masks[i].flat[:area] = True
    assert probe_indices(masks, 2).tolist() == [1, 2]  # smallest and largest
    assert sorted(probe_indices(masks, 3).tolist()) == [0, 1, 2]  # areas 5, 30, 80


def test_fast_mode_goes_float32_at_once_where_low_precision_tells_no_mask_apart(fast_model):
    """Masks whose features differ by less than the low precision's error (here: one mask and
    copies of it one pixel apart): every decision would fall back, so prepare computes float32
    features straight away; the result equals the exact features."""
    data, image, _ = load_case(CASES[0])
    base = data["masks"][0]
    masks = np.repeat(base[None], 5, axis=0)
    ys, xs = np.nonzero(base)
    for i in range(1, 5):
        masks[i, ys[i], xs[i]] = False
    view = fast_model.prepare(image, proposals=masks)
    assert view.feature_error is None
    exact = hybrid_features(fast_model.clip, view.image, masks, fast_model.config.replace(fast=False))
    np.testing.assert_allclose(view.features.numpy(), exact.numpy(), rtol=0, atol=1e-5)


def test_feature_error_ignores_what_all_masks_share():
    """Choices see only differences of scores: an error common to every mask costs nothing, and
    the bound is half the largest difference between the masks' errors (never above the largest error)."""
    common = torch.tensor([[0.3, 0.0, 0.0]] * 3)
    assert feature_error(common) == 0.0
    apart = torch.tensor([[0.1, 0.0, 0.0], [-0.1, 0.0, 0.0], [0.0, 0.05, 0.0]])
    assert feature_error(apart) == pytest.approx(0.1)
    assert feature_error(apart[:1]) == pytest.approx(0.1)  # one probe: no difference to measure
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        delta = torch.randn(4, 8, generator=gen) * 0.01 + torch.randn(1, 8, generator=gen)
        assert feature_error(delta) <= delta.norm(dim=-1).max().item() + 1e-6
        # the scores' errors minus their midpoint stay within logit_scale * feature_error, for any text
        text = F.normalize(torch.randn(8, generator=gen), dim=0)
        dS = 100.0 * delta @ text
        assert (dS - (dS.max() + dS.min()) / 2).abs().max().item() <= 100.0 * feature_error(delta) + 1e-4
