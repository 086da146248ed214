"""Speed of HybridGL on full-size architectures with random weights, on a fixed synthetic workload.

    python bench/bench_speed.py                          # this tree: exact and fast mode
    python bench/bench_speed.py --baseline 8bc2a8c       # ... and a commit's code in the same run: ratios
    python bench/bench_speed.py --images 4 --expressions 4 --sam vit_h   # scale up
    python bench/bench_speed.py --models real --device cuda   # real weights (downloaded once): GPU sizing
    python bench/bench_speed.py --models tiny --baseline main  # the tests' tiny models: checks the harness
    python bench/bench_speed.py --modes exact,fast,sam16,fast+sam16   # SAM's encoder in low precision too

SAM ViT-B (or --sam) and CLIP ViT-B/16 are built with seeded random weights, so anyone gets the
same models without downloads; random SAM weights predict IoUs near 0, so the generator's
thresholds are changed (RANDOM_SAM) to keep a few dozen masks per image. Each variant
(the exact mode, the fast mode, and with --baseline the code of another commit, extracted with
`git archive` and run in a subprocess) runs the same images and expressions; the report gives
seconds per stage and per expression, ratios between variants (these machines are noisy: the
variants run round robin `--rounds` times and each time is its minimum over the rounds), whether
the variants chose the same masks (where masks differ, as with SAM's encoder in low precision,
their IoU with the exact mode's), how many masks the fast mode kept in low precision, and the
model's share of wall time when a batch overlaps decoding and encoding with the model (bounded
prefetch).
Nothing is asserted: this prints figures.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Random SAM weights predict IoUs in about [-0.1, 0.1] and unstable, mostly image-sized masks that
# box NMS would merge into one: these settings keep a few dozen masks (the report prints how many).
RANDOM_SAM = {"pred_iou_thresh": 0.045, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
EXPRESSIONS = ["the red ball on the left", "the big green box", "the blue cup in the middle",
               "the small yellow ball right of the box", "the box above the table", "the person on the right"]


def synthetic_image(index: int, height: int = 480, width: int = 640):
    """A fixed scene: a gradient background, a table, boxes and balls in seeded colours and places, noise."""
    import numpy as np

    rng = np.random.default_rng(1000 + index)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([80 + 60 * yy / height, 90 + 50 * xx / width, np.full_like(yy, 110.0)], -1)
    image[int(height * 0.7):] = (120, 90, 60)  # a table
    for _ in range(6):
        colour = rng.integers(0, 256, 3)
        cy, cx = rng.integers(40, height - 40), rng.integers(40, width - 40)
        r = rng.integers(20, 90)
        if rng.random() < 0.5:
            image[max(0, cy - r):cy + r, max(0, cx - r):cx + r] = colour
        else:
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = colour
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The worker: runs one variant of the workload with whatever `hybridgl` is first on sys.path.
# It must only use APIs every compared commit has (HybridGL, its proposer, hybrid_features,
# gem_tokens, PreparedView, segment).

def random_models(sam_type: str):
    """Seeded random SAM and CLIP ViT-B/16 (the real architectures) and CLIP's tokenizer."""
    import torch
    from segment_anything import sam_model_registry
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    sam = sam_model_registry[sam_type](checkpoint=None).eval()
    torch.manual_seed(1)
    clip = CLIPModel(CLIPConfig(vision_config={"patch_size": 16}, projection_dim=512)).eval()
    return clip, CLIPTokenizer.from_pretrained(str(ROOT / "tests/fixtures/tiny-clip")), sam


def worker(args) -> dict:
    import numpy as np
    import torch

    import hybridgl
    from hybridgl import HybridGL, HybridGLConfig
    from hybridgl.coherence import gem_tokens
    from hybridgl.hybrid_features import hybrid_features
    from hybridgl.pipeline import PreparedView

    torch.set_num_threads(args.threads or torch.get_num_threads())
    # as the programs of the variant's commit run (its CLI and backend keep freed memory since
    # hybridgl/allocator.py); asked of the files: an editable install would import this tree's
    # modules into an older package
    here = Path(hybridgl.__file__).parent
    kept = False
    if (here / "allocator.py").exists():
        from hybridgl.allocator import keep_freed_memory

        kept = keep_freed_memory()
    overrides = {"random": RANDOM_SAM, "real": {}}.get(args.models)
    if args.models == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import PERMISSIVE, build_tiny_sam, tiny_clip

        overrides = PERMISSIVE
    overrides = {**overrides, **{k: json.loads(v) for k, _, v in (kv.partition("=") for kv in args.set)}}
    if args.sam_low:  # SAM's encoder in low precision (bfloat16 on CPU, float16 on a GPU)
        overrides["sam_dtype"] = "float16" if args.device.startswith("cuda") else "bfloat16"
    config = HybridGLConfig(**overrides, **({"fast": True} if args.fast else {}))
    if args.models == "real":
        model = HybridGL.from_pretrained(sam=args.sam, parser="rules", device=args.device, config=config)
    else:
        clip, tokenizer, sam = random_models(args.sam) if args.models == "random" else (*tiny_clip(), build_tiny_sam())
        model = HybridGL(clip, tokenizer, sam=sam, parser="rules", device=args.device, config=config)
    cuda = model.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(model.device)) if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(model.device)

    def timed(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t, out

    def packed(mask) -> str:
        return base64.b64encode(np.packbits(mask).tobytes()).decode()

    images = []
    for i in range(args.images):
        image = synthetic_image(i)
        t_sam, props = timed(lambda: model.proposer(image))
        if args.fast:  # the fast mode's own prepare: features and GEM together
            t_feat, view = timed(lambda: model.prepare(image, proposals=props))
            t_gem = 0.0
        else:
            t_feat, feats = timed(lambda: hybrid_features(model.clip, image, props.masks, model.config, model.device))
            t_gem, tokens = timed(lambda: gem_tokens(model.clip, image, model.config, model.device))
            view = PreparedView(image, props, feats, tokens)
        exprs = []
        for j in range(args.expressions):
            text = EXPRESSIONS[(i + j) % len(EXPRESSIONS)]
            t_seg, seg = timed(lambda: model.segment(view, text))
            exprs.append({"text": text, "seconds": t_seg, "index": seg.index,
                          "mask": hashlib.sha1(np.packbits(seg.mask).tobytes()).hexdigest() if seg.mask is not None
                          else None, "bits": packed(seg.mask) if seg.mask is not None else None})
        low = getattr(view, "low_precision", None)  # the fast mode: masks still low precision after all
        images.append({"masks": len(props), "sam": t_sam, "features": t_feat, "gem": t_gem,
                       "proposals": hashlib.sha1(np.packbits(props.masks).tobytes()).hexdigest(),
                       "proposal_bits": [packed(m) for m in props.masks], "shape": list(image.shape[:2]),
                       "low_rows": int(low.low.sum()) if low is not None else 0, "expressions": exprs})
    batch = batch_share(model, args, sync) if args.batch else None
    out = {"images": images, "batch": batch, "peak_gpu_bytes": torch.cuda.max_memory_allocated(model.device) if cuda else None,
           "device": str(model.device), "threads": torch.get_num_threads()}
    cache = getattr(model, "text_cache", None)  # commits before the text cache have none
    if cache is not None:
        out["text_cache"] = [cache.hits, cache.misses]
    if args.fast:  # which low precision the fast mode took on this machine
        out["low_precision"] = getattr(model, "fast_dtype", None)
    sam_dtype = getattr(model.proposer, "sam_dtype", None)  # commits before sam_dtype: float32
    out["sam_dtype"] = sam_dtype(model.device) if sam_dtype else "float32"
    # commits before hybridgl/kernels.py multiplied float32 with torch's kernels (MKL on x86)
    out["float32_products"] = "torch's"
    out["freed_memory_kept"] = kept
    if (here / "kernels.py").exists():
        from hybridgl import kernels
        if kernels._ONEDNN and model.device.type == "cpu":
            out["float32_products"] = "oneDNN"
    return out


def batch_share(model, args, sync) -> dict:
    """A batch as `hybridgl evaluate` runs it (PNG files read and decoded, every expression, masks
    run-length encoded for Label Studio), with the next images prefetched: the model's share of wall time."""
    import numpy as np
    from PIL import Image

    from hybridgl.pipeline import load_image
    from hybridgl.prefetch import prefetch
    from backend.model import mask_to_rle

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.images):
            paths.append(Path(tmp) / f"{i}.png")
            Image.fromarray(synthetic_image(i)).save(paths[-1])
        model_s, start = 0.0, time.perf_counter()
        for i, (path, loaded) in enumerate(prefetch(paths, load_image)):
            image = loaded.result()
            sync()
            t = time.perf_counter()
            view = model.prepare(image)
            segs = [model.segment(view, EXPRESSIONS[(i + j) % len(EXPRESSIONS)]) for j in range(args.expressions)]
            sync()
            model_s += time.perf_counter() - t
            for seg in segs:
                mask_to_rle(seg.mask if seg.mask is not None else np.zeros(image.shape[:2], bool))
        wall = time.perf_counter() - start
    return {"model": model_s, "wall": wall}


# ---------------------------------------------------------------------------------------------
# The driver: runs the variants in subprocesses (one at a time, same machine) and compares them.

def extract(rev: str, into: Path) -> Path:
    """The tree of commit `rev` (its tracked files) under `into`."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_variant(name: str, code: Path, args, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--code", str(code), "--json", out.name,
               "--images", str(args.images), "--expressions", str(args.expressions), "--sam", args.sam,
               "--device", args.device, "--threads", str(args.threads), "--models", args.models, *extra,
               *[a for kv in args.set for a in ("--set", kv)]]
        print(f"running {name} ...", flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=code)
        result = json.loads(Path(out.name).read_text())
        result["wall"] = time.perf_counter() - t
        return result


def fastest(runs: list[dict]) -> dict:
    """One result from several runs of a variant: every measured time is its minimum over the runs
    (the choices and proposals are the first run's; runs of one variant compute the same things)."""
    out = json.loads(json.dumps(runs[0]))
    for i, image in enumerate(out["images"]):
        for stage in ("sam", "features", "gem"):
            image[stage] = min(r["images"][i][stage] for r in runs)
        for j, expr in enumerate(image["expressions"]):
            expr["seconds"] = min(r["images"][i]["expressions"][j]["seconds"] for r in runs)
    if out.get("batch"):  # the share of the run whose batch took the least wall time
        out["batch"] = min((r["batch"] for r in runs), key=lambda b: b["wall"])
    return out


def summary(result: dict) -> dict:
    imgs = result["images"]
    exprs = [e for im in imgs for e in im["expressions"]]
    return {"sam": sum(i["sam"] for i in imgs), "features": sum(i["features"] for i in imgs),
            "gem": sum(i["gem"] for i in imgs),
            "prepare": sum(i["sam"] + i["features"] + i["gem"] for i in imgs),
            "segment": sum(e["seconds"] for e in exprs), "n_images": len(imgs), "n_expr": len(exprs),
            "masks": [i["masks"] for i in imgs]}


def agreement(a: dict, b: dict) -> tuple[int, int, bool]:
    """(same chosen masks, expressions, same proposals on every image)."""
    pairs = [(x, y) for ia, ib in zip(a["images"], b["images"]) for x, y in zip(ia["expressions"], ib["expressions"])]
    same_props = all(ia["proposals"] == ib["proposals"] for ia, ib in zip(a["images"], b["images"]))
    return sum(x["mask"] == y["mask"] for x, y in pairs), len(pairs), same_props


def _unpack(bits: str, shape: list[int]):
    import numpy as np

    return np.unpackbits(np.frombuffer(base64.b64decode(bits), np.uint8))[:shape[0] * shape[1]].reshape(shape).astype(bool)


def _iou(m, n) -> float:
    union = (m | n).sum()
    return float((m & n).sum() / union) if union else 1.0


def overlap(a: dict, b: dict) -> dict:
    """How close variant b's masks are to variant a's where they are not identical (low-precision
    SAM moves borders): the chosen masks' IoU, and for b's proposals the best IoU with one of a's."""
    chosen, best = [], []
    for ia, ib in zip(a["images"], b["images"]):
        for x, y in zip(ia["expressions"], ib["expressions"]):
            if x.get("bits") and y.get("bits"):
                chosen.append(_iou(_unpack(x["bits"], ia["shape"]), _unpack(y["bits"], ib["shape"])))
        ref = [_unpack(bits, ia["shape"]) for bits in ia.get("proposal_bits", [])]
        for bits in ib.get("proposal_bits", []):
            m = _unpack(bits, ib["shape"])
            best.append(max((_iou(m, n) for n in ref), default=0.0))
    return {"chosen": chosen, "proposals": best}


def report(results: dict[str, dict]) -> None:
    sums = {k: summary(v) for k, v in results.items()}
    print(f"\nworkload: {next(iter(sums.values()))['n_images']} images 640x480, "
          f"{next(iter(sums.values()))['n_expr']} expressions; masks per image "
          f"{next(iter(sums.values()))['masks']}")
    print(f"{'variant':<12}{'SAM s':>8}{'features s':>12}{'GEM s':>8}{'prepare s':>11}{'s/image':>9}"
          f"{'s/expr':>9}{'s/image+exprs':>15}")
    for k, s in sums.items():
        print(f"{k:<12}{s['sam']:8.2f}{s['features']:12.2f}{s['gem']:8.2f}{s['prepare']:11.2f}"
              f"{s['prepare'] / s['n_images']:9.2f}{s['segment'] / s['n_expr']:9.3f}"
              f"{(s['prepare'] + s['segment']) / s['n_images']:15.2f}")
    print("(s/image: prepare, once per new image; s/expr: each expression after it, which in the fast mode "
          "includes making features float32 where a decision is close; s/image+exprs: both, per image)")
    print("float32 products: " + ", ".join(f"{k} {r.get('float32_products', '?')}" for k, r in results.items())
          + " (bench/bench_kernels.py compares them on this CPU); freed memory kept (glibc): "
          + ", ".join(f"{k} {'yes' if r.get('freed_memory_kept') else 'no'}" for k, r in results.items()))
    for k, r in results.items():
        if r.get("text_cache"):
            hits, misses = r["text_cache"]
            print(f"{k}: {hits} of {hits + misses} text encodings came from the model's text cache (the "
                  "workload's noun phrases and GEM prompts recur, as a dataset's do; its expressions cycle "
                  "over 6 sentences)")
        if r.get("batch"):
            b = r["batch"]
            print(f"{k}: batch of {sums[k]['n_images']} images with prefetch: model {b['model']:.1f} s of "
                  f"{b['wall']:.1f} s wall, a share of {100 * b['model'] / b['wall']:.1f} %")
        if r.get("peak_gpu_bytes"):
            s = sums[k]
            print(f"{k}: {s['n_images'] / s['prepare']:.2f} new images/s, "
                  f"{1000 * s['segment'] / s['n_expr']:.0f} ms per further expression, "
                  f"peak GPU memory {r['peak_gpu_bytes'] / 2**30:.2f} GiB")
    if "baseline" in sums:
        for k in sums:
            if k != "baseline":
                r = {st: sums[k][st] / sums["baseline"][st] for st in ("sam", "features", "gem", "prepare")}
                same, n, props = agreement(results["baseline"], results[k])
                print(f"{k} / baseline time: SAM {r['sam']:.2f}, features {r['features']:.2f}, GEM {r['gem']:.2f},"
                      f" prepare {r['prepare']:.2f}; same proposals {props}, same chosen mask {same}/{n}")
    for k in sums:
        if k in ("exact", "baseline") or "exact" not in sums:
            continue
        e, f = sums["exact"], sums[k]
        speed = e["prepare"] / f["prepare"]
        same, n, props = agreement(results["exact"], results[k])
        print(f"{k}: prepare {speed:.2f}x faster than exact (SAM {e['sam'] / f['sam']:.2f}x, features+GEM "
              f"{(e['features'] + e['gem']) / (f['features'] + f['gem']):.2f}x), per expression "
              f"{f['segment'] / max(1e-9, e['segment']):.2f}x the exact time, image with its expressions "
              f"{(e['prepare'] + e['segment']) / (f['prepare'] + f['segment']):.2f}x faster; same proposals "
              f"{props}, same chosen mask as exact {same}/{n}")
        if "fast" in k.split("+"):
            dtype = results[k].get("low_precision")
            print(f"  {k}: low precision {dtype}" if dtype else f"  {k}: no low precision (bfloat16 measured not "
                  "faster than float32 on this CPU): the fast mode computed float32, the exact mode's work")
            if results[k].get("sam_dtype") == "float32":
                # Amdahl: the SAM pass costs the same in both modes, so it bounds the ratio
                print(f"  {k}: SAM runs float32 in both modes here ({e['sam'] / e['prepare']:.0%} of the exact "
                      f"prepare): even with free features and GEM, prepare could be at most "
                      f"{e['prepare'] / e['sam']:.2f}x faster than exact")
            low = [im["low_rows"] for im in results[k]["images"]]
            print(f"  {k}: masks whose features stayed low precision after all expressions, per image: {low} "
                  f"of {f['masks']} (the others were made float32: probes' error too large, or near ties)")
        if not props or same < n:
            o = overlap(results["exact"], results[k])
            if o["chosen"]:
                print(f"  {k}: chosen masks' IoU with exact's: min {min(o['chosen']):.3f}, "
                      f"mean {sum(o['chosen']) / len(o['chosen']):.3f}; proposals matching one of exact's "
                      f"(IoU >= 0.9): {sum(v >= 0.9 for v in o['proposals'])}/{len(o['proposals'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--expressions", type=int, default=3, help="expressions per image")
    ap.add_argument("--sam", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--models", default="random", choices=["random", "real", "tiny"],
                    help="random: full-size architectures, seeded random weights; real: the real weights "
                         "(downloaded once); tiny: the tests' tiny models (a quick check of the harness)")
    ap.add_argument("--baseline", metavar="REV", help="also run the code of this commit and print ratios")
    ap.add_argument("--modes", default="exact,fast",
                    help="variants of this tree, comma-separated: exact, fast, sam16 (SAM's encoder in "
                         "bfloat16/float16: sam_dtype), or combinations such as fast+sam16")
    ap.add_argument("--rounds", type=int, default=3,
                    help="runs of each variant, round robin; each time is the minimum over the rounds "
                         "(a shared machine's load bursts only ever add time)")
    ap.add_argument("--batch", action="store_true",
                    help="also run the workload as a prefetched batch and print the model's share of wall time")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every variant, e.g. points_per_side=4 (JSON value)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sam-low", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        sys.path[:0] = [args.code]
        os.environ.setdefault("HF_HUB_OFFLINE", "0" if args.models == "real" else "1")
        Path(args.json).write_text(json.dumps(worker(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        variants = {"baseline": (extract(args.baseline, Path(tmp)), [])} if args.baseline else {}
        for mode in args.modes.split(","):
            flags = set(mode.split("+"))
            unknown = flags - {"exact", "fast", "sam16"}
            if unknown:
                ap.error(f"unknown mode {mode!r}: modes are exact, fast, sam16 and their +-combinations")
            variants[mode] = (ROOT, (["--fast"] if "fast" in flags else []) + (["--sam-low"] if "sam16" in flags else [])
                              + (["--batch"] if args.batch else []))
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for r in range(args.rounds):  # round robin, the order reversed every other round
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                code, extra = variants[name]
                runs[name].append(run_variant(f"{name} (round {r + 1}/{args.rounds})", code, args, extra))
    report({name: fastest(rs) for name, rs in runs.items()})


if __name__ == "__main__":
    main()
