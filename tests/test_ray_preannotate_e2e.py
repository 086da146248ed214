"""End to end: `python -m backend.preannotate --ray ADDRESS` on a real Label Studio 1.23.2, the model
actors on a local Ray cluster (127.0.0.1) started by this module.

The Ray run must post what the single-process run posts (same masks, scores, model_version, the
same failures), add nothing when run again, and post every prediction exactly once when a model
actor is killed mid-run.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from ray_local import driver_environment, model_actor_pids, ray_address  # noqa: F401 (ray_address: a fixture)
from test_preannotate_e2e import finish, new_project, preannotate, predictions_by_task, stack, summary_of  # noqa: F401

pytestmark = pytest.mark.e2e

RAY = ["--ray-actors", "2", "--ray-cpus-per-actor", "0.5"]


def preannotate_on_ray(ls, env: dict, project: int, *extra: str, timeout: float = 900):
    """The command with --ray: besides the run, it starts 2 actors and asks a worker for the version,
    each loading the models (slow on a busy 2-core machine)."""
    return finish(preannotate(ls, env, project, *extra, wait=False), timeout)


def masks_and_scores(ls, project: int, tasks: list[int]) -> list[tuple]:
    """Per task, in import order: (model_version, score, RLE) of its one prediction."""
    preds = predictions_by_task(ls, project)
    out = []
    for task in tasks:
        (pred,) = preds[task]
        regions = [(r["value"]["rle"], r["original_width"]) for r in pred["result"]]  # none for a failure
        out.append((pred["model_version"], pred["score"], regions))
    return out


def test_ray_run_posts_what_the_single_process_run_posts(stack, ray_address):
    ls, _, env, _ = stack
    single, good_single, bad_single = new_project(ls)
    rc, out, err = preannotate(ls, env, single, "--no-progress")
    env = driver_environment(env)
    assert rc == 1, err[-3000:]
    expected = summary_of(out)

    project, good, bad = new_project(ls)
    rc, out, err = preannotate_on_ray(ls, env, project, "--batch", "4", "--ray", ray_address, *RAY)
    assert rc == 1, err[-3000:]  # the two broken tasks failed, as single-process
    s = summary_of(out)
    for key in ("model_version", "total", "done", "predictions", "skipped", "failed", "failed_by_kind",
                "prepared_images"):
        assert s[key] == expected[key], (key, s, expected)
    assert s["prepared_images"] == 5  # one SAM pass per image, on whichever actor
    # the same reasons, up to the numbers (task and project ids, ports) of the other project
    assert [re.sub(r"\d+", "N", s["failures"][str(t)]) for t in bad] == \
        [re.sub(r"\d+", "N", expected["failures"][str(t)]) for t in bad_single]
    assert "ETA" in err or "task/s" in err or "s/task" in err  # the driver's progress bar
    assert masks_and_scores(ls, project, good + bad) == masks_and_scores(ls, single, good_single + bad_single)

    rc, out, err = preannotate_on_ray(ls, env, project, "--no-progress", "--ray", ray_address, *RAY)
    s = summary_of(out)  # a rerun posts nothing (the broken tasks hold their failure predictions)
    assert (rc, s["done"], s["predictions"], s["skipped"], s["failed"], s["prepared_images"]) == (0, 0, 0, 22, 0, 0), s
    assert {t: len(p) for t, p in predictions_by_task(ls, project).items()} == {t: 1 for t in good + bad}


def test_a_killed_model_actor_loses_and_repeats_nothing(stack, ray_address):
    ls, _, env, _ = stack
    project, good, _ = new_project(ls, broken=False)
    env = driver_environment(env)
    proc = preannotate(ls, env, project, "--batch", "1", "--no-progress", "--ray", ray_address, *RAY, wait=False)
    killed = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and killed is None:
            if ls.api("GET", f"/api/predictions?project={project}"):  # results are flowing: kill an actor
                pids = model_actor_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed = pids[0]
            time.sleep(0.1)
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed is not None, "no model actor was found to kill while the run was going"
    assert proc.returncode == 0, err[-3000:]
    s = summary_of(out)
    assert (s["done"], s["predictions"], s["failed"]) == (20, 20, 0), s
    assert {t: len(p) for t, p in predictions_by_task(ls, project).items()} == {t: 1 for t in good}
