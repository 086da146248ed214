"""float32 matrix products on a CPU through oneDNN instead of MKL.

torch sends float32 linears and matmuls on an x86 CPU to MKL, and MKL picks its fast kernels for
Intel CPUs only: on an AMD EPYC (Zen 5, AVX-512) its sgemm ran at 160-190 GFLOP/s where oneDNN's,
which torch already uses for its bfloat16 products, ran at 300-415 GFLOP/s for the method's
shapes (SAM's and CLIP's linears, SAM's attention products: 2-3x). Both are IEEE float32 with
fused multiply-adds, summed in another order: results differ in their last bits, as between two
machines or two batch sizes. Every float32 pass of the method (the exact mode, and the fast mode's
float32 rows) goes through the same functions, so both modes compute the same bits.

Anything else takes torch's own path: other devices and dtypes, autocast (the fast mode's low
precision), autograd, and torch builds without oneDNN.
"""
from __future__ import annotations

import torch
from torch import nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn(*tensors: torch.Tensor) -> bool:
    """True where these float32 CPU tensors' products go to oneDNN (no autocast, no autograd)."""
    return (_ONEDNN and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _dense(m: torch.Tensor) -> bool:
    """Whether matrices [..., r, c] are laid out row- or column-major: oneDNN multiplies a weight
    of any other layout (rows of a wider tensor) with a reference kernel, hundreds of times slower."""
    r, c = m.shape[-2:]
    row_major = m.stride(-1) == 1 and (m.stride(-2) == c or r == 1)
    return row_major or (m.stride(-2) == 1 and (m.stride(-1) == r or c == 1))


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`: [..., in] -> [..., out]."""
    if onednn(x, layer.weight) and _dense(layer.weight):
        return _onednn_linear(x, layer.weight, layer.bias)
    return layer(x)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for a [..., m, k] and b [..., k, n] with the same leading dimensions: [..., m, n].

    oneDNN takes one matrix product per call, so batches are looped over: worth it from a few
    hundred rows on (SAM's 196-token windows: 2.4x), not for a prompt's 7 tokens (left to torch).
    """
    if a.dim() < 2 or a.shape[:-2] != b.shape[:-2] or not onednn(a, b):
        return a @ b
    lead = a.shape[:-2]
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    if not _dense(b3):
        b3 = b3.contiguous()
    if a3.shape[0] == 1:  # one product: its result as it comes (no copy into a batch)
        return _onednn_linear(a3[0], b3[0].transpose(0, 1), None).view(*lead, a.shape[-2], b.shape[-1])
    out = torch.empty(*lead, a.shape[-2], b.shape[-1], dtype=a.dtype).view(-1, a.shape[-2], b.shape[-1])
    for i in range(a3.shape[0]):  # oneDNN's "weight" is b transposed, [n, k]: a view, no copy
        out[i] = _onednn_linear(a3[i], b3[i].transpose(0, 1), None)
    return out.view(*lead, a.shape[-2], b.shape[-1])
