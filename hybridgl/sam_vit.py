"""SAM's image encoder and mask decoder re-expressed for the automatic generator, without waste.

The same modules and weights as segment-anything's `ImageEncoderViT` and `MaskDecoder`, the same
operations in the same order, so the same numbers up to float rounding (tested against them).
What changes is only work nobody reads or memory traffic:

- Attention with decomposed relative positions (`attention`) is computed a few query rows at a
  time, the two position terms added in place: the reference materialises heads x 4096 x 4096
  scores in the global blocks and adds to them out of place twice (three passes over ~800 MB).
- The mask decoder (`decode_masks`) is given all of a batch's point prompts on one image. Its
  first layer sees the same image tokens for every prompt, so their projections are computed
  once instead of once per prompt; prompts are decoded a few at a time on CPU (cache-sized tensors);
  and the quality filter, which reads only the IoU head, runs before the output upscaling, so
  only masks that survive it are upscaled.
Shapes: B batch, H x W token grid, C width, h heads, d = C / h.
"""
from __future__ import annotations

from typing import Callable

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import get_rel_pos, window_partition, window_unpartition
from torch import nn

from .kernels import linear, matmul, onednn
from .precision import ieee_float32

# Scores per chunk of rows in `attention` (floats): a few MB on CPU, so a chunk stays in cache; a
# GPU wants few large kernels (256 MB: a global block's heads in a handful of chunks).
SCORE_CHUNK = {"cpu": 1 << 20, "cuda": 1 << 26}
# Point prompts decoded together in `decode_masks`: on CPU per-prompt image tokens stay tens of MB.
PROMPT_CHUNK = {"cpu": 8, "cuda": 64}


def _per_device(sizes: dict[str, int], device: torch.device) -> int:
    return sizes.get(device.type, sizes["cpu"])


def attention(attn: nn.Module, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """segment-anything's encoder `Attention.forward`: tokens [B,H,W,C] -> [B,H,W,C].

    chunk: about how many scores (floats) are held at once (None: SCORE_CHUNK for the device).
    """
    chunk = chunk or _per_device(SCORE_CHUNK, x.device)
    b, height, width, _ = x.shape
    heads = attn.num_heads
    qkv = linear(attn.qkv, x).reshape(b, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * heads, height * width, -1).unbind(0)  # [B*h, HW, d]
    if onednn(k):  # for B = 1 the reshape is a view, each head's rows 3C apart: oneDNN wants them dense
        k, v = k.contiguous(), v.contiguous()  # (copied once here, not once per chunk by `matmul`)
    if attn.use_rel_pos:
        r_q = q.reshape(b * heads, height, width, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(height, height, attn.rel_pos_h))  # [B*h,H,W,H]
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(width, width, attn.rel_pos_w))  # [B*h,H,W,W]
    q_scaled, k_t = q * attn.scale, k.transpose(-2, -1)
    out = torch.empty_like(q)
    tokens = height * width
    rows = max(1, min(height, chunk // (width * tokens)))  # query rows of the grid per chunk
    group = max(1, min(b * heads, chunk // (rows * width * tokens)))  # (batch, head) pairs per chunk
    for g0 in range(0, b * heads, group):
        g = slice(g0, g0 + group)
        for r0 in range(0, height, rows):
            r1 = min(height, r0 + rows)
            scores = matmul(q_scaled[g, r0 * width:r1 * width], k_t[g])  # [g, (r1-r0)*W, HW]
            if attn.use_rel_pos:
                grid = scores.view(scores.shape[0], r1 - r0, width, height, width)
                grid.add_(rel_h[g, r0:r1, :, :, None]).add_(rel_w[g, r0:r1, :, None, :])
            # no out=: under autocast softmax may return float32 and matmul must cast it back
            out[g, r0 * width:r1 * width] = matmul(scores.softmax(dim=-1), v[g])
    out = out.view(b, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(b, height, width, -1)
    return linear(attn.proj, out)


def mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's `MLPBlock.forward`: [..., C] -> [..., C]."""
    return linear(block.lin2, block.act(linear(block.lin1, x)))


def encoder_block(block: nn.Module, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """segment-anything's encoder `Block.forward`: tokens [B,H,W,C] -> [B,H,W,C]."""
    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        height, width = x.shape[1], x.shape[2]
        x, padded = window_partition(x, block.window_size)
        x = window_unpartition(attention(block.attn, x, chunk), block.window_size, padded, (height, width))
    else:
        x = attention(block.attn, x, chunk)
    x = shortcut + x
    return x + mlp(block.mlp, block.norm2(x))


@ieee_float32
def image_embedding(sam: Sam, pixels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """`sam.image_encoder(pixels)`: preprocessed pixels [1,3,S,S] -> image embedding [1,256,S/16,S/16]."""
    encoder = sam.image_encoder
    x = encoder.patch_embed(pixels)  # [1,H,W,C], a permuted view of the convolution's output
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    # the residual stream would otherwise keep that channels-first layout through every block: each
    # residual add then reads one operand strided and each layer norm first copies its input
    x = x.contiguous()
    for block in encoder.blocks:
        x = encoder_block(block, x, chunk)
    return encoder.neck(x.permute(0, 3, 1, 2))


def _heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B,N,c] -> [B,h,N,c/h] (the decoder Attention's `_separate_heads`)."""
    b, n, c = x.shape
    return x.reshape(b, n, attn.num_heads, c // attn.num_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B,h,N,d] -> [B,N,h*d] (`_recombine_heads`)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The decoder Attention after its input projections: q, k, v projected [*,N,c] -> [B,Nq,C].

    k, v may have batch 1 (shared by every prompt): matmul broadcasts them.
    """
    q, k, v = _heads(attn, q), _heads(attn, k), _heads(attn, v)
    scores = (q @ k.permute(0, 1, 3, 2)) / (q.shape[-1] ** 0.5)
    return linear(attn.out_proj, _merge(torch.softmax(scores, dim=-1) @ v))


def _attend_few_keys(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`_attend` for many queries and few keys (image tokens attending to the prompt's 7 tokens):
    the scores are held keys-first, so the softmax runs along the 4096 queries of each key
    instead of over rows of 7 keys (a 7-wide softmax is ~20x slower per element). The same
    numbers up to float rounding (decoding 64 prompts: 1.86 s -> 1.70 s on ViT-B, same masks)."""
    q, k, v = _heads(attn, q), _heads(attn, k), _heads(attn, v)
    scores = (k @ q.permute(0, 1, 3, 2)) / (q.shape[-1] ** 0.5)  # [B,h,Nk,Nq]
    return linear(attn.out_proj, _merge(torch.softmax(scores, dim=-2).transpose(-1, -2) @ v))


def _cross_attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _attend(attn, linear(attn.q_proj, q), linear(attn.k_proj, k), linear(attn.v_proj, v))


def _two_way(transformer: nn.Module, keys: torch.Tensor, key_pe: torch.Tensor, tokens: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`TwoWayTransformer.forward` for prompts on one image.

    keys: image tokens [1,HW,C] (embedding + dense prompt, shared by all prompts); key_pe [1,HW,C];
    tokens: output + prompt tokens [B,T,C]. Returns queries [B,T,C] and keys [B,HW,C].
    """
    queries, query_pe = tokens, tokens
    for i, layer in enumerate(transformer.layers):
        if layer.skip_first_layer_pe:
            queries = _cross_attention(layer.self_attn, queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + _cross_attention(layer.self_attn, q, q, queries)
        queries = layer.norm1(queries)
        # while keys are still the shared image tokens (first layer), their projections are shared too
        k = keys + key_pe
        t2i = layer.cross_attn_token_to_image
        queries = layer.norm2(queries + _cross_attention(t2i, queries + query_pe, k, keys))
        queries = layer.norm3(queries + mlp(layer.mlp, queries))
        i2t = layer.cross_attn_image_to_token
        q = queries + query_pe
        keys = layer.norm4(keys + _attend_few_keys(i2t, linear(i2t.q_proj, k), linear(i2t.k_proj, q),
                                                         linear(i2t.v_proj, queries)))
    q = queries + query_pe
    queries = queries + _cross_attention(transformer.final_attn_token_to_image, q, keys + key_pe, keys)
    return transformer.norm_final_attn(queries), keys


@torch.no_grad()
@ieee_float32
def decode_masks(sam: Sam, embedding: torch.Tensor, coords: torch.Tensor, keep: Callable[[torch.Tensor], torch.Tensor],
                 prompts_per_pass: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's multimask prediction for single-point prompts on one image, only for masks `keep` accepts.

    embedding: [1,C,h,w] image embedding; coords: [B,2] point prompts (label 1) in the model's
    input frame; keep: predicted IoU [n] -> bool [n] (the quality filter). Returns the kept
    low-resolution mask logits [K,4h,4w] and their predicted IoUs [K], in the order of
    `mask_decoder(..., multimask_output=True)` flattened (prompt by prompt, mask by mask).
    """
    decoder, prompt_encoder = sam.mask_decoder, sam.prompt_encoder
    prompts_per_pass = prompts_per_pass or _per_device(PROMPT_CHUNK, embedding.device)
    c, h, w = embedding.shape[1:]
    labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=coords.device)
    sparse, dense = prompt_encoder(points=(coords[:, None, :], labels), boxes=None, masks=None)
    # no mask prompt: the dense embedding is the same `no_mask_embed` for every prompt
    keys = (embedding + dense[:1]).flatten(2).permute(0, 2, 1)  # [1,HW,C]
    key_pe = prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)  # [1,HW,C]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    logits, ious = [], []
    for lo in range(0, coords.shape[0], prompts_per_pass):
        prompts = sparse[lo:lo + prompts_per_pass]
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(prompts.shape[0], -1, -1), prompts), dim=1)
        hs, src = _two_way(decoder.transformer, keys, key_pe, tokens)
        iou = decoder.iou_prediction_head(hs[:, 0, :])[:, 1:]  # multimask outputs: [b,3]
        kept = keep(iou.flatten()).view(iou.shape)
        prompt_idx = kept.any(dim=1).nonzero()[:, 0]
        if len(prompt_idx):
            upscaled = decoder.output_upscaling(src[prompt_idx].transpose(1, 2).reshape(len(prompt_idx), c, h, w))
            hyper = torch.stack([head(hs[prompt_idx, 1 + i, :]) for i, head in
                                 enumerate(decoder.output_hypernetworks_mlps)], dim=1)[:, 1:]  # [p,3,c']
            b2, c2, h2, w2 = upscaled.shape
            masks = (hyper @ upscaled.view(b2, c2, h2 * w2)).view(b2, -1, h2, w2)  # [p,3,4h,4w]
            logits.append(masks[kept[prompt_idx]])
        ious.append(iou[kept])
    iou = torch.cat(ious)
    if not logits:
        return embedding.new_zeros(0, 4 * h, 4 * w), iou
    return torch.cat(logits), iou
