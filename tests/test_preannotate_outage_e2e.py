"""`python -m backend.preannotate` when a real Label Studio 1.23.2 goes away mid-run: it waits for it
(bounded), resumes when it is back, and otherwise stops with exit status 3 and a clear message; a
rerun finishes the rest, never posting a prediction twice and never marking a task failed for it."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from harness import LabelStudio, require_label_studio  # noqa: E402
from serve_tiny import command_environment  # noqa: E402
from test_preannotate_e2e import finish, new_project, predictions_by_task, preannotate, summary_of  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_label_studio()
    work = tmp_path_factory.mktemp("outage")
    env = command_environment(work, work / "model-dir")
    ls = LabelStudio(work)
    try:
        yield ls, env
    finally:
        ls.stop()


def stop_after_first_batch(ls: LabelStudio, project: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(ls.api("GET", f"/api/predictions?project={project}")) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before Label Studio could go away"
    ls.stop()


def test_label_studio_restarting_mid_run_is_waited_for(stack):
    ls, env = stack
    project, good, _ = new_project(ls, broken=False)
    proc = preannotate(ls, env, project, "--batch", "2", "--no-progress", "--retry-for", "400", wait=False)
    try:
        stop_after_first_batch(ls, project, proc)
        time.sleep(2)  # the run now meets a Label Studio that is away
    finally:
        ls.restart()
    rc, out, err = finish(proc, 400)
    assert rc == 0, err[-3000:]
    s = summary_of(out)
    assert (s["done"], s["failed"], s["label_studio_gone"]) == (20, 0, None), s
    assert "does not answer: retrying" in err + out and "answers again" in err + out
    assert {t: len(p) for t, p in predictions_by_task(ls, project).items()} == {t: 1 for t in good}


def test_label_studio_gone_past_the_retry_window_stops_with_status_3_and_a_rerun_finishes(stack):
    ls, env = stack
    project, good, _ = new_project(ls, broken=False)
    proc = preannotate(ls, env, project, "--batch", "2", "--no-progress", "--retry-for", "5", wait=False)
    try:
        stop_after_first_batch(ls, project, proc)
        rc, out, err = finish(proc, 120)
    finally:
        ls.restart()
    assert rc == 3, err[-3000:]
    s = summary_of(out)
    # Label Studio held the first batch's predictions when it was stopped, but may have gone before
    # answering that POST: the run then counts those tasks as not reached (the rerun skips them)
    assert s["failed"] == 0 and s["label_studio_gone"] and s["done"] < 20, s
    assert s["done"] + s["not_reached"] == 20, s
    assert "did not answer for 5 s" in err and "rerun" in err and "refused" not in out + err
    rc, out, err = preannotate(ls, env, project, "--no-progress")
    assert rc == 0, err[-3000:]
    s = summary_of(out)
    assert s["failed"] == 0 and s["done"] + s["skipped"] == 20, s
    assert {t: len(p) for t, p in predictions_by_task(ls, project).items()} == {t: 1 for t in good}
