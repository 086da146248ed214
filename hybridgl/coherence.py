"""Spatial coherence map: GEM ("Grounding Everything") on the same CLIP weights (spec section 7).

The last `gem_blocks` residual blocks get a second, parameter-free path: self-self attention
(q-q, k-k and v-v similarities of L2-normalised projections) applied to v, accumulated from
the input of the first such block onwards without MLPs. Its tokens localise the text far
better than CLIP's own patch tokens. The token features depend on the image alone; only the
final cosine needs the text, so `gem_tokens` runs in `prepare` and `coherence_map` per query.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import clip_vit
from .config import HybridGLConfig
from .hybrid_features import image_tensor, normalize
from .kernels import linear, matmul
from .precision import ieee_float32


def gem_input(image: np.ndarray, config: HybridGLConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [H,W,3] -> [1,3,S,S]: Pillow bicubic resize to S x S (aspect not kept), CLIP mean/std."""
    size = config.gem_input_size
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    return normalize(image_tensor(resized, torch.device(device)), config.clip_mean, config.clip_std)[None]


def self_self_attention(layer: nn.Module, x: torch.Tensor, iterations: int,
                        temperature: float | None) -> torch.Tensor:
    """GEM's attention of layer-normed tokens [B,L,C] -> [B,L,C] (before the block's residual add)."""
    attn = layer.self_attn
    q, k, v = clip_vit.qkv(layer, x)  # [B,h,L,d]
    if temperature is None:  # adaptive: the mean token norm times the usual attention scale
        inv_temp = x.norm(dim=-1).mean(dim=-1).view(-1, 1, 1, 1) * attn.scale
    else:
        inv_temp = temperature

    def attend(z: torch.Tensor) -> torch.Tensor:  # softmax of the scaled cosine self-similarity of unit rows
        return (matmul(z, z.transpose(-2, -1)) * inv_temp).softmax(dim=-1)

    streams = [F.normalize(z, dim=-1) for z in (v, k, q)]
    for _ in range(iterations):
        streams = [F.normalize(matmul(attend(z), z), dim=-1) for z in streams]
    out = sum(matmul(attend(z), v) for z in streams) / 3
    return linear(attn.out_proj, clip_vit.merge_heads(out))


@torch.no_grad()
@ieee_float32
def gem_tokens(clip: nn.Module, image: np.ndarray, config: HybridGLConfig,
               device: torch.device | str = "cpu", debug: dict | None = None) -> torch.Tensor:
    """GEM patch-token features of an image, L2-normalised: float32 [g, g, D] (g = S / patch)."""
    pixels = gem_input(image, config, device)
    if debug is not None:
        debug["gem_input"] = pixels.cpu().numpy()
    layers = clip.vision_model.encoder.layers
    first = len(layers) - config.gem_blocks
    if first < 0:  # the config allows 12 (ViT-B/16's depth); a shallower CLIP has fewer blocks
        raise ValueError(f"gem_blocks={config.gem_blocks} exceeds this CLIP's {len(layers)} blocks")
    x = clip_vit.embed(clip, pixels)
    for layer in layers[:first]:
        x = clip_vit.residual_block(layer, x)
    x_gem = x  # the GEM path starts from the input of its first block
    for layer in layers[first:]:
        normed = layer.layer_norm1(x)
        x_gem = x_gem + self_self_attention(layer, normed, config.gem_iterations, config.gem_temperature)
        x = clip_vit.mlp_residual(layer, x + clip_vit.attention(layer, normed))
    tokens = F.normalize(clip_vit.project_tokens(clip, x_gem[0, 1:]), dim=-1).float()  # [g*g, D]
    grid = int(round(tokens.shape[0] ** 0.5))
    return tokens.view(grid, grid, -1)


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Min-max to [0,1]; a constant map (no contrast at all) becomes all zeros instead of NaN."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


TINY_SIDE = 32  # images with a side below this: A resized on the CPU when on CUDA (see coherence_map)


@ieee_float32
def coherence_map(tokens: torch.Tensor, text_feature: torch.Tensor, size: tuple[int, int],
                  config: HybridGLConfig, debug: dict | None = None) -> torch.Tensor:
    """Coherence map A in [0,1], float32 [H,W].

    tokens: GEM token features [g,g,D] (unit norm); text_feature: [D] raw feature of the GEM prompt.
    Cosine per token, bilinear up to the GEM input size, min-max, resize to H x W (bilinear,
    antialias), min-max again.
    """
    t = F.normalize(text_feature.float(), dim=-1)
    sim = (tokens @ t)[None, None]  # [1,1,g,g]
    s = config.gem_input_size
    sim = _min_max(F.interpolate(sim, size=(s, s), mode="bilinear", align_corners=False))
    if debug is not None:
        debug["gem_raw"] = sim[0].cpu().numpy()
    # CUDA's antialiased kernel needs shared memory growing with the downscale factor and refuses
    # large ones (a side of a few pixels from 448): such small maps are resized on the CPU
    tiny = sim.device.type == "cuda" and min(size) < TINY_SIDE
    resized = F.interpolate(sim.cpu() if tiny else sim, size=size, mode="bilinear", align_corners=False,
                            antialias=True)[0, 0].to(sim.device)
    if debug is not None:
        debug["gem_resized"] = resized.cpu().numpy()
    return _min_max(resized)
