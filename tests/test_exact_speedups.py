"""The exact mode's shortcuts compute what the straightforward code computes.

Composites are built on the resize taps instead of at full resolution, and the last CLIP block
computes only the CLS outputs the fusion mode reads; both are checked here against the plain
formulation (full-resolution composite then `F.interpolate`, every block on every token).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridgl import HybridGLConfig, clip_vit
from hybridgl.config import FUSION_MODES
from hybridgl.hybrid_features import (Resampler, blur, fuse_branches, global_inputs, image_tensor, local_inputs,
                                      normalize, token_masks)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


@pytest.mark.parametrize("shape", [(360, 640), (100, 150), (224, 224), (481, 333), (14, 15)])
def test_resampler_is_bilinear_resize(shape):
    x = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    r = Resampler(*shape, 224)
    np.testing.assert_allclose(r.combine(r.taps(x)).numpy(), resize(x, 224).numpy(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (181, 257, 3), dtype=np.uint8)
    masks = np.zeros((5, 181, 257), bool)
    for m in masks:
        y, x = rng.integers(0, 150), rng.integers(0, 220)
        m[y:y + rng.integers(3, 60), x:x + rng.integers(3, 80)] = True
    masks[4] = rng.random((181, 257)) < 0.5  # speckled: every tap matters
    return image, torch.from_numpy(masks)


def test_composites_on_taps_equal_full_resolution_composites(scene):
    image, masks = scene
    cfg = HybridGLConfig()
    image01 = image_tensor(image, torch.device("cpu"))
    x = normalize(image01, cfg.image_mean, cfg.image_std)[None]
    m = masks[:, None].float()
    fill = torch.tensor(cfg.fill_value).view(1, 3, 1, 1)
    expected_local = resize(x * m + (1 - m) * fill, 224)
    sharp, blurred = torch.from_numpy(image), torch.from_numpy(blur(image, cfg.blur_kernel))
    composite = torch.where(masks[..., None], sharp[None], blurred[None]).permute(0, 3, 1, 2).float() / 255
    expected_global = normalize(resize(composite, 224), cfg.image_mean, cfg.image_std)
    expected_w = resize(masks[:, None].float(), 14)[:, 0].flatten(1)

    np.testing.assert_allclose(local_inputs(image01, masks, cfg).numpy(), expected_local.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(global_inputs(sharp, blurred, masks, cfg).numpy(), expected_global.numpy(),
                               rtol=0, atol=1e-5)
    w = token_masks(masks, 14)
    assert (w[:, 0] == 1).all()
    np.testing.assert_allclose(w[:, 1:].numpy(), expected_w.numpy(), rtol=0, atol=1e-6)


def plain_fusion(clip, local, global_, w, cfg):
    """Every block on every token of both branches, then the CLS feature the mode asks for."""
    layers, b, beta = clip.vision_model.encoder.layers, local.shape[0], cfg.beta
    blocked = torch.zeros(b, w.shape[1], w.shape[1], dtype=torch.bool)
    blocked[:, 0, 1:] = w[:, 1:] == 0
    x = clip_vit.embed(clip, torch.cat([local, global_]))
    for layer in layers[:cfg.fusion_start_block]:
        x = clip_vit.residual_block(layer, x)
    xl, xg = x[:b], x[b:]
    hl, hg = xl, xg
    block = clip_vit.residual_block
    for layer in layers[cfg.fusion_start_block:]:
        gl = xl + beta * (w[..., None] * xg)
        if cfg.fusion_mode == "G2L":
            xl, xg = block(layer, gl), block(layer, xg, blocked)
        elif cfg.fusion_mode == "L2G":
            xl, xg = block(layer, xl), block(layer, xl + beta * xg, blocked)
        elif cfg.fusion_mode == "G2L+L2G":
            hl, hg = block(layer, hl + beta * (w[..., None] * xg)), block(layer, xl + beta * hg, blocked)
            xl, xg = block(layer, xl), block(layer, xg, blocked)
        else:
            xl, xg = block(layer, xl), block(layer, xg, blocked)
    f = lambda t: clip_vit.project_tokens(clip, t[:, 0])  # noqa: E731
    return {"G2L": lambda: f(xl), "local": lambda: f(xl), "L2G": lambda: f(xg), "global": lambda: f(xg),
            "G2L+L2G": lambda: f(hl) + f(hg),
            "G+L": lambda: cfg.fusion_weight * F.normalize(f(xg), dim=-1)
            + (1 - cfg.fusion_weight) * F.normalize(f(xl), dim=-1)}[cfg.fusion_mode]()


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_last_block_on_cls_only_changes_nothing(tiny_clip_pair, scene, mode):
    clip, _ = tiny_clip_pair
    image, masks = scene
    cfg = HybridGLConfig(fusion_mode=mode)
    image01 = image_tensor(image, torch.device("cpu"))
    sharp, blurred = torch.from_numpy(image), torch.from_numpy(blur(image, cfg.blur_kernel))
    local, glob = local_inputs(image01, masks, cfg), global_inputs(sharp, blurred, masks, cfg)
    w = token_masks(masks, 224 // clip_vit.patch_size(clip))
    with torch.no_grad():
        ours = fuse_branches(clip, local, glob, w, cfg)
        plain = plain_fusion(clip, local, glob, w, cfg)
    np.testing.assert_allclose(ours.numpy(), plain.numpy(), rtol=0, atol=1e-5)
