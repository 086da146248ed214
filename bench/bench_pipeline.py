"""Time the stages of HybridGL: SAM proposals, hybrid features, GEM tokens, and one expression.

    python bench/bench_pipeline.py                       # tiny models (CPU, what CI machines have)
    python bench/bench_pipeline.py --real --device cuda  # real weights (SAM ViT-H, CLIP B/16)

Prints seconds per stage (median of --repeat runs) so that changes can be compared; it asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hybridgl import HybridGL, HybridGLConfig  # noqa: E402
from hybridgl.coherence import gem_tokens  # noqa: E402
from hybridgl.hybrid_features import hybrid_features  # noqa: E402
from hybridgl.pipeline import load_image  # noqa: E402


def timed(fn, repeat: int, sync) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="openai/clip-vit-base-patch16 + SAM vit_h (weights needed)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image", default=str(ROOT / "tests/fixtures/golden/p02_bird_above_tree/image.png"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--masks", type=int, default=30, help="injected masks when SAM finds none (tiny models)")
    args = ap.parse_args()

    if args.real:
        model = HybridGL.from_pretrained(parser="auto", device=args.device)
    else:
        from tiny_models import tiny_hybridgl

        model = tiny_hybridgl(sam=True)
        model = HybridGL(model.clip, model.tokenizer, sam=model.sam, parser="rules", device=args.device,
                         config=model.config)
    sync = (lambda: torch.cuda.synchronize(model.device)) if model.device.type == "cuda" else (lambda: None)
    image = load_image(args.image)
    h, w = image.shape[:2]
    print(f"device {model.device}, image {w}x{h}, {'real' if args.real else 'tiny'} models")

    t_sam, props = timed(lambda: model.proposer(image), args.repeat, sync)
    masks = props.masks
    if len(masks) == 0:
        rng = np.random.default_rng(0)
        masks = np.zeros((args.masks, h, w), bool)
        for m in masks:
            y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
            m[y:y + rng.integers(10, h - y), x:x + rng.integers(10, w - x)] = True
    cfg: HybridGLConfig = model.config
    t_feat, _ = timed(lambda: hybrid_features(model.clip, image, masks, cfg, model.device), args.repeat, sync)
    t_gem, _ = timed(lambda: gem_tokens(model.clip, image, cfg, model.device), args.repeat, sync)
    view = model.prepare(image, proposals=masks)
    t_seg, seg = timed(lambda: model.segment(view, "the bird above the tree"), args.repeat, sync)
    print(f"SAM proposals      {t_sam:8.3f} s  ({len(props)} masks)")
    print(f"hybrid features    {t_feat:8.3f} s  ({len(masks)} masks, {t_feat / max(1, len(masks)) * 1000:.1f} ms/mask)")
    print(f"GEM tokens         {t_gem:8.3f} s")
    print(f"segment (1 expr.)  {t_seg:8.3f} s  (score {seg.score:.3f})")
    print(f"image total        {t_sam + t_feat + t_gem + t_seg:8.3f} s; each further expression {t_seg:.3f} s")


if __name__ == "__main__":
    main()
