"""The fast mode keeps every choice of the exact mode: the 8 golden cases and a full-size check.

Low-precision features alone change choices (the issue measured 2 of 8 golden cases with
bfloat16); the fast mode must reproduce every golden choice, computing float32 features for the
masks of any decision that lies within the measured error of a tie.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridgl import HybridGL, HybridGLConfig
from hybridgl.fast import REPROBE_EVERY, FastHistory, LowPrecision, contested, decision_is_safe, feature_error, probe_indices
from hybridgl.hybrid_features import Resampler, hybrid_features
from hybridgl.pipeline import PreparedView
from hybridgl.proposals import Proposals

from golden_cases import CASES, EXACT, load_case


@pytest.fixture(scope="module")
def fast_model(tiny_clip_pair):
    # fast_patience=0: every image takes the low-precision path (the tiny CLIP's goldens all end in
    # float32, which would otherwise make the model skip it after two of them); dtype: bfloat16 on
    # any CPU (the fast mode picks it itself only where the CPU computes it natively), while the
    # features that decide stay float32
    return HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu",
                    config=HybridGLConfig(fast=True, fast_patience=0, dtype="bfloat16"))


@pytest.fixture(scope="module")
def fast_results(fast_model):
    out = {}
    for name in CASES:
        data, image, parse = load_case(name)
        view = fast_model.prepare(image, proposals=data["masks"])
        low_precision = view.low_precision is not None
        seg = fast_model.segment(view, parse=parse)
        out[name] = (data, view, seg, low_precision)
    return out


@pytest.mark.parametrize("name", CASES)
def test_fast_mode_makes_the_golden_choices(fast_results, name):
    data, view, seg, low_precision = fast_results[name]
    assert low_precision  # prepare really ran in low precision (each case has more masks than probes)
    # and measured an error: float32 against bfloat16, not bfloat16 against itself (the fast mode's
    # float32 passes once took the config's dtype, which names its low precision: every near tie sure)
    assert view.low_precision is None or view.low_precision.spread > 0
    for key in EXACT:
        np.testing.assert_array_equal(seg.explain[key], data[key], err_msg=f"{name}: {key}")
    np.testing.assert_array_equal(seg.mask, data["masks"][int(data["pred_final"])])
    assert 0.0 <= seg.score <= 1.0


def test_fast_mode_uses_low_precision_where_it_decided(fast_results):
    """Decided on low-precision features: the numbers differ from the exact ones, the choices do not;
    fallen back: the features are the exact ones."""
    kept = [n for n, (_, view, _, _) in fast_results.items() if view.low_precision is not None]
    for name, (data, view, seg, _) in fast_results.items():
        diff = np.abs(seg.explain["hybrid_features"] - data["hybrid_features"]).max()
        if name in kept:
            assert diff > 1e-4, name
        else:
            assert diff <= 1e-4, name
    print(f"decided in low precision: {kept}")


def _explain(S, F_, P, R, k1, p=None, **extra):
    """A segmentation's explain dict with the entries `contested` reads (I = top k1 of S, J = I)."""
    S = np.asarray(S, dtype=np.float64)
    I = np.argsort(-S, kind="stable")[:k1]
    p = np.exp(S - S.max()) / np.exp(S - S.max()).sum() if p is None else np.asarray(p)
    return {"S": S, "p": p, "k1": np.int64(k1), "k2": np.int64(k1), "topk_I": I, "J_used": I,
            "R": np.asarray(R, np.float64), "P": np.asarray(P, np.float64), "F": np.asarray(F_, np.float64), **extra}


def _tie_case(kind: str):
    """Masks whose features tie in all but their last bits, and an expression that ranks them
    first: (image, masks, expression).

    duplicates: a 2x2 mask and the whole image twice. twin: the masks of a golden case and a copy
    of one of them one row shorter, at a row that neither resize (to the CLIP input, to the token
    grid) reads, so both give CLIP the same inputs but they are different masks (a different G).
    """
    if kind == "duplicates":
        _, image, _ = load_case("p00_cup_left_of_plate")
        rgb = np.asarray(image.convert("RGB"))
        masks = np.ones((3, *rgb.shape[:2]), bool)
        masks[0] = False
        masks[0, 10:12, 10:12] = True
        return rgb, masks, "smallest one"
    data, image, _ = load_case("p01_red_ball")
    rgb, masks = np.asarray(image.convert("RGB")), data["masks"]
    h, w = rgb.shape[:2]
    read = set(Resampler(h, w, 224).rows.tolist()) | set(Resampler(h, w, 14).rows.tolist())
    free = [r for r in np.flatnonzero(masks[2].any(axis=1)) if r not in read]
    twin = masks[2].copy()
    twin[free[len(free) // 2]] = False
    return rgb, np.concatenate([masks, twin[None]]), "person to the right of the car"


@pytest.mark.parametrize("kind", ["duplicates", "twin"])
def test_fast_mode_breaks_ties_as_the_exact_mode(fast_model, kind):
    """Masks that tie up to float32 rounding: the exact mode's choice between them turns on the
    last bits of their features, and those depend on the pass that computed them (batch size,
    place in the batch). The fast mode computed its float32 rows in other passes (the probes in
    one of their own, the disputed masks together) and counted them as error-free, so it chose
    the other mask of the tie: with the twin, a different mask (exact 2, fast 8). Its float32
    rows now come from the exact mode's passes: the same bits, the same choices."""
    image, masks, expression = _tie_case(kind)
    exact_model = HybridGL(fast_model.clip, fast_model.tokenizer, sam=None, parser="rules",
                           config=fast_model.config.replace(fast=False, dtype="float32"))
    exact_view = exact_model.prepare(image, proposals=masks)
    expected = exact_model.segment(exact_view, expression)
    view = fast_model.prepare(image, proposals=masks)
    assert view.low_precision is not None
    seg = fast_model.segment(view, expression)
    assert seg.index == expected.index and seg.hybrid_index == expected.hybrid_index
    for key in EXACT:
        np.testing.assert_array_equal(seg.explain[key], expected.explain[key], err_msg=key)
    exact_rows = np.arange(len(masks)) if view.low_precision is None else np.flatnonzero(~view.low_precision.low)
    np.testing.assert_array_equal(view.features[exact_rows].numpy(), exact_view.features[exact_rows].numpy())


def test_a_subset_of_a_fast_view_has_its_parents_exact_rows(fast_model):
    """The exact mode's `subset` copies its parent's rows; a fast view's subset computes its
    float32 rows in the parent's passes (its own would round them otherwise, and break the tie
    of the twin case the other way)."""
    image, masks, expression = _tie_case("twin")
    exact_model = HybridGL(fast_model.clip, fast_model.tokenizer, sam=None, parser="rules",
                           config=fast_model.config.replace(fast=False, dtype="float32"))
    exact_view = exact_model.prepare(image, proposals=masks)
    view = fast_model.prepare(image, proposals=masks)
    for allowed in ([1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 7, 8]):
        expected = exact_model.segment(exact_view.subset(allowed), expression)
        part = view.subset(allowed)
        assert part.low_precision is not None
        seg = fast_model.segment(part, expression)
        for key in EXACT:
            np.testing.assert_array_equal(seg.explain[key], expected.explain[key], err_msg=f"{allowed}: {key}")
        rows = np.arange(len(allowed)) if part.low_precision is None else np.flatnonzero(~part.low_precision.low)
        np.testing.assert_array_equal(part.features[rows].numpy(), exact_view.features[np.asarray(allowed)[rows]].numpy())
    assert view.low_precision is not None and view.low_precision.low.all()  # the parent is left as it was


@pytest.mark.parametrize("where", ["rest", "probe"])
def test_an_overflow_in_low_precision_falls_back(fast_model, monkeypatch, where):
    """float16 (the fast mode on a GPU) overflows where float32 does not: a mask's feature becomes
    inf or NaN. Every comparison with NaN is False, so `contested` called such a decision sure and
    the answer came from NaN scores. A mask's broken row is disputed (made exact) first; broken
    probes measure no error, and prepare computes float32 at once."""
    import hybridgl.fast as fast

    data, image, parse = load_case(CASES[1])
    masks = data["masks"]
    probes = probe_indices(masks, fast_model.config.fast_probes)
    victim = masks[int(probes[0]) if where == "probe" else int(np.setdiff1d(np.arange(len(masks)), probes)[0])]

    def overflowing(clip, image, masks, config, device="cpu", debug=None):
        out = hybrid_features(clip, image, masks, config, device)
        if config.dtype != "float32":
            out[[i for i, m in enumerate(masks) if np.array_equal(m, victim)]] = float("inf")
        return out

    monkeypatch.setattr(fast, "hybrid_features", overflowing)
    view = fast_model.prepare(image, proposals=masks)
    assert (view.low_precision is None) == (where == "probe")
    seg = fast_model.segment(view, parse=parse)
    for key in EXACT:
        np.testing.assert_array_equal(seg.explain[key], data[key], err_msg=key)
    assert np.isfinite(view.features.numpy()).all()


def test_contested_disputes_masks_whose_scores_or_bounds_are_not_finite():
    cfg = HybridGLConfig()
    explain = _explain([30.0, 20.0, 19.0, 10.0], F_=[0.9, 0.5, 0.4], P=[0.5, 0.3, 0.2], R=[0.6, 0.3, 0.1], k1=3)
    assert contested(explain, np.full(4, 0.1), cfg).tolist() == []
    assert contested({**explain, "S": np.array([30.0, 20.0, 19.0, np.inf])}, np.full(4, 0.1), cfg).tolist() == [3]
    assert contested({**explain, "S_neg": np.array([1.0, np.nan, 0.0, 0.0]), "q": np.full(4, 0.25)},
                     np.full(4, 0.1), cfg).tolist() == [1]
    assert contested(explain, np.full(4, np.nan), cfg).tolist() == [0, 1, 2, 3]


def test_decision_is_safe_propagates_the_error():
    """A clear choice is safe for a small error and not for a large one; near ties never are."""
    explain = _explain([30.0, 20.0, 19.0, 10.0], F_=[0.9, 0.5, 0.4], P=[0.5, 0.3, 0.2], R=[0.6, 0.3, 0.1], k1=3)
    cfg = HybridGLConfig()
    assert decision_is_safe(explain, 0.1, cfg)
    assert not decision_is_safe(explain, 5.0, cfg)  # S's 3rd and 4th are 9 apart: 2 * 5 > 9
    assert not decision_is_safe({**explain, "F": np.array([0.9, 0.8999, 0.4])}, 0.1, cfg)
    with_neg = {**explain, "S_neg": np.array([1.0, 1.0, 1.0, 0.99]), "q": np.full(4, 0.25)}
    assert not decision_is_safe(with_neg, 0.1, cfg)  # J's boundary is a tie
    # one bound eps for every mask: log p moves by 2 eps, R by a factor exp(4 eps), P by exp(2 max dR),
    # F_i by (1 - alpha) P_i (exp(2 max(R) (exp(4 eps) - 1)) - 1): the top's and the runner-up's together
    eps = 0.01
    grow = math.expm1(2 * 0.6 * math.expm1(4 * eps))
    gap = (1 - cfg.alpha) * (0.5 + 0.3) * grow
    # and each F_i by its float32 rounding (8 ulps of the largest F: F is float32 in both modes)
    gap += 2 * 8 * float(np.finfo(np.float32).eps) * (0.5 + gap)
    assert decision_is_safe({**explain, "F": np.array([0.5 + gap + 1e-9, 0.5, 0.1])}, eps, cfg)
    assert not decision_is_safe({**explain, "F": np.array([0.5 + gap - 1e-9, 0.5, 0.1])}, eps, cfg)


def test_a_final_tie_within_float32_rounding_is_never_sure():
    """The final scores F are float32 in both modes, computed from softmaxes whose normalisers sum
    different low-precision rows: where the error bound of the rows left in low precision is
    negligible (they have almost no probability), the two modes' F can still differ in their last
    bits. A final margin below that rounding was called sure, and the fast mode could pick the
    other of two candidates one ulp apart."""
    cfg = HybridGLConfig()
    one_ulp = float(np.spacing(np.float32(0.9)))
    explain = _explain([30.0, 25.0, 20.0, -80.0], F_=[0.9 + one_ulp, 0.9, 0.4], P=[0.4, 0.4, 0.2],
                       R=[0.5, 0.4, 0.1], k1=3)
    e = np.array([0.0, 0.0, 0.0, 1e-3])  # the candidates exact; the low row's p is ~e-48
    assert contested(explain, e, cfg).tolist() == [0, 1, 2]
    assert contested({**explain, "F": np.array([0.95, 0.9, 0.4])}, e, cfg).tolist() == []


def test_contested_names_only_the_masks_of_the_close_decision():
    """A near tie at the candidates' boundary (3rd and 4th of S) disputes those two masks only;
    a near tie of the final scores disputes the candidates that could still win (and J)."""
    cfg = HybridGLConfig()
    S = [30.0, 25.0, 20.0, 19.9, 10.0, 5.0]
    explain = _explain(S, F_=[0.9, 0.5, 0.4], P=[0.5, 0.3, 0.2], R=[0.6, 0.3, 0.1], k1=3)
    assert contested(explain, np.full(6, 0.1), cfg).tolist() == [2, 3]
    assert contested(explain, np.full(6, 0.01), cfg).tolist() == []
    e = np.full(6, 0.1)
    e[[2, 3]] = 0.0  # those two made exact: nothing is disputed any more
    assert contested(explain, e, cfg).tolist() == []
    close = {**explain, "F": np.array([0.9, 0.8999, 0.4])}
    assert contested(close, e, cfg).tolist() == [0, 1, 2]  # candidates 0 and 1 (could win), J = I
    # a one-candidate decision has no final tie
    assert contested(_explain(S, F_=[0.9], P=[1.0], R=[0.6], k1=1), np.full(6, 0.1), cfg).tolist() == []


def test_low_precision_masks_of_small_probability_barely_move_the_softmax():
    """Once the candidates are exact, the other masks' error moves p only through the softmax's
    normaliser, weighted by their (small) probabilities: a final gap that the uniform bound
    cannot decide is decided."""
    cfg = HybridGLConfig()
    S = [12.0, 11.9, 11.8, 2.0, 1.0, 0.0]
    F_ = [0.62, 0.6, 0.1]
    explain = _explain(S, F_=F_, P=[0.36, 0.34, 0.3], R=[0.36, 0.33, 0.31], k1=3)
    uniform = np.full(6, 0.05)
    assert not decision_is_safe(explain, uniform, cfg)
    candidates_exact = uniform.copy()
    candidates_exact[:3] = 0.0
    assert decision_is_safe(explain, candidates_exact, cfg)


def test_score_bounds_hold_for_any_text_when_rows_are_mixed():
    """The bound a view uses holds for the true score errors, for random texts: among low rows
    alone up to one shared shift (`spread`), and once some rows are exact for each row on its own
    (`size`): a shift shared by the low rows then counts (the probes' exact rows do not have it)."""
    gen = torch.Generator().manual_seed(0)
    shift_free_would_fail = 0
    for trial in range(20):
        delta = torch.randn(6, 16, generator=gen) * 0.002 + torch.randn(1, 16, generator=gen) * 0.01
        spread, size = feature_error(delta), delta.norm(dim=-1).max().item()
        low = np.ones(6, bool)
        if trial % 2:
            low[[1, 4]] = False
            delta[[1, 4]] = 0.0  # exact rows have no error
        bounds = LowPrecision(low, spread, size).score_bounds(100.0)
        text = F.normalize(torch.randn(16, generator=gen), dim=0)
        dS = (100.0 * delta @ text).numpy().astype(np.float64)
        if low.all():
            dS = dS - (dS.max() + dS.min()) / 2
        assert np.all(np.abs(dS) <= bounds + 1e-6), trial
        shift_free_would_fail += int(not low.all() and np.abs(dS).max() > 100.0 * spread)
    # the shift-free bound alone (what prepare used while the probes kept exact features among
    # low-precision ones) does not hold for mixed views
    assert shift_free_would_fail > 0


@pytest.mark.parametrize("per_pass", [1, 2])
def test_refinement_makes_only_the_disputed_masks_exact(fast_model, per_pass):
    """A view whose low-precision error is small against most gaps of S (a stand-in for real
    weights, where features of different objects lie far apart): `segment` computes float32
    features for the disputed masks only, in the exact mode's passes (`feature_batch_size` masks:
    the disputed masks' pass-mates become exact with them), keeps the others in low precision,
    and answers exactly what the exact mode answers, with the exact mode's features bit for bit."""
    data, image, parse = load_case(CASES[1])
    masks = data["masks"]
    config = fast_model.config.replace(feature_batch_size=per_pass)
    model = HybridGL(fast_model.clip, fast_model.tokenizer, sam=None, parser="rules", config=config)
    exact_model = HybridGL(fast_model.clip, fast_model.tokenizer, sam=None, parser="rules",
                           config=config.replace(fast=False, dtype="float32"))
    exact_view = exact_model.prepare(image, proposals=masks)
    expected = exact_model.segment(exact_view, parse=parse)
    exact = exact_view.features
    # low-precision features: the exact ones moved by a known amount, within the bound given
    gen = torch.Generator().manual_seed(0)
    noise = F.normalize(torch.randn(exact.shape, generator=gen), dim=-1) * exact.norm(dim=-1, keepdim=True) * 1e-4
    S = np.sort(expected.explain["S"])[::-1]
    gaps = np.diff(S)[::-1]  # a bound half the second-smallest gap of S disputes the closest pair only
    spread = float(np.sort(np.abs(gaps))[1]) / 2 / model.logit_scale * 0.99
    props = Proposals.from_masks(masks, *masks.shape[1:])
    view = PreparedView(exact_view.image, props, exact + noise, exact_view.tokens,
                        low_precision=LowPrecision(np.ones(len(masks), bool), spread, 2 * spread))
    before = contested(model._segment(view, parse).explain,
                       view.low_precision.score_bounds(model.logit_scale), model.config)
    assert 0 < len(before) < len(masks)
    seg = model.segment(view, parse=parse)
    for key in EXACT:
        np.testing.assert_array_equal(seg.explain[key], expected.explain[key], err_msg=key)
    assert view.low_precision is not None  # some masks stayed low precision
    made_exact = np.flatnonzero(~view.low_precision.low)
    assert set(before.tolist()) <= set(made_exact.tolist()) and len(made_exact) < len(masks)
    passes = np.unique(made_exact // per_pass)  # whole passes, nothing else
    assert made_exact.tolist() == [i for i in range(len(masks)) if i // per_pass in passes]
    np.testing.assert_array_equal(view.features[made_exact].numpy(), exact[made_exact].numpy())
    kept = np.flatnonzero(view.low_precision.low)
    np.testing.assert_array_equal(view.features[kept].numpy(), (exact + noise)[kept].numpy())


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
    assert view.low_precision is None
    exact = hybrid_features(fast_model.clip, view.image, masks, fast_model.config.replace(fast=False, dtype="float32"))
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


def test_a_fast_view_is_shared_by_threads_and_travels_between_processes(fast_model):
    """Views are cached and shared between requests: concurrent expressions on one fast view all
    get the exact mode's answers while rows are being made exact, and a view pickles (Ray)
    without its lock."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    data, image, parse = load_case(CASES[2])
    view = fast_model.prepare(image, proposals=data["masks"])
    assert view.low_precision is not None
    clone = pickle.loads(pickle.dumps(view))
    assert clone.low_precision is not None and clone.refining is not view.refining
    with ThreadPoolExecutor(4) as pool:
        segs = list(pool.map(lambda _: fast_model.segment(view, parse=parse), range(4)))
    for seg in segs + [fast_model.segment(clone, parse=parse)]:
        for key in EXACT:
            np.testing.assert_array_equal(seg.explain[key], data[key], err_msg=key)


def test_history_skips_low_precision_after_wasted_images_and_tries_again():
    """Two images in a row whose first expression needed float32 for (nearly) every mask: the next
    images skip the low-precision pass, except every REPROBE_EVERY-th; an image where low precision
    paid off resets it; patience 0 never skips."""
    history = FastHistory(2)
    assert not history.skip_low_precision()
    history.record(1.0)
    assert not history.skip_low_precision()
    history.record(0.95)
    pattern = [history.skip_low_precision() for _ in range(2 * REPROBE_EVERY)]
    assert pattern.count(False) == 2 and not pattern[REPROBE_EVERY - 1] and not pattern[-1]
    history.record(0.3)  # the probe image decided mostly in low precision
    assert not history.skip_low_precision()
    never = FastHistory(0)
    never.record(1.0)
    never.record(1.0)
    assert not never.skip_low_precision()


def test_a_fast_model_stops_paying_for_low_precision_that_never_decides(tiny_clip_pair):
    """With the tiny CLIP every golden decision is a near tie at bfloat16's error: after two such
    images the model computes float32 at once (the exact mode's cost, the same answers)."""
    model = HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu",
                     config=HybridGLConfig(fast=True, fast_patience=2, dtype="bfloat16"))
    low = []
    for name in CASES[:4]:
        data, image, parse = load_case(name)
        view = model.prepare(image, proposals=data["masks"])
        low.append(view.low_precision is not None)
        seg = model.segment(view, parse=parse)
        for key in EXACT:
            np.testing.assert_array_equal(seg.explain[key], data[key], err_msg=f"{name}: {key}")
    assert low == [True, True, False, False]


def test_a_segmentation_keeps_the_features_it_was_computed_from(fast_model):
    """explain["hybrid_features"] is a snapshot: rows that a later expression on the shared view
    makes exact (in place, under `refining`) must not change an answer already given."""
    data, image, parse = load_case(CASES[2])
    masks, image = data["masks"], np.asarray(image.convert("RGB"))
    exact = hybrid_features(fast_model.clip, image, masks, fast_model.config.replace(fast=False, dtype="float32"))
    low = exact + 1e-3 * exact.norm(dim=-1, keepdim=True)  # low-precision stand-in; no decision disputed
    view = PreparedView(image, Proposals.from_masks(masks, *masks.shape[1:]), low.clone(), None,
                        low_precision=LowPrecision(np.ones(len(masks), bool), 0.0, 0.0))
    seg = fast_model.segment(view, parse=parse)
    assert view.low_precision is not None  # nothing was refined for this expression
    np.testing.assert_array_equal(seg.explain["hybrid_features"], low.numpy())
    with view.refining:  # what a later expression's refinement does to the shared view
        fast_model._refine(view, np.flatnonzero(view.low_precision.low))
    np.testing.assert_array_equal(seg.explain["hybrid_features"], low.numpy())


def test_a_subset_of_a_shared_fast_view_waits_for_its_refinement(fast_model):
    """`subset` copies the features and which rows are low precision: taken while another thread
    makes rows exact, the copy could pair low-precision values with rows marked exact (or fail on
    the exact features' dict changing size). It waits for `refining`, and sees one state."""
    import threading

    data, image, _ = load_case(CASES[2])
    masks, image = data["masks"], np.asarray(image.convert("RGB"))
    exact = hybrid_features(fast_model.clip, image, masks, fast_model.config.replace(fast=False, dtype="float32"))
    low = exact + 1e-3 * exact.norm(dim=-1, keepdim=True)
    view = PreparedView(image, Proposals.from_masks(masks, *masks.shape[1:]), low.clone(), None,
                        low_precision=LowPrecision(np.ones(len(masks), bool), 0.0, 0.0))
    out = []
    with view.refining:  # another thread's expression is refining the view
        worker = threading.Thread(target=lambda: out.append(view.subset(np.arange(len(masks)))))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and not out  # the subset waits ...
        fast_model._refine(view, np.arange(len(masks) // 2))
    worker.join(10)
    sub = out[0]  # ... and sees the refined rows as exact, with their exact values
    assert not sub.low_precision.low[: len(masks) // 2].any()
    np.testing.assert_array_equal(sub.features.numpy(), view.features.numpy())



@pytest.mark.parametrize("speedup, native", [(0.2, False), (0.6, False), (1.2, False), (1.3, True), (5.0, True)])
def test_the_fast_mode_takes_bfloat16_only_on_a_cpu_where_it_measured_faster(tiny_clip_pair, monkeypatch, caplog,
                                                                              speedup, native):
    """Whether bfloat16 is faster than float32 on a CPU is measured when the model loads: the CPU's
    feature flags do not tell (an AVX2 CPU emulates it, 4.8x slower; AVX512-BF16 was 1.65x slower
    on a Xeon without AMX and 3.5-4x faster on a Zen 5 EPYC). Below BFLOAT16_GAIN the fast mode computes
    float32 at once (the exact features, bit for bit) and says so; above it takes the low-precision
    path. The measurement, a property of the hardware, is all that is faked."""
    from hybridgl import pipeline

    monkeypatch.setattr(pipeline, "bfloat16_speedup", lambda: speedup)
    data, image, parse = load_case(CASES[0])
    with caplog.at_level(logging.INFO, logger="hybridgl"):
        model = HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu",
                         config=HybridGLConfig(fast=True, fast_patience=0))
    assert model.fast_dtype == ("bfloat16" if native else None)
    said = f"bfloat16 measured {speedup:.2f}x float32's speed on this CPU, so hybrid features are computed in float32"
    assert (said in caplog.text) == (not native)
    view = model.prepare(image, proposals=data["masks"])
    assert (view.low_precision is not None) == native
    if not native:
        exact = hybrid_features(model.clip, view.image, data["masks"], HybridGLConfig())
        np.testing.assert_array_equal(view.features.numpy(), exact.numpy())
    seg = model.segment(view, parse=parse)
    for key in EXACT:
        np.testing.assert_array_equal(seg.explain[key], data[key], err_msg=key)


def test_the_bfloat16_measurement_runs_only_where_it_decides_something(tiny_clip_pair, monkeypatch):
    """The exact mode never measures (model loading stays as fast as it was); a forced dtype is kept
    whatever the measurement says; the measurement itself gives a positive ratio on this CPU."""
    from hybridgl import fast, pipeline

    calls = []
    monkeypatch.setattr(pipeline, "bfloat16_speedup", lambda: calls.append(1) or 0.5)
    HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu")
    assert calls == []
    forced = HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu",
                      config=HybridGLConfig(fast=True, dtype="bfloat16"))
    assert forced.fast_dtype == "bfloat16" and calls == [1]
    assert fast.low_precision(HybridGLConfig(fast=True), torch.device("cpu")) is None  # not measured: float32
    assert fast.low_precision(HybridGLConfig(fast=True), torch.device("cpu"), fast.BFLOAT16_GAIN) == "bfloat16"
    ratio = fast.bfloat16_speedup(repeats=2)
    assert math.isfinite(ratio) and ratio > 0


@pytest.mark.parametrize("speedup", [0.2, 0.6])
def test_a_bfloat16_asked_for_on_a_cpu_where_it_is_slower_is_warned_of(tiny_clip_pair, monkeypatch, caplog, speedup):
    """dtype or sam_dtype "bfloat16" are explicit choices (kept), but on such a CPU they cost time."""
    from hybridgl import pipeline
    from tiny_models import build_tiny_sam

    monkeypatch.setattr(pipeline, "bfloat16_speedup", lambda: speedup)
    for config, what in ((HybridGLConfig(dtype="bfloat16"), "CLIP's hybrid features"),
                         (HybridGLConfig(sam_dtype="bfloat16"), "SAM's image encoder")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hybridgl"):
            HybridGL(*tiny_clip_pair, sam=build_tiny_sam(), parser="rules", device="cpu", config=config)
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warned == [f"{what} in bfloat16: bfloat16 measured {speedup:.2f}x float32's speed on this CPU"]
    monkeypatch.setattr(pipeline, "bfloat16_speedup", lambda: 3.0)
    caplog.clear()
    HybridGL(*tiny_clip_pair, sam=build_tiny_sam(), parser="rules", device="cpu",
             config=HybridGLConfig(dtype="bfloat16", sam_dtype="bfloat16"))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_the_low_precision_pass_composes_its_inputs_in_float32(tiny_clip_pair):
    """The low-precision passes of one image share one autocast region (CLIP's weights are cast once
    for all of them, not once per pass); the masked and blurred inputs and the token masks are still
    composed in float32, the exact mode's bit for bit: only CLIP's layers change precision."""
    clip, _ = tiny_clip_pair
    data, image, _ = load_case(CASES[0])
    image, masks = np.asarray(image), data["masks"]
    assert len(masks) > 1  # several passes
    exact_debug, low_debug = {}, {}
    exact = hybrid_features(clip, image, masks, HybridGLConfig(feature_batch_size=1), debug=exact_debug)
    low = hybrid_features(clip, image, masks, HybridGLConfig(feature_batch_size=1, dtype="bfloat16"), debug=low_debug)
    for key in ("local_imgs", "global_imgs", "soft_masks"):
        assert low_debug[key].dtype == np.float32
        np.testing.assert_array_equal(low_debug[key], exact_debug[key], err_msg=key)
    assert low.dtype == torch.float32 and not torch.equal(low, exact)  # CLIP's layers did run in bfloat16
