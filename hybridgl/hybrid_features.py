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
from .precision import ieee_float32


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


def bilinear_taps(n_in: int, n_out: int, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two source indices and weights of each output pixel along one axis of the reference
    code's resize `T.Resize(..., antialias=None)` (bilinear, align_corners=False, no antialias).

    Returns idx int64 [2*n_out] (first taps, then second taps) and lambda0, lambda1 float32
    [n_out], computed as PyTorch's bilinear kernel does (float32, align_corners=False, no antialias).
    """
    if n_in == n_out:
        i0 = torch.arange(n_out)
        return torch.cat([i0, i0]).to(device), torch.ones(n_out, device=device), torch.zeros(n_out, device=device)
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    # scale * (i + 0.5) - 0.5 rounded once to float32, as the kernel's fused multiply-add does
    src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32), np.float32(0))
    i0 = src.astype(np.int64)
    i1 = i0 + (i0 < n_in - 1)
    lam1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    idx = torch.from_numpy(np.concatenate([i0, i1])).to(device)
    return idx, torch.from_numpy(1 - lam1).to(device), torch.from_numpy(lam1).to(device)


class Resampler:
    """That resize of [..., H, W] maps to S x S, reading only the 2S rows and 2S columns it needs.

    Bilinear resizing without antialias is a 2x2-tap filter, so a per-mask composite can be
    built on those taps alone instead of at full resolution: the same numbers (up to float
    rounding) for a fraction of the work.
    """

    def __init__(self, height: int, width: int, size: int, device: torch.device | str = "cpu"):
        self.size = size
        self.rows, self.wy0, self.wy1 = bilinear_taps(height, size, device)
        self.cols, self.wx0, self.wx1 = bilinear_taps(width, size, device)

    def taps(self, x: torch.Tensor) -> torch.Tensor:
        """[..., H, W] -> the tap values [..., 2S, 2S]."""
        return x[..., self.rows, :][..., self.cols]

    def combine(self, t: torch.Tensor) -> torch.Tensor:
        """Tap values [..., 2S, 2S] (float) -> the resized map [..., S, S]."""
        s = self.size
        wx0, wx1 = self.wx0.to(t.dtype), self.wx1.to(t.dtype)
        top = t[..., :s, :s] * wx0 + t[..., :s, s:] * wx1
        bottom = t[..., s:, :s] * wx0 + t[..., s:, s:] * wx1
        return top * self.wy0.to(t.dtype)[:, None] + bottom * self.wy1.to(t.dtype)[:, None]


def local_inputs(image01: torch.Tensor, masks: torch.Tensor, config: HybridGLConfig,
                 resampler: Resampler | None = None) -> torch.Tensor:
    """Local branch inputs [B,3,S,S]: the normalised image inside each mask, the fill value outside.

    image01: float [3,H,W] in [0,1]; masks: bool [B,H,W]. The fill is used as an already
    normalised value, as the reference code does. resampler: composite on the resize taps only.
    """
    r = resampler or Resampler(*masks.shape[1:], config.clip_input_size, masks.device)
    x = r.taps(normalize(image01, config.image_mean, config.image_std))[None]  # [1,3,2S,2S]
    m = r.taps(masks)[:, None].to(x.dtype)  # [B,1,2S,2S]
    fill = torch.tensor(config.fill_value, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return r.combine(x * m + (1 - m) * fill)


def global_inputs(sharp: torch.Tensor, blurred: torch.Tensor, masks: torch.Tensor,
                  config: HybridGLConfig, resampler: Resampler | None = None) -> torch.Tensor:
    """Global branch inputs [B,3,S,S]: sharp pixels inside each mask, blurred ones outside (uint8 composite).

    sharp, blurred: uint8 [H,W,3] on the masks' device; masks: bool [B,H,W].
    """
    r = resampler or Resampler(*masks.shape[1:], config.clip_input_size, masks.device)
    sharp_t, blurred_t = r.taps(sharp.permute(2, 0, 1)), r.taps(blurred.permute(2, 0, 1))  # [3,2S,2S]
    composite = torch.where(r.taps(masks)[:, None], sharp_t[None], blurred_t[None])  # uint8 [B,3,2S,2S]
    return normalize(r.combine(composite.float().div(255)), config.image_mean, config.image_std)


def token_masks(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """Soft token masks w [B, 1 + grid*grid]: each mask resized to grid x grid (bilinear, no antialias), CLS = 1."""
    r = Resampler(*masks.shape[1:], grid, masks.device)
    soft = r.combine(r.taps(masks).float())
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
    if start >= len(layers):
        raise ValueError(f"fusion_start_block={start} is not a block of this CLIP (it has {len(layers)})")
    b = local.shape[0]
    w = w.to(local.dtype)
    blocked = cls_attention_block(w)

    x = clip_vit.embed(clip, torch.cat([local, global_], dim=0))
    for layer in layers[:start]:  # both branches unchanged before the fusion start
        x = clip_vit.residual_block(layer, x)
    xl, xg = x[:b], x[b:]
    hl, hg = xl, xg  # the hybrid streams of "G2L+L2G"
    # Only the CLS tokens of the last block are read, and only the streams the mode returns.
    needed = {"G2L": "l", "local": "l", "L2G": "g", "global": "g"}.get(mode, "lg")
    for i, layer in enumerate(layers[start:], start):
        last = i == len(layers) - 1
        block = clip_vit.cls_residual_block if last else clip_vit.residual_block
        skip_l, skip_g = last and "l" not in needed, last and "g" not in needed
        if mode == "G2L":
            xl, xg = (block(layer, xl + beta * (w[..., None] * xg)),
                      None if skip_g else block(layer, xg, blocked))
        elif mode == "L2G":
            xl, xg = (None if skip_l else block(layer, xl),
                      block(layer, xl + beta * xg, blocked))
        elif mode == "G2L+L2G":
            hl, hg = (block(layer, hl + beta * (w[..., None] * xg)),
                      block(layer, xl + beta * hg, blocked))
            if not last:
                xl, xg = block(layer, xl), block(layer, xg, blocked)
        else:  # "local", "global", "G+L": the branches stay apart
            xl, xg = (None if skip_l else block(layer, xl), None if skip_g else block(layer, xg, blocked))

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


def feature_batch_size(config: HybridGLConfig, device: torch.device | str) -> int:
    """Masks per CLIP pass: `config.feature_batch_size`, else 4 on CPU (cache-sized tensors), 32 on a GPU."""
    return config.feature_batch_size or (32 if torch.device(device).type == "cuda" else 4)


@torch.no_grad()
@ieee_float32
def hybrid_features(clip: nn.Module, image: np.ndarray, masks: np.ndarray | torch.Tensor,
                    config: HybridGLConfig, device: torch.device | str = "cpu",
                    debug: dict | None = None) -> torch.Tensor:
    """Hybrid global-local feature of every mask.

    image: uint8 [H,W,3] RGB; masks: bool [N,H,W]. Returns float32 [N,D], unnormalised.
    debug: when a dict is given, the CLIP inputs and soft masks are stored in it (tests).
    """
    per_pass = feature_batch_size(config, device)
    return _passes(clip, image, masks, range(0, len(masks), per_pass), per_pass, config, device, debug)


@torch.no_grad()
@ieee_float32
def hybrid_feature_rows(clip: nn.Module, image: np.ndarray, masks: np.ndarray | torch.Tensor,
                        rows: np.ndarray, config: HybridGLConfig, device: torch.device | str = "cpu"
                        ) -> tuple[np.ndarray, torch.Tensor]:
    """The rows of `hybrid_features(clip, image, masks, ...)` that hold `rows`, bit for bit.

    A mask's feature depends in its last bits on the pass that computes it: the kernels round
    differently for another batch size or another place in the batch (~1e-6 of a score). Where
    masks tie (duplicate proposals, or masks that differ only at pixels the resize to the CLIP
    input never reads) those bits decide, so features meant to be the exact mode's come from the
    exact mode's own passes: each pass of `feature_batch_size(config, device)` masks that holds
    one of `rows` runs whole. Returns (indices: every mask of those passes, ascending; their
    features [len(indices), D]).
    """
    per_pass = feature_batch_size(config, device)
    starts = np.unique(np.asarray(rows, dtype=np.int64) // per_pass) * per_pass
    indices = np.concatenate([np.arange(lo, min(lo + per_pass, len(masks))) for lo in starts]) \
        if len(starts) else np.zeros(0, np.int64)
    return indices, _passes(clip, image, masks, starts.tolist(), per_pass, config, device)


def _passes(clip: nn.Module, image: np.ndarray, masks: np.ndarray | torch.Tensor, starts, per_pass: int,
            config: HybridGLConfig, device: torch.device | str, debug: dict | None = None) -> torch.Tensor:
    """Features of masks[lo:lo + per_pass] for each lo of `starts`, one CLIP pass each, concatenated."""
    device = torch.device(device)
    n = len(masks)
    dim = clip.visual_projection.out_features
    if n == 0 or not len(starts):
        return torch.zeros(0, dim, device=device)
    dtype = getattr(torch, config.dtype)
    grid = config.clip_input_size // clip_vit.patch_size(clip)
    image01 = image_tensor(image, device)
    sharp = torch.from_numpy(np.array(image, dtype=np.uint8)).to(device)  # once, not per batch
    blurred = torch.from_numpy(blur(image, config.blur_kernel)).to(device)
    resampler = Resampler(image.shape[0], image.shape[1], config.clip_input_size, device)
    out = []
    # one autocast region for all the passes: it casts CLIP's weights once, not once per pass
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for lo in starts:
            with torch.autocast(device.type, enabled=False):  # the inputs are composed in float32
                batch = torch.as_tensor(masks[lo:lo + per_pass], device=device).bool()
                local = local_inputs(image01, batch, config, resampler)
                glob = global_inputs(sharp, blurred, batch, config, resampler)
                w = token_masks(batch, grid)
            if debug is not None:
                for key, value in (("local_imgs", local), ("global_imgs", glob), ("soft_masks", w[:, 1:])):
                    debug.setdefault(key, []).append(value.cpu())
            out.append(fuse_branches(clip, local, glob, w, config).float())
    if debug is not None:
        for key in ("local_imgs", "global_imgs", "soft_masks"):
            debug[key] = torch.cat(debug[key]).numpy()
        debug["soft_masks"] = debug["soft_masks"].reshape(n, grid, grid)
    return torch.cat(out)
