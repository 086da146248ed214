"""hybridgl.kernels: float32 products on a CPU through oneDNN, the same numbers as torch's up to
float rounding, torch's own path wherever oneDNN must not or cannot take them."""
from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn
from torch.profiler import profile

from hybridgl import clip_vit, kernels, sam_vit
from hybridgl.coherence import self_self_attention

pytestmark = pytest.mark.skipif(not kernels._ONEDNN, reason="this torch has no oneDNN")


def onednn_calls(fn) -> int:
    """How many products `fn` ran on oneDNN's float32 linear kernel."""
    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


@pytest.mark.parametrize("shape", [(5, 24), (3, 7, 24)])
def test_linear_is_the_layer(shape):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert onednn_calls(lambda: kernels.linear(layer, x)) == 1
        torch.testing.assert_close(kernels.linear(layer, x), layer(x), rtol=1e-5, atol=1e-5)
        # a strided input (a CLS row of a batch of tokens)
        tokens = torch.randn(4, 9, 24)
        torch.testing.assert_close(kernels.linear(layer, tokens[:, :1]), layer(tokens[:, :1]), rtol=1e-5, atol=1e-5)


def test_linear_takes_torchs_path_under_autocast_autograd_and_for_other_dtypes():
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert onednn_calls(lambda: kernels.linear(layer, x)) == 0
        assert kernels.linear(layer, x).dtype == torch.bfloat16  # autocast's product, as layer(x)
    out = kernels.linear(layer, x)  # autograd on: oneDNN's op has no backward
    assert out.requires_grad
    out.sum().backward()
    assert layer.weight.grad is not None
    with torch.no_grad():
        assert kernels.linear(layer.double(), x.double()).dtype == torch.float64


def test_a_weight_made_of_rows_of_a_wider_tensor_is_not_handed_to_onednn():
    # oneDNN multiplies such a weight with a reference kernel, ~800x slower (a SAM attention block: minutes)
    wide = torch.randn(64, 3, 16)
    layer = nn.Linear(16, 64, bias=False)
    layer.weight = nn.Parameter(wide[:, 1])
    assert not kernels._dense(layer.weight)
    assert kernels._dense(wide[:, 1].contiguous()) and kernels._dense(wide[:, 1].contiguous().t())
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert onednn_calls(lambda: kernels.linear(layer, x)) == 0
        torch.testing.assert_close(kernels.linear(layer, x), x @ wide[:, 1].t())


@pytest.mark.parametrize("layout", ["plain", "transposed", "rows of a wider tensor"])
def test_matmul_is_the_product(layout):
    torch.manual_seed(1)
    a = torch.randn(2, 3, 10, 12)
    b = {"plain": torch.randn(2, 3, 12, 7),
         "transposed": torch.randn(2, 3, 7, 12).transpose(-2, -1),
         "rows of a wider tensor": torch.randn(2, 3, 12, 2, 7)[:, :, :, 1]}[layout]
    with torch.no_grad():
        got = kernels.matmul(a, b)
        assert onednn_calls(lambda: kernels.matmul(a, b)) == 6  # one per matrix of the batch
    torch.testing.assert_close(got, a @ b, rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 3, 10, 7)


def test_matmul_leaves_broadcasting_to_torch():
    a, b = torch.randn(4, 2, 5, 6), torch.randn(1, 2, 6, 3)
    with torch.no_grad():
        assert onednn_calls(lambda: kernels.matmul(a, b)) == 0
        torch.testing.assert_close(kernels.matmul(a, b), a @ b)


def test_the_method_passes_run_their_float32_products_on_onednn():
    torch.manual_seed(2)
    encoder = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                              out_chans=32, qkv_bias=True, use_rel_pos=True, window_size=0).eval()
    tokens = torch.randn(1, 4, 4, 32)
    with torch.no_grad():
        # qkv, proj, the MLP's two, and per head the scores and the weighted values
        assert onednn_calls(lambda: sam_vit.encoder_block(encoder.blocks[0], tokens)) == 4 + 2 * 2
        torch.testing.assert_close(sam_vit.encoder_block(encoder.blocks[0], tokens), encoder.blocks[0](tokens),
                                   rtol=1e-5, atol=1e-5)


def test_clip_and_gem_blocks_run_on_onednn(tiny_clip_pair):
    clip, _ = tiny_clip_pair
    layer = clip.vision_model.encoder.layers[0]
    width = layer.self_attn.embed_dim
    heads = layer.self_attn.num_heads
    x = torch.randn(2, 5, width)
    with torch.no_grad():
        assert onednn_calls(lambda: clip_vit.residual_block(layer, x)) == 6  # q, k, v, out, fc1, fc2
        torch.testing.assert_close(clip_vit.residual_block(layer, x), layer(x, None), rtol=1e-5, atol=1e-5)
        # q, k, v, out; then per head: 3 streams x (similarity, one iteration, similarity, values) x 2 images
        assert onednn_calls(lambda: self_self_attention(layer, x, 1, None)) == 4 + 3 * 4 * heads * 2


def test_the_fast_modes_bfloat16_gate_times_float32_as_the_exact_mode_computes_it():
    # measured against MKL's float32 the gate said 3.5-4x on a Zen 5 EPYC, against oneDNN's (what the
    # exact mode runs) 1.8x: the float32 side of the timing must be the exact mode's kernels
    from hybridgl.fast import bfloat16_speedup

    with profile() as prof:
        bfloat16_speedup(repeats=1)
    calls = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    assert calls == 2  # float32: the kernel-selecting call and the timed one; bfloat16 goes through autocast
