"""Bounded images: an image larger than config.max_image_side is downscaled for the model and its mask
comes back at the original size; the backend holds only the downscaled work after the task."""
from __future__ import annotations

import gc
import io
import tracemalloc

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image, ImageDraw

from backend.labeling import parse_config
from backend.model import HybridGLBackend, view_bytes
from backend.settings import Settings
from hybridgl import HybridGLConfig

from test_backend import CONFIG
from tiny_models import GOLDEN_DIR, tiny_hybridgl

IMAGE = GOLDEN_DIR / "p00_cup_left_of_plate" / "image.png"  # 500x333


def test_default_side_leaves_the_golden_images_alone():
    assert HybridGLConfig().max_image_side == 1024  # every golden image is smaller: the spec's numerics
    with pytest.raises(ValueError, match="max_image_side"):
        HybridGLConfig(max_image_side=10)


def test_a_large_image_is_segmented_at_the_bounded_size_and_answered_at_its_own():
    """An exact 3x enlargement, bounded back to the original side, gives the original's answer, enlarged."""
    small = np.asarray(Image.open(IMAGE).convert("RGB"))
    big = small.repeat(3, axis=0).repeat(3, axis=1)  # 1500x999
    model = tiny_hybridgl(sam=True, max_image_side=500)
    expression = "the cup to the left of the plate"
    view_small, view_big = model.prepare(small), model.prepare(big)
    assert view_big.size == view_small.size == (333, 500) and view_big.original_size == (999, 1500)
    np.testing.assert_array_equal(view_big.image, small)  # area averaging of 3x3 equal pixels
    np.testing.assert_array_equal(view_big.masks, view_small.masks)
    seg_small, seg_big = model.segment(view_small, expression), model.segment(view_big, expression)
    assert (seg_big.index, seg_big.score) == (seg_small.index, pytest.approx(seg_small.score))
    assert seg_big.mask.shape == (999, 1500)
    np.testing.assert_array_equal(seg_big.mask, seg_small.mask.repeat(3, axis=0).repeat(3, axis=1))
    # given proposals at the original size are bounded the same way
    injected = model.prepare(big, proposals=view_big.full_size(view_big.masks[0])[None])
    np.testing.assert_array_equal(injected.masks[0], view_small.masks[0])


def huge_png(width: int, height: int) -> bytes:
    """A few shapes on a plain background: a tiny file of width x height pixels."""
    im = Image.new("RGB", (width, height), (200, 200, 200))
    d = ImageDraw.Draw(im)
    d.rectangle([width // 10, height // 3, width // 3, height * 2 // 3], fill=(200, 30, 30))
    d.ellipse([width // 2, height // 4, width * 9 // 10, height * 3 // 4], fill=(30, 30, 200))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_a_59_megapixel_upload_gives_a_full_size_mask_and_keeps_only_bounded_work():
    """Just under HYBRIDGL_MAX_IMAGE_PIXELS: the prediction is at the image's size; what stays in
    memory after the task (the cached prepared view) is the bounded view, not 59 MP masks."""
    width, height = 7800, 7600
    raw = huge_png(width, height)
    assert len(raw) < 2**20
    backend = HybridGLBackend(tiny_hybridgl(sam=True, max_image_side=512), Settings())  # 1024 costs 4x, same path
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        (outcome,) = backend.predict_tasks([{"id": 1, "data": {"image": "huge.png", "text": "the red box"}}],
                                           parse_config(CONFIG), fetch=lambda url, task_id: raw)
        assert outcome.ok, outcome.error
        (region,) = outcome.predictions[0]["result"]
        assert (region["original_width"], region["original_height"]) == (width, height)
        mask = decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0
        assert 0 < mask.sum() < width * height
        del outcome, region, mask
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    (view,) = backend._views.values()
    assert max(view.size) == 512 and view.output_size == (height, width)
    assert left < 64 * 2**20 and view_bytes(view) < 64 * 2**20  # 59 MP masks would be 59 MB each


def test_given_proposals_of_the_wrong_size_are_refused_before_downscaling():
    """Proposals must match the image as given: downscaling used to crop wider ones silently and to
    fail on smaller ones with an IndexError; a Proposals object was never checked."""
    from hybridgl.proposals import Proposals

    model = tiny_hybridgl(sam=False, max_image_side=500)
    big = np.zeros((999, 1500, 3), np.uint8)
    for shape in ((1, 999, 1600), (1, 900, 1500)):
        with pytest.raises(ValueError, match=r"proposals must be bool \[N,999,1500\]"):
            model.prepare(big, proposals=np.zeros(shape, bool))
    small = np.zeros((333, 500, 3), np.uint8)
    wrong = Proposals.from_masks(np.ones((1, 333, 501), bool), 333, 501)
    with pytest.raises(ValueError, match=r"proposals must be bool \[N,333,500\]"):
        model.prepare(small, proposals=wrong)


def test_given_proposals_keep_their_quality_and_thin_masks_when_downscaled():
    """Downscaling given proposals kept neither SAM's predicted IoU of a Proposals object (the
    calibration's sam_iou feature became NaN) nor a mask thinner than the sampling step (a 1-pixel
    line vanished and an empty mask was scored)."""
    from hybridgl.proposals import Proposals

    model = tiny_hybridgl(sam=False, max_image_side=500)
    big = np.asarray(Image.open(IMAGE).convert("RGB")).repeat(3, axis=0).repeat(3, axis=1)  # 1500x999
    masks = np.zeros((3, 999, 1500), bool)
    masks[0, 100:400, 200:600] = True
    masks[1, 601, 300:1200] = True  # one pixel tall: nearest neighbour samples rows 0, 3, 6, ...
    masks[2, 700:900, 1000:1400] = True
    given = Proposals.from_masks(masks, 999, 1500)
    given = Proposals(given.masks, given.boxes_xywh, np.array([0.9, 0.8, 0.7], np.float32))
    view = model.prepare(big, proposals=given)
    np.testing.assert_array_equal(view.proposals.quality, given.quality)
    assert view.masks[1].any() and view.masks[1].sum() == 300  # row 601 -> row 200, columns 100..399
    assert np.flatnonzero(view.masks[1].any(axis=1)).tolist() == [200]
    np.testing.assert_array_equal(view.masks[0], masks[0, ::3, ::3])  # thick masks: nearest neighbour as before
    np.testing.assert_array_equal(view.masks[2], masks[2, ::3, ::3])
    seg = model.segment(view, "the cup")
    assert seg.mask.shape == (999, 1500)


def test_cached_proposals_of_a_large_image_are_those_sam_gives_without_the_cache(tmp_path):
    """The evaluation's proposal cache ran SAM on the full-size image and prepare then shrank its
    masks by nearest neighbour, while without the cache SAM runs on the downscaled image: runs with
    and without the cache were not comparable. SAM now sees the working image either way, and the
    cache key holds max_image_side."""
    from hybridgl.evaluation.runner import ProposalCache

    class Group:
        image_id = "big"

    image = np.asarray(Image.open(IMAGE).convert("RGB"))  # 500x333
    model = tiny_hybridgl(sam=True, max_image_side=200)
    plain = model.prepare(image)
    assert plain.original_size == (333, 500) and plain.size == (133, 200) and len(plain) > 0
    for round_ in ("miss", "hit"):
        cache = ProposalCache(tmp_path, model)
        cached = model.prepare(image, proposals=cache(Group(), image))
        assert (cache.hits, cache.misses) == ((0, 1) if round_ == "miss" else (1, 0))
        np.testing.assert_array_equal(cached.masks, plain.masks)
        np.testing.assert_array_equal(cached.proposals.quality, plain.proposals.quality)
        seg_a, seg_b = model.segment(plain, "the cup"), model.segment(cached, "the cup")
        assert seg_a.index == seg_b.index and seg_b.mask.shape == (333, 500)
    other = ProposalCache(tmp_path, tiny_hybridgl(sam=True, max_image_side=300))
    assert other.key != cache.key
