"""The evaluation run end to end with the tiny models: predictions, metrics, resume, re-scoring,
Label Studio exports and the command line."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures.evaluation import minidata
from hybridgl.evaluation import masks, runner
from hybridgl.evaluation.datasets import load_phrasecut, load_refer
from hybridgl.evaluation.metrics import summarize

ROOT = Path(__file__).resolve().parents[1]


def _parser():
    """The rule parser where it exists; else a stand-in that names the whole sentence."""
    try:
        from hybridgl.parsing import make_parser

        return make_parser("rules")
    except ImportError:
        from hybridgl import ParsedExpression

        def parse(text: str) -> ParsedExpression:
            s = " ".join(text.lower().split())
            return ParsedExpression(s, s.split()[-1] if s else s, parser="stub")

        parse.name = "stub"
        return parse


def _library_complete() -> bool:
    """The rule parser and the weight loading that `python -m hybridgl` needs (the lead's modules)."""
    try:
        from hybridgl import weights  # noqa: F401
        from hybridgl.parsing import make_parser  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def clip_pair():
    from tiny_models import tiny_clip

    return tiny_clip()


def make_model(clip_pair, **config):
    from hybridgl import HybridGL, HybridGLConfig

    return HybridGL(*clip_pair, sam=None, parser=_parser(), device="cpu", config=HybridGLConfig(**config))


class Counting:
    """The model, counting prepare/segment calls; raises KeyboardInterrupt after `stop_after` segments."""

    def __init__(self, model, stop_after: int | None = None):
        self.model, self.stop_after = model, stop_after
        self.prepared, self.segmented = [], 0

    def prepare(self, image, proposals=None):
        self.prepared.append(image.shape)
        return self.model.prepare(image, proposals=proposals)

    def segment(self, view, sentence):
        if self.stop_after is not None and self.segmented >= self.stop_after:
            raise KeyboardInterrupt
        self.segmented += 1
        return self.model.segment(view, sentence)

    def __getattr__(self, name):
        return getattr(self.model, name)


def gt_proposals(group, image):
    """Injected proposals: every ground truth of the image, plus the left half of the image."""
    gts = [group.ground_truth(k) for k in dict.fromkeys(s.gt_key for s in group.samples)]
    half = np.zeros(image.shape[:2], bool)
    half[:, : image.shape[1] // 2] = True
    return np.stack(gts + [half])


def no_proposals(group, image):
    return np.zeros((0, *image.shape[:2]), bool)


@pytest.fixture()
def refer_data(tmp_path):
    return minidata.make_refer(tmp_path / "data")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------

def test_run_writes_predictions_metrics_and_plots(clip_pair, refer_data, tmp_path):
    root, images = refer_data
    ds = load_refer(root, "refcoco", "val", coco_images=images)
    model = Counting(make_model(clip_pair))
    out = tmp_path / "run"
    metrics = runner.evaluate_model(model, ds, out, proposals_fn=gt_proposals, progress=False)

    assert len(model.prepared) == 2  # each image prepared once for all its expressions
    assert model.segmented == 4
    recs = lines(out / "predictions.jsonl")
    assert [r["sent_id"] for r in recs] == minidata.VAL_SENT_IDS
    for r in recs:
        ref_id = r["ref_id"]
        gt = minidata.expected_refer_gt(ref_id)
        assert r["image_id"] == minidata.REFER_ANNS[minidata.REFER_REFS[ref_id][0]][0]
        assert r["mask"]["size"] == list(gt.shape) and isinstance(r["mask"]["counts"], str)
        pred = masks.decode(r["mask"])
        i, u = int((pred & gt).sum()), int((pred | gt).sum())
        assert (r["intersection"], r["union"]) == (i, u) and r["iou"] == pytest.approx(i / u)
        hyb = masks.decode(r["hybrid_mask"])
        assert r["hybrid_iou"] == pytest.approx((hyb & gt).sum() / (hyb | gt).sum())
        assert np.array_equal(masks.decode(r["gt"]), gt)
        assert 0.0 <= r["score"] <= 1.0 and r["n_proposals"] >= 2
        assert r["index"] is not None and r["hybrid_index"] is not None
        assert r["ranking"][0]["index"] == r["index"]
    by_hand = summarize([(r["intersection"], r["union"]) for r in recs])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n"] == 4 and saved["oIoU"] == pytest.approx(by_hand["oIoU"])
    assert saved["mIoU"] == pytest.approx(by_hand["mIoU"]) == pytest.approx(metrics["mIoU"])
    hybrid = summarize([(r["hybrid_intersection"], r["hybrid_union"]) for r in recs])
    assert saved["hybrid_only"]["oIoU"] == pytest.approx(hybrid["oIoU"])
    assert saved["paper"]["full"] == {"oIoU": 41.81, "mIoU": 49.48}
    assert saved["paper"]["hybrid_only"] == {"oIoU": 31.71, "mIoU": 40.27}
    assert saved["config"]["fusion_mode"] == "G2L" and saved["model_version"] == model.model_version
    assert saved["calibration"]["n"] == 4 and len(saved["calibration"]["thresholds"]) == 3
    for name in ("reliability.png", "iou_histogram.png", "run.json"):
        assert (out / name).is_file()
    # a finished run started again does nothing but rewrite the metrics
    again = Counting(make_model(clip_pair))
    runner.evaluate_model(again, ds, out, proposals_fn=gt_proposals, progress=False)
    assert again.prepared == [] and again.segmented == 0


def test_resume_after_interruption(clip_pair, refer_data, tmp_path):
    root, images = refer_data
    ds = load_refer(root, "refcoco", "val", coco_images=images)
    full = runner.evaluate_model(make_model(clip_pair), ds, tmp_path / "full", proposals_fn=gt_proposals,
                                 progress=False)

    out = tmp_path / "run"
    killed = Counting(make_model(clip_pair), stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate_model(killed, ds, out, proposals_fn=gt_proposals, progress=False)
    assert [r["sent_id"] for r in lines(out / "predictions.jsonl")] == [11, 12]
    with open(out / "predictions.jsonl", "a") as f:  # killed in the middle of writing a line
        f.write('{"sent_id": 21, "ref_id": 2, "mask": {"si')

    resumed = Counting(make_model(clip_pair))
    metrics = runner.evaluate_model(resumed, ds, out, proposals_fn=gt_proposals, progress=False)
    assert resumed.segmented == 2  # only sentences 21 and 31
    assert len(resumed.prepared) == 2  # image 1 (for 21) and image 2 (for 31)
    recs = lines(out / "predictions.jsonl")
    assert [r["sent_id"] for r in recs] == minidata.VAL_SENT_IDS
    assert metrics["run"]["resumed_from"] == 2
    for key in ("oIoU", "mIoU", "n"):
        assert metrics[key] == pytest.approx(full[key])
    assert metrics["hybrid_only"]["mIoU"] == pytest.approx(full["hybrid_only"]["mIoU"])


def test_resume_refuses_another_config_unless_overwrite(clip_pair, refer_data, tmp_path):
    root, images = refer_data
    ds = load_refer(root, "refcoco", "val", coco_images=images).limited(1)
    out = tmp_path / "run"
    runner.evaluate_model(make_model(clip_pair), ds, out, proposals_fn=gt_proposals, progress=False)
    other = make_model(clip_pair, use_relation=False)
    with pytest.raises(runner.ResumeError, match="model_version"):
        runner.evaluate_model(other, ds, out, proposals_fn=gt_proposals, progress=False)
    m = runner.evaluate_model(other, ds, out, proposals_fn=gt_proposals, progress=False, overwrite=True)
    assert m["n"] == 1 and m["config"]["use_relation"] is False
    # RefCOCOg's umd and google splits put different refs in "val": a resume must not mix them
    info = json.loads((out / runner.RUN_INFO).read_text())
    assert ds.split_by == "unc" and info["split_by"] == "unc"
    with pytest.raises(runner.ResumeError, match="split_by"):
        runner._check_resume(out, {**info, "split_by": "google"}, overwrite=False)
    del info["split_by"]  # a run from before split_by was recorded resumes as before
    (out / runner.RUN_INFO).write_text(json.dumps(info))
    runner._check_resume(out, {**info, "split_by": "unc"}, overwrite=False)


class Failing(Counting):
    """Fails on chosen sentences, or on every image."""

    def __init__(self, model, bad_sentences=(), bad_images=False):
        super().__init__(model)
        self.bad_sentences, self.bad_images = set(bad_sentences), bad_images

    def prepare(self, image, proposals=None):
        if self.bad_images:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().prepare(image, proposals)

    def segment(self, view, sentence):
        if sentence in self.bad_sentences:
            raise ValueError("cannot parse (simulated)")
        return super().segment(view, sentence)


def test_a_failing_expression_is_recorded_and_retried(clip_pair, refer_data, tmp_path):
    root, images = refer_data
    ds = load_refer(root, "refcoco", "val", coco_images=images)
    out = tmp_path / "run"
    m = runner.evaluate_model(Failing(make_model(clip_pair), bad_sentences={"red thing"}), ds, out,
                              proposals_fn=gt_proposals, progress=False)
    recs = {r["sent_id"]: r for r in lines(out / "predictions.jsonl")}
    assert recs[12]["reason"].startswith("error: ValueError") and recs[12]["iou"] == 0.0
    assert m["errors"] == 1 and m["run"]["errors"] == 1 and m["n"] == 4
    retry = Counting(make_model(clip_pair))
    m = runner.evaluate_model(retry, ds, out, proposals_fn=gt_proposals, progress=False)
    assert retry.segmented == 1 and m["errors"] == 0 and m["n"] == 4  # only the failed one again


def test_a_systematic_failure_stops_the_run(clip_pair, refer_data, tmp_path):
    root, images = refer_data
    ds = load_refer(root, "refcoco", "val", coco_images=images)
    with pytest.raises(RuntimeError, match="out of memory"):
        runner.evaluate_model(Failing(make_model(clip_pair), bad_images=True), ds, tmp_path / "run",
                              proposals_fn=gt_proposals, progress=False)
    with pytest.raises(FileNotFoundError):  # a wrong image folder
        runner.evaluate_model(make_model(clip_pair), load_refer(root, "refcoco", "val", coco_images=tmp_path),
                              tmp_path / "run2", proposals_fn=gt_proposals, progress=False)


def test_a_device_failure_stops_the_run_keeping_its_lines_and_the_rerun_continues(clip_pair, refer_data, tmp_path):
    """A sticky CUDA error (simulated by a hook on the tiny CLIP: the hardware is all that is faked)
    fails every later CUDA call of the process. The run must not record the image's and every later
    image's expressions as failed lines: it stops with DeviceFailure, says what is kept, and the same
    command continues from the lines written before it."""
    from hybridgl.distributed import DeviceFailure, is_device_failure
    from tiny_models import CUDA_ERROR, StickyCudaError, text_entry, vision_entry

    root, images = refer_data
    ds = load_refer(root, "refcoco", "val", coco_images=images)
    model = make_model(clip_pair)
    with StickyCudaError(vision_entry(model), after=10**9) as counting:  # image 1's calls (its 3 expressions)
        runner.evaluate_model(model, ds.limited(3), tmp_path / "count", proposals_fn=gt_proposals, progress=False)
    out = tmp_path / "run"
    with StickyCudaError(vision_entry(model), after=counting.calls), pytest.raises(DeviceFailure) as failed:
        runner.evaluate_model(model, ds, out, proposals_fn=gt_proposals, progress=False)
    message = str(failed.value)
    assert CUDA_ERROR in message and "image 2" in message and "run the same command again" in message
    assert is_device_failure(failed.value) and CUDA_ERROR in str(failed.value.__cause__)
    recs = lines(out / "predictions.jsonl")
    assert [r["sent_id"] for r in recs] == [11, 12, 21] and not any(r["reason"] for r in recs)  # image 1, kept
    assert not (out / "metrics.json").exists()
    resumed = Counting(model)
    metrics = runner.evaluate_model(resumed, ds, out, proposals_fn=gt_proposals, progress=False)
    assert resumed.segmented == 1 and metrics["run"]["resumed_from"] == 3 and metrics["errors"] == 0
    assert [r["sent_id"] for r in lines(out / "predictions.jsonl")] == minidata.VAL_SENT_IDS

    # failing in segment (the text encoder): the first expression stops the run, no "error:" line written
    out = tmp_path / "run-text"
    with StickyCudaError(text_entry(model)), pytest.raises(DeviceFailure, match="sent_id 11"):
        runner.evaluate_model(model, ds, out, proposals_fn=gt_proposals, progress=False)
    assert lines(out / "predictions.jsonl") == []


@pytest.mark.skipif(not _library_complete(), reason="hybridgl.weights / the rule parser are not written yet")
def test_the_command_stops_on_a_device_failure_with_one_line_and_exit_2(tmp_path, capsys):
    """`hybridgl evaluate` as a user runs it (in this process, so that the fault can be simulated: a
    global forward pre-hook failing CLIP's encoders, whichever model the command loads)."""
    import torch

    from hybridgl import cli
    from tiny_models import CUDA_ERROR, PERMISSIVE, TINY_CLIP_DIR, save_tiny_sam

    root, images = minidata.make_refer(tmp_path / "data")
    sets = [a for k, v in PERMISSIVE.items() for a in ("--set", f"{k}={json.dumps(v)}")]

    def broken_gpu(module, args):
        if type(module).__name__ == "CLIPMLP":  # (the text encoder's, in segment)
            raise RuntimeError(CUDA_ERROR)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(broken_gpu)
    try:
        rc = cli.main(["evaluate", "--dataset", "refcoco", "--split", "val", "--data-root", str(root),
                       "--coco-images", str(images), "--no-progress", "--no-plots", "--out", str(tmp_path / "run"),
                       "--clip", str(TINY_CLIP_DIR), "--sam", "tiny_models:build_tiny_sam", "--sam-checkpoint",
                       str(save_tiny_sam(tmp_path / "tiny_sam.pth")), "--parser", "rules", "--device", "cpu", *sets])
    finally:
        handle.remove()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: device failure on cpu at sent_id 11 (RuntimeError: " + CUDA_ERROR)
    assert "run the same command again to continue" in err[-1] and "Traceback" not in "\n".join(err)
    assert lines(tmp_path / "run" / "predictions.jsonl") == []  # no image recorded as failed


def test_no_proposals_is_an_empty_prediction(clip_pair, refer_data, tmp_path):
    root, images = refer_data
    ds = load_refer(root, "refcoco", "val", coco_images=images)
    m = runner.evaluate_model(make_model(clip_pair), ds, tmp_path / "run", proposals_fn=no_proposals,
                              progress=False)
    recs = lines(tmp_path / "run" / "predictions.jsonl")
    assert all(r["index"] is None and r["reason"] and r["iou"] == 0.0 for r in recs)
    assert all(masks.area(r["mask"]) == 0 for r in recs)
    # U = |G| for each expression: 140, 140, 80, 750 pixels
    assert [r["union"] for r in recs] == [140, 140, 80, 750]
    assert m["oIoU"] == 0.0 and m["mIoU"] == 0.0 and m["no_prediction"] == 4


def test_rescore_without_a_model(clip_pair, refer_data, tmp_path):
    root, images = refer_data
    ds = load_refer(root, "refcoco", "val", coco_images=images)
    run = tmp_path / "run"
    first = runner.evaluate_model(make_model(clip_pair), ds, run, proposals_fn=gt_proposals, progress=False)

    again = runner.rescore(run / "predictions.jsonl", tmp_path / "rescored")
    for key in ("oIoU", "mIoU", "n"):
        assert again[key] == pytest.approx(first[key])
    assert again["hybrid_only"]["oIoU"] == pytest.approx(first["hybrid_only"]["oIoU"])
    assert again["config"] == first["config"]  # carried over from run.json
    for name in ("predictions.jsonl", "metrics.json", "reliability.png", "iou_histogram.png"):
        assert (tmp_path / "rescored" / name).is_file()

    # edit the masks: the first line now predicts its ground truth exactly, the second nothing
    recs = lines(run / "predictions.jsonl")
    recs[0]["mask"] = recs[0]["gt"]
    recs[1]["mask"] = masks.empty_rle(*recs[1]["gt"]["size"])
    recs[1]["iou"] = 0.99  # stale numbers are recomputed, not trusted
    edited = tmp_path / "edited" / "predictions.jsonl"
    edited.parent.mkdir()
    runner.write_predictions(recs, edited)
    m = runner.rescore(edited)
    out = lines(edited)
    assert out[0]["iou"] == 1.0 and out[1]["iou"] == 0.0 and out[1]["union"] == 140
    by_hand = summarize([(r["intersection"], r["union"]) for r in out])
    assert m["oIoU"] == pytest.approx(by_hand["oIoU"]) and m["mIoU"] == pytest.approx(by_hand["mIoU"])

    # against the dataset's ground truth, for lines that carry none
    for r in recs:
        del r["gt"], r["intersection"], r["union"]
    runner.write_predictions(recs, edited)
    with pytest.raises(ValueError, match="no ground truth"):
        runner.rescore(edited)
    m2 = runner.rescore(edited, dataset=ds)
    assert m2["oIoU"] == pytest.approx(m["oIoU"]) and m2["dataset"] == "refcoco" and m2["missing"] == 0


def test_phrasecut_run(clip_pair, tmp_path):
    root = minidata.make_phrasecut(tmp_path / "data")
    ds = load_phrasecut(root, "test")
    model = Counting(make_model(clip_pair))
    m = runner.evaluate_model(model, ds, tmp_path / "run", proposals_fn=gt_proposals, progress=False)
    recs = lines(tmp_path / "run" / "predictions.jsonl")
    assert [r["sent_id"] for r in recs] == ["3__1", "7__1", "7__2"] and len(model.prepared) == 2
    for r in recs:
        gt = minidata.expected_phrasecut_gt(r["sent_id"])
        assert np.array_equal(masks.decode(r["gt"]), gt)
    assert m["paper"]["full"] == {"oIoU": 38.39, "mIoU": 36.98} and m["skipped"] == {"no_phrase_structure": 1}


# ---------------------------------------------------------------------------------------------
# Label Studio export

def _brush_region(mask: np.ndarray, **extra) -> dict:
    from label_studio_sdk.converter.brush import mask2rle

    h, w = mask.shape
    return {"type": "brushlabels", "from_name": "mask", "to_name": "image", "original_width": w,
            "original_height": h, "value": {"format": "rle", "rle": [int(v) for v in mask2rle(mask.astype(np.uint8) * 255)],
                                            "brushlabels": ["Target"]}, **extra}


def make_ls_export(path: Path) -> dict:
    h, w = 20, 30
    gt1 = minidata.coco_rect_mask(h, w, (0, 0, 10, 10))      # 100 px
    pred1 = minidata.coco_rect_mask(h, w, (5, 0, 15, 10))    # 100 px, 50 shared -> IoU 50/150
    gt2 = minidata.coco_rect_mask(h, w, (10, 10, 20, 20))    # 100 px
    gt2_old = minidata.coco_rect_mask(h, w, (0, 0, 1, 1))
    pred2 = gt2.copy()                                        # IoU 1
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/1/a.png", "text": "the left box"},
         "annotations": [{"id": 10, "was_cancelled": False, "updated_at": "2026-01-02T00:00:00Z",
                          "result": [_brush_region(gt1)]}],
         "predictions": [{"id": 100, "model_version": "old", "score": 0.9, "created_at": "2026-01-01T00:00:00Z",
                          "result": [_brush_region(gt1)]},
                         {"id": 101, "model_version": "hybridgl-1", "score": 0.3, "created_at": "2026-01-01T01:00:00Z",
                          "result": [_brush_region(pred1)]}]},
        {"id": 2, "data": {"image": "/data/upload/1/b.png", "text": "the right box"},
         "annotations": [{"id": 20, "was_cancelled": False, "updated_at": "2026-01-01T00:00:00Z",
                          "result": [_brush_region(gt2_old)]},
                         {"id": 21, "was_cancelled": False, "updated_at": "2026-01-03T00:00:00Z",  # the final one
                          "result": [_brush_region(minidata.coco_rect_mask(h, w, (10, 10, 20, 15))),
                                     _brush_region(minidata.coco_rect_mask(h, w, (10, 15, 20, 20)))]},
                         {"id": 22, "was_cancelled": True, "updated_at": "2026-01-04T00:00:00Z",
                          "result": [_brush_region(gt2_old)]}],
         "predictions": [{"id": 200, "model_version": "hybridgl-1", "score": 0.8, "result": [_brush_region(pred2)]}]},
        {"id": 3, "data": {"image": "c.png", "text": "nothing predicted"},  # annotated, no prediction: IoU 0
         "annotations": [{"id": 30, "result": [{"type": "polygonlabels", "from_name": "poly", "to_name": "image",
                                                "original_width": w, "original_height": h,
                                                "value": {"points": [[0, 0], [50, 0], [50, 50], [0, 50]],
                                                          "polygonlabels": ["Target"]}}]}],
         "predictions": []},
        {"id": 4, "data": {"image": "d.png", "text": "not annotated yet"}, "annotations": [],
         "predictions": [{"id": 400, "model_version": "hybridgl-1", "score": 0.5, "result": [_brush_region(gt1)]}]},
    ]
    path.write_text(json.dumps(tasks))
    return {"gt1": gt1, "pred1": pred1, "gt2": gt2}


def test_label_studio_export_metrics(tmp_path):
    pytest.importorskip("label_studio_sdk")
    from hybridgl.evaluation.label_studio import evaluate_export

    export = tmp_path / "export.json"
    make_ls_export(export)
    m = evaluate_export(export, tmp_path / "ls", model_version="hybridgl-1")
    recs = lines(tmp_path / "ls" / "predictions.jsonl")
    assert [r["sent_id"] for r in recs] == [1, 2, 3]  # task 4 has no annotation
    assert [(r["intersection"], r["union"]) for r in recs] == [(50, 150), (100, 100), (0, 16 * 11)]  # polygon 50% of 30x20, outline included
    assert [r["score"] for r in recs] == [0.3, 0.8, 0.0]
    assert recs[2]["reason"] == "no prediction" and recs[0]["sentence"] == "the left box"
    # oIoU = 150 / 426, mIoU = (1/3 + 1 + 0) / 3
    assert m["oIoU"] == pytest.approx(100 * 150 / 426) and m["mIoU"] == pytest.approx(100 * (1 / 3 + 1) / 3)
    assert m["hybrid_only"] is None and m["dataset"] == "label-studio"
    assert m["label_studio"]["no_annotation"] == 1 and m["label_studio"]["no_prediction"] == 1
    assert m["label_studio"]["model_versions"] == {"old": 1, "hybridgl-1": 3}
    assert (tmp_path / "ls" / "reliability.png").is_file() and (tmp_path / "ls" / "iou_histogram.png").is_file()
    # without a model_version, the latest prediction of each task is taken (the same ones here)
    m_latest = evaluate_export(export, tmp_path / "ls2")
    assert m_latest["oIoU"] == pytest.approx(m["oIoU"])
    # the old model's predictions alone: task 1 exact, tasks 2 and 3 unpredicted
    m_old = evaluate_export(export, tmp_path / "ls3", model_version="old")
    assert m_old["mIoU"] == pytest.approx(100 / 3)
    # the lines it wrote can be re-scored like any run's
    assert runner.rescore(tmp_path / "ls" / "predictions.jsonl")["oIoU"] == pytest.approx(m["oIoU"])


def test_label_studio_export_through_the_cli(tmp_path, capsys):
    pytest.importorskip("label_studio_sdk")
    from hybridgl.evaluation import cli

    export = tmp_path / "export.json"
    make_ls_export(export)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--label-studio-export", str(export), "--out", str(tmp_path / "ls"),
                              "--target-precision", "0.5"])
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "4 tasks, 3 scored" in text and "AUROC" in text and "precision 0.50" in text
    metrics = json.loads((tmp_path / "ls" / "metrics.json").read_text())
    assert metrics["calibration"]["thresholds"][0]["target_precision"] == 0.5


# ---------------------------------------------------------------------------------------------
# the command line, as a user runs it (tiny SAM from a checkpoint, tiny CLIP from its folder)

def run_cli(*args: str, cwd: Path, module=("hybridgl", "evaluate")) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", module[0], *module[1:], *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not _library_complete(), reason="hybridgl.weights / the rule parser are not written yet")
def test_cli_evaluate_rescore_and_proposal_cache(tmp_path):
    from tiny_models import PERMISSIVE, TINY_CLIP_DIR, save_tiny_sam

    root, images = minidata.make_refer(tmp_path / "data")
    checkpoint = save_tiny_sam(tmp_path / "tiny_sam.pth")
    sets = [a for k, v in PERMISSIVE.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    model_args = ["--clip", str(TINY_CLIP_DIR), "--sam", "tiny_models:build_tiny_sam", "--sam-checkpoint",
                  str(checkpoint), "--parser", "rules", "--device", "cpu", *sets]
    common = ["--dataset", "refcoco", "--split", "val", "--data-root", str(root), "--coco-images", str(images),
              "--proposals-cache", str(tmp_path / "cache"), "--no-progress", *model_args]

    r = run_cli(*common, "--limit", "3", "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "41.81" in r.stdout and "49.48" in r.stdout and "AUROC" in r.stdout  # beside the paper
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["run"]["proposal_cache"] == {"hits": 0, "misses": 1}
    assert len(lines(tmp_path / "run" / "predictions.jsonl")) == 3

    # an ablation reuses SAM's proposals from the cache
    r = run_cli(*common, "--ablation", "hybrid-only", "--out", "ablation", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ab = json.loads((tmp_path / "ablation" / "metrics.json").read_text())
    assert ab["n"] == 4 and ab["run"]["proposal_cache"] == {"hits": 1, "misses": 1}
    assert ab["config"]["use_relation"] is False and ab["config"]["use_position_prior"] is False

    # the same command continues the first run instead of starting again
    r = run_cli(*common, "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["run"]["resumed_from"] == 3 and metrics["run"]["expressions_segmented"] == 1

    # re-scoring needs no model options at all, through either entry point
    r = run_cli("--predictions", str(tmp_path / "run" / "predictions.jsonl"), "--out", "rescored", cwd=tmp_path,
                module=("hybridgl.evaluation",))
    assert r.returncode == 0, r.stderr
    rescored = json.loads((tmp_path / "rescored" / "metrics.json").read_text())
    assert rescored["oIoU"] == pytest.approx(metrics["oIoU"]) and rescored["mIoU"] == pytest.approx(metrics["mIoU"])

    # user errors are one line, exit 2
    r = run_cli("--dataset", "refcoco", "--split", "testB", "--data-root", str(root), "--coco-images",
                str(images), "--out", "bad", *model_args, cwd=tmp_path)
    assert r.returncode == 2 and "testB" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--dataset", "refcoco", "--split", "val", "--out", "bad", cwd=tmp_path)
    assert r.returncode == 2 and "--data-root" in r.stderr


def test_rescore_in_place_against_part_of_a_dataset_keeps_the_other_lines(refer_data, tmp_path):
    """`evaluate --predictions RUN/predictions.jsonl --dataset ... --limit N` (no --out) rewrites the
    run's own predictions.jsonl: the lines it did not re-score must stay in it, not be deleted."""
    root, images = refer_data
    ds = load_refer(root, "refcoco", "val", coco_images=images)
    recs = []
    for group in ds.groups:
        for s in group.samples:
            gt = group.ground_truth(s.gt_key)
            recs.append({"sent_id": s.sent_id, "ref_id": s.ref_id, "image_id": s.image_id, "sentence": s.sentence,
                         "mask": masks.encode(gt), "score": 0.5, "reason": None})
    run = tmp_path / "run"
    run.mkdir()
    runner.write_predictions(recs, run / "predictions.jsonl")
    m = runner.rescore(run / "predictions.jsonl", dataset=ds.limited(1))
    assert m["n"] == 1 and m["mIoU"] == pytest.approx(100.0)
    kept = lines(run / "predictions.jsonl")
    assert sorted(r["sent_id"] for r in kept) == sorted(minidata.VAL_SENT_IDS)
    assert next(r for r in kept if r["sent_id"] == minidata.VAL_SENT_IDS[0])["iou"] == 1.0


@pytest.mark.parametrize("content", [b"", b"<html>login</html>", b"\xff\xfe[]"])
def test_a_label_studio_export_that_is_not_json_names_the_file(tmp_path, content):
    from hybridgl.evaluation.label_studio import read_export

    export = tmp_path / "export.json"
    export.write_bytes(content)
    with pytest.raises(ValueError, match=f"{export}: not a Label Studio JSON export"):
        read_export(export)
