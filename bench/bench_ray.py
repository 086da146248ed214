"""Throughput of the Ray pipeline (hybridgl.distributed) with 1 and 2 model actors, and the scaling.

    python bench/bench_ray.py                          # tiny models, a local cluster on this machine
    python bench/bench_ray.py --images 64 --exprs 3 --cpus-per-actor 1
    python bench/bench_ray.py --real --address auto    # real weights, on a running GPU cluster

Each item is one image with --exprs expressions: prepared once by a model actor, then segmented per
expression, the images read by Ray tasks meanwhile (what `--ray` runs). Prints images/s and
expressions/s per actor count (after one warm-up item per actor, so model loading is not counted)
and the scaling factor of 2 actors over 1; it asserts nothing. On a machine shared with other work
(or with fewer cores than actors x torch threads) the figures are noisy: compare runs of one go.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hybridgl import distributed  # noqa: E402

EXPRESSIONS = ["the object on the left", "the red thing", "the biggest one", "the thing in the middle",
               "the small one on the right"]


def build(real: bool, device: str | None):
    from hybridgl import HybridGL

    if real:
        return HybridGL.from_pretrained(parser="auto", device=device)
    from tiny_models import tiny_hybridgl

    return tiny_hybridgl(sam=True)


def make_image(index: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    img = rng.integers(90, 140, (size, size, 3)).astype(np.uint8)
    for color in ((220, 30, 30), (30, 30, 220)):
        y, x = rng.integers(0, size // 2, 2)
        img[y:y + size // 3, x:x + size // 3] = color
    return img


def load_image(size: int, item: tuple[int, int]) -> np.ndarray:
    return make_image(item[0], size)


def work(model, item: tuple[int, int], image: np.ndarray) -> int:
    view = model.prepare(image)
    for k in range(item[1]):
        model.segment(view, EXPRESSIONS[(item[0] + k) % len(EXPRESSIONS)])
    return item[1]


def measure(actors: int, args) -> tuple[float, float]:
    """(images/s, expressions/s) with `actors` model actors, after a warm-up item each."""
    options = distributed.RayOptions(actors=actors, cpus_per_actor=args.cpus_per_actor,
                                     gpus_per_actor=args.gpus_per_actor)
    factory = partial(build, args.real, args.device)
    load = partial(load_image, args.size)
    warm = [(args.images + i, 1) for i in range(actors)]  # other images than the measured ones
    items = [(i, args.exprs) for i in range(args.images)]
    # one pipeline, so the actors (and their models) stay up: the clock starts at the first real item
    t0, done, exprs = None, 0, 0
    for result in distributed.run_grouped(warm + items, load, factory, work, options):
        if result.error:
            raise RuntimeError(result.error)
        if result.index < len(warm):
            continue
        if t0 is None:  # the first real item marks the start (models loaded, pipeline full)
            t0 = time.perf_counter()
            continue
        done += 1
        exprs += result.value
    seconds = time.perf_counter() - t0
    return done / seconds, exprs / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", action="store_true", help="real weights (SAM ViT-H, CLIP B/16)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--address", default=None, help="Ray cluster (default: start a local one)")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--exprs", type=int, default=3, help="expressions per image")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (synthetic images)")
    ap.add_argument("--cpus-per-actor", type=float, default=0.5)
    ap.add_argument("--gpus-per-actor", type=float, default=None)
    args = ap.parse_args()
    # a local cluster's workers inherit this environment: they import the tests' tiny models too
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"),
                                                             os.environ.get("PYTHONPATH")]))
    with distributed.cluster(distributed.RayOptions(address=args.address)) as resources:
        print(f"cluster: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU; {args.images} images x "
              f"{args.exprs} expressions, {'real' if args.real else 'tiny'} models")
        rates = {}
        for actors in (1, 2):
            rates[actors] = measure(actors, args)
            print(f"{actors} actor{'s' if actors > 1 else ' '}: {rates[actors][0]:7.2f} images/s  "
                  f"{rates[actors][1]:7.2f} expressions/s")
        print(f"scaling 2 actors / 1 actor: {rates[2][0] / rates[1][0]:.2f}x")


if __name__ == "__main__":
    main()
