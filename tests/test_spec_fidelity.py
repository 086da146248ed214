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
SOME = ("left", "big", "none", "two others")
CONFIGS = {  # name: (overrides, the parses it is checked on)
    "defaults": ({}, tuple(PARSES)),
    "k beyond N": ({"k1": 20, "k2": 50}, ("left", "within", "none")),
    "k1 one, k2 two": ({"k1": 1, "k2": 2}, ("left", "small", "none")),
    "alpha 0": ({"alpha": 0.0}, SOME),
    "alpha 1": ({"alpha": 1.0}, SOME),
    "no relation": ({"use_relation": False}, ("left", "big", "small")),
    "no coherence": ({"use_coherence": False}, SOME),
    "no position": ({"use_position_prior": False}, SOME),
    "vertical prior": ({"vertical_prior": True}, ("up", "down", "left")),
    "b values": ({"black": 1.2, "black_big": 2.0, "black_small": 0.5}, ("big", "small", "none")),
    "sentence only": ({"sentence_weight": 1.0}, ("left", "none")),
}


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_choice_follows_the_spec_formulas(tiny_clip_pair, prepared, config_name):
    overrides, parse_names = CONFIGS[config_name]
    cfg = HybridGLConfig(**overrides)
    model = HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu", config=cfg)
    for parse_name in parse_names:
        parse = PARSES[parse_name]
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



def test_a_view_prepared_with_other_image_settings_is_refused(tiny_clip_pair, prepared):
    """A view holds the features and GEM tokens of the config that prepared it: a model whose
    fusion, CLIP input, GEM or image-size settings differ segmented it with the preparer's features
    and tokens, under its own model_version. It is refused, naming the keys; a model that differs
    only in the choice's settings (guidance, scoring, speed) segments it."""
    parse = PARSES["left"]
    for changes in ({"beta": 1.0}, {"gem_iterations": 2}, {"fusion_mode": "L2G", "blur_kernel": 5},
                    {"max_image_side": 512}):
        other = HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu", config=changes)
        keys = ", ".join(sorted(changes))
        with pytest.raises(ValueError, match=f"prepared with other image settings \\({keys}\\)"):
            other.segment(prepared, parse=parse)
        with pytest.raises(ValueError, match="prepared with other image settings"):
            other.segment(prepared.subset([0, 1]), parse=parse)
    same = HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu",
                    config={"alpha": 0.2, "k1": 2, "use_coherence": False, "fast": True, "points_per_side": 4})
    assert same.segment(prepared, parse=parse).index is not None

# -- spec 2: the feature settings a configuration may change ------------------------------------

def _small_case():
    rng = np.random.RandomState(3)
    image = (rng.rand(90, 120, 3) * 255).astype(np.uint8)
    masks = np.zeros((2, 90, 120), bool)
    masks[0, 10:50, 20:70] = True
    masks[1, 40:, 60:] = True  # touches the bottom and right borders
    return image, masks


def test_blur_kernel_and_normalisation_are_honoured():
    """Global input (spec 2): sharp inside, the k x k Gaussian blur (OpenCV sigma 0, reflect-101)
    outside, /255, bilinear 224 without antialias, ImageNet mean/std; local input: x*m + (1-m)*fill."""
    import cv2
    import torch
    import torch.nn.functional as F

    from hybridgl.hybrid_features import global_inputs, local_inputs

    image, masks = _small_case()
    cfg = HybridGLConfig(blur_kernel=5, fill_value=(0.1, -0.2, 0.3), image_mean=(0.5, 0.5, 0.5),
                         image_std=(0.25, 0.5, 1.0))
    blurred = cv2.GaussianBlur(image, (5, 5), 0, borderType=cv2.BORDER_REFLECT_101)
    mean, std = np.array(cfg.image_mean)[:, None, None], np.array(cfg.image_std)[:, None, None]
    resize = lambda a: F.interpolate(torch.from_numpy(a[None]).float(), size=(224, 224), mode="bilinear",  # noqa: E731
                                     align_corners=False, antialias=False)[0].numpy()
    m = torch.from_numpy(masks)
    ours_g = global_inputs(torch.from_numpy(image), torch.from_numpy(blurred), m, cfg).numpy()
    ours_l = local_inputs(torch.from_numpy(image).permute(2, 0, 1).float() / 255, m, cfg).numpy()
    for i, mask in enumerate(masks):
        composite = np.where(mask[..., None], image, blurred).transpose(2, 0, 1) / 255.0
        np.testing.assert_allclose(ours_g[i], (resize(composite) - mean) / std, atol=1e-5)
        x = (image.transpose(2, 0, 1) / 255.0 - mean) / std
        local = x * mask + (1 - mask) * np.array(cfg.fill_value)[:, None, None]
        np.testing.assert_allclose(ours_l[i], resize(local), atol=1e-5)
    from hybridgl.hybrid_features import blur
    np.testing.assert_array_equal(blur(image, 5), blurred)


def test_beta_zero_leaves_the_local_branch_alone(tiny_clip_pair):
    """H_b = X_L + beta * (w . X_G): with beta = 0 the G2L feature is the local branch's own."""
    from hybridgl.hybrid_features import hybrid_features

    clip, _ = tiny_clip_pair
    image, masks = _small_case()
    g2l = hybrid_features(clip, image, masks, HybridGLConfig(beta=0.0))
    local = hybrid_features(clip, image, masks, HybridGLConfig(fusion_mode="local"))
    np.testing.assert_allclose(g2l.numpy(), local.numpy(), atol=1e-5)
    assert not np.allclose(hybrid_features(clip, image, masks, HybridGLConfig(beta=1.0)).numpy(), local.numpy(),
                           atol=1e-3)


# -- spec 5: every keyword of the lists, the earliest-head rule and its ties, null words ----------

from hybridgl.parsing import Word, analyze  # noqa: E402

SPEC_RELATIONS = {"left": "left west", "right": "right east", "up": "above north top back behind",
                  "down": "below south under front", "big": "bigger larger closer",
                  "small": "smaller tinier further smallest", "within": "inside within contained"}
SPEC_DIRECTIONS = {"left": "left", "right": "right", "middle": "middle between", "up": "up top above",
                   "down": "down under bottom low"}


def _tree(*words):
    """(text, upos, head, deprel) with 0-based heads, the root pointing to itself."""
    return [Word(*w) for w in words]


@pytest.mark.parametrize("word", sorted({w for v in (*SPEC_RELATIONS.values(), *SPEC_DIRECTIONS.values())
                                         for w in v.split()}))
def test_every_listed_keyword_gives_its_classes(word):
    """"the cup <word> the plate", the keyword hanging off "plate": its relation class (RIGHT fires,
    the deliberate fix) and its direction class, as listed in spec 5."""
    words = _tree(("the", "DET", 1, "det"), ("cup", "NOUN", 1, "root"), (word, "ADP", 4, "case"),
                  ("the", "DET", 4, "det"), ("plate", "NOUN", 1, "nmod"))
    parse = analyze(words, "test")
    relation = next((c for c, ws in SPEC_RELATIONS.items() if word in ws.split()), "none")
    direction = next((c for c, ws in SPEC_DIRECTIONS.items() if word in ws.split()), "none")
    assert (parse.relation, parse.direction) == (relation, direction)
    assert parse.noun_phrase == "the cup" and parse.other_nouns == ("the plate",)


def test_earliest_head_wins_and_ties_go_to_the_first_word():
    # "the cup under the plate left of the bowl": under -> plate (4), left -> bowl (8): under's head is earlier
    words = _tree(("the", "DET", 1, "det"), ("cup", "NOUN", 1, "root"), ("under", "ADP", 4, "case"),
                  ("the", "DET", 4, "det"), ("plate", "NOUN", 1, "nmod"), ("left", "ADV", 8, "advmod"),
                  ("of", "ADP", 8, "case"), ("the", "DET", 8, "det"), ("bowl", "NOUN", 4, "nmod"))
    assert (analyze(words, "test").relation, analyze(words, "test").direction) == ("down", "down")
    # the same words with "left" hanging off the cup (1): now left's head is the earliest
    words[5] = Word("left", "ADV", 1, "advmod")
    assert (analyze(words, "test").relation, analyze(words, "test").direction) == ("left", "left")
    # two keywords on one head: the first in the sentence wins, for each class
    tie = _tree(("smaller", "ADJ", 2, "amod"), ("left", "ADJ", 2, "amod"), ("box", "NOUN", 2, "root"))
    assert (analyze(tie, "test").relation, analyze(tie, "test").direction) == ("small", "left")
    tie = _tree(("left", "ADJ", 2, "amod"), ("smaller", "ADJ", 2, "amod"), ("box", "NOUN", 2, "root"))
    assert analyze(tie, "test").relation == "left"


@pytest.mark.parametrize("null", ["part", "image", "side", "picture", "half", "region", "section", "photo"])
def test_a_null_word_heading_another_phrase_cancels_the_relation_not_the_direction(null):
    words = _tree(("the", "DET", 1, "det"), ("cup", "NOUN", 1, "root"), ("on", "ADP", 5, "case"),
                  ("the", "DET", 5, "det"), ("left", "ADJ", 5, "amod"), (null, "NOUN", 1, "nmod"))
    parse = analyze(words, "test")
    assert (parse.noun_phrase, parse.other_nouns) == ("the cup", (f"the left {null}",))
    assert (parse.relation, parse.direction) == ("none", "left")


def test_no_noun_phrase_targets_the_whole_expression():
    words = _tree(("on", "ADP", 2, "case"), ("the", "DET", 2, "det"), ("left", "NOUN", 2, "root"))
    parse = analyze(words, "test")
    assert (parse.sentence, parse.noun_phrase, parse.other_nouns) == ("on the left", "on the left", ())
    assert (parse.relation, parse.direction) == ("left", "left")


def test_one_mask_is_its_own_candidate_and_partner(tiny_clip_pair):
    """N = 1: k1 = k2 = 1, I = J = [0]; a strict relation with itself fails (R = 0, P = 1), within holds
    fully (R = p * q = 1); F = (1 - alpha) * 1 + alpha * G_0."""
    image, masks = _small_case()
    model = HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu")
    view = model.prepare(image, proposals=masks[:1])
    for relation, R in (("left", 0.0), ("within", 1.0), ("none", 1.0)):
        seg = model.segment(view, parse=ParsedExpression("the cup by the plate", "the cup", ("the plate",),
                                                         relation, "none"))
        e = seg.explain
        assert seg.index == 0 and list(e["topk_I"]) == [0] and list(e["J_used"]) == [0]
        np.testing.assert_allclose(e["R"], [R], atol=1e-9)
        np.testing.assert_allclose(e["P"], [1.0])
        np.testing.assert_allclose(e["F"], [0.4 + 0.6 * e["G"][0]], atol=1e-6)


def test_a_weight_given_as_an_integer_is_the_same_config():
    """alpha=1 (what `--set alpha=1` parses to) and alpha=1.0 are one configuration: one fingerprint,
    so one model version and one proposal cache key."""
    assert HybridGLConfig(alpha=1).fingerprint() == HybridGLConfig(alpha=1.0).fingerprint()
    assert type(HybridGLConfig(alpha=1).alpha) is float


def test_the_type_error_says_what_to_write():
    with pytest.raises(ValueError, match=r"use_relation must be true or false, got 'False'"):
        HybridGLConfig(use_relation="False")
    with pytest.raises(ValueError, match=r"k1 must be an integer, got 2.5"):
        HybridGLConfig(k1=2.5)


@pytest.mark.parametrize("key, value", [
    ("score_temperature", float("nan")), ("beta", float("inf")), ("sentence_weight", float("nan")),
    ("fast_safety", float("nan")), ("pred_iou_thresh", float("nan")), ("fusion_weight", float("-inf")),
    ("gem_temperature", float("nan")), ("gem_temperature", 0.0), ("gem_temperature", -1.0),
    ("image_std", (0.229, 0.0, 0.225)), ("clip_mean", (0.5, float("nan"), 0.5)), ("clip_std", (1.0, 1.0, -1.0)),
])
def test_non_finite_numbers_and_non_positive_scales_are_refused(key, value):
    """NaN passed every range check written as a comparison (`nan <= 0` is False): a score_temperature
    of NaN (HYBRIDGL_CONFIG is JSON, which Python reads NaN from) made every confidence NaN, a NaN
    pred_iou_thresh dropped every proposal. A std of 0 or a temperature <= 0 divides by nothing."""
    with pytest.raises(ValueError, match=key):
        HybridGLConfig(**{key: value})


@pytest.mark.parametrize("key, value", [
    ("image_mean", (0.5,)), ("image_std", (1.0, 2.0, 3.0, 4.0)), ("clip_mean", (0.5, 0.5)), ("fill_value", 3),
    ("clip_std", "abc"), ("fill_value", None),
])
def test_a_colour_triple_must_be_three_numbers(key, value):
    """image_mean=(0.5,) or clip_std of 4 values were accepted and failed at the first image inside torch
    ("shape '[3, 1, 1]' is invalid"); fill_value=3 said "'int' object is not iterable"."""
    with pytest.raises(ValueError, match=f"{key} must be 3 numbers"):
        HybridGLConfig(**{key: value})
    assert HybridGLConfig(**{key: [0.5, 0.5, 0.5]}).to_dict()[key] == [0.5, 0.5, 0.5]  # JSON gives lists


@pytest.mark.parametrize("prompt", ["{0} {1}", "{x}", "a photo of a {", "a photo of something."])
def test_a_gem_prompt_must_take_the_noun_phrase(prompt):
    """A prompt str.format cannot fill with the noun phrase failed at the first expression (IndexError,
    KeyError); one without a slot gave every expression the same coherence map."""
    with pytest.raises(ValueError, match="gem_prompt"):
        HybridGLConfig(gem_prompt=prompt)
    assert HybridGLConfig(gem_prompt="{} in a photo").gem_prompt == "{} in a photo"


@pytest.mark.parametrize("key, value", [("sentence_weight", 1.5), ("sentence_weight", -0.1), ("fusion_weight", 2.0)])
def test_mixing_weights_lie_in_0_1(key, value):
    """t = w f(sentence) + (1 - w) f(noun phrase) and the G+L sum are mixes, as alpha's is."""
    with pytest.raises(ValueError, match=key):
        HybridGLConfig(**{key: value})


@pytest.mark.parametrize("text, suffix, message", [
    ('{"hybridgl": 5}', ".json", "expected a table of config keys"),
    ("", ".json", "not valid JSON"),
    ("alpha = ", ".toml", "not valid TOML"),
])
def test_a_malformed_config_file_is_named_in_the_error(tmp_path, text, suffix, message):
    """{"hybridgl": 5} said "'int' object is not iterable"; a syntax error did not name the file."""
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path.name}: {message}"):
        HybridGLConfig.from_file(path)
    with pytest.raises(TypeError, match="config must be a HybridGLConfig, a mapping or a file path, got int"):
        HybridGLConfig.load(5)  # what an inline {"hybridgl": 5} unwraps to
