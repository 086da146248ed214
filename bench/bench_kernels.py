"""float32 products on this CPU: torch's own kernels (MKL on x86) against oneDNN (hybridgl.kernels).

    python bench/bench_kernels.py            # the method's shapes, GFLOP/s of each and the ratio
    python bench/bench_kernels.py --threads 4

The method's float32 passes route their products through oneDNN (hybridgl/kernels.py) because on
an AMD EPYC MKL's sgemm ran at about half oneDNN's speed. This prints whether that holds on the
CPU at hand, for the shapes that dominate a new image: SAM ViT-B's linears and global-attention
products, CLIP ViT-B/16's linears in a pass of 4 masks, GEM's self-self attention. Nothing is
asserted: this prints figures (bfloat16 autocast, the fast mode's, for comparison).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hybridgl import kernels  # noqa: E402

# (what, rows m, inner k, columns n): m x k times k x n
SHAPES = [
    ("SAM ViT-B qkv (4096 tokens)", 4096, 768, 2304),
    ("SAM ViT-B MLP up", 4096, 768, 3072),
    ("SAM ViT-B MLP down", 4096, 3072, 768),
    ("SAM global attention scores (256 queries)", 256, 64, 4096),
    ("SAM global attention values", 256, 4096, 64),
    ("CLIP MLP up (4 masks: 8 x 197 tokens)", 8 * 197, 768, 3072),
    ("CLIP MLP down", 8 * 197, 3072, 768),
    ("CLIP q/k/v/out", 8 * 197, 768, 768),
    ("GEM similarity (785 tokens, one head)", 785, 64, 785),
]


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN "
          f"{'available' if kernels._ONEDNN else 'NOT available: the method uses torch kernels'}")
    print(f"{'shape':<44}{'torch fp32':>12}{'oneDNN fp32':>13}{'ratio':>7}{'bf16 autocast':>15}   (GFLOP/s)")
    torch.manual_seed(0)
    with torch.no_grad():
        for what, m, k, n in SHAPES:
            a, b = torch.randn(m, k), torch.randn(k, n)
            flops = 2 * m * k * n
            t_torch = best_time(lambda: a @ b, args.repeats)
            t_ours = best_time(lambda: kernels.matmul(a, b), args.repeats) if kernels._ONEDNN else t_torch
            with torch.autocast("cpu", dtype=torch.bfloat16):
                t_low = best_time(lambda: a @ b, args.repeats)
            print(f"{what:<44}{flops / t_torch / 1e9:12.0f}{flops / t_ours / 1e9:13.0f}{t_torch / t_ours:7.2f}"
                  f"{flops / t_low / 1e9:15.0f}")


if __name__ == "__main__":
    main()
