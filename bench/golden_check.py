"""The 8 golden cases on a device: numbers and choices of the exact and fast modes against the authors'.

    python bench/golden_check.py                         # CPU
    python bench/golden_check.py --device cuda           # a GPU: exact (IEEE float32), fast (float16)
    python bench/golden_check.py --device cuda --torch-defaults   # also: torch's own float32 settings

tests/test_golden.py and tests/test_fast_mode.py assert these on CPU; on a GPU the same cases
check that the exact mode's float32 is float32 there too (cuBLAS/cuDNN, fused attention) and that
the fast mode's float16 keeps every choice. For each case and mode it prints the worst array's
deviation as a fraction of its tolerance (GOLDEN.md; at most 1 passes) and whether the choices (I,
J, k1, k2, the hybrid and the final choice) are the authors'. `--torch-defaults` adds the exact mode
with the method's IEEE guard made a no-op (hybridgl.precision): on Ampere and later GPUs torch then
runs the float32 convolutions (CLIP's patch embedding) in TF32, which is what the guard prevents.

Nothing is asserted: this prints figures.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hybridgl import HybridGL, HybridGLConfig  # noqa: E402
from hybridgl import precision  # noqa: E402

from golden_cases import CASES, EXACT, TOLERANCES, load_case  # noqa: E402
from tiny_models import tiny_clip  # noqa: E402


def check(model: HybridGL) -> list[tuple[str, float, str, bool]]:
    """Per case: (name, worst deviation / tolerance, the key of it, same choices)."""
    rows = []
    for name in CASES:
        data, image, parse = load_case(name)
        view = model.prepare(image, proposals=data["masks"])
        seg = model.segment(view, parse=parse)
        worst, worst_key = 0.0, "-"
        for key, tol in TOLERANCES.items():
            expected = data[key]
            if np.isnan(expected).all():
                continue
            ratio = float(np.abs(np.asarray(seg.explain[key], dtype=np.float64) - expected).max()) / tol
            if ratio > worst:
                worst, worst_key = ratio, key
        same = all(np.array_equal(seg.explain[k], data[k]) for k in EXACT) and seg.index == int(data["pred_final"])
        rows.append((name, worst, worst_key, same))
    return rows


def report(label: str, rows: list[tuple[str, float, str, bool]]) -> None:
    print(f"\n{label}")
    for name, worst, key, same in rows:
        print(f"  {name:24s} worst {worst:8.3f} x tol ({key:15s}) choices {'same' if same else 'DIFFER'}")
    within = sum(w <= 1 for _, w, _, _ in rows)
    print(f"  within tolerance {within}/{len(rows)}, same choices {sum(s for *_, s in rows)}/{len(rows)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--torch-defaults", action="store_true", help="also the exact mode without the IEEE guard")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    clip, tokenizer = tiny_clip()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"golden cases on {name} ({args.device}), torch {torch.__version__}; torch's float32 settings: "
          f"{precision.precision_flags()}")
    exact = HybridGL(clip, tokenizer, sam=None, parser="rules", device=device, config=HybridGLConfig())
    report("exact mode (IEEE float32)", check(exact))
    # fast_patience 0: every case takes the low-precision path; its dtype named (a CPU without native
    # bfloat16 would otherwise compute float32 only)
    dtype = "float16" if device.type == "cuda" else "bfloat16"
    fast = HybridGL(clip, tokenizer, sam=None, parser="rules", device=device,
                    config=HybridGLConfig(fast=True, fast_patience=0, dtype=dtype))
    report(f"fast mode ({dtype}, float32 where a choice is close)", check(fast))
    if args.torch_defaults:
        setter = precision._set
        precision._set = lambda flags: None  # the guard no longer changes torch's settings
        try:
            report("exact mode under torch's own float32 settings (no IEEE guard)", check(exact))
        finally:
            precision._set = setter


if __name__ == "__main__":
    main()
