"""Evaluation harness parts that need no model: metrics, calibration, RLE, dataset readers, plots."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fixtures.evaluation import minidata
from hybridgl.evaluation import calibration, masks
from hybridgl.evaluation.datasets import load_dataset, load_phrasecut, load_refer
from hybridgl.evaluation.metrics import (IoUAccumulator, PAPER_RESULTS, format_table, intersection_union,
                                         mask_iou, summarize)


# ---------------------------------------------------------------------------------------------
# metrics, by hand

def test_intersection_union_by_hand():
    gt = np.zeros((4, 5), bool)
    gt[0:2, 0:3] = True  # 6 pixels
    pred = np.zeros((4, 5), bool)
    pred[1:3, 1:4] = True  # 6 pixels, 2 shared
    assert intersection_union(pred, gt) == (2, 10)
    assert mask_iou(pred, gt) == pytest.approx(0.2)
    assert intersection_union(None, gt) == (0, 6)  # no proposal: an empty prediction
    assert mask_iou(None, np.zeros((4, 5), bool)) == 0.0  # empty union: IoU 0 by the spec
    with pytest.raises(ValueError):
        intersection_union(np.zeros((3, 3), bool), gt)


def test_oiou_miou_precision_by_hand():
    # (I, U): IoU 0.5, 0, 0 (empty union), 0.9, 0.6
    counts = [(2, 4), (0, 5), (0, 0), (9, 10), (3, 5)]
    m = summarize(counts)
    assert m["n"] == 5
    assert m["oIoU"] == pytest.approx(100 * 14 / 24)  # sums: I 14, U 24
    assert m["mIoU"] == pytest.approx(100 * (0.5 + 0 + 0 + 0.9 + 0.6) / 5)  # 40.0
    assert m["precision"]["0.5"] == pytest.approx(60.0)
    assert m["precision"]["0.6"] == pytest.approx(40.0)
    assert m["precision"]["0.9"] == pytest.approx(20.0)
    assert m["precision"]["0.7"] == pytest.approx(20.0)
    acc = IoUAccumulator()
    with pytest.raises(ValueError):
        acc.add(3, 2)
    assert summarize([])["oIoU"] == 0.0 and summarize([])["mIoU"] == 0.0


def test_table_shows_paper_numbers():
    assert PAPER_RESULTS[("refcoco", "val")] == (41.81, 49.48)
    assert PAPER_RESULTS[("phrasecut", "test")] == (38.39, 36.98)
    text = format_table({"oIoU": 40.0, "mIoU": 50.0, "n": 3, "hybrid_only": {"oIoU": 30.0, "mIoU": 40.0}},
                        "refcoco", "val")
    assert "41.81" in text and "49.48" in text and "31.71" in text and "40.27" in text
    assert "-1.81" in text  # 40.00 - 41.81
    text = format_table({"oIoU": 1.0, "mIoU": 2.0, "n": 1}, "refcoco", "train")
    assert "HybridGL" in text and " - " in text


# ---------------------------------------------------------------------------------------------
# calibration, by hand

def test_auroc_by_hand():
    # positives 0.9, 0.4; negatives 0.6, 0.1: pairs (0.9>0.6, 0.9>0.1, 0.4<0.6, 0.4>0.1) -> 3/4
    assert calibration.auroc([0.9, 0.4, 0.6, 0.1], [True, True, False, False]) == pytest.approx(0.75)
    # a tie counts one half: positive 0.5 vs negative 0.5
    assert calibration.auroc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    assert calibration.auroc([0.2, 0.9], [False, True]) == pytest.approx(1.0)
    assert calibration.auroc([0.2, 0.9], [True, True]) is None


def test_threshold_for_precision_by_hand():
    scores = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5]
    ious = [0.9, 0.8, 0.1, 0.7, 0.6, 0.0]  # good: Y Y N Y Y N
    # accepted prefixes: 1/1, 2/2, 2/3, 3/4, 4/5, 4/6
    t = calibration.threshold_for_precision(scores, ious, 0.8)
    assert t["threshold"] == pytest.approx(0.6) and t["accepted"] == 5
    assert t["precision"] == pytest.approx(0.8) and t["coverage"] == pytest.approx(5 / 6)
    assert t["recall"] == pytest.approx(1.0)
    t = calibration.threshold_for_precision(scores, ious, 0.95)
    assert t["threshold"] == pytest.approx(0.9) and t["accepted"] == 2
    assert calibration.threshold_for_precision([0.3], [0.1], 0.5)["threshold"] is None
    # ties: the threshold keeps or drops a whole group of equal scores
    t = calibration.threshold_for_precision([0.9, 0.5, 0.5], [0.9, 0.9, 0.0], 0.9)
    assert t["threshold"] == pytest.approx(0.9) and t["accepted"] == 1


def test_reliability_bins_and_ece_by_hand():
    rel = calibration.reliability_bins([0.05, 0.15, 0.95, 0.99], [0.0, 0.6, 0.7, 0.2], n_bins=10)
    bins = rel["bins"]
    assert [b["count"] for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins[9]["good_rate"] == pytest.approx(0.5) and bins[9]["mean_iou"] == pytest.approx(0.45)
    # ECE = 1/4 |0 - .05| + 1/4 |1 - .15| + 2/4 |0.5 - 0.97|
    assert rel["ece"] == pytest.approx(0.25 * 0.05 + 0.25 * 0.85 + 0.5 * 0.47)


def test_plots_are_pngs(tmp_path):
    rng = np.random.default_rng(0)
    scores, ious = rng.random(50), rng.random(50)
    report = calibration.calibration_report(scores, ious)
    p1 = calibration.plot_reliability(report, tmp_path / "rel.png")
    p2 = calibration.plot_iou_histogram(ious, tmp_path / "hist.png", hybrid_ious=rng.random(50))
    for p in (p1, p2):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (640, 480)
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 16)) > 3  # something was drawn


# ---------------------------------------------------------------------------------------------
# RLE and polygons

def test_rle_round_trip_and_counts():
    rng = np.random.default_rng(1)
    a, b = rng.random((17, 23)) > 0.5, rng.random((17, 23)) > 0.3
    ra, rb = masks.encode(a), masks.encode(b)
    assert ra["size"] == [17, 23] and isinstance(ra["counts"], str)
    assert np.array_equal(masks.decode(ra), a)
    assert masks.area(ra) == int(a.sum())
    assert masks.rle_intersection_union(ra, rb) == intersection_union(a, b)
    assert masks.rle_intersection_union(None, rb) == (0, int(b.sum()))
    uncompressed = {"size": [2, 3], "counts": [1, 2, 3]}  # column-major runs: 0, 1 1, 0 0 0
    assert np.array_equal(masks.decode(uncompressed), np.array([[False, True, False], [True, False, False]]))


def test_polygon_rasterisation_conventions():
    m = masks.coco_segmentation_to_mask([minidata.rect_poly(2, 2, 12, 10), minidata.rect_poly(14, 1, 16, 3)], 16, 20)
    assert np.array_equal(m, minidata.coco_rect_mask(16, 20, (2, 2, 12, 10), (14, 1, 16, 3)))
    assert m.sum() == 80 + 4
    p = masks.polygons_to_mask_pil([minidata.rect_points(2, 2, 12, 10)], 16, 20)
    assert p.sum() == 11 * 9  # Pillow includes the outline, as PhraseCut's toolkit
    assert masks.coco_segmentation_to_mask([], 4, 4).sum() == 0
    # a degenerate polygon (2 points) heading the list made pycocotools read the list as boxes: TypeError
    # for the annotation (outside the runner's per-image try, so a run and every resume stopped there)
    degenerate = masks.coco_segmentation_to_mask([[1.0, 1.0, 5.0, 5.0], minidata.rect_poly(2, 2, 12, 10)], 16, 20)
    assert np.array_equal(degenerate, minidata.coco_rect_mask(16, 20, (2, 2, 12, 10)))
    assert masks.coco_segmentation_to_mask([[1.0, 1.0, 5.0, 5.0]], 16, 20).sum() == 0


# ---------------------------------------------------------------------------------------------
# dataset readers on generated miniature datasets

def test_refer_layout_reader(tmp_path):
    root, images = minidata.make_refer(tmp_path)
    ds = load_refer(root, "refcoco", "val", coco_images=images)
    assert ds.name == "refcoco" and ds.split == "val"
    assert [s.sent_id for s in ds.samples()] == minidata.VAL_SENT_IDS  # train/testA refs ignored
    assert len(ds) == 4 and ds.num_images == 2  # image 3 (train only) never appears
    g1 = ds.groups[0]
    assert g1.image_id == 1 and (g1.height, g1.width) == (32, 40)
    assert [s.sentence for s in g1.samples][:2] == ["The red block on the left", "red thing"]  # raw text
    gts = g1.ground_truths()
    assert set(gts) == {1, 2}  # two sentences of ref 1 share one mask
    assert np.array_equal(gts[1], minidata.expected_refer_gt(1))  # both polygons of the object
    assert gts[1].sum() == 10 * 8 + 10 * 6
    assert np.array_equal(ds.groups[1].ground_truth(3), minidata.expected_refer_gt(3))
    assert g1.load_image().shape == (32, 40, 3)
    assert len(load_refer(root, "refcoco", "testA", coco_images=images)) == 1
    with pytest.raises(ValueError, match="splits: testA, train, val"):
        load_refer(root, "refcoco", "testB", coco_images=images)
    with pytest.raises(FileNotFoundError, match="refs"):
        load_refer(root, "refcoco+", "val", coco_images=images)
    limited = ds.limited(3)
    assert [s.sent_id for s in limited.samples()] == [11, 12, 21] and limited.num_images == 1


def test_refcocog_uses_umd_refs_and_default_image_dir(tmp_path):
    root, images = minidata.make_refer(tmp_path, dataset="refcocog", split_by="umd")
    target = root / "images" / "mscoco" / "images"
    target.mkdir(parents=True)
    images.rename(target / "train2014")
    ds = load_dataset("refcocog", "val", root)
    assert len(ds) == 4
    assert ds.groups[0].load_image().shape == (32, 40, 3)


def test_image_size_mismatch_is_resized(tmp_path):
    root, images = minidata.make_refer(tmp_path)
    name = "COCO_train2014_000000000001.jpg"
    Image.new("RGB", (20, 16), "white").save(images / name)
    ds = load_refer(root, "refcoco", "val", coco_images=images)
    assert ds.groups[0].load_image().shape == (32, 40, 3)


def test_phrasecut_layout_reader(tmp_path):
    root = minidata.make_phrasecut(tmp_path)
    ds = load_phrasecut(root, "test")
    assert [g.image_id for g in ds.groups] == [3, 7]  # sorted, as the toolkit
    assert [s.sent_id for s in ds.samples()] == ["3__1", "7__1", "7__2"]  # no phrase_structure: skipped
    assert ds.skipped == {"no_phrase_structure": 1}
    g7 = ds.groups[1]
    assert (g7.height, g7.width) == (30, 36)
    gt = g7.ground_truth("7__1")  # the union of both instances
    assert np.array_equal(gt, minidata.expected_phrasecut_gt("7__1"))
    assert gt.sum() == 7 * 7 + 11 * 11
    assert g7.samples[0].sentence == "two green boxes"
    with pytest.raises(FileNotFoundError):
        load_phrasecut(root, "val")
    assert len(load_dataset("phrasecut", "test", root / "VGPhraseCut_v0")) == 3


def test_evaluation_import_is_light():
    import subprocess
    import sys

    code = ("import sys, hybridgl.evaluation.metrics, hybridgl.evaluation.datasets, "
            "hybridgl.evaluation.calibration, hybridgl.evaluation.runner, hybridgl.evaluation.label_studio; "
            "bad = [m for m in ('label_studio_sdk', 'pycocotools') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
