"""`python -m backend.preannotate --ray ADDRESS` when a real Label Studio 1.23.2 goes away while the
Ray workers fetch its images: the driver waits for it (bounded, --retry-for), has the tasks whose
images could not be fetched predicted again once it is back, and otherwise stops with exit status 3;
a rerun finishes the rest. Every prediction is posted exactly once, no task is marked failed for it.

Label Studio is stopped as soon as the driver has listed the tasks (its "to do over N images" line),
so the workers' downloads meet a Label Studio that is away (they say "unreachable" for each task).
"""
from __future__ import annotations

import subprocess
import threading
import time

import pytest

from ray_local import driver_environment, ray_address  # noqa: F401 (ray_address: a fixture)
from test_preannotate_e2e import new_project, preannotate, predictions_by_task, summary_of
from test_preannotate_outage_e2e import stack  # noqa: F401 (a fixture)
from test_ray_preannotate_e2e import RAY, preannotate_on_ray

pytestmark = pytest.mark.e2e


class Watched:
    """A started command whose output is read as it comes (`listed` is set once the tasks are listed)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.out, self.err = proc, [], []
        self.listed = threading.Event()
        self.readers = [threading.Thread(target=self._read, args=(proc.stdout, self.out), daemon=True),
                        threading.Thread(target=self._read, args=(proc.stderr, self.err), daemon=True)]
        for r in self.readers:
            r.start()

    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            if " to do over " in line:
                self.listed.set()

    def finish(self, timeout: float) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(30)
        for r in self.readers:
            r.join(30)
        return self.proc.returncode, "".join(self.out), "".join(self.err)


def stop_once_listed(ls, run: Watched) -> None:
    assert run.listed.wait(600), f"the driver did not list the tasks: {''.join(run.err)[-3000:]}"
    ls.stop()


def test_label_studio_away_while_the_workers_fetch_is_waited_for_and_its_tasks_redone(stack, ray_address):
    ls, env = stack
    project, good, _ = new_project(ls, broken=False)
    run = Watched(preannotate(ls, driver_environment(env), project, "--batch", "2", "--no-progress",
                              "--retry-for", "400", "--ray", ray_address, *RAY, wait=False))
    try:
        stop_once_listed(ls, run)
        # the workers' downloads meet the Label Studio that is away, then the driver finds it away
        # and waits: Label Studio comes back only then (sooner, the driver would not have to wait)
        for said in ("unreachable: could not reach", "does not answer: retrying"):
            deadline = time.time() + 300
            while not any(said in line for line in list(run.err) + list(run.out)):
                assert time.time() < deadline and run.proc.poll() is None, "".join(run.err)[-3000:]
                time.sleep(0.2)
    finally:
        ls.restart()
    rc, out, err = run.finish(900)
    assert rc == 0, err[-3000:]
    s = summary_of(out)
    assert (s["done"], s["predictions"], s["failed"], s["label_studio_gone"]) == (20, 20, 0, None), s
    assert "does not answer: retrying" in err + out and "answers again" in err + out
    assert {t: len(p) for t, p in predictions_by_task(ls, project).items()} == {t: 1 for t in good}


def test_label_studio_gone_past_the_retry_window_exits_3_and_a_rerun_finishes(stack, ray_address):
    ls, env = stack
    project, good, _ = new_project(ls, broken=False)
    env = driver_environment(env)
    run = Watched(preannotate(ls, env, project, "--batch", "2", "--no-progress", "--retry-for", "5",
                              "--ray", ray_address, *RAY, wait=False))
    try:
        stop_once_listed(ls, run)
        rc, out, err = run.finish(900)
    finally:
        ls.restart()
    assert rc == 3, err[-3000:]
    s = summary_of(out)
    assert s["failed"] == 0 and s["label_studio_gone"] and s["done"] + s["not_reached"] == 20, s
    assert "did not answer for 5 s" in err and "rerun" in err
    rc, out, err = preannotate_on_ray(ls, env, project, "--no-progress", "--ray", ray_address, *RAY)
    assert rc == 0, err[-3000:]
    s = summary_of(out)
    assert s["failed"] == 0 and s["done"] + s["skipped"] == 20, s
    assert {t: len(p) for t, p in predictions_by_task(ls, project).items()} == {t: 1 for t in good}
