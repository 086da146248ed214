"""The spec (HYBRIDGL.md) where the golden cases do not reach: non-default configuration values,
edge cases and the deliberate fixes. Expected numbers are computed here with numpy from the
spec's formulas, not by the functions under test."""
from __future__ import annotations

import numpy as np
import pytest

from hybridgl import HybridGLConfig


# -- spec 11: every number is a configuration value; a value the method cannot run with is refused

@pytest.mark.parametrize("bad", [
    {"points_per_side": 0}, {"points_per_batch": 0}, {"crop_n_layers": -1},
    {"crop_n_points_downscale_factor": 0}, {"gem_input_size": 0}, {"clip_input_size": 0},
    {"gem_iterations": -1},
])
def test_counts_and_sizes_the_method_cannot_run_with_are_refused(bad):
    """points_per_side 0 / points_per_batch 0 crashed in SAM's grid with ZeroDivisionError, crop_n_layers -1
    with an IndexError, and a negative gem_iterations silently ran none; the config now says which key."""
    (key,) = bad
    with pytest.raises(ValueError, match=key):
        HybridGLConfig(**bad)


@pytest.mark.parametrize("key, value", [
    ("use_relation", "False"), ("use_coherence", "no"), ("use_position_prior", 0), ("vertical_prior", "true"),
    ("k1", 2.5), ("k2", "6"), ("k1", True), ("alpha", "0.5"), ("black", None), ("points_per_side", 8.0),
    ("fusion_mode", 3),
])
def test_values_of_the_wrong_type_are_refused(key, value):
    """A switch given as a string (`--set use_relation=False` reaches the config as the string "False",
    which is truthy) left the guidance on without a word; k1=2.5 failed later inside torch.topk."""
    with pytest.raises(ValueError, match=key):
        HybridGLConfig(**{key: value})


def test_numbers_of_other_numeric_types_are_accepted_as_plain_python_numbers():
    """numpy integers and floats (a tuning grid) and ints for float keys (TOML `alpha = 1`) stay valid,
    and the stored values serialise (the fingerprint is JSON)."""
    cfg = HybridGLConfig(k1=np.int64(2), alpha=1, black=np.float32(1.5), gem_temperature=2)
    assert cfg.k1 == 2 and type(cfg.k1) is int
    assert cfg.alpha == 1.0 and type(cfg.black) is float and cfg.black == 1.5
    assert cfg.fingerprint() == HybridGLConfig(k1=2, alpha=1, black=1.5, gem_temperature=2).fingerprint()
    assert HybridGLConfig().fingerprint() == HybridGLConfig(**HybridGLConfig().to_dict()).fingerprint()


# -- spec 4, 6, 8, 9, 10 under non-default configurations, recomputed with numpy -----------------

from PIL import Image  # noqa: E402

from hybridgl import HybridGL, ParsedExpression  # noqa: E402

from tiny_models import GOLDEN_DIR  # noqa: E402

CASE = GOLDEN_DIR / "p02_bird_above_tree"  # 9 masks, 360x640


@pytest.fixture(scope="module")
def prepared(tiny_clip_pair):
    data = np.load(CASE / "case.npz")
    model = HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu")
    return model.prepare(Image.open(CASE / "image.png"), proposals=data["masks"])


def softmax(x):
    z = np.exp(np.asarray(x, np.float64) - np.max(x))
    return z / z.sum()


def spec_choice(view, explain, parse: ParsedExpression, cfg: HybridGLConfig) -> dict:
    """Spec sections 4, 6, 8, 9 and 10 in numpy, from the features, text features and GEM map A."""
    v = np.asarray(explain["hybrid_features"], np.float64)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    cos = lambda t: v @ (t / np.linalg.norm(t))  # noqa: E731
    t = (cfg.sentence_weight * explain["text_sentence"].astype(np.float64)
         + (1 - cfg.sentence_weight) * explain["text_noun_phrase"].astype(np.float64))
    n = len(v)
    p = softmax(100.00001 * cos(t))
    I = np.argsort(-p, kind="stable")[:min(cfg.k1, n)]
    if parse.other_nouns:
        q = softmax(100.00001 * cos(explain["text_neg"].astype(np.float64)))
        J, s = np.argsort(-q, kind="stable")[:min(cfg.k2, n)], q
    else:
        J, s = I, p
    relation = parse.relation if cfg.use_relation else "none"
    box = view.boxes_xywh.astype(np.float64)
    cx, cy, area = box[:, 0] + box[:, 2] / 2, box[:, 1] + box[:, 3] / 2, box[:, 2] * box[:, 3]

    def rel(i, j):
        if relation == "none":
            return p[i]
        if relation == "within":
            ix = max(0.0, min(box[i, 0] + box[i, 2], box[j, 0] + box[j, 2]) - max(box[i, 0], box[j, 0]))
            iy = max(0.0, min(box[i, 1] + box[i, 3], box[j, 1] + box[j, 3]) - max(box[i, 1], box[j, 1]))
            return p[i] * s[j] * ix * iy / area[i]
        holds = {"left": cx[i] < cx[j], "right": cx[i] > cx[j], "up": cy[i] < cy[j], "down": cy[i] > cy[j],
                 "big": area[i] > area[j], "small": area[i] < area[j]}[relation]
        return p[i] * s[j] * float(holds)

    R = np.array([sum(rel(i, j) for j in J) for i in I])
    P = softmax(R)
    h, w = view.size
    direction = parse.direction if cfg.use_position_prior else "none"
    ramp = {"left": np.linspace(1, 0, w)[None].repeat(h, 0), "right": np.linspace(0, 1, w)[None].repeat(h, 0),
            "middle": np.concatenate([np.linspace(0, 1, w // 2), np.linspace(1, 0, w - w // 2)])[None].repeat(h, 0)}
    if cfg.vertical_prior:
        ramp.update(up=np.linspace(1, 0, h)[:, None].repeat(w, 1), down=np.linspace(0, 1, h)[:, None].repeat(w, 1))
    A = explain["gem_A"].astype(np.float64) if cfg.use_coherence else np.ones((h, w))
    A = A * ramp.get(direction, np.ones((h, w)))
    A = A / A.mean()
    b = {"big": cfg.black_big, "small": cfg.black_small}.get(relation, cfg.black)
    m = view.masks
    G = np.array([(2 - b) * A[mi].mean() - b * (A[~mi].mean() if (~mi).any() else 0.0) for mi in m])
    F = (1 - cfg.alpha) * P + cfg.alpha * G[I]
    return {"p": p, "I": I, "J": J, "R": R, "P": P, "black": b, "G": G, "F": F, "index": int(I[np.argmax(F)])}


PARSES = {
    "left": ParsedExpression("the bird left of the tree", "the bird", ("the tree",), "left", "left"),
    "right": ParsedExpression("the bird right of the tree", "the bird", ("the tree",), "right", "right"),
    "up": ParsedExpression("the bird above the tree", "the bird", ("the tree",), "up", "up"),
    "down": ParsedExpression("the bird under the tree", "the bird", ("the tree",), "down", "down"),
    "big": ParsedExpression("the bigger bird", "the bigger bird", (), "big", "none"),
    "small": ParsedExpression("the smaller bird near the tree", "the smaller bird", ("the tree",), "small", "none"),
    "within": ParsedExpression("the bird inside the tree", "the bird", ("the tree",), "within", "none"),
    "none": ParsedExpression("the bird in the middle", "the bird", (), "none", "middle"),
    "two others": ParsedExpression("the bird left of the tree and the sky", "the bird", ("the tree", "the sky"),
                                   "left", "left"),
}
CONFIGS = {
    "defaults": {},
    "k beyond N": {"k1": 20, "k2": 50},
    "k1 one, k2 two": {"k1": 1, "k2": 2},
    "alpha 0": {"alpha": 0.0},
    "alpha 1": {"alpha": 1.0},
    "no relation": {"use_relation": False},
    "no coherence": {"use_coherence": False},
    "no position": {"use_position_prior": False},
    "vertical prior": {"vertical_prior": True},
    "b values": {"black": 1.2, "black_big": 2.0, "black_small": 0.5},
    "sentence only": {"sentence_weight": 1.0},
}


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_choice_follows_the_spec_formulas(tiny_clip_pair, prepared, config_name):
    cfg = HybridGLConfig(**CONFIGS[config_name])
    model = HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu", config=cfg)
    for parse_name, parse in PARSES.items():
        seg = model.segment(prepared, parse=parse)
        e = seg.explain
        want = spec_choice(prepared, e, parse, cfg)
        where = f"{config_name} / {parse_name}"
        np.testing.assert_array_equal(e["topk_I"], want["I"], err_msg=where)
        np.testing.assert_array_equal(e["J_used"], want["J"], err_msg=where)
        np.testing.assert_allclose(e["p"], want["p"], atol=1e-5, err_msg=where)
        np.testing.assert_allclose(e["R"], want["R"], atol=1e-5, err_msg=where)
        np.testing.assert_allclose(e["P"], want["P"], atol=1e-5, err_msg=where)
        assert float(e["black"]) == pytest.approx(want["black"]), where
        np.testing.assert_allclose(e["G"], want["G"], atol=1e-4, err_msg=where)
        np.testing.assert_allclose(e["F"], want["F"], atol=1e-4, err_msg=where)
        assert seg.index == want["index"], where


def test_coherence_switch_is_honoured_at_segment_time(tiny_clip_pair, prepared):
    """use_coherence is a guidance on/off (spec 11) like use_relation and use_position_prior: segment
    honours it whatever view it is given. A view prepared with the GEM tokens, segmented by a model with
    coherence off, kept the coherence map; a view prepared without them, by a model with coherence on,
    silently used A = 1. Both now follow the segmenting model's config."""
    parse = PARSES["left"]
    on = HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu")
    off = HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu", config={"use_coherence": False})
    data = np.load(CASE / "case.npz")
    bare = off.prepare(Image.open(CASE / "image.png"), proposals=data["masks"])
    assert bare.tokens is None
    with_map = on.segment(prepared, parse=parse).explain
    np.testing.assert_allclose(on.segment(bare, parse=parse).explain["gem_A"], with_map["gem_A"], atol=1e-6)
    np.testing.assert_allclose(on.segment(bare, parse=parse).explain["G"], with_map["G"], atol=1e-6)
    without = off.segment(prepared, parse=parse).explain
    assert (without["gem_A"] == 1).all()
    np.testing.assert_allclose(without["G"], off.segment(bare, parse=parse).explain["G"], atol=1e-6)
