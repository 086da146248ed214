"""`hybridgl evaluate --ray`: the evaluation run of `runner.evaluate_model` on a Ray cluster.

The same RUN_DIR, lines, resume and metrics as the single-process run: the driver picks the
expressions not yet in predictions.jsonl, `hybridgl.distributed.run_grouped` prepares each image
once on a pool of model actors (images read by Ray tasks meanwhile), and the driver appends the
lines of each image as they come back (any order: metrics and re-scoring key lines by sent_id).
The models are built on the workers from the command line's model options (weights must be
reachable there: MODEL_DIR on shared storage, or the same path on every node).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from functools import partial
from pathlib import Path

from hybridgl import distributed

from . import calibration, runner
from .datasets import EvalDataset, ImageGroup

log = logging.getLogger("hybridgl.evaluation")


def _build(args: argparse.Namespace, proposals_cache: str | None):
    """On each worker: the model (from the command line's options) and the proposal cache."""
    from hybridgl.cli import load_model

    model = load_model(args, need_sam=True)
    return model, (runner.ProposalCache(proposals_cache, model) if proposals_cache else None)


def _describe(state) -> dict:
    """What run.json says about the model, computed where the model runs."""
    return runner._run_info(state[0], EvalDataset("", "", []))


def _load(item: tuple[ImageGroup, list[str]]):
    """The image, or the exception reading it (reported in the image's lines, as single-process)."""
    try:
        return item[0].load_image()
    except Exception as exc:  # noqa: BLE001
        return exc


def _failed_lines(group: ImageGroup, keys: list[str], reason: str) -> list[dict]:
    pending = [s for s in group.samples if s.key in keys]
    gts = {k: group.ground_truth(k) for k in dict.fromkeys(s.gt_key for s in pending)}
    return [runner.make_record(s, None, None, gts[s.gt_key], reason=reason) for s in pending]


def _work(state, item: tuple[ImageGroup, list[str]], image) -> dict:
    """One image on a model actor: prepare once, segment each pending expression, its lines.

    An exception becomes the failed lines of its image or expression, except a device failure
    (`distributed.is_device_failure`: a sticky CUDA error), which is raised: every later image on
    this actor would fail too, so the actor exits and Ray retries the image on a fresh one."""
    model, proposals_fn = state
    group, keys = item
    cache = (proposals_fn.hits, proposals_fn.misses) if proposals_fn is not None else (0, 0)
    try:
        if isinstance(image, Exception):
            raise image
        view = model.prepare(image, proposals=proposals_fn(group, image) if proposals_fn is not None else None)
    except Exception as exc:  # noqa: BLE001 - as the single-process run: the image's lines say why
        if distributed.is_device_failure(exc):
            raise
        log.error("image %s failed (%s: %s)", group.image_id, type(exc).__name__, exc)
        return {"lines": _failed_lines(group, keys, f"error: {type(exc).__name__}: {exc}"), "prepared": 0,
                "cache": (0, 0)}
    lines = []
    for sample in (s for s in group.samples if s.key in keys):
        seg, reason = None, None
        try:
            seg = model.segment(view, sample.sentence) if sample.sentence.strip() else None
        except Exception as exc:  # noqa: BLE001
            if distributed.is_device_failure(exc):
                raise
            log.error("sent_id %s failed (%s: %s)", sample.sent_id, type(exc).__name__, exc)
            reason = f"error: {type(exc).__name__}: {exc}"
        lines.append(runner.make_record(sample, seg, view, group.ground_truth(sample.gt_key), reason=reason))
    if proposals_fn is not None:
        cache = (proposals_fn.hits - cache[0], proposals_fn.misses - cache[1])
    return {"lines": lines, "prepared": 1, "cache": cache}


def evaluate_on_ray(args: argparse.Namespace, dataset: EvalDataset, out_dir: str | Path,
                    options: distributed.RayOptions, *, proposals_cache: str | None = None, progress: bool = True,
                    overwrite: bool = False, good_iou: float = 0.5, targets=calibration.DEFAULT_TARGETS,
                    plots: bool = True) -> dict:
    """`runner.evaluate_model` with the model options `args` (hybridgl.cli), on Ray. Returns the metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    factory = partial(_build, args, proposals_cache)
    with distributed.cluster(options) as resources:
        model_info = distributed.probe(factory, _describe, options)
        info = {**model_info, "dataset": dataset.name, "split": dataset.split, "split_by": dataset.split_by}
        runner._check_resume(out_dir, info, overwrite)
        (out_dir / runner.RUN_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
        pred_path = out_dir / runner.PREDICTIONS
        done = {k: r for k, r in runner.read_predictions(pred_path, repair=True).items() if not runner._failed(r)}
        items = [(g, [s.key for s in g.samples if s.key not in done]) for g in dataset.groups]
        items = [item for item in items if item[1]]
        total, todo = len(dataset), sum(len(keys) for _, keys in items)
        already = total - todo
        actors, gpus, _ = options.resources(resources, len(items))
        print(f"Ray: {actors} model actors ({gpus:g} GPU each) for {len(items)} images, {todo} expressions",
              file=sys.stderr, flush=True)
        bar = runner._progress(total, already, progress, f"{dataset.name} {dataset.split}")
        writer = runner._Appender(pred_path)
        failures = runner._Failures(limit=min(5, max(1, todo)))
        t0, images_done, exprs_done, workers = time.perf_counter(), 0, 0, set()
        hits = misses = 0
        try:
            for result in distributed.run_grouped(items, _load, factory, _work, options):
                group, keys = items[result.index]
                if result.error:
                    log.error("image %s failed on Ray (%s): its %d expressions count as empty predictions",
                              group.image_id, result.error, len(keys))
                    lines = _failed_lines(group, keys, f"error: {result.error}")
                else:
                    lines = result.value["lines"]
                    images_done += result.value["prepared"]
                    exprs_done += len(lines) if result.value["prepared"] else 0
                    hits, misses = hits + result.value["cache"][0], misses + result.value["cache"][1]
                    workers.add(result.worker)
                for rec in lines:
                    writer.write(rec)
                    done[str(rec["sent_id"])] = rec
                    if runner._failed(rec):
                        failures.check(ValueError(rec["reason"]), 1)  # all failed: one line, exit 2
                    else:
                        failures.ok()
                    bar.update(1)
                writer.sync()
        finally:
            writer.close()
            bar.close()
    elapsed = time.perf_counter() - t0
    run = runner.run_stats(images_done, exprs_done, failures.count, already, elapsed, info["device"],
                           (hits, misses) if proposals_cache else None)
    run["ray"] = {"actors": actors, "worker_processes": len(workers)}
    return runner.finish_run(dataset, done, out_dir, info, run, good_iou=good_iou, targets=targets, plots=plots)
