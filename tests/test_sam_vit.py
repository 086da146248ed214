"""hybridgl.sam_vit against segment-anything's own encoder and decoder, same weights, same inputs.

A small SAM with what the tests' tiny SAM lacks: relative positions (non-zero), windowed blocks
with padding and global blocks; chunk sizes small enough that every chunking path is taken.
"""
from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from hybridgl import sam_vit

@pytest.fixture(scope="module")
def sam() -> Sam:
    torch.manual_seed(3)
    size, patch, dim = 160, 16, 32  # a 10 x 10 token grid: windows of 4 need padding
    model = Sam(
        image_encoder=ImageEncoderViT(img_size=size, patch_size=patch, embed_dim=dim, depth=3, num_heads=2,
                                      mlp_ratio=2.0, out_chans=dim, qkv_bias=True, use_rel_pos=True,
                                      window_size=4, global_attn_indexes=(1,), use_abs_pos=True),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                                     input_image_size=(size, size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
                                 transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=16),
    ).eval()
    with torch.no_grad():
        for block in model.image_encoder.blocks:  # zero-initialised in segment-anything: make them matter
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
        model.image_encoder.pos_embed.normal_(0, 0.1)
    return model

@pytest.mark.parametrize("chunk", [None, 100 * 8, 100 * 10 * 3, 1])
def test_image_embedding_equals_segment_anything(sam, chunk):
    pixels = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        expected = sam.image_encoder(pixels)
        got = sam_vit.image_embedding(sam, pixels, chunk=chunk)
    assert got.shape == expected.shape == (1, 32, 10, 10)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

def _reference(sam, embedding, coords):
    labels = torch.ones(coords.shape[0], 1, dtype=torch.int)
    sparse, dense = sam.prompt_encoder(points=(coords[:, None, :], labels), boxes=None, masks=None)
    with torch.no_grad():
        masks, iou = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=True)
    return masks.flatten(0, 1), iou.flatten(0, 1)

@pytest.mark.parametrize("per_pass", [None, 1, 3, 8, 64])
@pytest.mark.parametrize("rule", ["all", "none", "median", "first of each"])
def test_decode_masks_equals_segment_anything_then_the_filter(sam, per_pass, rule):
    torch.manual_seed(5)
    embedding = torch.randn(1, 32, 10, 10)
    coords = torch.rand(10, 2) * 160
    masks, iou = _reference(sam, embedding, coords)
    # half way between the two middle values: the median itself is one of them, and the decoder's
    # own predicted IoU may differ from the reference's in its last bits (this machine: one did)
    middle = iou.sort().values[len(iou) // 2 - 1:len(iou) // 2 + 1]
    assert middle[1] - middle[0] > 1e-4
    keep = {"all": lambda v: torch.ones_like(v, dtype=torch.bool),
            "none": lambda v: torch.zeros_like(v, dtype=torch.bool),
            "median": lambda v: v > middle.mean(),
            "first of each": lambda v: torch.arange(len(v)) % 3 == 0}[rule]
    got_masks, got_iou = sam_vit.decode_masks(sam, embedding, coords, keep, prompts_per_pass=per_pass)
    expected = keep(iou)
    assert got_masks.shape == (int(expected.sum()), 40, 40)
    torch.testing.assert_close(got_iou, iou[expected], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_masks, masks[expected], rtol=1e-4, atol=1e-5)

def test_filter_sees_every_prediction_once(sam):
    seen = []
    coords = torch.rand(7, 2) * 160
    sam_vit.decode_masks(sam, torch.randn(1, 32, 10, 10), coords, lambda v: seen.append(v.clone()) or v > 0,
                         prompts_per_pass=3)
    assert [len(v) for v in seen] == [9, 9, 3]  # 3 multimask predictions per prompt, batch by batch


def test_image_embedding_under_autocast(sam):
    """The fast mode runs the encoder under autocast (float16 on a GPU): mixed dtypes must work."""
    pixels = torch.randn(1, 3, 160, 160)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = sam.image_encoder(pixels)
        got = sam_vit.image_embedding(sam, pixels, chunk=100 * 8)
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)
