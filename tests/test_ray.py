"""`hybridgl evaluate --ray` on a local Ray cluster (127.0.0.1, started and stopped here), tiny models.

The Ray run must write the same lines as the single-process run, survive the death of a model
actor without losing or repeating a line, and add nothing when run again.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures.evaluation import minidata
from ray_local import model_actor_pids, ray_address  # noqa: F401 (ray_address: a fixture)

from hybridgl import distributed

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["the red block on the left", "blue square at the bottom", "big green box", "the thing in the middle",
             "the small one on the right"]
N_IMAGES = 10
MISSING_IMAGE = 4  # its file is deleted: its lines say why, the others are unaffected


def make_refer_many(root: Path, n: int = N_IMAGES) -> tuple[Path, Path]:
    """A refer-layout RefCOCO val split of n images, 2 objects and 3 expressions each."""
    rng = np.random.default_rng(7)
    images_dir = root / "train2014"
    images_dir.mkdir(parents=True)
    (root / "refcoco").mkdir()
    images, anns, refs = [], [], []
    for image_id in range(1, n + 1):
        h, w = int(rng.integers(30, 50)), int(rng.integers(30, 50))
        img = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
        name = f"COCO_train2014_{image_id:012d}.jpg"
        for k in range(2):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            x1, y1 = x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 2))
            img[y0:y1, x0:x1] = [(220, 30, 30), (30, 30, 220)][k]
            ann_id = image_id * 10 + k
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "area": 1.0,
                         "segmentation": [minidata.rect_poly(x0, y0, x1, y1)], "bbox": [x0, y0, x1 - x0, y1 - y0]})
            sents = [(ann_id * 10 + j, SENTENCES[(image_id + k + j) % len(SENTENCES)]) for j in range(2 - k)]
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "split": "val", "category_id": 1,
                         "file_name": name, "sent_ids": [s for s, _ in sents],
                         "sentences": [{"sent_id": s, "raw": r, "sent": r, "tokens": r.split()} for s, r in sents]})
        Image.fromarray(img).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    import pickle

    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    (root / "refcoco" / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    (images_dir / f"COCO_train2014_{MISSING_IMAGE:012d}.jpg").unlink()
    return root, images_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The mini dataset, the model options, and the single-process run's lines (the reference)."""
    from tiny_models import PERMISSIVE, TINY_CLIP_DIR, save_tiny_sam

    work = tmp_path_factory.mktemp("ray-eval")
    root, images = make_refer_many(work / "data")
    checkpoint = save_tiny_sam(work / "tiny_sam.pth")
    sets = [a for k, v in PERMISSIVE.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    common = ["--dataset", "refcoco", "--split", "val", "--data-root", str(root), "--coco-images", str(images),
              "--no-progress", "--no-plots", "--clip", str(TINY_CLIP_DIR), "--sam", "tiny_models:build_tiny_sam",
              "--sam-checkpoint", str(checkpoint), "--parser", "rules", "--device", "cpu", *sets]
    r = run_cli(*common, "--out", "single", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return work, common, lines_by_id(work / "single" / "predictions.jsonl")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # one torch thread, as in Ray's fractional-CPU actors: the same float reductions, bit for bit
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hybridgl", "evaluate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def lines_by_id(path: Path) -> dict[int, dict]:
    """sent_id -> line; fails on a repeated sent_id (a line written twice)."""
    out: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        assert rec["sent_id"] not in out, f"sent_id {rec['sent_id']} written twice"
        out[rec["sent_id"]] = rec
    return out


def test_reference_run_has_the_failed_image(setup):
    _, _, reference = setup
    failed = [r for r in reference.values() if (r["reason"] or "").startswith("error:")]
    assert len(reference) == 3 * N_IMAGES and len(failed) == 3
    assert all(r["image_id"] == MISSING_IMAGE and "FileNotFoundError" in r["reason"] for r in failed)


def test_ray_run_equals_single_process_and_rerun_adds_nothing(setup, ray_address):
    work, common, reference = setup
    ray_args = ["--ray", ray_address, "--ray-actors", "2", "--ray-cpus-per-actor", "0.5"]
    r = run_cli(*common, *ray_args, "--out", "ray", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Ray: 2 model actors" in r.stderr and "oIoU" in r.stdout
    assert lines_by_id(work / "ray" / "predictions.jsonl") == reference  # masks, scores, IoUs, reasons
    single = json.loads((work / "single" / "metrics.json").read_text())
    metrics = json.loads((work / "ray" / "metrics.json").read_text())
    assert (metrics["oIoU"], metrics["mIoU"], metrics["n"]) == (single["oIoU"], single["mIoU"], single["n"])
    assert metrics["model_version"] == single["model_version"]  # the workers' model is the driver's
    assert metrics["run"]["images_prepared"] == N_IMAGES - 1 and metrics["run"]["ray"]["actors"] == 2

    # again, with the missing image back: only its 3 expressions are computed, nothing else is added
    images = work / "images-fixed"
    shutil.copytree(common[common.index("--coco-images") + 1], images)
    name = f"COCO_train2014_{MISSING_IMAGE:012d}.jpg"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(images / name)
    fixed = [images if a == common[common.index("--coco-images") + 1] else a for a in common]
    r = run_cli(*map(str, fixed), *ray_args, "--out", "ray", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((work / "ray" / "metrics.json").read_text())
    assert metrics["run"]["resumed_from"] == len(reference) - 3 and metrics["run"]["images_prepared"] == 1
    assert metrics["run"]["expressions_segmented"] == 3 and metrics["errors"] == 0 and metrics["n"] == len(reference)
    lines = [json.loads(line) for line in (work / "ray" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == len(reference) + 3  # the failed image's lines again, nothing else
    assert sorted(r["sent_id"] for r in lines[-3:]) == sorted(k for k, v in reference.items() if v["reason"]
                                                               and v["reason"].startswith("error:"))


def test_killing_a_model_actor_mid_run_loses_and_repeats_nothing(setup, ray_address, tmp_path):
    from hybridgl.evaluation import cli as evaluation_cli
    from hybridgl.evaluation import ray_runner
    from hybridgl.evaluation.datasets import load_refer

    work, common, reference = setup
    parser = argparse.ArgumentParser()
    evaluation_cli.add_arguments(parser)
    args = parser.parse_args([*common, "--out", str(tmp_path / "run")])
    dataset = load_refer(args.data_root, "refcoco", "val", coco_images=args.coco_images)
    pred_path = tmp_path / "run" / "predictions.jsonl"
    killed: list[int] = []

    def kill_one_actor_after_the_first_line() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if pred_path.is_file() and pred_path.stat().st_size > 0:
                pids = model_actor_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor_after_the_first_line, daemon=True)
    killer.start()
    options = distributed.RayOptions(actors=2, cpus_per_actor=0.5)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the driver's ground truths only; the models run in the actors
    try:
        metrics = ray_runner.evaluate_on_ray(args, dataset, tmp_path / "run", options, progress=False, plots=False)
    finally:
        torch.set_num_threads(threads)
    killer.join(timeout=10)
    assert killed, "no model actor process was found to kill"
    assert lines_by_id(pred_path) == reference  # every line exactly once, as computed single-process
    assert metrics["n"] == len(reference)


def test_actor_count_follows_the_cluster():
    assert distributed.RayOptions().resources({"CPU": 16.0, "GPU": 4.0}) == (4, 1.0, 1.0)  # one per GPU
    assert distributed.RayOptions(gpus_per_actor=0.5).resources({"GPU": 2.0})[:2] == (4, 0.5)  # two per GPU
    assert distributed.RayOptions().resources({"CPU": 16.0}) == (1, 0.0, 1.0)  # CPU-only: one, unless told
    assert distributed.RayOptions(actors=3, cpus_per_actor=0.5).resources({"CPU": 2.0}) == (3, 0.0, 0.5)
    assert distributed.RayOptions().resources({"GPU": 8.0}, items=3)[0] == 3  # no actor without an item
    assert distributed.RayOptions(actors=4).resources({"CPU": 2.0}, items=1)[0] == 1
    parser = argparse.ArgumentParser()
    distributed.add_ray_arguments(parser)
    assert distributed.options_from_args(parser.parse_args([])) is None  # without --ray nothing changes
    assert distributed.options_from_args(parser.parse_args(["--ray"])).address is None  # a local cluster
    assert distributed.options_from_args(parser.parse_args(["--ray", "auto", "--ray-actors", "2"])) == \
        distributed.RayOptions(address="auto", actors=2)
    with pytest.raises(ValueError, match="--ray-actors"):
        distributed.options_from_args(parser.parse_args(["--ray", "--ray-actors", "0"]))


def test_the_actors_use_the_gpu_ray_assigns_them_whatever_index_the_driver_named(caplog):
    """Ray makes an actor's GPUs its only visible ones, from cuda:0: the driver's "cuda:1" (DEVICE of a
    server on a multi-GPU machine, reused for a --ray run) named no GPU there, and every actor failed."""
    with caplog.at_level(logging.WARNING, logger="hybridgl.distributed"):
        assert distributed.actor_device("cuda:1") == "cuda"
    assert "cuda:1" in caplog.text and "assigns" in caplog.text
    caplog.clear()
    assert [distributed.actor_device(d) for d in ("cuda:0", "cuda", "cpu", None, "tpu9")] == \
        ["cuda", "cuda", "cpu", None, "tpu9"]  # an unknown device is refused where the model loads
    assert caplog.text == ""
    gpus = {"CPU": 8.0, "GPU": 2.0}
    # told "cpu", the actors reserve no GPU: before, one actor per GPU held it idle
    assert distributed.for_actors("cpu", distributed.RayOptions())[1].resources(gpus) == (1, 0.0, 1.0)
    assert distributed.for_actors("cpu", distributed.RayOptions(gpus_per_actor=0.5))[1].resources(gpus)[:2] == (4, 0.5)
    assert distributed.for_actors("cuda:1", distributed.RayOptions()) == ("cuda", distributed.RayOptions())
    assert distributed.for_actors(None, distributed.RayOptions()) == (None, distributed.RayOptions())


def test_device_failures_end_the_actor_other_errors_stay_per_item():
    assert distributed.is_device_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    # out of memory leaves the device usable: the item that asked too much fails, the process goes on
    assert not distributed.is_device_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert distributed.is_device_failure(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"))
    assert distributed.is_device_failure(distributed.DeviceFailure("the GPU failed"))
    try:  # raised from one: still one (a wrapper that names the device failure in its own words)
        try:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")
        except RuntimeError as exc:
            raise KeyError("task 3") from exc
    except KeyError as wrapped:
        assert distributed.is_device_failure(wrapped)
    assert not distributed.is_device_failure(ValueError("image is truncated"))
    assert not distributed.is_device_failure(RuntimeError("shape mismatch"))


def _eval_state(tmp_path: Path):
    """A model actor's state for the evaluation's `_work` (tiny CLIP and SAM, no proposal cache), and
    the mini dataset's first image with its pending expressions."""
    from hybridgl.evaluation.datasets import load_refer
    from tiny_models import tiny_hybridgl

    root, images = minidata.make_refer(tmp_path / "data")
    group = load_refer(root, "refcoco", "val", coco_images=images).groups[0]
    return (tiny_hybridgl(sam=True), None), (group, [s.key for s in group.samples])


def test_the_evaluation_work_raises_a_device_failure_instead_of_failing_the_image(tmp_path):
    """`ray_runner._work` turns an image's or expression's error into its failed lines; a device failure
    (a sticky CUDA error, simulated by a hook on the tiny CLIP) must reach `_Worker` instead, whose actor
    then exits so that Ray retries the image on a fresh one: recorded as failed lines, it would fail
    every later image the broken actor takes."""
    from hybridgl.evaluation import ray_runner
    from tiny_models import CUDA_ERROR, StickyCudaError, text_entry, vision_entry

    state, item = _eval_state(tmp_path)
    model, image = state[0], item[0].load_image()
    ok = ray_runner._work(state, item, image)
    assert ok["prepared"] == 1 and [r["reason"] for r in ok["lines"]] == [None] * 3
    for entry in (vision_entry, text_entry):  # in prepare, in segment
        with StickyCudaError(entry(model)), pytest.raises(RuntimeError, match=CUDA_ERROR):
            ray_runner._work(state, item, image)
    # an ordinary error is still the image's own: its lines say why
    failed = ray_runner._work(state, item, FileNotFoundError("no such image"))
    assert failed["prepared"] == 0 and len(failed["lines"]) == 3
    assert all(r["reason"] == "error: FileNotFoundError: no such image" for r in failed["lines"])


def _times_ten(model, item: int, loaded: int) -> int:
    if item == 3:
        os._exit(1)  # this item kills every actor that takes it
    return loaded * 10


def _cuda_error_once(marker: str, model, item: int, loaded: int) -> int:
    if item == 2 and not os.path.exists(marker):
        Path(marker).touch()
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    if item == 4:
        raise ValueError("bad input")
    return loaded * 10


def _identity(item):
    return item


def test_an_item_that_keeps_killing_its_actor_is_reported_and_the_rest_done(ray_address):
    options = distributed.RayOptions(actors=2, cpus_per_actor=0.5)
    results = list(distributed.run_grouped(list(range(6)), _identity, lambda: None, _times_ten, options))
    assert sorted(r.index for r in results) == list(range(6))  # each item exactly once
    by_index = {r.index: r for r in results}
    assert by_index[3].value is None and by_index[3].error.startswith("lost:")
    assert {i: r.value for i, r in by_index.items() if i != 3} == {0: 0, 1: 10, 2: 20, 4: 40, 5: 50}


def _slow_last(model, item: int, loaded: int) -> int:
    if item == 3:
        time.sleep(12)  # longer than the no-progress timeout below (its actor is freed once it ends)
    return loaded * 10


def test_a_run_that_makes_no_progress_stops_with_a_clear_error_after_the_results_that_came(ray_address,
                                                                                          monkeypatch):
    """Ray Data ends a run in which nothing moves for its no-progress timeout (30 min by default: an
    actor stuck on an item, CPUs held elsewhere) with its internal ExecutionTimeoutError, which the
    commands did not expect (a traceback advising `ds.context` settings a user cannot reach). It is
    now RayStalled, a RayUnavailable (the commands post or write what came back and stop with a
    message), after every result that did come back."""
    import ray.data

    monkeypatch.setattr(ray.data.DataContext.get_current(), "execution_no_progress_timeout_s", 5.0)
    options = distributed.RayOptions(actors=1, cpus_per_actor=0.5)
    got = []
    with pytest.raises(distributed.RayStalled) as stalled:
        for result in distributed.run_grouped(list(range(4)), _identity, lambda: None, _slow_last, options):
            got.append((result.index, result.value))
    # the items the actor took before the slow one came back (one queued behind it may not have)
    assert got and set(got) <= {(0, 0), (1, 10), (2, 20)}
    message = str(stalled.value)
    assert "no progress for 5 s" in message and f"{len(got)} of 4 items done" in message
    assert "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S" in message and "\n" not in message


def test_a_run_leaves_the_callers_data_context_as_it_was(ray_address):
    """run_grouped set its Ray Data settings (no progress bars, errored blocks allowed) on the
    process's current DataContext and never put them back: every later dataset of the caller's had
    them too. They are set on the run's own dataset (which holds a copy of the context) only; the
    test above shows that they still apply to the run."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    mine = {"enable_progress_bars": True, "print_on_execution_start": True, "max_errored_blocks": 0,
            "wait_for_min_actors_s": -1}
    before = {name: getattr(ctx, name) for name in mine}
    try:
        for name, value in mine.items():
            setattr(ctx, name, value)
        options = distributed.RayOptions(actors=1, cpus_per_actor=0.5)
        results = list(distributed.run_grouped([1, 2], _identity, lambda: None, _times_ten, options))
        assert sorted((r.index, r.value, r.error) for r in results) == [(0, 10, None), (1, 20, None)]
        assert ray.data.DataContext.get_current() is ctx
        assert {name: getattr(ctx, name) for name in mine} == mine
    finally:
        for name, value in before.items():
            setattr(ctx, name, value)


def test_a_cuda_error_replaces_the_actor_and_redoes_the_item(ray_address, tmp_path):
    from functools import partial

    marker = str(tmp_path / "failed-once")
    options = distributed.RayOptions(actors=2, cpus_per_actor=0.5)
    results = list(distributed.run_grouped(list(range(6)), _identity, lambda: None,
                                           partial(_cuda_error_once, marker), options))
    assert os.path.exists(marker)  # the device failure happened, the actor process ended ...
    by_index = {r.index: r for r in results}
    assert len(results) == 6 and by_index[2].value == 20 and by_index[2].error is None  # ... and item 2 was redone
    assert by_index[4].error == "internal: ValueError: bad input"  # an ordinary error stays with its item
    assert {i: r.value for i, r in by_index.items() if i not in (2, 4)} == {0: 0, 1: 10, 3: 30, 5: 50}


def _eval_model_on_a_gpu_that_fails_once(marker: str):
    """A model actor's state (ray_runner._build's shape) whose device fails on its first image, once in the
    cluster (the marker file): the hardware fault of StickyCudaError, on the tiny CLIP."""
    from tiny_models import CUDA_ERROR, tiny_hybridgl, vision_entry

    def fail_once(module, args):
        if not os.path.exists(marker):
            Path(marker).touch()
            raise RuntimeError(CUDA_ERROR)

    model = tiny_hybridgl(sam=True)
    vision_entry(model).register_forward_pre_hook(fail_once)
    return model, None


def test_a_device_failure_in_the_evaluation_work_replaces_the_actor_and_redoes_the_image(ray_address, tmp_path):
    from functools import partial

    from hybridgl.evaluation import ray_runner
    from hybridgl.evaluation.datasets import load_refer

    root, images = minidata.make_refer(tmp_path / "data")
    items = [(g, [s.key for s in g.samples]) for g in load_refer(root, "refcoco", "val", coco_images=images).groups]
    marker = str(tmp_path / "failed-once")
    options = distributed.RayOptions(actors=1, cpus_per_actor=0.5)
    results = list(distributed.run_grouped(items, ray_runner._load, partial(_eval_model_on_a_gpu_that_fails_once,
                                                                            marker), ray_runner._work, options))
    assert os.path.exists(marker)  # the device failed, its actor exited ...
    assert sorted(r.index for r in results) == [0, 1] and all(r.error is None for r in results)
    lines = [line for r in results for line in r.value["lines"]]  # ... and its image was redone on a fresh one
    assert sorted(line["sent_id"] for line in lines) == minidata.VAL_SENT_IDS
    assert not any(line["reason"] for line in lines)


def _unpicklable(model, item, loaded):
    return lambda: item  # a work function's value that cannot travel back to the driver


def test_a_value_that_cannot_be_sent_back_is_that_items_error():
    """Reported with its item as an internal error, not raised in the actor (Ray Data would count the
    block as errored and the driver would report it as `lost: ... the actor kept dying`)."""
    import pickle

    worker = distributed._Worker(lambda: None, _unpicklable)
    row = worker({"index": 5, "item": pickle.dumps(1), "loaded": pickle.dumps(2), "error": ""})
    assert row["index"] == 5 and row["error"].startswith("internal: ") and pickle.loads(row["value"]) is None


def test_nan_or_infinite_actor_resources_are_refused():
    parser = argparse.ArgumentParser()
    distributed.add_ray_arguments(parser)
    for option in ("--ray-gpus-per-actor", "--ray-cpus-per-actor"):
        for value in ("nan", "inf"):
            with pytest.raises(ValueError, match=option):
                distributed.options_from_args(parser.parse_args(["--ray", option, value]))


def _within(seconds: float, fn):
    """fn() in a thread: ("value", result) or ("error", exception); a test failure, not a stuck suite,
    when it is still running after `seconds` (the thread is left behind: Ray offers no way to stop it)."""
    out: list = []

    def target():
        try:
            out.append(("value", fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(("error", exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still waiting after {seconds:g} s: the run hangs instead of giving up")
    return out[0]


def test_actors_the_cluster_cannot_place_end_the_run_with_what_was_asked_and_what_it_has(ray_address, caplog):
    """Ray Data waited forever, saying nothing, for model actors the cluster has no room for (a GPU on
    this CPU-only cluster). The pool's start is bounded by RayOptions.start_timeout: then the run
    raises RayStartTimeout (a RayUnavailable, which the CLIs report as an error), which says what was
    asked and what the cluster has; the actors that did start are ended, their CPUs freed."""
    import ray

    gpu = distributed.RayOptions(actors=1, gpus_per_actor=1, cpus_per_actor=0.5, start_timeout=5)
    kind, error = _within(90, lambda: list(distributed.run_grouped([1, 2], _identity, lambda: None, _times_ten, gpu)))
    assert kind == "error" and isinstance(error, distributed.RayStartTimeout), error
    assert isinstance(error, distributed.RayUnavailable)
    message = str(error)
    assert "did not start the model actors within 5 s" in message
    assert "1 actor with 1 GPU and 0.5 CPU each" in message and "1 node, 0 GPU and 2 CPU in all: room for 0" in message
    assert "--ray-start-timeout" in message

    # two actors of 1.5 CPU on 2 CPUs: one starts, the other never does; the run says so at once, then
    # stops and frees the first's CPUs
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hybridgl.distributed"):
        kind, error = _within(90, lambda: list(distributed.run_grouped(
            [1, 2], _identity, lambda: None, _times_ten, distributed.RayOptions(actors=2, cpus_per_actor=1.5,
                                                                                start_timeout=5))))
    assert [r.getMessage() for r in caplog.records if r.name == "hybridgl.distributed"] == [
        "the Ray cluster has room for 1 of the 2 model actors asked for (0 GPU, 1.5 CPU each) now; the run waits "
        "up to 5 s for all of them to start (--ray-start-timeout), then stops"]
    assert kind == "error" and isinstance(error, distributed.RayStartTimeout), error
    assert "2 actors with 0 GPU and 1.5 CPU each (0 GPU, 3 CPU in all)" in str(error) and "room for 1 " in str(error)
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0.0) < 2.0 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0.0) == 2.0  # the actor that started was ended
    one = distributed.RayOptions(actors=1, cpus_per_actor=1.5, start_timeout=60)
    kind, results = _within(120, lambda: list(distributed.run_grouped([1, 2], _identity, lambda: None, _times_ten,
                                                                      one)))
    assert kind == "value" and sorted((r.index, r.value) for r in results) == [(0, 10), (1, 20)], results

    # the probe (run before the pool by both commands) is bounded the same way
    kind, error = _within(60, lambda: distributed.probe(lambda: None, repr, gpu))
    assert kind == "error" and isinstance(error, distributed.RayStartTimeout), error
    assert "did not start the model probe" in str(error) and "1 task with 1 GPU" in str(error)


def test_actors_that_take_every_cpu_leave_the_load_tasks_room(ray_address, caplog):
    """Model actors that took every CPU of the cluster (2 of 1 CPU, or 1 of 2, on these 2 CPUs) all
    started, so the start timeout never fired, and then Ray Data waited, saying nothing, for a CPU for
    the load tasks (it had submitted them; Ray held them pending). Now the load tasks reserve no CPU
    when the actors may take them all, at most one per actor at a time, and the run completes."""
    for actors, cpus in ((2, 1.0), (1, 2.0)):
        caplog.clear()
        options = distributed.RayOptions(actors=actors, cpus_per_actor=cpus, start_timeout=60)
        with caplog.at_level(logging.INFO, logger="hybridgl.distributed"):
            kind, results = _within(90, lambda: list(distributed.run_grouped([0, 1, 2], _identity, lambda: None,
                                                                             _times_ten, options)))
        assert kind == "value" and sorted((r.index, r.value, r.error) for r in results) == [
            (0, 0, None), (1, 10, None), (2, 20, None)], results
        assert any("the load tasks reserve no CPU" in r.getMessage() for r in caplog.records), caplog.text


def test_the_load_tasks_keep_their_cpus_when_the_actors_cannot_take_them_all():
    """Ray places the actors where it likes: the load tasks reserve no CPU when some placement of
    the actors leaves no node a load task's CPUs (the worst one is assumed), and keep them otherwise."""
    starve = distributed._loads_may_starve
    two = [{"CPU": 2.0}]
    assert starve(two, 2, 0.0, 1.0, 0.25) and starve(two, 1, 0.0, 2.0, 0.25)
    assert not starve(two, 1, 0.0, 1.0, 0.25) and not starve(two, 2, 0.0, 0.5, 0.25)
    assert not starve(two, 1, 0.0, 1.75, 0.25) and starve(two, 1, 0.0, 1.8, 0.25)  # 0.25 left, then 0.2
    assert not starve(two, 4, 0.0, 0.0, 0.25) and not starve(two, 4, 0.0, 1.0, 0.0)  # no CPU taken or needed
    # fragments: 2 actors of 0.9 CPU on 2 nodes of 1 CPU leave 0.1 on each
    assert starve([{"CPU": 1.0}, {"CPU": 1.0}], 2, 0.0, 0.9, 0.25)
    assert not starve([{"CPU": 1.0}, {"CPU": 1.0}], 1, 0.0, 0.9, 0.25)
    # GPU actors cannot take a CPU-only node's CPUs; a GPU node's 8 CPUs go to its 8 GPU actors
    gpu_node, cpu_node = {"CPU": 8.0, "GPU": 8.0}, {"CPU": 4.0}
    assert not starve([gpu_node, cpu_node], 8, 1.0, 1.0, 0.25) and starve([gpu_node], 8, 1.0, 1.0, 0.25)
    assert not starve([gpu_node], 7, 1.0, 1.0, 0.25)


def test_evaluate_stops_with_an_error_when_the_pool_cannot_start(setup, ray_address, tmp_path):
    """The probe fits (one actor's resources), the pool of two does not: exit status 2, the error on
    stderr (not Ray Data's internal traceback), no prediction line written."""
    work, common, _ = setup
    # 45 s: the probe's worker imports torch and loads the model, slow on a loaded 2-core machine
    r = run_cli(*common, "--ray", ray_address, "--ray-actors", "2", "--ray-cpus-per-actor", "1.5",
                "--ray-start-timeout", "45", "--out", str(tmp_path / "run"), cwd=work)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error: the Ray cluster did not start the model actors within 45 s" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "open an issue" not in r.stderr, r.stderr[-3000:]
    predictions = tmp_path / "run" / "predictions.jsonl"
    assert not predictions.exists() or predictions.read_text() == ""


def test_the_start_timeout_option_is_a_finite_positive_number_of_seconds():
    parser = argparse.ArgumentParser()
    distributed.add_ray_arguments(parser)
    assert distributed.options_from_args(parser.parse_args(["--ray"])).start_timeout == 1800  # model loads included
    assert distributed.options_from_args(parser.parse_args(["--ray", "--ray-start-timeout", "90"])).start_timeout == 90
    for value in ("0", "-5", "nan", "inf"):
        with pytest.raises(ValueError, match="--ray-start-timeout"):
            distributed.options_from_args(parser.parse_args(["--ray", "--ray-start-timeout", value]))
    from backend import preannotate

    with pytest.raises(SystemExit) as exit_:  # the command refuses it before connecting anywhere
        preannotate.parse_args(["--project", "1", "--ray", "--ray-start-timeout", "0"])
    assert exit_.value.code == 2


def test_evaluate_refuses_a_bad_ray_option_before_reading_the_dataset(tmp_path, capsys, monkeypatch):
    """`hybridgl evaluate` checked the --ray-* values only after loading the dataset (minutes for a
    large split), and a missing dataset was the error reported instead: they are checked first."""
    from hybridgl import cli
    from hybridgl.evaluation import datasets

    def no_reading(*args, **kwargs):
        raise AssertionError("the dataset was read before the --ray options were checked")

    monkeypatch.setattr(datasets, "load_dataset", no_reading)
    status = cli.main(["evaluate", "--dataset", "refcoco", "--split", "val", "--data-root", str(tmp_path / "absent"),
                       "--out", str(tmp_path / "run"), "--ray", "--ray-cpus-per-actor", "-1"])
    err = capsys.readouterr().err
    assert status == 2 and "--ray-cpus-per-actor must be a finite number" in err, err
    assert "absent" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("scoring", [["--predictions", "run/predictions.jsonl"], ["--label-studio-export", "x.json"]])
def test_evaluate_refuses_ray_where_no_model_runs(scoring, tmp_path, capsys, monkeypatch):
    """Scoring existing predictions (--predictions, --label-studio-export) runs no model, so --ray was
    ignored without a word: a user asking for a cluster run got a local rescoring."""
    from hybridgl import cli

    monkeypatch.chdir(tmp_path)
    status = cli.main(["evaluate", *scoring, "--out", str(tmp_path / "scored"), "--ray"])
    err = capsys.readouterr().err
    assert status == 2 and f"--ray has no effect with {scoring[0]}" in err, err
    assert not (tmp_path / "scored").exists()


def _visible_gpus(model, item: int, loaded: int):
    return model


def test_an_actor_given_no_gpu_sees_none(ray_address):
    """Ray >= 2.60 leaves CUDA_VISIBLE_DEVICES as the node has it for an actor given no GPU, so the
    model's default device would be GPU 0 outside Ray's accounting: our actors hide the GPUs."""
    options = distributed.RayOptions(actors=1, cpus_per_actor=0.5)
    results = list(distributed.run_grouped([1], _identity, lambda: os.environ.get("CUDA_VISIBLE_DEVICES"),
                                           _visible_gpus, options))
    assert [(r.value, r.error) for r in results] == [("", None)]
