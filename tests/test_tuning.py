"""`hybridgl tune`: re-scoring equals the pipeline, honest cross-validation, report, calibration.

The generated data: images with coloured blocks, proposals from the tiny SAM, and "annotators"
who mark the proposal the method picks with alpha = 0 (Eq. 9 without the guidance score G)
instead of the default 0.6 (the deliberately mis-set parameter). Their masks are written as a refer-layout dataset (RLE
segmentations) and as a Label Studio export.
"""
from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hybridgl import HybridGLConfig
from hybridgl.evaluation import calibration as reliability
from hybridgl.evaluation import masks as mask_utils
from hybridgl.tuning import search
from hybridgl.tuning.candidates import CandidateCache
from hybridgl.tuning.fit import fit_logistic
from hybridgl.tuning.rescore import choose
from hybridgl.tuning.space import configurations
from hybridgl.tuning.tune import Sample, TuneImage, prepare_items, tune

HIDDEN = {"alpha": 0.0}  # what the annotators' choices follow; the default alpha is 0.6
N_IMAGES, H, W = 8, 48, 64
EXPRESSIONS = ["the red block on the left", "the green box on the right", "the blue thing in the middle",
               "the bigger square", "the smaller one", "a yellow block above the blue box",
               "the object below the red one", "the box left of the green square"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30)]


def make_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = (rng.integers(0, 60, (H, W, 3)) + 90).astype(np.uint8)
    for colour in COLOURS:
        x, y = int(rng.integers(0, W - 16)), int(rng.integers(0, H - 14))
        img[y:y + int(rng.integers(8, 14)), x:x + int(rng.integers(8, 16))] = colour
    return img


@pytest.fixture(scope="module")
def model():
    from tiny_models import tiny_hybridgl

    return tiny_hybridgl(gem_input_size=224)  # a smaller GEM input: the same code, 4x fewer tokens


@pytest.fixture(scope="module")
def data(model, tmp_path_factory):
    """Images, their candidates (cached), and the annotators' masks under the hidden config."""
    root = tmp_path_factory.mktemp("tune-data")
    cache_dir = root / "cache"
    images = {i: make_image(i) for i in range(N_IMAGES)}
    cache = CandidateCache(model, cache_dir)
    hidden = model.config.replace(**HIDDEN)
    gts = {}
    for i, img in images.items():
        key, cand = cache.image(str(i), lambda img=img: img)
        assert len(cand) > 1
        for j, text in enumerate(EXPRESSIONS):
            gts[(i, j)] = cand.masks[choose(cand, cache.expression(key, cand, text), hidden).index]
    return {"root": root, "cache": cache_dir, "images": images, "gts": gts}


def tune_images(data) -> list[TuneImage]:
    return [TuneImage(i, lambda img=img: img,
                      [Sample(f"{i}-{j}", text, lambda g=data["gts"][(i, j)]: g) for j, text in enumerate(EXPRESSIONS)])
            for i, img in data["images"].items()]


@pytest.fixture(scope="module")
def tuned(model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune-out")
    items, problems, cache = prepare_items(model, tune_images(data), data["cache"])
    assert not problems and cache.misses == 0  # everything came from the cache the fixture filled
    result = tune(items, model.config, out, folds=4, n_configs=120, min_images=8, min_expressions=40,
                  bootstrap=500)
    return out, result, items


def test_rescoring_chooses_exactly_what_the_pipeline_chooses(model, data):
    from hybridgl import HybridGL
    from hybridgl.pipeline import PreparedView

    img = data["images"][0]
    view = model.prepare(img)
    cache = CandidateCache(model, data["cache"])
    key, cand = cache.image("0", lambda: img)
    np.testing.assert_array_equal(cand.masks, view.masks)
    configs = [{}, {"alpha": 0.1}, {"alpha": 1.0, "black": 1.2}, {"sentence_weight": 0.0, "k1": 5, "k2": 3},
               {"use_relation": False, "use_position_prior": False}, {"use_coherence": False, "k1": 2},
               {"vertical_prior": True, "black_big": 2.0, "black_small": 1.0}, {"k1": 1}]
    compared = 0
    for overrides in configs:
        cfg = model.config.replace(**overrides)
        other = HybridGL(model.clip, model.tokenizer, sam=None, parser=model.parser, config=cfg, device="cpu")
        v = view if cfg.use_coherence else PreparedView(view.image, view.proposals, view.features, None)
        for text in EXPRESSIONS:
            seg = other.segment(v, text)
            ch = choose(cand, cache.expression(key, cand, text), cfg)
            assert ch.index == seg.index, (overrides, text)
            assert ch.score == seg.score, (overrides, text)
            np.testing.assert_array_equal(ch.F, seg.explain["F"])
            compared += 1
    assert compared == len(configs) * len(EXPRESSIONS)


def test_tune_finds_the_mis_set_parameter_on_held_out_images(tuned):
    out, result, items = tuned
    assert len({i.image_id for i in items}) == N_IMAGES
    ho = result["held_out"]
    assert ho["tuned"]["mIoU"] > ho["defaults"]["mIoU"]
    assert result["held_out"]["interval"]["mIoU_gain"][0] > 0
    assert result["recommended"] is True
    assert result["chosen"] == HIDDEN  # the annotators' alpha, found first among equals
    written = HybridGLConfig.from_file(out / "overrides.toml")
    assert written.alpha == result["chosen"]["alpha"]
    assert written.fingerprint() != HybridGLConfig().fingerprint()
    for name in ("report.md", "report.json", "held_out.csv", "gain_per_parameter.png", "iou_histogram.png",
                 "reliability_raw.png", "reliability_calibrated.png"):
        assert (out / name).is_file(), name
    assert "recommended" in (out / "report.md").read_text()


def test_report_numbers_are_recomputable_from_held_out_csv_and_no_image_is_in_two_folds(tuned):
    out, result, _ = tuned
    rows = list(csv.DictReader(open(out / "held_out.csv")))
    assert len(rows) == result["n_expressions"] == N_IMAGES * len(EXPRESSIONS)
    folds_of_image: dict[str, set] = {}
    for r in rows:
        folds_of_image.setdefault(r["image_id"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in folds_of_image.values())
    assert len({f for fs in folds_of_image.values() for f in fs}) == 4
    report = json.loads((out / "report.json").read_text())
    for which in ("defaults", "tuned"):
        i = np.array([int(r[f"{which if which == 'tuned' else 'default'}_intersection"]) for r in rows])
        u = np.array([int(r[f"{which if which == 'tuned' else 'default'}_union"]) for r in rows])
        assert report["held_out"][which]["mIoU"] == pytest.approx(100 * np.mean(i / u))
        assert report["held_out"][which]["oIoU"] == pytest.approx(100 * i.sum() / u.sum())
    tuned_iou = [float(r["tuned_iou"]) for r in rows]
    for col, key in (("raw_score", "held_out_raw"), ("calibrated_score", "held_out_calibrated")):
        rel = reliability.reliability_bins([float(r[col]) for r in rows], tuned_iou)
        assert report["calibration"][key]["ece"] == pytest.approx(rel["ece"])


def test_a_second_tune_reads_every_candidate_from_the_cache(model, data):
    _, _, cache = prepare_items(model, tune_images(data)[:2], data["cache"])
    assert cache.misses == 0 and cache.hits == 2 * (1 + len(EXPRESSIONS))


def test_a_cache_written_by_an_older_computation_is_not_read(model, data, monkeypatch):
    """Cached means or features from code that computed them otherwise (in their last bits) would
    re-score candidates differently from the pipeline: a new CACHE_FORMAT recomputes them."""
    from hybridgl.tuning import candidates

    monkeypatch.setattr(candidates, "CACHE_FORMAT", candidates.CACHE_FORMAT + "-next")
    _, _, cache = prepare_items(model, tune_images(data)[:1], data["cache"])
    assert cache.hits == 0 and cache.misses == 1 + len(EXPRESSIONS)


def test_too_few_tasks_says_so_and_recommends_nothing(tuned, tmp_path):
    _, _, items = tuned
    few = [it for it in items if it.image_id in (0, 1, 2)]
    result = tune(few, HybridGLConfig(), tmp_path, folds=5)
    assert result["recommended"] is False and result["overrides_file"] is None
    assert "too few reviewed tasks" in result["verdict"]
    assert "too few reviewed tasks" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "overrides.toml").exists()


def test_no_gain_no_recommendation(model, data, tmp_path):
    """Annotators who agree with the defaults: the defaults stay."""
    cache = CandidateCache(model, data["cache"])
    images = []
    for i, img in data["images"].items():
        key, cand = cache.image(str(i), lambda img=img: img)
        samples = [Sample(f"{i}-{j}", t, lambda g=cand.masks[choose(cand, cache.expression(key, cand, t),
                                                                    model.config).index]: g)
                   for j, t in enumerate(EXPRESSIONS)]
        images.append(TuneImage(i, lambda img=img: img, samples))
    items, _, _ = prepare_items(model, images, data["cache"])
    result = tune(items, model.config, tmp_path, folds=4, n_configs=60, min_images=8, min_expressions=40,
                  bootstrap=300)
    assert result["recommended"] is False
    assert "no parameter change recommended" in result["verdict"]
    assert result["held_out"]["gain"]["mIoU"] <= 0


def test_folds_are_by_image():
    ids = [i // 3 for i in range(30)]  # 10 images, 3 expressions each
    folds = search.assign_folds(ids, 4, seed=1)
    for image in set(ids):
        assert len({int(folds[e]) for e in range(30) if ids[e] == image}) == 1
    assert sorted(np.bincount([folds[e] for e in range(0, 30, 3)]).tolist()) == [2, 2, 3, 3]


def test_configurations_start_with_the_base_and_its_one_parameter_sweeps():
    confs = configurations(HybridGLConfig(), n=200, seed=0)
    assert confs[0] == {} and len(confs) == 200
    assert {"alpha": 0.1} in confs and {"use_coherence": False} in confs
    assert len({tuple(sorted(c.items())) for c in confs}) == 200


def test_calibration_on_synthetic_scores_reduces_the_calibration_error():
    from hybridgl import calibration

    rng = np.random.default_rng(0)
    n = 4000
    score = rng.uniform(1 / 3, 1, n)
    good = rng.uniform(0, 1, n) < score ** 4  # the raw score is overconfident
    table = np.zeros((n, len(calibration.FEATURES)))
    table[:, list(calibration.FEATURES).index("score")] = score
    table[:, list(calibration.FEATURES).index("area")] = rng.uniform(0, 1, n)  # noise
    fit = fit_logistic(table[:2000], good[:2000])
    assert fit.features == ("score", "area")
    iou = good[2000:].astype(float)
    before = reliability.reliability_bins(score[2000:], iou)["ece"]
    after = reliability.reliability_bins(fit(table[2000:]), iou)["ece"]
    assert before > 0.1 and after < 0.05 and after < before / 3
    assert reliability.auroc(fit(table[2000:]), good[2000:]) > 0.6


def test_a_calibrated_config_changes_the_score_and_the_model_version(model, data, tuned):
    from hybridgl import HybridGL, calibration

    out, result, items = tuned
    fit = {"calibration_features": ["score", "margin", "semantic"], "calibration_coef": [-1.0, 2.0, 30.0, 1.5]}
    cfg = model.config.replace(**fit)
    plain = HybridGL(model.clip, model.tokenizer, sam=model.sam, parser=model.parser, config=model.config,
                     device="cpu")
    calibrated = HybridGL(model.clip, model.tokenizer, sam=model.sam, parser=model.parser, config=cfg, device="cpu")
    assert calibrated.model_version != plain.model_version
    cache = CandidateCache(model, data["cache"])
    key, cand = cache.image("0", lambda: data["images"][0])
    view = model.prepare(data["images"][0])
    for text in EXPRESSIONS[:3]:
        raw, cal = plain.segment(view, text), calibrated.segment(view, text)
        assert cal.index == raw.index
        ch = choose(cand, cache.expression(key, cand, text), cfg)
        expected = calibration.probability(ch.features(cand), fit["calibration_features"], fit["calibration_coef"])
        assert cal.score == pytest.approx(float(expected[ch.order[0]]), abs=1e-9)
        assert cal.score != pytest.approx(raw.score)
        np.testing.assert_allclose(cal.explain["score_raw"], raw.explain["score_raw"])
        assert [r["index"] for r in cal.ranking] == [r["index"] for r in raw.ranking]


def test_bad_calibration_values_are_refused():
    with pytest.raises(ValueError, match="unknown calibration features"):
        HybridGLConfig(calibration_features=("nope",), calibration_coef=(0.0, 1.0))
    with pytest.raises(ValueError, match="needs 2 values"):
        HybridGLConfig(calibration_features=("score",), calibration_coef=(1.0,))


def write_refer(root: Path, data) -> Path:
    """The annotators' masks as a refer-layout dataset (RLE segmentations), split "val"."""
    (root / "refcoco").mkdir(parents=True, exist_ok=True)
    (root / "train2014").mkdir(exist_ok=True)
    images, anns, refs = [], [], []
    for i, img in data["images"].items():
        name = f"COCO_train2014_{i:012d}.png"
        Image.fromarray(img).save(root / "train2014" / name)
        images.append({"id": i, "file_name": name, "height": H, "width": W})
        for j, text in enumerate(EXPRESSIONS):
            ann_id = 100 * i + j
            anns.append({"id": ann_id, "image_id": i, "category_id": 1, "iscrowd": 0,
                         "segmentation": mask_utils.encode(data["gts"][(i, j)]), "bbox": [0, 0, 1, 1], "area": 1})
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": i, "split": "val", "category_id": 1,
                         "sentences": [{"sent_id": ann_id, "raw": text, "sent": text, "tokens": text.split()}]})
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    (root / "refcoco" / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return root


def test_command_line_on_a_refer_dataset_and_a_label_studio_export(model, data, tmp_path):
    """Both sources through `python -m hybridgl tune`, reusing the fixture's cache (no model pass)."""
    from label_studio_sdk.converter.brush import mask2rle

    from hybridgl.cli import main
    from tiny_models import PERMISSIVE, TINY_CLIP_DIR, save_tiny_sam

    ckpt = save_tiny_sam(tmp_path / "sam.pt")
    common = ["--clip", str(TINY_CLIP_DIR), "--sam", "tiny_models:tiny_sam_builder", "--sam-checkpoint", str(ckpt),
              "--parser", "rules", "--device", "cpu", "--offline", "--cache", str(data["cache"]),
              "--folds", "4", "--configs", "80", "--min-images", "8", "--min-expressions", "40",
              "--bootstrap", "300", "--no-progress"]
    for k, v in {**PERMISSIVE, "gem_input_size": 224}.items():
        common += ["--set", f"{k}={json.dumps(v)}"]
    root = write_refer(tmp_path / "refer", data)
    out = tmp_path / "out-refer"
    assert main(["tune", "--dataset", "refcoco", "--split", "val", "--data-root", str(root),
                 "--coco-images", str(root / "train2014"), "--out", str(out), *common]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_expressions"] == N_IMAGES * len(EXPRESSIONS) and report["source"]["cache"]["misses"] == 0
    assert report["recommended"] is True
    tuned = HybridGLConfig.from_file(out / "overrides.toml")
    assert tuned.points_per_side == PERMISSIVE["points_per_side"]  # the base config's overrides are kept

    # the same annotations as a Label Studio export; images by file name from --images
    tasks = []
    for i in data["images"]:
        for j, text in enumerate(EXPRESSIONS):
            region = {"type": "brushlabels", "from_name": "mask", "to_name": "image", "original_width": W,
                      "original_height": H, "value": {"format": "rle", "brushlabels": ["Target"],
                                                      "rle": mask2rle(data["gts"][(i, j)].astype(np.uint8) * 255)}}
            tasks.append({"id": 100 * i + j, "data": {"image": f"/data/upload/1/COCO_train2014_{i:012d}.png",
                                                      "text": text},
                          "annotations": [{"id": 100 * i + j, "result": [region], "was_cancelled": False}],
                          "predictions": []})
    tasks.append({"id": 9999, "data": {"image": "/data/upload/1/none.png", "text": "x"}, "annotations": []})
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    out = tmp_path / "out-ls"
    assert main(["tune", "--label-studio-export", str(export), "--images", str(root / "train2014"),
                 "--out", str(out), *common]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_expressions"] == N_IMAGES * len(EXPRESSIONS)
    assert report["source"]["no_annotation"] == 1 and report["source"]["cache"]["misses"] == 0
    assert report["recommended"] is True and "backend.preannotate" in report["repredict"]


def test_the_backend_reports_calibrated_scores_under_a_new_model_version(model, data):
    import io

    from backend.labeling import config_version, parse_config
    from backend.model import HybridGLBackend
    from backend.settings import Settings
    from hybridgl import HybridGL

    buf = io.BytesIO()
    Image.fromarray(data["images"][1]).save(buf, format="PNG")
    config = """<View><Image name="image" value="$image"/><Text name="expr" value="$text"/>
      <BrushLabels name="mask" toName="image"><Label value="Target"/></BrushLabels></View>"""
    fit = {"calibration_features": ["score", "semantic"], "calibration_coef": [-2.0, 3.0, 10.0]}
    calibrated = HybridGL(model.clip, model.tokenizer, sam=model.sam, parser=model.parser,
                          config=model.config.replace(**fit), device="cpu")
    plain, tuned = HybridGLBackend(model, Settings(alternatives=2)), HybridGLBackend(calibrated, Settings(alternatives=2))
    assert plain.model_version != tuned.model_version
    task = {"id": 7, "data": {"image": "x.png", "text": EXPRESSIONS[0]}}
    (a,), (b,) = (be.predict_tasks([task], parse_config(config), fetch=lambda url, tid: buf.getvalue())
                  for be in (plain, tuned))
    # the best mask's version: the tuned model's, for this labelling config
    assert b.predictions[0]["model_version"] == config_version(tuned.model_version, parse_config(config))
    assert a.predictions[0]["model_version"] == config_version(plain.model_version, parse_config(config))
    assert [p["score"] for p in b.predictions] == pytest.approx([r["score"] for r in b.segmentation.ranking[:2]])
    assert [p["score"] for p in a.predictions] == pytest.approx(list(b.segmentation.explain["score_raw"][
        np.argsort(-b.segmentation.explain["F"], kind="stable")][:2]))
    assert [p["score"] for p in a.predictions] != pytest.approx([p["score"] for p in b.predictions])


def test_tune_writes_a_calibration_that_lowers_the_held_out_calibration_error(model, data, tmp_path):
    """Annotators who accept the default's mask on half the expressions and draw another mask on
    the rest: no parameter explains them, but the raw score is overconfident, so a calibration
    is fitted, measured on held-out folds, and written with the overrides."""
    cache = CandidateCache(model, data["cache"])
    images = []
    for i, img in data["images"].items():
        key, cand = cache.image(str(i), lambda img=img: img)
        samples = []
        for j, t in enumerate(EXPRESSIONS):
            chosen = choose(cand, cache.expression(key, cand, t), model.config).index
            gt = cand.masks[chosen] if j % 2 == 0 else ~cand.masks[chosen]
            samples.append(Sample(f"{i}-{j}", t, lambda g=gt: g))
        images.append(TuneImage(i, lambda img=img: img, samples))
    items, _, _ = prepare_items(model, images, data["cache"])
    result = tune(items, model.config, tmp_path, folds=4, n_configs=40, min_images=8, min_expressions=40,
                  bootstrap=300)
    cal = result["calibration"]
    assert result["calibrated"] is True, cal["verdict"]
    assert cal["held_out_calibrated"]["ece"] < cal["held_out_raw"]["ece"]
    written = HybridGLConfig.from_file(tmp_path / "overrides.toml")
    assert list(written.calibration_features) == cal["fit"]["calibration_features"]
    assert written.calibration_coef == pytest.approx(cal["fit"]["calibration_coef"])
    assert written.alpha == model.config.alpha  # no parameter change was recommended


def test_overrides_of_a_base_config_holding_none_are_written_and_reload(tmp_path):
    """A base config with a None value (`--set max_image_side=null`: never downscale) cannot be
    written as TOML, which has no null; the overrides file must still be written, and load back."""
    from hybridgl.tuning import report

    base = HybridGLConfig(max_image_side=None, gem_temperature=0.5)
    path = report.write_overrides(tmp_path, base, {"alpha": 0.3, "calibration_features": ("score",),
                                                   "calibration_coef": (0.1, 2.0)}, {"verdict": "recommended"})
    loaded = HybridGLConfig.from_file(path)
    assert loaded == base.replace(alpha=0.3, calibration_features=("score",), calibration_coef=(0.1, 2.0))
    result = report.write({"verdict": "x", "n_expressions": 0, "n_images": 0, "overrides_file": str(path)},
                          tmp_path, [], None, plots=False)
    assert (tmp_path / result["files"]["overrides"]) == path
    # the usual case stays TOML
    (tmp_path / "plain").mkdir()
    plain = report.write_overrides(tmp_path / "plain", HybridGLConfig(), {"alpha": 0.3}, {"verdict": "x"})
    assert plain.name == "overrides.toml" and HybridGLConfig.from_file(plain).alpha == 0.3


def test_the_search_never_changes_what_a_prepared_view_holds():
    """The candidate cache reuses each image's view across the searched configs; segment refuses a
    view whose image settings (config.VIEW_KEYS) differ, so no searched key may be one of them."""
    from hybridgl.config import VIEW_KEYS
    from hybridgl.tuning.space import SEARCHED, TEXT_SEARCHED

    assert SEARCHED and not set(SEARCHED + TEXT_SEARCHED) & set(VIEW_KEYS)


def test_a_fast_model_caches_the_exact_features(model):
    """The searched configs are scored on the cached features, and a fast view's low-precision rows
    are bounded only for its own config's choices: a fast model (bfloat16 named, so the low-precision
    path runs on any CPU) must cache the exact mode's features, bit for bit."""
    from tiny_models import tiny_hybridgl

    fast = tiny_hybridgl(gem_input_size=224, fast=True, fast_patience=0, dtype="bfloat16")
    img = make_image(3)
    assert fast.prepare(img).low_precision is not None  # the fast model's own view is low precision
    _, exact = CandidateCache(model).image("3", lambda: img)
    _, cached = CandidateCache(fast).image("3", lambda: img)
    np.testing.assert_array_equal(cached.masks, exact.masks)
    np.testing.assert_array_equal(cached.features, exact.features)


def test_a_device_failure_stops_the_preparation_instead_of_leaving_out_every_later_image(model, tmp_path):
    """A sticky CUDA error (simulated by a hook on the tiny CLIP) would fail every later image: they must
    not be left out one by one (a tune on what is left), the preparation stops with DeviceFailure; the
    images prepared before it stay in the cache, so the rerun prepares only the rest."""
    from hybridgl.distributed import DeviceFailure
    from tiny_models import CUDA_ERROR, StickyCudaError, vision_entry

    empty = np.zeros((H, W), bool)
    images = [TuneImage(i, lambda i=i: make_image(100 + i), [Sample(f"{i}-0", EXPRESSIONS[0], lambda: empty)])
              for i in range(2)]
    with StickyCudaError(vision_entry(model), after=10**9) as first:  # the device's work for the first image
        prepare_items(model, images[:1], tmp_path / "count")
    with StickyCudaError(vision_entry(model), after=first.calls), pytest.raises(DeviceFailure) as failed:
        prepare_items(model, images, tmp_path / "cache")
    message = str(failed.value)
    assert f"at image 1 (RuntimeError: {CUDA_ERROR})" in message and "run the same command again" in message
    items, problems, cache = prepare_items(model, images, tmp_path / "cache")
    assert not problems and len(items) == 2
    assert (cache.hits, cache.misses) == (2, 2)  # image 0 and its expression from the cache; image 1 now
