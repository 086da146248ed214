"""Does the fast mode choose what the exact mode chooses? A seeded sweep on the tests' tiny CLIP.

    python bench/bench_fast_agreement.py                      # 60 views x 4 expressions (~2 min on 2 CPU cores)
    python bench/bench_fast_agreement.py --views 150 --probe-views 60 --seed 1
    python bench/bench_fast_agreement.py --propagation 30     # also: the error propagation at its bound
    python bench/bench_fast_agreement.py --device cuda        # float16 on a GPU

Each view is a golden image (tests/fixtures/golden) with a random mask set: N from 1 to 60;
rectangles, ellipses, 16-pixel blobs, tiny masks (1-16 pixels), whole-image masks, near-duplicates
(one mask's copies with a few pixels removed), many overlapping masks around the centre. Each gets
expressions with and without relations and other nouns, answered in turn on one fast view (so the
later ones meet rows that earlier ones made exact). It prints:

- agreement: final choice, semantic choice (argmax S) and candidate set I, fast vs exact, and how
  many answers were decided with low-precision rows left (with the tiny CLIP's random weights
  every mask's feature lies within the low precision's error of the others, so the fast mode
  almost always ends in float32: agreement then checks its fallbacks, not its bound);
- the probe estimate: the error measured on every mask against the one estimated from the probes
  (`fast_safety` multiplies the latter; a ratio above it means the bound did not hold for that
  view for some text), and for the sweep's own texts the score errors against their bound;
- with --propagation K: K views whose low-precision features are the exact ones moved along the
  texts' directions by exactly the bound given (the worst case for those texts, at a scale near
  the gaps of S), so that decisions are taken with low-precision rows and `contested` is
  checked at its edge.

Nothing is asserted: this prints figures (a disagreement is printed with its case).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hybridgl import HybridGL, HybridGLConfig  # noqa: E402
from hybridgl.fast import LowPrecision, feature_error, probe_indices  # noqa: E402
from hybridgl.hybrid_features import hybrid_features  # noqa: E402
from hybridgl.pipeline import PreparedView, load_image  # noqa: E402
from hybridgl.proposals import Proposals  # noqa: E402
from hybridgl.text import text_features  # noqa: E402

EXPRESSIONS = [
    "the cup left of the plate", "red ball", "bird above the tree", "bigger ball", "the smaller box near the lamp",
    "apple in the bowl", "bottle on the right", "chair in the middle", "the thing", "it", "man below the sign",
    "the larger dog", "dog inside the car", "smallest one", "the top one", "person to the right of the car",
    "blue", "a green car on the left", "the woman under the umbrella", "biggest", "left", "the cat",
    "the small red cup right of the big blue bowl", "tree", "sky above the house", "the lamp inside the box",
]
STYLES = ["mix", "rect", "ellipse", "neardup", "overlap", "tiny+whole"]


def shapes(rng: np.random.Generator, h: int, w: int, n: int, kind: str) -> np.ndarray:
    masks = np.zeros((n, h, w), bool)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        k = kind if kind != "mix" else rng.choice(["rect", "ellipse", "tiny", "whole", "blob"])
        if k == "rect":
            y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
            masks[i, y0:rng.integers(y0 + 1, h + 1), x0:rng.integers(x0 + 1, w + 1)] = True
        elif k == "ellipse":
            cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, h / 2), rng.uniform(3, w / 2)
            masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        elif k == "tiny":
            y0, x0, s = rng.integers(0, h - 4), rng.integers(0, w - 4), rng.integers(1, 5)
            masks[i, y0:y0 + s, x0:x0 + s] = True
        elif k == "whole":
            masks[i] = True
            if rng.random() < 0.5:
                masks[i, :rng.integers(1, h // 4)] = False
        else:  # blob
            cells = rng.random((h // 16 + 1, w // 16 + 1)) < rng.uniform(0.1, 0.6)
            masks[i] = np.kron(cells, np.ones((16, 16), bool))[:h, :w]
        if not masks[i].any():
            masks[i, rng.integers(h), rng.integers(w)] = True
    return masks


def mask_set(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    n = int(rng.choice([1, 2, 3, 4, 5, 8, 12, 20, 30, 45, 60], p=[.04, .06, .08, .08, .12, .14, .14, .12, .1, .07, .05]))
    style = str(rng.choice(STYLES))
    if style == "neardup":
        base = shapes(rng, h, w, max(1, n // 4), "mix")
        out = []
        for i in range(n):
            m = base[i % len(base)].copy()
            ys, xs = np.nonzero(m)
            if len(ys) > 1 and rng.random() < 0.8:
                j = rng.integers(len(ys), size=rng.integers(1, 4))
                m[ys[j], xs[j]] = False
            out.append(m)
        return np.stack(out), style
    if style == "overlap":
        out = np.zeros((n, h, w), bool)
        for i in range(n):
            r = rng.integers(5, min(h, w) // 2)
            out[i, max(0, h // 2 - r + rng.integers(-5, 6)):h // 2 + r, max(0, w // 2 - r):w // 2 + r + rng.integers(-5, 6)] = True
        return out, style
    if style == "tiny+whole" and n > 1:
        return np.concatenate([shapes(rng, h, w, n // 2, "tiny"), shapes(rng, h, w, n - n // 2, "whole")]), style
    return shapes(rng, h, w, n, "tiny" if style == "tiny+whole" else style), style


def same_choices(a, b) -> tuple[bool, bool, bool]:
    return (a.index == b.index, a.hybrid_index == b.hybrid_index,
            set(a.explain["topk_I"].tolist()) == set(b.explain["topk_I"].tolist()))


def tally(a, b, agreed: bool, where: str, score_diff: float) -> float:
    """The largest score difference so far where the choices agree; a disagreement is printed."""
    if agreed:
        return max(score_diff, abs(a.score - b.score))
    print(f"  DIFFERENT: {where}: exact {a.index} (semantic {a.hybrid_index}), fast {b.index} "
          f"(semantic {b.hybrid_index})", flush=True)
    return score_diff


def probe_check(model: HybridGL, view: PreparedView, expressions: list[str], dtype: str) -> dict[str, float]:
    """The error on every mask against the probes' estimate (as `fast_features` measures it in `dtype`)."""
    cfg, dev = model.config, model.device
    masks, image = view.masks, view.image
    low = hybrid_features(model.clip, image, masks, cfg.replace(dtype=dtype), dev)
    delta = F.normalize(low, dim=-1) - F.normalize(view.features, dim=-1)
    probes = probe_indices(masks, cfg.fast_probes)
    p_exact = hybrid_features(model.clip, image, masks[probes], cfg, dev)
    p_low = hybrid_features(model.clip, image, masks[probes], cfg.replace(dtype=dtype), dev)
    p_delta = F.normalize(p_low, dim=-1) - F.normalize(p_exact, dim=-1)
    spread, size = feature_error(p_delta), p_delta.norm(dim=-1).max().item()
    out = {"spread": feature_error(delta) / max(spread, 1e-30), "size": delta.norm(dim=-1).max().item() / max(size, 1e-30)}
    worst_spread = worst_size = 0.0
    for e in expressions:
        t = text_features(model.clip, model.tokenizer, model.parse(e), cfg, dev)
        for text in [t.mixed] + ([t.neg] if t.neg is not None else []):
            dS = model.logit_scale * (delta @ F.normalize(text, dim=0)).cpu().numpy()
            worst_spread = max(worst_spread, (dS.max() - dS.min()) / 2 / (model.logit_scale * spread * cfg.fast_safety))
            worst_size = max(worst_size, np.abs(dS).max() / (model.logit_scale * size * cfg.fast_safety))
    out.update(text_spread=worst_spread, text_size=worst_size)
    return out


def sweep(exact: HybridGL, fast: HybridGL, images: list[np.ndarray], args) -> None:
    rng = np.random.default_rng(args.seed)
    counts = dict(answers=0, final=0, semantic=0, candidates=0, low_left=0, views=0, views_low=0)
    score_diff = 0.0
    ratios = {"spread": [], "size": [], "text_spread": [], "text_size": []}
    t0 = time.perf_counter()
    for v in range(args.views):
        image = images[rng.integers(len(images))]
        masks, style = mask_set(rng, *image.shape[:2])
        expressions = [str(e) for e in rng.choice(EXPRESSIONS, size=args.expressions, replace=False)]
        exact_view = exact.prepare(image, proposals=masks)
        view = fast.prepare(image, proposals=masks)
        counts["views"] += 1
        counts["views_low"] += view.low_precision is not None
        if len(masks) > exact.config.fast_probes and v < args.probe_views:
            for key, value in probe_check(exact, exact_view, expressions, fast.config.dtype).items():
                ratios[key].append(value)
        for e in expressions:
            a, b = exact.segment(exact_view, e), fast.segment(view, e)
            final, semantic, candidates = same_choices(a, b)
            counts["answers"] += 1
            counts["final"] += final
            counts["semantic"] += semantic
            counts["candidates"] += candidates
            counts["low_left"] += view.low_precision is not None
            score_diff = tally(a, b, final, f"view {v} ({style}, N={len(masks)}) {e!r}", score_diff)
    print(f"sweep (seed {args.seed}): {counts['views']} views, {counts['answers']} answers in "
          f"{time.perf_counter() - t0:.0f} s; {counts['views_low']} views prepared in low precision")
    print(f"  same final choice {counts['final']}/{counts['answers']}, same semantic choice "
          f"{counts['semantic']}/{counts['answers']}, same candidate set {counts['candidates']}/{counts['answers']}; "
          f"answered with low-precision rows left: {counts['low_left']}; largest score difference "
          f"where the choice agreed {score_diff:.2e}")
    if ratios["spread"]:
        print(f"  probe estimate over {len(ratios['spread'])} views (fast_safety {exact.config.fast_safety:g}): "
              f"error on all masks / on the probes, largest: spread {max(ratios['spread']):.2f}, size "
              f"{max(ratios['size']):.2f} (median {np.median(ratios['spread']):.2f}, {np.median(ratios['size']):.2f}); "
              f"the sweep's texts' score errors / their bound, largest: spread {max(ratios['text_spread']):.3f}, "
              f"size {max(ratios['text_size']):.3f}")


def propagation(exact: HybridGL, fast: HybridGL, images: list[np.ndarray], args) -> None:
    """Low-precision features = exact ones moved along the texts' directions by the bound given."""
    rng = np.random.default_rng(args.seed + 1)
    total = same = low_left = 0
    score_diff = 0.0
    t0 = time.perf_counter()
    for v in range(args.propagation):
        image = images[rng.integers(len(images))]
        masks, style = mask_set(rng, *image.shape[:2])
        if len(masks) < 3:
            continue
        exact_view = exact.prepare(image, proposals=masks)
        unit = F.normalize(exact_view.features, dim=-1)
        n = len(masks)
        props = Proposals.from_masks(masks, *masks.shape[1:])
        for e in [str(x) for x in rng.choice(EXPRESSIONS, size=args.expressions, replace=False)]:
            a = exact.segment(exact_view, e)
            t = text_features(exact.clip, exact.tokenizer, exact.parse(e), exact.config, exact.device)
            gaps = np.abs(np.diff(np.sort(a.explain["S"])))
            gaps = gaps[gaps > 0] if (gaps > 0).any() else np.array([1.0])
            for _ in range(args.trials):
                eps = float(rng.choice(gaps)) / exact.logit_scale * 10 ** rng.uniform(-1.5, 0.3)
                kind = rng.integers(3)
                sign = torch.ones(n)
                if kind == 0:  # the exact choice (final or semantic) down, every other mask up
                    sign[a.index if rng.random() < 0.5 else a.hybrid_index] = -1
                elif kind == 1:
                    sign = torch.from_numpy(rng.choice([-1.0, 1.0], n)).float()
                else:  # the candidates down
                    sign[torch.from_numpy(a.explain["topk_I"])] = -1
                weight = torch.from_numpy(rng.uniform(0, 1, n)).float() if rng.random() < 0.5 else torch.ones(n)
                direction = F.normalize(t.mixed, dim=0)
                if t.neg is not None and rng.random() < 0.5:
                    direction = F.normalize(direction * rng.uniform(-1, 1) + F.normalize(t.neg, dim=0) * rng.uniform(-1, 1), dim=0)
                low = F.normalize(unit + (sign * weight)[:, None].to(unit.device) * direction[None] * eps, dim=-1)
                delta = low - unit
                bound = LowPrecision(np.ones(n, bool), feature_error(delta) * (1 + 1e-6),
                                     delta.norm(dim=-1).max().item() * (1 + 1e-6))
                view = PreparedView(exact_view.image, props, low, exact_view.tokens, low_precision=bound)
                if rng.random() < 0.3:  # some rows exact already (the bound of the others is then `size`)
                    fast._refine(view, rng.choice(n, size=max(1, n // 3), replace=False))
                b = fast.segment(view, e)
                total += 1
                ok = all(same_choices(a, b))
                same += ok
                low_left += view.low_precision is not None
                score_diff = tally(a, b, ok, f"view {v} ({style}, N={n}) {e!r} eps {eps:.2e}", score_diff)
    print(f"propagation at the bound: {total} answers in {time.perf_counter() - t0:.0f} s, all choices the same in "
          f"{same}; answered with low-precision rows left: {low_left}; largest score difference where the "
          f"choices agreed {score_diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=60)
    ap.add_argument("--expressions", type=int, default=4, help="per view")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-views", type=int, default=30, help="views whose probe estimate is checked (a low-precision pass more)")
    ap.add_argument("--propagation", type=int, default=0, help="views of the propagation check")
    ap.add_argument("--trials", type=int, default=3, help="noise draws per expression in the propagation check")
    ap.add_argument("--safety", type=float, default=None, help="fast_safety (default: the config's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from tiny_models import GOLDEN_DIR, tiny_clip

    clip, tokenizer = tiny_clip()
    config = HybridGLConfig() if args.safety is None else HybridGLConfig(fast_safety=args.safety)
    exact = HybridGL(clip, tokenizer, sam=None, parser="rules", device=args.device, config=config)
    # fast_patience 0: every view takes the low-precision path (random weights would make it skip it);
    # its dtype named, as a CPU without native bfloat16 would make the fast mode compute float32 only
    dtype = "float16" if args.device.startswith("cuda") else "bfloat16"
    fast = HybridGL(clip, tokenizer, sam=None, parser="rules", device=args.device,
                    config=config.replace(fast=True, fast_patience=0, dtype=dtype))
    images = [load_image(p) for p in sorted(GOLDEN_DIR.glob("*/image.png"))]
    print(f"tiny CLIP on {exact.device}, torch threads {torch.get_num_threads()}")
    sweep(exact, fast, images, args)
    if args.propagation:
        propagation(exact, fast, images, args)


if __name__ == "__main__":
    main()
