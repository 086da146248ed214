"""`python -m hybridgl evaluate ...`: the benchmarks, a re-scoring, or a Label Studio export.

    python -m hybridgl evaluate --dataset refcoco --split val --data-root DIR [--coco-images DIR]
                                [--limit N] --out RUN_DIR [--set fusion_mode=L2G] [--ablation NAME]
    python -m hybridgl evaluate --predictions RUN_DIR/predictions.jsonl [--out OTHER_DIR]
    python -m hybridgl evaluate --label-studio-export export.json --out RUN_DIR

`add_arguments(parser)` and `main(args)` are what the top-level CLI wires in.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .datasets import DATASETS

# Rows of the paper's ablation tables as config overrides (applied before any --set).
ABLATIONS: dict[str, dict] = {
    "full": {},
    # Table 5, spatial guidance, built up on G2L hybrid features
    "hybrid-only": {"use_relation": False, "use_coherence": False, "use_position_prior": False},
    "rel": {"use_coherence": False, "use_position_prior": False},
    "rel+coherence": {"use_position_prior": False},
    "no-relation": {"use_relation": False},
    "no-coherence": {"use_coherence": False},
    "no-position": {"use_position_prior": False},
    # Table 3, feature fusion (with the full guidance; compare hybrid_only for the table's numbers)
    "G2L": {"fusion_mode": "G2L"},
    "L2G": {"fusion_mode": "L2G"},
    "G2L+L2G": {"fusion_mode": "G2L+L2G"},
    "G+L": {"fusion_mode": "G+L"},
    "local": {"fusion_mode": "local"},
    "global": {"fusion_mode": "global"},
}


def _usage_error(message: str) -> Exception:
    try:
        from hybridgl.cli import UsageError
    except ImportError:  # pragma: no cover
        return SystemExit(f"error: {message}")
    return UsageError(message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("oIoU / mIoU of HybridGL on RefCOCO, RefCOCO+, RefCOCOg or PhraseCut "
                          "(beside the paper's numbers), a re-scoring of predictions.jsonl, or a "
                          "Label Studio export. See docs/evaluation.md.")
    g = parser.add_argument_group("what to evaluate")
    g.add_argument("--dataset", choices=DATASETS, type=str.lower, help="benchmark")
    g.add_argument("--split", help="val, testA, testB (RefCOCO/+), val, test (RefCOCOg umd), test (PhraseCut)")
    g.add_argument("--data-root", help="refer layout: DIR/<dataset>/refs(unc|umd).p and instances.json; "
                                       "PhraseCut: DIR[/VGPhraseCut_v0]/refer_<split>.json")
    g.add_argument("--coco-images", help="COCO train2014 images (default DIR/images/mscoco/images/train2014); "
                                         "for PhraseCut the images folder (default <root>/images)")
    g.add_argument("--split-by", help="refer split of RefCOCOg: umd (default) or google; unc for RefCOCO/+")
    g.add_argument("--limit", type=int, default=None, help="only the first N expressions (image order)")
    g.add_argument("--predictions", metavar="FILE",
                   help="re-score this predictions.jsonl, no model (with --dataset etc.: against the dataset)")
    g.add_argument("--label-studio-export", metavar="FILE",
                   help="Label Studio JSON export: our predictions vs the annotators' final masks")
    g.add_argument("--ls-model-version", help="only predictions of this model_version (default: the latest)")
    g.add_argument("--ls-from-name", help="only regions of this control (e.g. 'mask')")
    g.add_argument("--ls-label", help="only regions with this label")
    g.add_argument("--ls-text-key", help="task data key of the expression (default: text, expression, ...)")

    o = parser.add_argument_group("run")
    o.add_argument("--out", metavar="RUN_DIR", help="output folder (predictions.jsonl, metrics.json, plots)")
    o.add_argument("--ablation", choices=sorted(ABLATIONS), help="a paper ablation row as config overrides")
    o.add_argument("--proposals-cache", metavar="DIR",
                   help="keep SAM's proposals per image here and reuse them (ablation runs skip SAM)")
    o.add_argument("--overwrite", action="store_true", help="discard RUN_DIR's earlier predictions")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--no-plots", action="store_true", help="no PNG plots")
    o.add_argument("--good-iou", type=float, default=0.5, help="IoU that makes a prediction good (calibration)")
    o.add_argument("--target-precision", type=float, action="append", default=None, metavar="P",
                   help="score threshold that keeps this precision (repeatable; default 0.8, 0.9, 0.95)")

    from hybridgl.cli import add_model_arguments
    from hybridgl.distributed import add_ray_arguments

    add_model_arguments(parser)
    add_ray_arguments(parser)


def _targets(args) -> tuple[float, ...]:
    from .calibration import DEFAULT_TARGETS

    targets = tuple(args.target_precision) if args.target_precision else DEFAULT_TARGETS
    for t in targets:
        if not 0.0 < t <= 1.0:
            raise _usage_error(f"--target-precision must lie in (0, 1], got {t}")
    return targets


def _load_dataset(args):
    from .datasets import load_dataset

    missing = [name for name, value in (("--dataset", args.dataset), ("--split", args.split),
                                        ("--data-root", args.data_root)) if not value]
    if missing:
        raise _usage_error(f"{', '.join(missing)} required (or --predictions / --label-studio-export)")
    try:
        ds = load_dataset(args.dataset, args.split, args.data_root, coco_images=args.coco_images,
                          split_by=args.split_by)
    except FileNotFoundError as exc:
        raise _usage_error(str(exc)) from exc
    return ds.limited(args.limit)


def _print_result(metrics: dict, out_dir: Path) -> None:
    from .metrics import format_table

    print(format_table(metrics, metrics.get("dataset"), metrics.get("split")))
    cal = metrics.get("calibration") or {}
    if cal.get("n"):
        auroc = cal.get("auroc")
        print(f"score calibration (good = IoU >= {cal['good_iou']:g}, {100 * (cal['good_rate'] or 0):.1f}% good): "
              f"AUROC {'-' if auroc is None else f'{auroc:.3f}'}, ECE {cal['ece']:.3f}")
        for t in cal.get("thresholds", []):
            if t["threshold"] is None:
                print(f"  precision {t['target_precision']:.2f}: no score threshold reaches it")
            else:
                print(f"  precision {t['target_precision']:.2f}: score >= {t['threshold']:.4f} keeps "
                      f"{100 * t['coverage']:.1f}% of the predictions (precision {t['precision']:.3f})")
    if metrics.get("errors"):
        print(f"WARNING: {metrics['errors']} expressions failed and count as empty predictions "
              "(their `reason` in predictions.jsonl says why); running the same command again retries them")
    files = metrics.get("files") or {"metrics": "metrics.json", "predictions": "predictions.jsonl"}
    print(f"written in {out_dir}: " + ", ".join(files.values()))


def main(args: argparse.Namespace) -> int:
    from hybridgl.distributed import RayUnavailable, options_from_args

    from . import runner

    try:  # before any work: a bad --ray-* value is not reported after minutes of loading the dataset
        ray_options = options_from_args(args)
    except ValueError as exc:
        raise _usage_error(str(exc)) from exc
    targets = _targets(args)
    plots = not args.no_plots
    if args.predictions and args.label_studio_export:
        raise _usage_error("--predictions and --label-studio-export exclude each other")
    if ray_options is not None and (args.predictions or args.label_studio_export):
        given = "--predictions" if args.predictions else "--label-studio-export"
        raise _usage_error(f"--ray has no effect with {given}: scoring predictions runs no model")

    if args.predictions:
        dataset = _load_dataset(args) if (args.dataset or args.data_root) else None
        out_dir = Path(args.out) if args.out else Path(args.predictions).parent
        metrics = runner.rescore(args.predictions, out_dir, dataset=dataset, good_iou=args.good_iou,
                                 targets=targets, plots=plots)
        _print_result(metrics, out_dir)
        return 0

    if args.label_studio_export:
        from .label_studio import evaluate_export

        if not args.out:
            raise _usage_error("--out RUN_DIR required")
        out_dir = Path(args.out)
        metrics = evaluate_export(args.label_studio_export, out_dir, model_version=args.ls_model_version,
                                  from_name=args.ls_from_name, label=args.ls_label, text_key=args.ls_text_key,
                                  good_iou=args.good_iou, targets=targets, plots=plots)
        counts = metrics.get("label_studio", {})
        print(f"Label Studio export: {counts.get('tasks', 0)} tasks, {metrics['n']} scored, "
              f"{counts.get('no_annotation', 0)} without annotation, {counts.get('no_prediction', 0)} "
              f"without prediction")
        _print_result(metrics, out_dir)
        return 0

    if not args.out:
        raise _usage_error("--out RUN_DIR required")
    if args.ablation:
        args.set = [f"{k}={json.dumps(v)}" for k, v in ABLATIONS[args.ablation].items()] + list(args.set or [])
    from hybridgl.cli import build_config

    build_config(args)  # a bad --config/--set value: said now, not after reading the dataset (or on the workers)
    dataset = _load_dataset(args)  # fail on a bad layout before loading any model
    out_dir = Path(args.out)
    run_options = dict(progress=not args.no_progress, overwrite=args.overwrite, good_iou=args.good_iou,
                       targets=targets, plots=plots)
    try:
        if ray_options is not None:  # the models load on the Ray workers
            from hybridgl.distributed import for_actors

            from . import ray_runner

            args.device, ray_options = for_actors(args.device, ray_options)

            metrics = ray_runner.evaluate_on_ray(args, dataset, out_dir, ray_options,
                                                 proposals_cache=args.proposals_cache, **run_options)
        else:
            from hybridgl.cli import load_model

            model = load_model(args, need_sam=True)
            proposals_fn = runner.ProposalCache(args.proposals_cache, model) if args.proposals_cache else None
            print(f"{dataset.name} {dataset.split}: {len(dataset)} expressions on {dataset.num_images} images; "
                  f"model {model.model_version} on {model.device}", file=sys.stderr)
            metrics = runner.evaluate_model(model, dataset, out_dir, proposals_fn=proposals_fn, **run_options)
    except (runner.ResumeError, RayUnavailable) as exc:
        raise _usage_error(str(exc)) from exc
    except KeyboardInterrupt:
        print(f"\ninterrupted: the same command continues from {out_dir / runner.PREDICTIONS}", file=sys.stderr)
        raise
    _print_result(metrics, out_dir)
    return 0
