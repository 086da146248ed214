"""The evaluation loop (resumable) and the outputs of a run.

RUN_DIR/
  run.json            what is being evaluated: dataset, split, model_version, config (resume guard)
  predictions.jsonl   one line per expression, appended and flushed as soon as it is computed
  metrics.json        oIoU / mIoU (full method and hybrid features only), precision@IoU,
                      calibration of the score, the paper's numbers, the config
  reliability.png     share of good predictions (IoU >= 0.5) and mean IoU per score bin
  iou_histogram.png   IoU per expression, full method and hybrid features only

Each image is prepared once (`model.prepare`) for all its pending expressions, which are then
answered one by one (`model.segment`). A killed run leaves complete lines behind (a torn last
line is cut off on restart); running the same command again skips every expression already
in predictions.jsonl, so it continues where it stopped.

An image or expression that fails gets its line with reason "error: ...", except on a device
failure (`hybridgl.distributed.is_device_failure`: a sticky CUDA error, after which every later
image of the process would fail too): the run stops with `DeviceFailure`, the lines written so far
kept, and the same command, in a new process, continues from there.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..distributed import DeviceFailure, is_device_failure
from ..prefetch import prefetch
from . import calibration, masks as mask_utils
from .datasets import EvalDataset, ImageGroup
from .metrics import IoUAccumulator, paper_numbers

log = logging.getLogger("hybridgl.evaluation")

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
RUN_INFO = "run.json"
RELIABILITY_PNG = "reliability.png"
HISTOGRAM_PNG = "iou_histogram.png"
RANKING_KEEP = 5  # alternatives kept per line (index, score)


class ResumeError(ValueError):
    """RUN_DIR holds predictions of a different run."""


# ---------------------------------------------------------------------------------------------
# predictions.jsonl

def read_predictions(path: str | Path, repair: bool = False) -> dict[str, dict]:
    """Lines of a predictions.jsonl by sample key (str(sent_id)); a later line wins.

    A torn last line (the process was killed while writing it) is ignored, and with
    `repair` also cut off the file so that appending continues on a clean line.
    """
    path = Path(path)
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    good_end = 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        line = data[pos:end].strip()
        if line:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if nl < 0:  # the torn tail of an interrupted write
                    break
                raise ValueError(f"{path}: line is not JSON: {line[:80]!r}")
            if "sent_id" not in rec:
                raise ValueError(f"{path}: a line has no sent_id")
            records[str(rec["sent_id"])] = rec
        if nl < 0:  # a complete JSON object without its newline: keep it, add the newline later
            good_end = len(data)
            break
        good_end = end
        pos = end
    if repair and good_end < len(data):
        log.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - good_end)
        with open(path, "r+b") as f:
            f.truncate(good_end)
    if repair and good_end and data[good_end - 1:good_end] != b"\n":
        with open(path, "ab") as f:
            f.write(b"\n")
    return records


def write_predictions(records: Iterable[dict], path: str | Path) -> Path:
    """Write all lines at once, atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return path


class _Appender:
    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.f.flush()

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------------------------------
# one expression -> one line

def _jsonable_id(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


def make_record(sample, seg, view, gt: np.ndarray, reason: str | None = None) -> dict:
    """The predictions.jsonl line of one expression: masks as COCO RLE, IoU of both predictions."""
    h, w = gt.shape
    pred = seg.mask if seg is not None else None
    if pred is not None and pred.shape != gt.shape:
        raise ValueError(f"sample {sample.sent_id}: mask {pred.shape} but ground truth {gt.shape}")
    hybrid_index = getattr(seg, "hybrid_index", None) if seg is not None else None
    hybrid = view.full_size(view.masks[hybrid_index]) if hybrid_index is not None else None
    i, u = _counts(pred, gt)
    hi, hu = _counts(hybrid, gt)
    ranking = [{"index": int(r["index"]), "score": float(r["score"])}
               for r in (getattr(seg, "ranking", None) or [])[:RANKING_KEEP]]
    return {
        "sent_id": _jsonable_id(sample.sent_id),
        "ref_id": _jsonable_id(sample.ref_id),
        "image_id": _jsonable_id(sample.image_id),
        "sentence": sample.sentence,
        "mask": mask_utils.encode(pred) if pred is not None else mask_utils.empty_rle(h, w),
        "score": float(seg.score) if seg is not None else 0.0,
        "index": None if seg is None or seg.index is None else int(seg.index),
        "iou": i / u if u else 0.0,
        "intersection": i,
        "union": u,
        "hybrid_index": None if hybrid_index is None else int(hybrid_index),
        "hybrid_mask": mask_utils.encode(hybrid) if hybrid is not None else mask_utils.empty_rle(h, w),
        "hybrid_iou": hi / hu if hu else 0.0,
        "hybrid_intersection": hi,
        "hybrid_union": hu,
        "gt": mask_utils.encode(gt),
        "n_proposals": int(len(view)) if view is not None else 0,
        "ranking": ranking,
        "reason": reason or (getattr(seg, "reason", None) if seg is not None else "empty expression"),
    }


def _counts(pred: np.ndarray | None, gt: np.ndarray) -> tuple[int, int]:
    if pred is None:
        return 0, int(gt.sum())
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


# ---------------------------------------------------------------------------------------------
# proposals cache (reuse SAM's masks across ablation runs)

SAM_FIELDS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
              "box_nms_thresh", "crop_n_layers", "crop_n_points_downscale_factor", "min_mask_region_area",
              "max_image_side")


class ProposalCache:
    """`proposals_fn` that keeps SAM's proposals per image in DIR/<image_id>.npz.

    Only the proposal stage is cached (the rest of `prepare` runs every time), keyed by the SAM
    weights and SAM's settings: runs that differ in fusion mode, guidance or any other
    non-SAM setting reuse the masks instead of running SAM again.
    """

    def __init__(self, directory: str | Path, model):
        from hybridgl.pipeline import weights_fingerprint  # noqa: PLC0415 (torch only when used)

        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        cfg = model.config.to_dict()
        proposer = getattr(model, "proposer", None)
        encoder = proposer.sam_dtype(model.device) if proposer is not None and hasattr(proposer, "sam_dtype") else None
        blob = json.dumps({"sam": weights_fingerprint(getattr(model, "sam", None)), "sam_encoder_dtype": encoder,
                           **{k: cfg.get(k) for k in SAM_FIELDS}}, sort_keys=True)
        import hashlib

        self.key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.hits = self.misses = 0

    def _path(self, group: ImageGroup) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(group.image_id))
        return self.dir / f"{safe}.npz"

    def __call__(self, group: ImageGroup, image: np.ndarray):
        from hybridgl.proposals import Proposals  # noqa: PLC0415

        path = self._path(group)
        # SAM sees the image prepare works on (downscaled past max_image_side): the same masks as
        # without the cache, at that size (prepare takes them as they are)
        working = self.model.working_image(image) if hasattr(self.model, "working_image") else image
        h, w = working.shape[:2]
        if path.is_file():
            try:
                with np.load(path) as z:
                    if str(z["key"]) == self.key and tuple(int(v) for v in z["shape"][1:]) == (h, w):
                        n = int(z["shape"][0])
                        m = np.unpackbits(z["masks"], count=n * h * w).reshape(n, h, w).astype(bool)
                        self.hits += 1
                        return Proposals(m, z["boxes"].astype(np.int64), z["quality"].astype(np.float32))
            except (OSError, KeyError, ValueError) as exc:
                log.warning("ignoring unreadable proposal cache %s (%s)", path, exc)
        proposer = getattr(self.model, "proposer", None)
        if proposer is None:
            raise ValueError(f"no cached proposals for image {group.image_id} and the model has no SAM")
        props = proposer(working)
        self.misses += 1
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, key=np.array(self.key), shape=np.array(props.masks.shape, dtype=np.int64),
                            masks=np.packbits(props.masks.astype(bool).ravel()), boxes=props.boxes_xywh,
                            quality=props.quality)
        os.replace(tmp, path)
        return props


# ---------------------------------------------------------------------------------------------
# the run

def _run_info(model, dataset: EvalDataset) -> dict:
    return {"dataset": dataset.name, "split": dataset.split, "split_by": dataset.split_by,
            "model_version": model.model_version,
            "parser": getattr(model, "parser_name", None), "device": str(getattr(model, "device", "")),
            "config": model.config.to_dict(), "config_fingerprint": model.config.fingerprint()}


def _check_resume(out_dir: Path, info: dict, overwrite: bool) -> None:
    pred_path, info_path = out_dir / PREDICTIONS, out_dir / RUN_INFO
    if overwrite:
        for p in (pred_path, info_path, out_dir / METRICS):
            if p.exists():
                p.unlink()
        return
    if not pred_path.exists() or pred_path.stat().st_size == 0:
        return
    if not info_path.is_file():
        raise ResumeError(f"{pred_path} exists but {info_path} does not: not a run of this harness "
                          "(use another --out, or --overwrite)")
    old = json.loads(info_path.read_text(encoding="utf-8"))
    for key in ("dataset", "split", "split_by", "model_version"):
        if key == "split_by" and key not in old:  # a run from before split_by was recorded
            continue
        if old.get(key) != info.get(key):
            raise ResumeError(f"{out_dir} holds a run with {key} = {old.get(key)!r}, this one has "
                              f"{info.get(key)!r}: use another --out, or --overwrite to start again")


def evaluate_model(model, dataset: EvalDataset, out_dir: str | Path, *,
                   proposals_fn: Callable[[ImageGroup, np.ndarray], Any] | None = None,
                   progress: bool = True, overwrite: bool = False, good_iou: float = 0.5,
                   targets=calibration.DEFAULT_TARGETS, plots: bool = True) -> dict:
    """Run `model` on every expression of `dataset` not yet in RUN_DIR/predictions.jsonl, then
    write metrics.json and the plots. `proposals_fn(group, image)` may supply the proposals
    (a `Proposals` or bool [N,H,W]); None lets the model's SAM make them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = _run_info(model, dataset)
    _check_resume(out_dir, info, overwrite)
    (out_dir / RUN_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
    pred_path = out_dir / PREDICTIONS
    # lines of failed expressions (reason "error: ...") are tried again
    done = {k: r for k, r in read_predictions(pred_path, repair=True).items() if not _failed(r)}
    total = len(dataset)
    already = sum(1 for s in dataset.samples() if s.key in done)
    if already:
        log.info("resuming: %d of %d expressions already in %s", already, total, pred_path)

    bar = _progress(total, already, progress, f"{dataset.name} {dataset.split}")
    writer = _Appender(pred_path)
    t0, images_done, exprs_done = time.perf_counter(), 0, 0
    failures = _Failures(limit=min(5, max(1, total - already)))
    try:
        todo = [(g, p) for g in dataset.groups if (p := [s for s in g.samples if s.key not in done])]
        # the next images are read and decoded while the model works on this one
        for (group, pending), loaded in prefetch(todo, lambda gp: gp[0].load_image()):
            gts = {k: group.ground_truth(k) for k in dict.fromkeys(s.gt_key for s in pending)}
            try:
                image = loaded.result()
                proposals = proposals_fn(group, image) if proposals_fn is not None else None
                view = model.prepare(image, proposals=proposals)
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop a 10-hour run
                if is_device_failure(exc):  # ... but a broken GPU would fail every later one
                    raise _device_failure(exc, f"image {group.image_id}", info["device"], pred_path) from exc
                failures.check(exc, len(pending))
                log.error("image %s failed (%s: %s): its %d expressions count as empty predictions",
                          group.image_id, type(exc).__name__, exc, len(pending))
                for sample in pending:
                    rec = make_record(sample, None, None, gts[sample.gt_key],
                                      reason=f"error: {type(exc).__name__}: {exc}")
                    writer.write(rec)
                    done[sample.key] = rec
                    bar.update(1)
                writer.sync()
                continue
            for sample in pending:
                reason = None
                try:
                    seg = model.segment(view, sample.sentence) if sample.sentence.strip() else None
                    failures.ok()
                except Exception as exc:  # noqa: BLE001
                    if is_device_failure(exc):
                        raise _device_failure(exc, f"sent_id {sample.sent_id}", info["device"], pred_path) from exc
                    failures.check(exc, 1)
                    log.error("sent_id %s failed (%s: %s): counted as an empty prediction",
                              sample.sent_id, type(exc).__name__, exc)
                    seg, reason = None, f"error: {type(exc).__name__}: {exc}"
                rec = make_record(sample, seg, view, gts[sample.gt_key], reason=reason)
                writer.write(rec)
                done[sample.key] = rec
                exprs_done += 1
                bar.update(1)
            images_done += 1
            writer.sync()
    finally:
        writer.close()
        bar.close()
    elapsed = time.perf_counter() - t0
    cache = (proposals_fn.hits, proposals_fn.misses) if isinstance(proposals_fn, ProposalCache) else None
    run = run_stats(images_done, exprs_done, failures.count, already, elapsed, info["device"], cache)
    return finish_run(dataset, done, out_dir, info, run, good_iou=good_iou, targets=targets, plots=plots)


def _device_failure(exc: BaseException, where: str, device: str, pred_path: Path) -> DeviceFailure:
    """The error that stops a run whose device failed: what failed where, and how to go on."""
    return DeviceFailure(
        f"device failure on {device or 'the device'} at {where} ({type(exc).__name__}: {exc}): this process "
        f"can no longer use the device, so the run stopped instead of failing every later image. The lines "
        f"already in {pred_path} are kept (metrics.json was not updated); run the same command again to "
        f"continue from there")


def finish_run(dataset, done: dict[str, dict], out_dir: str | Path, info: dict, run: dict, good_iou: float,
               targets, plots: bool) -> dict:
    """metrics.json and the plots of a run (predictions.jsonl is already appended): every record
    made so far, in the dataset's order, with this run's statistics."""
    records = [done[s.key] for s in dataset.samples() if s.key in done]
    return write_outputs(records, out_dir, {**info, "run": run, "num_images": dataset.num_images,
                                            "skipped": dataset.skipped},
                         good_iou=good_iou, targets=targets, plots=plots, write_lines=False)


def run_stats(images: int, expressions: int, errors: int, resumed_from: int, seconds: float, device: str,
              cache: tuple[int, int] | None = None) -> dict:
    """metrics.json's "run" entry: what this run did (not what earlier runs of a resumed output did)."""
    run = {"images_prepared": images, "expressions_segmented": expressions, "errors": errors,
           "resumed_from": resumed_from, "seconds": round(seconds, 3),
           "seconds_per_expression": round(seconds / expressions, 4) if expressions else None, "device": device}
    if cache is not None:
        run["proposal_cache"] = {"hits": cache[0], "misses": cache[1]}
    return run


def _failed(rec: dict) -> bool:
    return str(rec.get("reason") or "").startswith("error:")


class _Failures:
    """Counts failed expressions; re-raises when everything tried so far failed (a setup error,
    not a bad sample: a wrong image folder, a broken model) once `limit` expressions failed."""

    def __init__(self, limit: int = 5):
        self.limit, self.count, self.succeeded = limit, 0, 0

    def ok(self) -> None:
        self.succeeded += 1

    def check(self, exc: BaseException, n: int) -> None:
        self.count += n
        if self.succeeded == 0 and self.count >= self.limit:
            raise exc


def _progress(total: int, initial: int, enabled: bool, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, initial=initial, unit="expr", desc=desc, dynamic_ncols=True, smoothing=0.05)


# ---------------------------------------------------------------------------------------------
# metrics from lines (a run, a re-scoring, a Label Studio export)

def compute_metrics(records: list[dict], good_iou: float = 0.5,
                    targets=calibration.DEFAULT_TARGETS) -> dict:
    full = IoUAccumulator()
    for r in records:
        full.add(r["intersection"], r["union"])
    out = full.result()
    has_hybrid = bool(records) and all(r.get("hybrid_union") is not None for r in records)
    if has_hybrid:
        hyb = IoUAccumulator()
        for r in records:
            hyb.add(r["hybrid_intersection"], r["hybrid_union"])
        out["hybrid_only"] = hyb.result()
    else:
        out["hybrid_only"] = None
    out["no_prediction"] = sum(1 for r in records if r.get("reason"))
    out["errors"] = sum(1 for r in records if _failed(r))
    out["calibration"] = calibration.calibration_report([r.get("score", 0.0) for r in records],
                                                        full.ious, good_iou=good_iou, targets=targets)
    return out


def write_outputs(records: list[dict], out_dir: str | Path, info: dict, good_iou: float = 0.5,
                  targets=calibration.DEFAULT_TARGETS, plots: bool = True, write_lines: bool = True) -> dict:
    """metrics.json (+ plots, + predictions.jsonl when `write_lines`) for these lines."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if write_lines:
        write_predictions(records, out_dir / PREDICTIONS)
    m = compute_metrics(records, good_iou=good_iou, targets=targets)
    metrics = {"dataset": info.get("dataset"), "split": info.get("split"), "n": m["n"],
               "oIoU": m["oIoU"], "mIoU": m["mIoU"], "precision": m["precision"],
               "intersection": m["intersection"], "union": m["union"],
               "hybrid_only": None, "no_prediction": m["no_prediction"], "errors": m["errors"]}
    if m["hybrid_only"] is not None:
        h = m["hybrid_only"]
        metrics["hybrid_only"] = {"oIoU": h["oIoU"], "mIoU": h["mIoU"], "precision": h["precision"]}
    paper = paper_numbers(info.get("dataset"), info.get("split"))
    metrics["paper"] = {k: (None if v is None else {"oIoU": v[0], "mIoU": v[1]}) for k, v in paper.items()}
    metrics["calibration"] = m["calibration"]
    for key, value in info.items():
        if key not in metrics:
            metrics[key] = value
    files = {"predictions": PREDICTIONS, "metrics": METRICS}
    if plots and records:
        calibration.plot_reliability(m["calibration"], out_dir / RELIABILITY_PNG)
        hybrid_ious = [r.get("hybrid_iou", 0.0) for r in records] if m["hybrid_only"] is not None else None
        calibration.plot_iou_histogram([r["iou"] for r in records], out_dir / HISTOGRAM_PNG, hybrid_ious)
        files.update(reliability_plot=RELIABILITY_PNG, iou_histogram=HISTOGRAM_PNG)
    metrics["files"] = files
    tmp = out_dir / (METRICS + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    os.replace(tmp, out_dir / METRICS)
    return metrics


# ---------------------------------------------------------------------------------------------
# re-scoring

def rescore_record(rec: dict, gt: np.ndarray | dict | None = None) -> dict:
    """Recompute a line's IoUs from its RLE masks, against `gt` (a mask or RLE) or its own "gt"."""
    rec = dict(rec)
    gt_rle = mask_utils.encode(gt) if isinstance(gt, np.ndarray) else (gt if gt is not None else rec.get("gt"))
    if gt_rle is not None:
        rec["gt"] = gt_rle
        i, u = mask_utils.rle_intersection_union(rec.get("mask"), gt_rle)
        rec.update(intersection=i, union=u, iou=i / u if u else 0.0)
        if "hybrid_mask" in rec or rec.get("hybrid_union") is not None:
            hi, hu = mask_utils.rle_intersection_union(rec.get("hybrid_mask"), gt_rle)
            rec.update(hybrid_intersection=hi, hybrid_union=hu, hybrid_iou=hi / hu if hu else 0.0)
    elif rec.get("intersection") is None or rec.get("union") is None:
        raise ValueError(f"line {rec.get('sent_id')}: no ground truth (\"gt\") and no intersection/union: "
                         "give --dataset/--split/--data-root to re-score against the dataset")
    else:
        i, u = int(rec["intersection"]), int(rec["union"])
        rec["iou"] = i / u if u else 0.0
    rec.setdefault("score", 0.0)
    return rec


def rescore(predictions: str | Path, out_dir: str | Path | None = None, dataset: EvalDataset | None = None,
            good_iou: float = 0.5, targets=calibration.DEFAULT_TARGETS, plots: bool = True) -> dict:
    """Metrics of an existing predictions.jsonl, no model: IoUs recomputed from the RLE masks
    (against the dataset's ground truth when `dataset` is given, else each line's "gt")."""
    predictions = Path(predictions)
    if not predictions.is_file():
        raise FileNotFoundError(f"predictions file not found: {predictions}")
    out_dir = Path(out_dir) if out_dir else predictions.parent
    by_key = read_predictions(predictions)
    info: dict = {}
    src_info = predictions.parent / RUN_INFO
    if src_info.is_file():
        info = json.loads(src_info.read_text(encoding="utf-8"))
    if dataset is not None:
        info.update(dataset=dataset.name, split=dataset.split)
        records, missing = [], 0
        for group in dataset.groups:
            present = [s for s in group.samples if s.key in by_key]
            missing += len(group.samples) - len(present)
            if not present:
                continue
            gts = {k: group.ground_truth(k) for k in dict.fromkeys(s.gt_key for s in present)}
            records += [rescore_record(by_key[s.key], gts[s.gt_key]) for s in present]
        if missing:
            log.warning("%d expressions of %s %s have no line in %s", missing, dataset.name, dataset.split,
                        predictions)
        info["missing"] = missing
    else:
        records = [rescore_record(r) for r in by_key.values()]
    info["rescored_from"] = str(predictions)
    in_place = (out_dir / PREDICTIONS).resolve() == predictions.resolve()
    if out_dir.resolve() != predictions.parent.resolve() and src_info.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RUN_INFO).write_text(src_info.read_text(encoding="utf-8"), encoding="utf-8")
    metrics = write_outputs(records, out_dir, info, good_iou=good_iou, targets=targets, plots=plots,
                            write_lines=not in_place)
    if in_place:  # the input itself: lines not re-scored (outside the dataset or --limit) stay in it
        rescored = {str(r["sent_id"]) for r in records}
        write_predictions(records + [r for k, r in by_key.items() if k not in rescored], predictions)
    return metrics
