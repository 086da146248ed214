"""`tune`: from reviewed expressions to a config overrides file, a calibration and a report.

1. prepare every image and expression once (cached, candidates.py);
2. re-score each candidate configuration (space.py) on every expression (rescore.py);
3. k-fold cross-validation over images: the defaults and the fold-chosen configurations on
   held-out images, the gain and its bootstrap interval (search.py); a change is recommended
   only when the interval of the mIoU gain lies above zero;
4. calibration of the score (fit.py) under the recommended config, measured the same way:
   fitted on the other folds, applied to the held-out one; kept when it lowers the held-out ECE;
5. OUT/overrides.toml, report.md, report.json, held_out.csv and the plots (report.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..config import HybridGLConfig
from ..distributed import DeviceFailure, is_device_failure
from ..evaluation import calibration as reliability
from . import report, search, space
from .candidates import CandidateCache
from .fit import fit_logistic

log = logging.getLogger("hybridgl.tuning")

GOOD_IOU = 0.5
MIN_PER_CLASS = 5  # good and bad predictions each, to fit a calibration


@dataclass
class Sample:
    """One reviewed expression: `gt()` -> the annotator's bool [H,W] mask."""

    sample_id: Any
    expression: str
    gt: Callable[[], np.ndarray]


@dataclass
class TuneImage:
    """One image (`load()` -> uint8 [H,W,3]) and its reviewed expressions."""

    image_id: Any
    load: Callable[[], np.ndarray]
    samples: list[Sample] = field(default_factory=list)


def prepare_items(model, images: Sequence[TuneImage], cache_dir: str | Path | None = None,
                  progress: bool = False) -> tuple[list[search.Item], dict, CandidateCache]:
    """Candidates and overlaps of every sample; an image or sample that fails is left out and counted,
    except on a device failure (a sticky CUDA error: every later image would fail too), which stops
    with DeviceFailure (the images prepared before it stay in the cache)."""
    cache = CandidateCache(model, cache_dir)
    items: list[search.Item] = []
    problems: dict[str, str] = {}
    bar = reliability_progress(sum(len(im.samples) for im in images), progress)
    for im in images:
        try:
            key, cand = cache.image(str(im.image_id), im.load)
        except Exception as exc:  # noqa: BLE001 - one unreadable image must not stop the tune
            if is_device_failure(exc):  # ... but a broken GPU would leave out every later one
                raise _device_failure(exc, f"image {im.image_id}", model, cache) from exc
            for s in im.samples:
                problems[str(s.sample_id)] = f"image {im.image_id}: {type(exc).__name__}: {exc}"
            log.warning("image %s left out: %s", im.image_id, exc)
            bar.update(len(im.samples))
            continue
        for s in im.samples:
            try:
                gt = np.asarray(s.gt(), dtype=bool)
                inter, union = search.overlap_counts(cand.output_masks(), gt)
                expr = cache.expression(key, cand, s.expression)
                items.append(search.Item(s.sample_id, im.image_id, cand, expr, inter, union, int(gt.sum())))
            except Exception as exc:  # noqa: BLE001
                if is_device_failure(exc):
                    raise _device_failure(exc, f"sample {s.sample_id}", model, cache) from exc
                problems[str(s.sample_id)] = f"{type(exc).__name__}: {exc}"
                log.warning("sample %s left out: %s", s.sample_id, exc)
            bar.update(1)
    bar.close()
    return items, problems, cache


def _device_failure(exc: BaseException, where: str, model, cache: CandidateCache) -> DeviceFailure:
    kept = (f"the images prepared before it are cached in {cache.dir}: run the same command again to continue"
            if cache.dir is not None else "run it again")
    return DeviceFailure(f"device failure on {getattr(model, 'device', 'the device')} at {where} "
                         f"({type(exc).__name__}: {exc}): this process can no longer use the device, so the tune "
                         f"stopped instead of leaving out every later image; {kept}")


def reliability_progress(total: int, enabled: bool):
    from ..evaluation.runner import _progress  # noqa: PLC0415 - the evaluation's progress bar

    return _progress(total, 0, enabled, "prepare")


def _calibrate_held_out(table: search.Table, items: Sequence[search.Item], folds: np.ndarray,
                        fold_config: np.ndarray) -> dict:
    """Raw and calibrated scores of every item under its fold's config, the calibration fitted
    on the other folds under that config. Items without proposals keep score 0."""
    n = len(items)
    raw, calibrated = np.zeros(n), np.zeros(n)
    fitted = 0
    for f, c in enumerate(fold_config):
        rows = table.choices[c]
        test = np.flatnonzero(folds == f)
        train = [e for e in np.flatnonzero(folds != f) if rows[e].index is not None]
        ious = table.ious(c)
        good = ious[train] >= GOOD_IOU
        model = None
        if good.sum() >= MIN_PER_CLASS and (~good).sum() >= MIN_PER_CLASS:
            X = np.stack([rows[e].chosen_features(items[e].image) for e in train])
            model = fit_logistic(X, good)
            fitted += 1
        for e in test:
            raw[e] = rows[e].score
            if rows[e].index is None:
                calibrated[e] = 0.0
            elif model is not None:
                calibrated[e] = float(model(rows[e].chosen_features(items[e].image)[None])[0])
            else:
                calibrated[e] = raw[e]
    return {"raw": raw, "calibrated": calibrated, "folds_fitted": fitted}


def tune(items: Sequence[search.Item], base: HybridGLConfig, out_dir: str | Path, *, folds: int = 5,
         n_configs: int = 300, seed: int = 0, min_images: int = 10, min_expressions: int = 30,
         bootstrap: int = 2000, source: dict | None = None, repredict: str | None = None,
         plots: bool = True) -> dict:
    """Search, cross-validate, calibrate and write OUT_DIR; returns report.json's content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = list(items)
    image_ids = [it.image_id for it in items]
    n_images = len(set(image_ids))
    result: dict[str, Any] = {
        "source": source or {}, "n_expressions": len(items), "n_images": n_images, "folds": folds,
        "searched": {k: list(v) for k, v in space.GRID.items()}, "good_iou": GOOD_IOU,
        "base_config": base.to_dict(), "recommended": False, "calibrated": False, "overrides_file": None,
    }
    need_images = max(min_images, folds)
    if n_images < need_images or len(items) < min_expressions:
        result["verdict"] = (f"too few reviewed tasks to tune: {len(items)} expressions on {n_images} images; "
                             f"at least {min_expressions} expressions on {need_images} images are needed for "
                             f"{folds}-fold cross-validation over images. Nothing is recommended: review "
                             "more tasks and run tune again.")
        return report.write(result, out, items, None, plots=plots)

    overrides = space.configurations(base, n_configs, seed)
    configs = [base.replace(**o) for o in overrides]
    table = search.choice_table(items, configs)
    fold = search.assign_folds(image_ids, folds, seed)
    chosen = search.cross_validate(table, fold)
    cols = np.arange(len(items))
    held = np.array([table.counts[chosen[fold[e]], e] for e in cols])
    default = table.counts[0]
    gain = search.bootstrap_gain(default, held, image_ids, n=bootstrap, seed=seed)
    before, after = search.metrics(default), search.metrics(held)
    best_all = search.best_config(table, cols)
    recommended = gain["mIoU_gain"][0] > 0 and best_all != 0
    result.update(
        held_out={"defaults": before, "tuned": after,
                  "gain": {"mIoU": after["mIoU"] - before["mIoU"], "oIoU": after["oIoU"] - before["oIoU"]},
                  "interval": gain},
        fold_choices=[overrides[c] for c in chosen], configurations=len(configs),
        chosen=overrides[best_all], in_sample={"defaults": search.metrics(table.counts[0]),
                                               "chosen": search.metrics(table.counts[best_all])},
        per_parameter=report.per_parameter_gain(table, overrides), recommended=bool(recommended))
    lo, hi = gain["mIoU_gain"]
    if recommended:
        result["verdict"] = (f"recommended: {report.describe(overrides[best_all])}. On held-out images mIoU "
                             f"{before['mIoU']:.2f} -> {after['mIoU']:.2f} (gain {lo:+.2f} to {hi:+.2f} points, "
                             f"{100 * gain['level']:.0f} % interval).")
    else:
        result["verdict"] = (f"no parameter change recommended: the held-out mIoU gain of the search is "
                             f"{after['mIoU'] - before['mIoU']:+.2f} points, interval {lo:+.2f} to {hi:+.2f}, "
                             "not clearly above zero. The defaults stay.")
    final = best_all if recommended else 0
    fold_config = chosen if recommended else np.zeros_like(chosen)

    cal = _calibrate_held_out(table, items, fold, fold_config)
    ious = np.array([table.ious(fold_config[fold[e]])[e] for e in cols])
    rel_before = reliability.calibration_report(cal["raw"], ious, GOOD_IOU)
    rel_after = reliability.calibration_report(cal["calibrated"], ious, GOOD_IOU)
    result["calibration"] = {"held_out_raw": _summary(rel_before), "held_out_calibrated": _summary(rel_after),
                             "folds_fitted": cal["folds_fitted"]}
    rows = table.choices[final]
    usable = [e for e in cols if rows[e].index is not None]
    good = table.ious(final)[usable] >= GOOD_IOU
    calibration = None
    if cal["folds_fitted"] == folds and rel_after["ece"] < rel_before["ece"] \
            and good.sum() >= MIN_PER_CLASS and (~good).sum() >= MIN_PER_CLASS:
        calibration = fit_logistic(np.stack([rows[e].chosen_features(items[e].image) for e in usable]), good)
        result["calibrated"] = True
        result["calibration"]["fit"] = calibration.to_config()
        result["calibration"]["verdict"] = (f"calibrated: held-out ECE {rel_before['ece']:.3f} -> "
                                            f"{rel_after['ece']:.3f}, AUROC {_fmt(rel_before['auroc'])} -> "
                                            f"{_fmt(rel_after['auroc'])}")
    else:
        result["calibration"]["verdict"] = (
            "no calibration: " + ("too few good or bad predictions in some fold to fit one"
                                  if cal["folds_fitted"] < folds else
                                  f"it does not lower the held-out ECE ({rel_before['ece']:.3f} -> "
                                  f"{rel_after['ece']:.3f})") + "; the score stays the raw share")
    written = dict(overrides[final]) if recommended else {}
    if calibration is not None:
        written.update(calibration.to_config())
    if written:
        path = report.write_overrides(out, base, written, result)
        result["overrides_file"] = str(path)
        final_cfg = HybridGLConfig.from_file(path)
        result["final_config_fingerprint"] = final_cfg.fingerprint()
        if repredict:
            result["repredict"] = repredict.format(overrides=path)
    held_rows = [{"sample_id": items[e].sample_id, "image_id": items[e].image_id, "fold": int(fold[e]),
                  "default": table.counts[0, e], "tuned": held[e], "raw_score": cal["raw"][e],
                  "calibrated_score": cal["calibrated"][e]} for e in cols]
    return report.write(result, out, items, held_rows, plots=plots, reliability_pair=(rel_before, rel_after))


def _summary(rel: dict) -> dict:
    return {"n": rel["n"], "ece": rel["ece"], "auroc": rel["auroc"], "good_rate": rel["good_rate"]}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
