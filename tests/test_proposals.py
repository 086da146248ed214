"""Our mask generator against segment-anything's own SamAutomaticMaskGenerator on the same inputs.

The tiny random SAM's logits hover near 0; its hypernetwork outputs are scaled so that
masks have non-zero stability scores and every filter (predicted IoU, stability, crop edges,
NMS, small regions) keeps some masks and drops others.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator

from hybridgl import HybridGLConfig
from hybridgl.pipeline import load_image
from hybridgl.proposals import MaskProposer

from tiny_models import GOLDEN_DIR, build_sharp_sam, build_tiny_sam

SETTINGS = {
    "filters": dict(points_per_side=3, pred_iou_thresh=0.2, stability_score_thresh=0.002,
                    box_nms_thresh=1.0, min_mask_region_area=300),
    "nms, small regions": dict(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                               box_nms_thresh=0.9, min_mask_region_area=5000),
    "crops": dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.9,
                  min_mask_region_area=0, crop_n_layers=1, points_per_batch=7),
}


@pytest.fixture(scope="module")
def sharp_sam():
    return build_sharp_sam()


@pytest.fixture(scope="module")
def image():
    return load_image(GOLDEN_DIR / "p02_bird_above_tree" / "image.png")


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_same_masks_as_segment_anything(sharp_sam, image, name):
    settings = SETTINGS[name]
    reference = SamAutomaticMaskGenerator(sharp_sam, output_mode="binary_mask", **settings).generate(image)
    ours = MaskProposer(sharp_sam, HybridGLConfig(**settings))(image)
    assert 0 < len(reference) < 3 * settings["points_per_side"] ** 2 * (1 + 4 * settings.get("crop_n_layers", 0))
    assert len(ours) == len(reference)
    for i, record in enumerate(reference):
        np.testing.assert_array_equal(ours.masks[i], record["segmentation"], err_msg=f"mask {i}")
        assert ours.boxes_xywh[i].tolist() == record["bbox"]
        # float rounding only: our encoder runs the same operations on other memory layouts
        assert ours.quality[i] == pytest.approx(record["predicted_iou"], abs=1e-6)
    assert ours.masks.dtype == bool and ours.boxes_xywh.dtype == np.int64 and ours.quality.dtype == np.float32


def test_every_filter_drops_something(sharp_sam, image):
    """The settings above are not vacuous: each filter alone removes masks (small regions change them)."""
    base = dict(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
                min_mask_region_area=0)
    everything = len(MaskProposer(sharp_sam, HybridGLConfig(**base))(image))
    assert everything == 3 * 9
    for change in ({"pred_iou_thresh": 0.2}, {"stability_score_thresh": 0.1}, {"box_nms_thresh": 0.9}):
        assert len(MaskProposer(sharp_sam, HybridGLConfig(**{**base, **change}))(image)) < everything, change


def test_nothing_survives_is_empty_proposals(sharp_sam, image):
    props = MaskProposer(sharp_sam, HybridGLConfig(points_per_side=2, pred_iou_thresh=5.0))(image)
    assert len(props) == 0 and props.masks.shape == (0, *image.shape[:2])


def test_sam_dtype_runs_the_encoder_in_low_precision(sharp_sam, image):
    """sam_dtype="bfloat16" puts SAM's image encoder under autocast (the decoder and thresholds stay
    float32): the embedding moves by bfloat16's rounding, the masks' borders a little (most masks
    match a float32 one almost exactly), which is why it is an explicit choice."""
    settings = SETTINGS["filters"]
    exact = MaskProposer(sharp_sam, HybridGLConfig(**settings))
    low = MaskProposer(sharp_sam, HybridGLConfig(**settings, sam_dtype="bfloat16"))
    e32, _ = exact._embed(image)
    e16, _ = low._embed(image)
    assert e16.dtype == torch.float32
    assert 1e-4 < ((e16 - e32).norm() / e32.norm()).item() < 0.05
    ours, theirs = low(image), exact(image)
    assert len(ours) > 0
    best = [max((m & n).sum() / (m | n).sum() for n in theirs.masks) for m in ours.masks]
    assert np.median(best) > 0.95


def test_which_dtype_sam_runs_in():
    """float32 unless asked; the fast mode on a GPU asks for float16; on CPU the fast mode leaves SAM
    exact (its masks would move); an explicit sam_dtype wins everywhere."""
    sam = build_tiny_sam()
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert MaskProposer(sam, HybridGLConfig()).sam_dtype(gpu) == "float32"
    assert MaskProposer(sam, HybridGLConfig(fast=True)).sam_dtype(cpu) == "float32"
    assert MaskProposer(sam, HybridGLConfig(fast=True)).sam_dtype(gpu) == "float16"
    assert MaskProposer(sam, HybridGLConfig(sam_dtype="bfloat16")).sam_dtype(cpu) == "bfloat16"
    assert MaskProposer(sam, HybridGLConfig(fast=True, sam_dtype="float32")).sam_dtype(gpu) == "float32"
    with pytest.raises(ValueError, match="sam_dtype"):
        HybridGLConfig(sam_dtype="int8")


@pytest.mark.parametrize("shape", [(1, 3000), (3000, 1)])
def test_an_image_too_thin_for_sams_input_has_no_proposals(sharp_sam, shape):
    """SAM's resize to 1024 on the long side rounds a 1x3000 image's short side to 0 pixels: no
    proposals (the spec's "tiny images"), not a ValueError from the resize (max_image_side off)."""
    image = np.full((*shape, 3), 128, np.uint8)
    props = MaskProposer(sharp_sam, HybridGLConfig(points_per_side=2, pred_iou_thresh=0.0,
                                                   stability_score_thresh=0.0, max_image_side=None))(image)
    assert len(props) == 0 and props.masks.shape == (0, *shape)
