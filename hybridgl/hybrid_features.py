"""Hybrid global-local mask features (paper 3.2, Eq. 1-2; spec section 2).

For every mask proposal two CLIP inputs are built: a *local* one (the image outside the mask
replaced by a fill value) and a *global* one (the image blurred outside the mask). From the
fusion start block on, the token-masked global tokens are added to the local branch
(G2L, the method's default), while the global branch's CLS may only attend to tokens inside
the mask. The mask feature is the local branch's CLS, post-layernormed and projected.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import clip_vit
from .config import HybridGLConfig


MAX_BATCH_PIXELS = 50_000_000


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, align_corners=False, no antialias: the reference code's `T.Resize(..., antialias=None)`."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s


def blur(image: np.ndarray, kernel: int) -> np.ndarray:
    """uint8 [H,W,3] -> the same image blurred with a kernel x kernel Gaussian (OpenCV sigma 0, reflect-101)."""
    return cv2.GaussianBlur(np.ascontiguousarray(image), (kernel, kernel), 0)


def image_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [H,W,3] -> float [3,H,W] in [0, 1] (torchvision's ToTensor)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).to(device).permute(2, 0, 1).float().div(255)


def local_inputs(image01: torch.Tensor, masks: torch.Tensor, config: HybridGLConfig) -> torch.Tensor:
    """Local branch inputs [B,3,S,S]: the normalised image inside each mask, the fill value outside.

    image01: float [3,H,W] in [0,1]; masks: bool [B,H,W]. The fill is used as an already
    normalised value, as the reference code does.
    """
    x = normalize(image01, config.image_mean, config.image_std)[None]  # [1,3,H,W]
    m = masks[:, None].to(x.dtype)  # [B,1,H,W]
    fill = torch.tensor(config.fill_value, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return _resize(x * m + (1 - m) * fill, config.clip_input_size)


def global_inputs(sharp: torch.Tensor, blurred: torch.Tensor, masks: torch.Tensor,
                  config: HybridGLConfig) -> torch.Tensor:
    """Global branch inputs [B,3,S,S]: sharp pixels inside each mask, blurred ones outside (uint8 composite).

    sharp, blurred: uint8 [H,W,3] on the masks' device; masks: bool [B,H,W].
    """
    composite = torch.where(masks[..., None], sharp[None], blurred[None])  # uint8 [B,H,W,3]
    x = composite.permute(0, 3, 1, 2).float().div(255)
    return normalize(_resize(x, config.clip_input_size), config.image_mean, config.image_std)


def token_masks(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """Soft token masks w [B, 1 + grid*grid]: each mask resized to grid x grid (bilinear, no antialias), CLS = 1."""
    soft = F.interpolate(masks[:, None].float(), size=(grid, grid), mode="bilinear",
                         align_corners=False, antialias=False)[:, 0]
    ones = torch.ones(masks.shape[0], 1, device=masks.device)
    return torch.cat([ones, soft.flatten(1)], dim=1)


def cls_attention_block(w: torch.Tensor) -> torch.Tensor:
    """bool [B,L,L], True where attention is blocked: only the CLS query row, at tokens with w == 0."""
    b, n = w.shape
    blocked = torch.zeros(b, n, n, dtype=torch.bool, device=w.device)
    blocked[:, 0, 1:] = w[:, 1:] == 0
    return blocked


def fuse_branches(clip: nn.Module, local: torch.Tensor, global_: torch.Tensor, w: torch.Tensor,
                  config: HybridGLConfig) -> torch.Tensor:
    """Run both branches through the vision tower and fuse them; returns mask features [B,D].

    local, global_: CLIP inputs [B,3,S,S]; w: token masks [B,L].
    """
    layers = clip.vision_model.encoder.layers
    start, beta, mode = config.fusion_start_block, config.beta, config.fusion_mode
    b = local.shape[0]
    w = w.to(local.dtype)
    blocked = cls_attention_block(w)

    x = clip_vit.embed(clip, torch.cat([local, global_], dim=0))
    for layer in layers[:start]:  # both branches unchanged before the fusion start
        x = clip_vit.residual_block(layer, x)
    xl, xg = x[:b], x[b:]
    hl, hg = xl, xg  # the hybrid streams of "G2L+L2G"
    for layer in layers[start:]:
        if mode == "G2L":
            xl, xg = (clip_vit.residual_block(layer, xl + beta * (w[..., None] * xg)),
                      clip_vit.residual_block(layer, xg, blocked))
        elif mode == "L2G":
            xl, xg = (clip_vit.residual_block(layer, xl),
                      clip_vit.residual_block(layer, xl + beta * xg, blocked))
        elif mode == "G2L+L2G":
            hl, hg = (clip_vit.residual_block(layer, hl + beta * (w[..., None] * xg)),
                      clip_vit.residual_block(layer, xl + beta * hg, blocked))
            xl, xg = clip_vit.residual_block(layer, xl), clip_vit.residual_block(layer, xg, blocked)
        else:  # "local", "global", "G+L": the branches stay apart
            xl, xg = clip_vit.residual_block(layer, xl), clip_vit.residual_block(layer, xg, blocked)

    feature = lambda tokens: clip_vit.project_tokens(clip, tokens[:, 0])  # noqa: E731
    if mode in ("G2L", "local"):
        return feature(xl)
    if mode in ("L2G", "global"):
        return feature(xg)
    if mode == "G2L+L2G":
        return feature(hl) + feature(hg)
    # "G+L": weighted sum of the unit-normalised global and local features
    fl, fg = F.normalize(feature(xl), dim=-1), F.normalize(feature(xg), dim=-1)
    return config.fusion_weight * fg + (1 - config.fusion_weight) * fl


@torch.no_grad()
def hybrid_features(clip: nn.Module, image: np.ndarray, masks: np.ndarray | torch.Tensor,
                    config: HybridGLConfig, device: torch.device | str = "cpu",
                    debug: dict | None = None) -> torch.Tensor:
    """Hybrid global-local feature of every mask.

    image: uint8 [H,W,3] RGB; masks: bool [N,H,W]. Returns float32 [N,D], unnormalised.
    debug: when a dict is given, the CLIP inputs and soft masks are stored in it (tests).
    """
    device = torch.device(device)
    masks = torch.as_tensor(masks, device=device).bool()
    n = masks.shape[0]
    dim = clip.visual_projection.out_features
    if n == 0:
        return torch.zeros(0, dim, device=device)
    dtype = getattr(torch, config.dtype)
    grid = config.clip_input_size // clip_vit.patch_size(clip)
    image01 = image_tensor(image, device)
    sharp = torch.from_numpy(np.array(image, dtype=np.uint8)).to(device)  # once, not per batch
    blurred = torch.from_numpy(blur(image, config.blur_kernel)).to(device)
    # The full-resolution inputs of a batch take ~28 bytes per pixel and mask: cap them near 1.5 GB.
    step = max(1, min(config.feature_batch_size, MAX_BATCH_PIXELS // (image.shape[0] * image.shape[1])))
    out = []
    for lo in range(0, n, step):
        batch = masks[lo:lo + step]
        local = local_inputs(image01, batch, config)
        glob = global_inputs(sharp, blurred, batch, config)
        w = token_masks(batch, grid)
        if debug is not None:
            for key, value in (("local_imgs", local), ("global_imgs", glob), ("soft_masks", w[:, 1:])):
                debug.setdefault(key, []).append(value.cpu())
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out.append(fuse_branches(clip, local, glob, w, config).float())
    if debug is not None:
        for key in ("local_imgs", "global_imgs", "soft_masks"):
            debug[key] = torch.cat(debug[key]).numpy()
        debug["soft_masks"] = debug["soft_masks"].reshape(n, grid, grid)
    return torch.cat(out)
