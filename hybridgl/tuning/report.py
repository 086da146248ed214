"""What `tune` writes: overrides.toml, report.json, report.md, held_out.csv and PNG plots.

held_out.csv has one row per expression (its fold, the defaults' and the tuned configuration's
intersection and union on held-out images, the raw and calibrated scores), so every number of
the report can be recomputed from it.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import HybridGLConfig
from ..evaluation import calibration as plots_lib
from . import space

OVERRIDES = "overrides.toml"
OVERRIDES_JSON = "overrides.json"  # when a value is None, which TOML cannot write
REPORT_MD, REPORT_JSON, HELD_OUT_CSV = "report.md", "report.json", "held_out.csv"
GAIN_PNG, HISTOGRAM_PNG = "gain_per_parameter.png", "iou_histogram.png"
RELIABILITY_BEFORE_PNG, RELIABILITY_AFTER_PNG = "reliability_raw.png", "reliability_calibrated.png"


def describe(overrides: dict) -> str:
    return ", ".join(f"{k} = {_toml(v)}" for k, v in overrides.items()) or "the defaults"


def per_parameter_gain(table, overrides: Sequence[dict]) -> dict[str, dict]:
    """For each searched parameter: its best value alone (others at the base) and the mIoU gain it
    gives on all reviewed expressions (in-sample: a guide to what matters, not the held-out gain)."""
    ious = table.ious(slice(None)).mean(axis=1) * 100
    out: dict[str, dict] = {}
    for name in space.GRID:
        rows = [c for c, o in enumerate(overrides) if set(o) == {name}]
        if not rows:
            continue
        best = max(rows, key=lambda c: (ious[c], -c))
        out[name] = {"value": overrides[best][name], "gain": float(ious[best] - ious[0])}
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def write_overrides(out: Path, base: HybridGLConfig, changes: dict, result: dict) -> Path:
    """The base config's own overrides plus `changes`, as TOML for HYBRIDGL_CONFIG / --config."""
    defaults = HybridGLConfig().to_dict()
    values = {k: v for k, v in base.to_dict().items() if defaults[k] != v}
    values.update({k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()})
    lines = ["# HybridGL overrides written by `python -m hybridgl tune` (see report.md).",
             f"# {result['verdict']}"]
    if result.get("calibrated"):
        lines.append(f"# {result['calibration']['verdict']}")
    if any(v is None for v in values.values()):  # TOML has no null (max_image_side = None ...): JSON has
        path = out / OVERRIDES_JSON
        path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
    else:
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        path = out / OVERRIDES
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for stale in {out / OVERRIDES, out / OVERRIDES_JSON} - {path}:  # an earlier tune's other file
        stale.unlink(missing_ok=True)
    HybridGLConfig.from_file(path)  # what we wrote must load
    return path


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sample_id", "image_id", "fold", "default_intersection", "default_union", "default_iou",
                    "tuned_intersection", "tuned_union", "tuned_iou", "raw_score", "calibrated_score"])
        for r in rows:
            (di, du), (ti, tu) = r["default"], r["tuned"]
            w.writerow([r["sample_id"], r["image_id"], r["fold"], int(di), int(du), di / du if du else 0.0,
                        int(ti), int(tu), ti / tu if tu else 0.0, repr(float(r["raw_score"])),
                        repr(float(r["calibrated_score"]))])


def plot_gain(gains: dict[str, dict], path: Path) -> Path:
    """Horizontal bars: the in-sample mIoU gain of each parameter's best value alone."""
    from PIL import Image, ImageDraw

    names = list(gains)
    w, row = 720, 30
    h = 70 + row * max(len(names), 1)
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font, small = plots_lib._font(16), plots_lib._font(12)
    d.text((w / 2, 18), "mIoU gain of each parameter's best value alone (points, in-sample)", fill="black",
           font=font, anchor="mm")
    left, right = 260, w - 90
    peak = max([abs(g["gain"]) for g in gains.values()] + [1e-9])
    zero = (left + right) / 2
    d.line([(zero, 40), (zero, h - 20)], fill="black")
    for i, name in enumerate(names):
        g = gains[name]
        y = 45 + i * row
        d.text((left - 8, y + row / 2 - 4), f"{name} = {_toml(g['value'])}", fill="black", font=small, anchor="rm")
        x = zero + (right - left) / 2 * g["gain"] / peak
        colour = (70, 130, 200) if g["gain"] >= 0 else (220, 90, 40)
        d.rectangle([min(zero, x), y + 4, max(zero, x), y + row - 8], fill=colour)
        d.text((max(zero, x) + 6, y + row / 2 - 4), f"{g['gain']:+.2f}", fill="black", font=small, anchor="lm")
    img.save(path)
    return path


def _markdown(result: dict) -> str:
    lines = ["# HybridGL tune report", "", f"**{result['verdict']}**", "",
             f"Reviewed expressions: {result['n_expressions']} on {result['n_images']} images; "
             f"source: `{json.dumps(result.get('source', {}))}`.", ""]
    if "held_out" in result:
        ho = result["held_out"]
        lo, hi = ho["interval"]["mIoU_gain"]
        olo, ohi = ho["interval"]["oIoU_gain"]
        lines += [f"## Held-out images ({result['folds']}-fold cross-validation over images, "
                  f"{result['configurations']} configurations)", "",
                  "| | mIoU | oIoU |", "|---|---|---|",
                  f"| defaults | {ho['defaults']['mIoU']:.2f} | {ho['defaults']['oIoU']:.2f} |",
                  f"| tuned (chosen per fold on the other folds) | {ho['tuned']['mIoU']:.2f} | "
                  f"{ho['tuned']['oIoU']:.2f} |",
                  f"| gain, {100 * ho['interval']['level']:.0f} % bootstrap interval over images | "
                  f"{ho['gain']['mIoU']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {ho['gain']['oIoU']:+.2f} "
                  f"[{olo:+.2f}, {ohi:+.2f}] |", "",
                  "Configurations chosen per fold: " + "; ".join(describe(c) for c in result["fold_choices"]) + ".",
                  f"Chosen on all reviewed tasks: {describe(result['chosen'])}.", "",
                  f"![gain per parameter]({GAIN_PNG})", f"![IoU before and after]({HISTOGRAM_PNG})", ""]
    if "calibration" in result:
        c = result["calibration"]
        r, a = c["held_out_raw"], c["held_out_calibrated"]
        lines += ["## Score calibration (held-out folds)", "", f"{c['verdict']}.", "",
                  "| score | ECE | AUROC |", "|---|---|---|",
                  f"| raw | {r['ece']:.3f} | {_f(r['auroc'])} |", f"| calibrated | {a['ece']:.3f} | {_f(a['auroc'])} |",
                  "", f"![raw]({RELIABILITY_BEFORE_PNG}) ![calibrated]({RELIABILITY_AFTER_PNG})", ""]
    lines += ["## Searched without a new image pass", "",
              ", ".join(f"`{k}`" for k in space.GRID) + " (see docs/review.md for why only these).", ""]
    if result.get("overrides_file"):
        lines += ["## Use it", "", f"Overrides: `{result['overrides_file']}`.", ""]
        if result.get("repredict"):
            lines += ["```bash", result["repredict"], "```", ""]
    lines += [f"Every number above can be recomputed from `{HELD_OUT_CSV}`."] if "held_out" in result else []
    return "\n".join(lines) + "\n"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def write(result: dict, out: Path, items, held_rows: list[dict] | None, plots: bool = True,
          reliability_pair: tuple[dict, dict] | None = None) -> dict:
    files = {"report": REPORT_MD, "json": REPORT_JSON}
    if held_rows is not None:
        _write_csv(out / HELD_OUT_CSV, held_rows)
        files["held_out"] = HELD_OUT_CSV
        if plots:
            plot_gain(result["per_parameter"], out / GAIN_PNG)
            iou = lambda c: [i / u if u else 0.0 for i, u in c]  # noqa: E731
            plots_lib.plot_iou_histogram(iou([r["tuned"] for r in held_rows]), out / HISTOGRAM_PNG,
                                         iou([r["default"] for r in held_rows]),
                                         title="IoU per expression, held-out images",
                                         labels=("tuned", "defaults"))
            plots_lib.plot_reliability(reliability_pair[0], out / RELIABILITY_BEFORE_PNG, "Raw score, held out")
            plots_lib.plot_reliability(reliability_pair[1], out / RELIABILITY_AFTER_PNG,
                                       "Calibrated score, held out")
            files.update(gain_plot=GAIN_PNG, iou_histogram=HISTOGRAM_PNG,
                         reliability_raw=RELIABILITY_BEFORE_PNG, reliability_calibrated=RELIABILITY_AFTER_PNG)
    if result.get("overrides_file"):
        files["overrides"] = Path(result["overrides_file"]).name
    result["files"] = files
    (out / REPORT_JSON).write_text(json.dumps(result, indent=2, default=_jsonable), encoding="utf-8")
    (out / REPORT_MD).write_text(_markdown(result), encoding="utf-8")
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
