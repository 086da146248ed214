"""CLIP ViT pieces run block by block, on Hugging Face `CLIPModel` weights.

HybridGL and GEM both need to step through the vision tower one residual block at a time
(fusing two branches, masking attention rows, adding a second attention path), so the
blocks are re-expressed here from their own submodules instead of calling `layer(x)`.
Shapes: B batch, L tokens (1 CLS + g*g patches), C width, h heads, d = C / h.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import QuickGELUActivation

from .kernels import linear


def vision_tower(clip: nn.Module) -> nn.Module:
    """`CLIPModel.vision_model` (the tower with embeddings, pre/post layernorm, encoder)."""
    return clip.vision_model


def num_blocks(clip: nn.Module) -> int:
    return len(clip.vision_model.encoder.layers)


def patch_size(clip: nn.Module) -> int:
    return int(clip.vision_model.embeddings.patch_size)


def resample_position_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g0*g0, C] -> [1 + grid*grid, C]: patch part resized bicubically (with antialias, as GEM)."""
    g0 = int(round((pos.shape[0] - 1) ** 0.5))
    if g0 == grid:
        return pos
    cls, patches = pos[:1], pos[1:]
    patches = patches.reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)
    return torch.cat([cls, patches], dim=0)


def embed(clip: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B,3,S,S] -> tokens [B,L,C] after the pre-layernorm (position embedding resampled if S differs)."""
    tower = clip.vision_model
    emb = tower.embeddings
    x = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype))  # [B,C,g,g]
    grid = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)  # [B,g*g,C]
    cls = emb.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = resample_position_embedding(emb.position_embedding.weight, grid)
    x = x + pos.to(x.dtype)
    return tower.pre_layrnorm(x)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B,L,C] -> [B,h,L,d]."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B,h,L,d] -> [B,L,C]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def qkv(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer-normed tokens [B,L,C] -> q, k, v each [B,h,L,d] (unscaled)."""
    attn = layer.self_attn
    h = attn.num_heads
    return tuple(split_heads(linear(proj, x), h) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))


def attention(layer: nn.Module, x: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head self-attention of layer-normed tokens [B,L,C] -> [B,L,C].

    blocked: optional bool [B,L,L], True where a query may NOT attend to a key (all heads alike).
    """
    attn = layer.self_attn
    q, k, v = qkv(layer, x)
    # softmax(q k^T * scale, blocked keys at -inf) v, fused: no [B,h,L,L] scores in memory
    allowed = None if blocked is None else ~blocked[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=attn.scale)
    return linear(attn.out_proj, merge_heads(out))


def mlp_residual(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x + mlp(ln2 x); CLIP's quick GELU is applied in place (its [B,L,4C] input is the largest tensor)."""
    mlp = layer.mlp
    if not isinstance(mlp.activation_fn, QuickGELUActivation):
        return x + mlp(layer.layer_norm2(x))
    hidden = linear(mlp.fc1, layer.layer_norm2(x))
    hidden.mul_(torch.sigmoid(1.702 * hidden))  # QuickGELUActivation's formula, same rounding
    return x + linear(mlp.fc2, hidden)


def residual_block(layer: nn.Module, x: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
    """One pre-norm transformer block: x + attn(ln1 x), then + mlp(ln2 .)."""
    x = x + attention(layer, layer.layer_norm1(x), blocked)
    return mlp_residual(layer, x)


def cls_residual_block(layer: nn.Module, x: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
    """`residual_block` for the CLS output only: tokens [B,L,C] -> [B,1,C].

    For a last block whose patch outputs nothing reads: keys and values of every token, but
    the query, the output projection and the MLP of the CLS token alone.
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(x)
    q = split_heads(linear(attn.q_proj, normed[:, :1]), attn.num_heads)  # [B,h,1,d]
    k, v = (split_heads(linear(proj, normed), attn.num_heads) for proj in (attn.k_proj, attn.v_proj))
    allowed = None if blocked is None else ~blocked[:, None, :1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=attn.scale)  # [B,h,1,d]
    x = x[:, :1] + linear(attn.out_proj, merge_heads(out))
    return mlp_residual(layer, x)


def project_tokens(clip: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Tokens [..., C] -> joint-space features [..., D]: post-layernorm then the visual projection."""
    return linear(clip.visual_projection, clip.vision_model.post_layernorm(x))
