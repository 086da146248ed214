"""The method on a CUDA device: the CPU tests' checks where the code's CUDA branches run.

Skipped where torch sees no GPU (CI, this repository's machines); `bench/gpu_check.sh` runs this
file on a GPU machine. CPU and GPU float32 differ in summation order only (the method's passes
are IEEE float32 there too, hybridgl/precision.py), so the golden tolerances and choices hold,
and our SAM generator matches segment-anything's own generator on the same device.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator

from hybridgl import HybridGL, HybridGLConfig
from hybridgl.pipeline import load_image
from hybridgl.precision import ieee_float32
from hybridgl.proposals import MaskProposer

from golden_cases import CASES, EXACT, TOLERANCES, load_case
from test_proposals import SETTINGS
from tiny_models import GOLDEN_DIR, PERMISSIVE, TINY_CLIP_DIR, build_sharp_sam, build_tiny_sam, tiny_clip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = "cuda"


@pytest.fixture(scope="module")
def sharp_sam_cuda():
    return build_sharp_sam().to(CUDA)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_our_generator_on_cuda_matches_segment_anythings(sharp_sam_cuda, name):
    """Crop layers, NMS, small-region removal: every step of the generator with tensors on the GPU."""
    image = load_image(GOLDEN_DIR / "p02_bird_above_tree" / "image.png")
    settings = SETTINGS[name]
    with ieee_float32:  # segment-anything's own passes with the same float32 as ours (not torch's TF32 convs)
        reference = SamAutomaticMaskGenerator(sharp_sam_cuda, output_mode="binary_mask", **settings).generate(image)
    ours = MaskProposer(sharp_sam_cuda, HybridGLConfig(**settings))(image)
    assert len(reference) > 0 and len(ours) == len(reference)
    for i, record in enumerate(reference):
        np.testing.assert_array_equal(ours.masks[i], record["segmentation"], err_msg=f"mask {i}")
        assert ours.boxes_xywh[i].tolist() == record["bbox"]
        assert ours.quality[i] == pytest.approx(record["predicted_iou"], abs=1e-4)


@pytest.fixture(scope="module")
def clip_pair():
    """A CLIP of this module's own: HybridGL moves its model to the device in place, and the other
    test files share theirs on the CPU."""
    return tiny_clip()


@pytest.fixture(scope="module")
def exact_cuda(clip_pair):
    return HybridGL(*clip_pair, sam=None, parser="rules", device=CUDA)


@pytest.mark.parametrize("name", CASES)
def test_golden_cases_on_cuda(exact_cuda, name):
    data, image, parse = load_case(name)
    seg = exact_cuda.segment(exact_cuda.prepare(image, proposals=data["masks"]), parse=parse)
    for key, atol in TOLERANCES.items():
        if np.isnan(data[key]).all():
            continue
        np.testing.assert_allclose(seg.explain[key], data[key], rtol=0, atol=atol, err_msg=f"{name}: {key}")
    for key in EXACT:
        np.testing.assert_array_equal(seg.explain[key], data[key], err_msg=f"{name}: {key}")
    np.testing.assert_array_equal(seg.mask, data["masks"][int(data["pred_final"])])


@pytest.mark.parametrize("name", CASES)
def test_the_fast_mode_on_cuda_makes_the_golden_choices_in_float16(clip_pair, name):
    fast = HybridGL(*clip_pair, sam=None, parser="rules", device=CUDA,
                    config=HybridGLConfig(fast=True, fast_patience=0))
    data, image, parse = load_case(name)
    view = fast.prepare(image, proposals=data["masks"])
    assert view.low_precision is not None  # float16 autocast ran (the fast mode's GPU precision)
    seg = fast.segment(view, parse=parse)
    for key in EXACT:
        np.testing.assert_array_equal(seg.explain[key], data[key], err_msg=f"{name}: {key}")


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_the_whole_pipeline_on_cuda_with_sam(fast):
    """SAM (float16 encoder in the fast mode), crops and small-region removal, features, GEM, scoring;
    the view pickles (Ray moves views and results between processes) and segments after the trip."""
    config = HybridGLConfig(**{**PERMISSIVE, "crop_n_layers": 1, "min_mask_region_area": 4, "fast": fast})
    model = HybridGL.from_pretrained(clip=str(TINY_CLIP_DIR), sam=build_tiny_sam(), parser="rules",
                                     device=CUDA, config=config)
    assert model.device.type == "cuda"
    image = load_image(GOLDEN_DIR / "p00_cup_left_of_plate" / "image.png")
    view = model.prepare(image)
    assert len(view.masks) > 0
    seg = model.segment(view, "the cup on the left of the plate")
    assert seg.mask is not None and seg.mask.shape == image.shape[:2] and seg.mask.dtype == bool
    assert 0.0 <= seg.score <= 1.0
    again = model.segment(pickle.loads(pickle.dumps(view)), "the cup on the left of the plate")
    assert again.index == seg.index
    assert pickle.loads(pickle.dumps(seg)).index == seg.index


def test_a_gpu_model_is_the_cpu_models_choice_on_an_image():
    """The same tiny models on CPU and GPU choose the same proposal for the same injected masks."""
    image = load_image(GOLDEN_DIR / "p05_apple_in_bowl" / "image.png")
    data, _, parse = load_case("p05_apple_in_bowl")
    chosen = {}
    for device in ("cpu", CUDA):
        model = HybridGL.from_pretrained(clip=str(TINY_CLIP_DIR), sam=None, parser="rules", device=device)
        chosen[device] = model.segment(model.prepare(image, proposals=data["masks"]), parse=parse).index
    assert chosen["cpu"] == chosen[CUDA]


def test_proposals_given_as_a_gpu_tensor(exact_cuda):
    data, image, parse = load_case("p01_red_ball")
    masks = torch.from_numpy(data["masks"]).to(CUDA)
    seg = exact_cuda.segment(exact_cuda.prepare(image, proposals=masks), parse=parse)
    assert seg.index == int(data["pred_final"])


def test_a_view_prepared_on_the_gpu_segments_on_the_cpu_and_back(exact_cuda):
    """A view made by one model, segmented by a model on another device (views travel: Ray)."""
    data, image, parse = load_case("p03_bigger_ball")
    cpu_model = HybridGL(*tiny_clip(), sam=None, parser="rules", device="cpu")
    on_gpu = exact_cuda.prepare(image, proposals=data["masks"])
    on_cpu = cpu_model.prepare(image, proposals=data["masks"])
    assert cpu_model.segment(on_gpu, parse=parse).index == int(data["pred_final"])
    assert exact_cuda.segment(on_cpu, parse=parse).index == int(data["pred_final"])
    assert exact_cuda.segment(on_gpu, parse=parse).index == int(data["pred_final"])  # masks back on the GPU


def test_the_model_version_tells_a_float16_sam_from_a_float32_one():
    """The fast mode runs SAM's encoder in float16 on a GPU only (other proposals): its predictions
    must not share a version with the same config's on CPU; the exact mode's do."""
    versions = {}
    for device in ("cpu", CUDA):
        for fast in (False, True):
            model = HybridGL(*tiny_clip(), sam=build_tiny_sam(), parser="rules", device=device,
                             config=HybridGLConfig(fast=fast))
            versions[device, fast] = model.model_version
    assert versions["cpu", False] == versions[CUDA, False]
    assert versions["cpu", True] != versions[CUDA, True]


@pytest.mark.parametrize("shape", [(1, 1), (2, 2000), (3, 3), (7, 4000), (16, 17), (31, 640)])
def test_thin_and_tiny_images_on_cuda(exact_cuda, shape):
    """The coherence map's antialiased resize from 448 to a side of a few pixels (CUDA's kernel
    refuses large downscale factors): the same map as on the CPU."""
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    masks = np.ones((2, *shape), dtype=bool)
    masks[1, :, shape[1] // 2:] = False  # the left half (empty for a one-pixel-wide image)
    cpu_model = HybridGL(*tiny_clip(), sam=None, parser="rules", device="cpu")
    gpu = exact_cuda.segment(exact_cuda.prepare(image, proposals=masks), "the thing on the left")
    cpu = cpu_model.segment(cpu_model.prepare(image, proposals=masks), "the thing on the left")
    assert gpu.mask.shape == shape
    np.testing.assert_allclose(gpu.explain["gem_A"], cpu.explain["gem_A"], atol=1e-4)


def test_the_guidance_means_and_the_text_cache_on_cuda(exact_cuda):
    """The guidance score's chunked float64 products on the GPU give the CPU's means; a text feature
    cached on the GPU is the one computed there."""
    from hybridgl.guidance import inside_outside_means

    gen = torch.Generator().manual_seed(0)
    guided = torch.rand(300, 400, generator=gen)
    masks = torch.rand(40, 300, 400, generator=gen) > torch.linspace(0.0, 1.0, 40)[:, None, None]
    cpu = inside_outside_means(guided, masks)
    gpu = inside_outside_means(guided.to(CUDA), masks.to(CUDA))
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(b.cpu().numpy(), a.numpy(), rtol=1e-12, atol=1e-15)
    from hybridgl.text import encode_text

    first = encode_text(exact_cuda.clip, exact_cuda.tokenizer, "a photo of bird", CUDA, exact_cuda.text_cache)
    again = encode_text(exact_cuda.clip, exact_cuda.tokenizer, "a photo of bird", CUDA, exact_cuda.text_cache)
    assert again.device.type == "cuda" and torch.equal(first, again)
