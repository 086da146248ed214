"""`python -m hybridgl tune`: from reviewed tasks to an overrides file, a calibration and a report.

    python -m hybridgl tune --url URL --api-key KEY --project 3 --out tune/
    python -m hybridgl tune --label-studio-export export.json [--images DIR | --url URL --api-key KEY] --out tune/
    python -m hybridgl tune --dataset refcoco --split val --data-root DATA --limit 500 --out tune/
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

from ..evaluation.datasets import DATASETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_model_arguments

    parser.description = ("Search HybridGL's re-scorable parameters and calibrate its score on reviewed "
                          "tasks, with cross-validation over images. See docs/review.md.")
    g = parser.add_argument_group("reviewed tasks (one source)")
    g.add_argument("--project", type=int, help="Label Studio project id: its annotated tasks (with --url, --api-key)")
    g.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL"), help="Label Studio URL ($LABEL_STUDIO_URL)")
    g.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                   help="Label Studio token, legacy or personal ($LABEL_STUDIO_API_KEY)")
    g.add_argument("--label-studio-export", metavar="FILE", help="a Label Studio JSON export")
    g.add_argument("--images", metavar="DIR", help="with an export: read images from DIR by file name "
                                                   "(else from Label Studio with --url/--api-key)")
    g.add_argument("--ls-from-name", help="only regions of this control (e.g. 'mask')")
    g.add_argument("--ls-label", help="only regions with this label")
    g.add_argument("--ls-text-key", help="task data key of the expression (default: text, expression, ...)")
    g.add_argument("--dataset", choices=DATASETS, type=str.lower, help="a benchmark in the refer/PhraseCut layout")
    g.add_argument("--split", help="its split")
    g.add_argument("--data-root", help="as for evaluate")
    g.add_argument("--coco-images", help="as for evaluate")
    g.add_argument("--split-by", help="as for evaluate")
    g.add_argument("--limit", type=int, default=None, help="dataset: only the first N expressions")

    o = parser.add_argument_group("tuning")
    o.add_argument("--out", required=True, metavar="DIR", help="overrides.toml, report.md/json, held_out.csv, plots")
    o.add_argument("--cache", metavar="DIR", help="prepared candidates (default OUT/cache): a second tune is fast")
    o.add_argument("--folds", type=int, default=5, help="cross-validation folds over images (default 5)")
    o.add_argument("--configs", type=int, default=300, help="configurations tried (default 300)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--min-images", type=int, default=10, help="fewer reviewed images: no recommendation")
    o.add_argument("--min-expressions", type=int, default=30, help="fewer reviewed expressions: no recommendation")
    o.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the gain")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    add_model_arguments(parser)


def _rgb(data: bytes):
    from PIL import Image

    from ..pipeline import to_rgb_array

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return to_rgb_array(im)


def label_studio_images(args, tasks: list, project=None):
    """TuneImages of an export's (or a project's) annotated tasks; empty annotations are left out."""
    from ..evaluation import masks as mask_utils
    from ..evaluation.label_studio import records_from_tasks
    from .tune import Sample, TuneImage

    records, counts = records_from_tasks(tasks, from_name=args.ls_from_name, label=args.ls_label,
                                         text_key=args.ls_text_key)

    def loader(ref):
        def load():
            if not isinstance(ref, str) or not ref:
                raise ValueError("the task has no image")
            if args.images and (Path(args.images) / Path(ref.split("?d=")[-1]).name).is_file():
                return _rgb((Path(args.images) / Path(ref.split("?d=")[-1]).name).read_bytes())
            if Path(ref).is_file():
                return _rgb(Path(ref).read_bytes())
            if project is None:
                raise ValueError(f"image {ref!r} not found: give --images DIR or --url and --api-key")
            return _rgb(project.image(ref))
        return load

    images: dict = {}
    empty = 0
    for r in records:
        if not r["sentence"].strip() or mask_utils.area(r["gt"]) == 0:
            empty += 1
            continue
        im = images.setdefault(r["image_id"], TuneImage(r["image_id"], loader(r["image_id"])))
        im.samples.append(Sample(r["sent_id"], r["sentence"], lambda rle=r["gt"]: mask_utils.decode(rle)))
    counts["empty_annotation_or_text"] = empty
    return list(images.values()), counts


def main(args: argparse.Namespace) -> int:
    from ..cli import UsageError, load_model
    from ..evaluation.label_studio import LabelStudioProject, read_export
    from .tune import Sample, TuneImage, prepare_items, tune

    sources = [bool(args.project is not None), bool(args.label_studio_export), bool(args.dataset)]
    if sum(sources) != 1:
        raise UsageError("give exactly one source: --project (with --url/--api-key), --label-studio-export, "
                         "or --dataset/--split/--data-root")
    if args.folds < 2:
        raise UsageError("--folds must be at least 2")
    project = LabelStudioProject(args.url, args.api_key) if args.url and args.api_key else None
    source: dict = {}
    if args.project is not None:
        if project is None:
            raise UsageError("--project needs --url and --api-key (or LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)")
        images, counts = label_studio_images(args, project.annotated_tasks(args.project), project)
        source = {"label_studio": args.url, "project": args.project, **counts}
        repredict = (f"HYBRIDGL_CONFIG={{overrides}} python -m backend.preannotate --project {args.project} "
                     "--unreviewed")
    elif args.label_studio_export:
        images, counts = label_studio_images(args, read_export(args.label_studio_export), project)
        source = {"export": args.label_studio_export, **counts}
        repredict = "HYBRIDGL_CONFIG={overrides} python -m backend.preannotate --project ID --unreviewed"
    else:
        from ..evaluation.cli import _load_dataset

        ds = _load_dataset(args)
        images = [TuneImage(g.image_id, g.load_image,
                            [Sample(s.sent_id, s.sentence, lambda g=g, k=s.gt_key: g.ground_truth(k))
                             for s in g.samples]) for g in ds.groups]
        source = {"dataset": ds.name, "split": ds.split}
        repredict = (f"python -m hybridgl evaluate --dataset {ds.name} --split {ds.split} --data-root "
                     f"{args.data_root} --config {{overrides}} --out runs/tuned")
    n = sum(len(im.samples) for im in images)
    print(f"{n} reviewed expressions on {len(images)} images", file=sys.stderr)
    model = load_model(args, need_sam=True)
    out = Path(args.out)
    items, problems, cache = prepare_items(model, images, args.cache or out / "cache", not args.no_progress)
    source.update(left_out=len(problems), cache={"hits": cache.hits, "misses": cache.misses})
    if problems:
        print(f"{len(problems)} expressions left out, e.g. {next(iter(problems.items()))}", file=sys.stderr)
    result = tune(items, model.config, out, folds=args.folds, n_configs=args.configs, seed=args.seed,
                  min_images=args.min_images, min_expressions=args.min_expressions, bootstrap=args.bootstrap,
                  source=source, repredict=repredict, plots=not args.no_plots)
    print(result["verdict"])
    if "calibration" in result:
        print(result["calibration"]["verdict"])
    if result.get("overrides_file"):
        print(f"overrides: {result['overrides_file']}")
        if result.get("repredict"):
            print(f"re-predict the unreviewed tasks with:\n  {result['repredict']}")
    print(f"report: {out / 'report.md'}")
    return 0
