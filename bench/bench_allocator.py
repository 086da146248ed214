"""What keeping freed memory (hybridgl/allocator.py) does over a run of new images, as a server sees them.

    python bench/bench_allocator.py                  # 12 images, glibc as it is vs freed memory kept
    python bench/bench_allocator.py --images 40      # a longer run: does resident memory settle?

Each setting runs in its own process, one after the other: the full-size models with random weights
(bench_speed.py's), images of seeded random sizes (240-900 px a side), two expressions each, and the
last `--cache` prepared images kept alive as the backend's cache keeps them. Per image it prints the
seconds, minor page faults, kernel seconds and resident memory; then medians, the largest and the last
resident memory. The first images fill the heap (and the cache): the medians are of the second half.
Nothing is asserted: this prints figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args) -> None:
    import resource
    import time
    from collections import OrderedDict

    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_speed import RANDOM_SAM, random_models, synthetic_image

    from hybridgl import HybridGL, HybridGLConfig, allocator

    if args.threads:
        torch.set_num_threads(args.threads)
    kept = allocator.keep_freed_memory() if args.worker == "kept" else False
    clip, tokenizer, sam = random_models(args.sam)
    model = HybridGL(clip, tokenizer, sam=sam, parser="rules", device="cpu", config=HybridGLConfig(**RANDOM_SAM))
    page = os.sysconf("SC_PAGE_SIZE")
    rng = np.random.default_rng(0)
    cache: OrderedDict[int, object] = OrderedDict()
    for i in range(args.images):
        height, width = (int(v) for v in rng.integers(240, 900, 2))
        image = synthetic_image(i, height, width)
        before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        view = model.prepare(image)
        for expression in ("the red ball on the left", "the big green box"):
            model.segment(view, expression)
        seconds, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
        cache[i] = view
        while len(cache) > args.cache:
            cache.popitem(last=False)
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * page
        print(json.dumps({"kept": kept, "image": [height, width], "s": round(seconds, 2),
                          "faults": after.ru_minflt - before.ru_minflt,
                          "kernel_s": round(after.ru_stime - before.ru_stime, 2), "rss_gb": round(rss / 2**30, 3)}),
              flush=True)


def run(setting: str, args) -> list[dict]:
    command = [sys.executable, __file__, "--worker", setting, "--images", str(args.images), "--sam", args.sam,
               "--cache", str(args.cache), "--threads", str(args.threads)]
    # the worker decides: glibc's own variables or the opt-out would make both settings the same
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "HYBRIDGL_MALLOC"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    rows = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as process:
        for line in process.stdout:
            if line.startswith("{"):
                rows.append(json.loads(line))
                row = rows[-1]
                print(f"  {setting:6s} image {len(rows):3d} {row['image'][0]:4d}x{row['image'][1]:<4d} "
                      f"{row['s']:6.2f} s  {row['faults']:9d} faults  {row['kernel_s']:5.2f} s kernel  "
                      f"{row['rss_gb']:.3f} GB resident", flush=True)
    if process.returncode:
        raise SystemExit(f"the {setting} worker failed ({process.returncode})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--sam", default="vit_b")
    parser.add_argument("--cache", type=int, default=16, help="prepared images kept alive (the backend's LRU)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--worker", choices=["glibc", "kept"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results = {setting: run(setting, args) for setting in ("glibc", "kept")}
    print(f"\n{args.images} new images, SAM {args.sam} + CLIP ViT-B/16 random weights, cache {args.cache}; "
          "medians of the second half")
    for setting, rows in results.items():
        if setting == "kept" and not rows[0]["kept"]:
            print("  kept: not applied here (not glibc): both rows measure glibc's defaults")
        half = rows[len(rows) // 2:]
        print(f"  {setting:6s} {statistics.median(r['s'] for r in half):6.2f} s per image  "
              f"{statistics.median(r['faults'] for r in half):10.0f} faults  "
              f"{statistics.median(r['kernel_s'] for r in half):5.2f} s kernel  resident "
              f"max {max(r['rss_gb'] for r in rows):.3f} GB, last {rows[-1]['rss_gb']:.3f} GB")


if __name__ == "__main__":
    main()
