"""Pre-annotate a whole Label Studio project with HybridGL, outside Label Studio's 100 s request limit.

    python -m backend.preannotate --url http://localhost:8080 --api-key KEY --project 3 \\
        [--batch 50] [--limit N] [--report DIR] [--sampling uncertainty] [--keep-project-version]
        [--unreviewed]

Pages through the project's tasks (label-studio-sdk), skips those already holding a prediction of
this backend's model_version for the project's labelling config (labeling.config_version: an edit of
its tags or label makes another), groups the rest by image (one SAM pass per image: the backend's
prepared-image cache serves its other expressions), runs HybridGL and posts the predictions with
that version through Label Studio's API, one batch at a time. A failing task
(missing image, no expression, ...) is reported and skipped; an interrupted run loses at most one
batch of work, and rerunning it finishes the rest without duplicates. A task whose image or
expression is unusable gets an empty prediction scored 0 (it sorts first for review). At the end
the project's model_version is set to this one (and, with --sampling, its task sampling), so that
Label Studio's score column, review queue and pre-filled masks read these predictions.
When Label Studio goes away mid-run (a restart), the run waits for it with backoff for --retry-for
seconds (default 300), then resumes; past that it stops with exit status 3 and rerunning it later
finishes the rest. With --ray too: tasks whose images the workers could not fetch while it was away
are predicted again once it is back. With --ray, model actors that do not start within
--ray-start-timeout (the cluster has no room for them) stop the run with exit status 2, the
predictions made before that posted. So does a device failure in this process (a sticky CUDA error,
after which every later task would fail): the task it happened on is not marked failed but left,
with the rest, for the rerun (with --ray the model actor exits instead and Ray redoes its image).

Configuration is the backend's (the same environment variables: HYBRIDGL_*, DEVICE, MODEL_DIR,
LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, ...); --url/--api-key override the Label Studio ones.

--report DIR writes scores.csv (our tasks by ascending score, with the margin to the runner-up)
and score_histogram.png, to review the least confident predictions first. --unreviewed leaves
every task a person has annotated alone: after `python -m hybridgl tune`, the tuned model (a new
model_version) re-predicts only what nobody has reviewed yet.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from hybridgl.distributed import DeviceFailure, RayUnavailable, add_ray_arguments, options_from_args
from hybridgl.prefetch import prefetch

from . import logsafe
from .labeling import Interface, TaskError, config_version, parse_config
from .reconnect import CONNECTION_KINDS, LabelStudioGone, Reconnect, is_connection_error, label_studio_up
from .settings import Settings, SettingsError

log = logging.getLogger("backend.preannotate")

EXIT_LABEL_STUDIO_GONE = 3


@dataclass
class Row:
    """One task of the report."""

    task_id: int
    image: str
    expression: str
    score: float | None
    margin: float | None
    status: str  # predicted | existing | failed
    reason: str = ""


@dataclass
class Summary:
    total: int = 0
    done: int = 0  # tasks that got predictions in this run
    predictions: int = 0  # predictions posted in this run
    skipped: int = 0  # tasks that already held a prediction of this model_version
    reviewed: int = 0  # tasks left alone because a person annotated them (--unreviewed)
    failed: dict[int, str] = field(default_factory=dict)  # task id -> "kind: message"
    not_reached: int = 0  # left for a later run (--limit, interruption)
    prepared_images: int = 0  # SAM passes (distinct images computed)
    interrupted: bool = False
    gone: str = ""  # why the run stopped early: Label Studio did not come back within --retry-for
    stopped: str = ""  # why the run stopped early: the model cannot run (--ray actors did not start, GPU failed)
    seconds: float = 0.0
    model_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        kinds = Counter(reason.split(":", 1)[0] for reason in self.failed.values())
        return {"model_version": self.model_version, "total": self.total, "done": self.done,
                "predictions": self.predictions, "skipped": self.skipped, "reviewed": self.reviewed,
                "failed": len(self.failed),
                "failed_by_kind": dict(kinds), "failures": {str(k): v for k, v in self.failed.items()},
                "not_reached": self.not_reached, "prepared_images": self.prepared_images,
                "interrupted": self.interrupted, "label_studio_gone": self.gone or None,
                "stopped": self.stopped or None,
                "seconds": round(self.seconds, 2)}


# -- Label Studio ---------------------------------------------------------------------------------
def _as_dict(item: Any) -> dict:
    if isinstance(item, dict):
        return item
    for name in ("model_dump", "dict"):
        if hasattr(item, name):
            return getattr(item, name)()
    return dict(item)


class UnsupportedLabelStudio(RuntimeError):
    """Label Studio answers, but not as the run needs (too old, or a proxy rewrote the request)."""


def iter_tasks(ls, project: int, page_size: int) -> Iterator[dict]:
    """Every task of the project with its predictions (fields=all), page by page, by ascending id.

    Each page is the first page of the tasks after the last id read (a Data Manager filter), not
    the next page by offset: tasks deleted meanwhile would shift the later pages and leave as many
    others unread. The list ends at an empty page (Label Studio may cap page_size)."""
    last = 0
    while True:
        query = {"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": last}]},
            "ordering": ["tasks:id"]}
        pager = ls.tasks.list(project=project, page=1, page_size=page_size, fields="all", query=json.dumps(query))
        items = [_as_dict(t) for t in (pager.items or [])]
        if not items:
            return
        ids = [t.get("id") for t in items]
        if not all(isinstance(i, int) and i > last for i in ids):  # else the same page would come forever
            raise UnsupportedLabelStudio(f"Label Studio ignored the filter on task ids when listing project "
                                         f"{project}'s tasks (its Data Manager query): cannot page through them")
        yield from items
        last = max(ids)


def has_prediction(task: dict, model_version: str) -> bool:
    return any(_as_dict(p).get("model_version") == model_version for p in task.get("predictions") or [])


def existing_score(task: dict, model_version: str) -> float | None:
    scores = [_as_dict(p).get("score") for p in task.get("predictions") or []
              if _as_dict(p).get("model_version") == model_version]
    scores = [float(s) for s in scores if isinstance(s, (int, float))]
    return max(scores) if scores else None


def post_predictions(ls, project: int, items: list[tuple[int, dict]], summary: Summary,
                     stored_after: Callable[[BaseException, list[int], str], set[int]], bulk: bool = True) -> set[int]:
    """Post [(task id, prediction)]: one bulk import, else (or with bulk=False) one by one (to
    report the bad one). Returns the task ids whose predictions were not stored. A connection error
    of the bulk import is raised (the caller waits for Label Studio); one while posting one by one is
    waited for here: stored_after(error, task ids, model_version) waits for Label Studio to be back
    and says which of the tasks hold a prediction of that version. A prediction whose post drops the
    connection POST_ATTEMPTS times, Label Studio answering in between, is reported failed."""
    if not items:
        return set()
    if bulk:
        dropped = _import(ls, project, items, summary)
        if dropped is not None:
            return dropped
    failed: set[int] = set()
    for t, p in items:
        for _ in range(POST_ATTEMPTS):  # posted again after an outage, unless stored before its answer was lost
            try:
                ls.predictions.create(task=t, result=p["result"], score=p["score"], model_version=p["model_version"])
            except Exception as exc:  # noqa: BLE001 - reported for that task
                if not is_connection_error(exc):
                    failed.add(t)
                    summary.failed[t] = f"post: Label Studio refused the prediction ({exc.__class__.__name__}: " \
                                        f"{str(exc)[:200]})"
                    break
                if t not in stored_after(exc, [t], p["model_version"]):
                    lost = exc
                    continue
            summary.predictions += 1
            break
        else:
            failed.add(t)
            summary.failed[t] = f"post: the connection dropped {POST_ATTEMPTS} times posting this prediction while " \
                                f"Label Studio answered in between ({lost.__class__.__name__}: {str(lost)[:200]}); " \
                                "a rerun tries it again"
    return failed


def _import(ls, project: int, items: list[tuple[int, dict]], summary: Summary) -> set[int] | None:
    """One bulk import: the task ids whose predictions Label Studio left out, or None when it refused
    the import (post them one by one). A connection error is raised."""
    body = [{"task": t, "result": p["result"], "score": p["score"], "model_version": p["model_version"]}
            for t, p in items]
    try:
        created = getattr(ls.projects.import_predictions(project, request=body), "created", None)
    except Exception as exc:  # noqa: BLE001 - retried one by one
        if is_connection_error(exc):  # Label Studio is away: not the predictions' fault (the caller waits)
            raise
        log.warning("bulk import of %d predictions failed (%s); posting one by one", len(items), exc)
        return None
    if not isinstance(created, int) or created >= len(items):
        summary.predictions += len(items)
        return set()
    # Label Studio answered 201 but left out the predictions its labelling config rejects (edited mid-run?)
    held: dict[int, set] = {}
    dropped: set[int] = set()
    for t, p in items:
        if t not in held:
            held[t] = posted_versions(ls, t)
        if p["model_version"] not in held[t]:
            dropped.add(t)
            summary.failed[t] = "post: Label Studio did not store the prediction (does it still match the " \
                                "project's labelling config?)"
    summary.predictions += created
    return dropped


# -- the run ----------------------------------------------------------------------------------------
def margin_of(segmentation) -> float | None:
    """Score of the best candidate minus the runner-up's (small: the choice was close)."""
    if segmentation is None or not segmentation.ranking:
        return None
    scores = [float(r["score"]) for r in segmentation.ranking[:2]]
    return scores[0] - (scores[1] if len(scores) > 1 else 0.0)


def _image_key(task: dict, interface: Interface) -> str:
    url = (task.get("data") or {}).get(interface.image_field) if isinstance(task.get("data"), dict) else None
    return url if isinstance(url, str) else f"\0{task.get('id')}"


def group_by_image(tasks: Sequence[dict], interface: Interface) -> list[dict]:
    """Tasks ordered so that those sharing an image are consecutive (first appearance order)."""
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for task in tasks:
        groups.setdefault(_image_key(task, interface), []).append(task)
    return [t for group in groups.values() for t in group]


def is_reviewed(task: dict) -> bool:
    """A person has submitted an annotation (not a skip) for the task."""
    annotations = [_as_dict(a) for a in task.get("annotations") or []]
    return any(not a.get("was_cancelled") for a in annotations) or bool(task.get("total_annotations"))


# After a bulk import whose answer timed out (the request reached Label Studio, which may still be
# storing it), what it stored is checked for up to this long before the batch is posted again.
SETTLE_SECONDS, SETTLE_POLL = 60.0, 5.0
# A post that drops the connection this often, Label Studio answering in between, fails for its body
# (a worker crashing on it behind a proxy), not for an outage: it is not posted again and again.
POST_ATTEMPTS = 3


def is_answer_timeout(exc: BaseException) -> bool:
    """The request was sent but its answer did not come in time (not a refused or broken connection)."""
    import httpx

    return isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout))


def posted_versions(ls, task_id: int) -> set:
    """The model versions of the predictions Label Studio holds for a task."""
    return {_as_dict(p).get("model_version") for p in ls.predictions.list(task=task_id)}


def already_posted(ls, task_id: int, model_version: str) -> bool:
    """Whether Label Studio holds a prediction of `model_version` for the task (an import whose answer was lost)."""
    return model_version in posted_versions(ls, task_id)


def stored_tasks(ls, ids: list[int], model_version: str, settle_until: float) -> set[int]:
    """The tasks among `ids` that hold a prediction of `model_version`, asked again every SETTLE_POLL
    seconds until all do or time.monotonic() reaches `settle_until`."""
    while True:
        stored = {t for t in ids if already_posted(ls, t, model_version)}
        if len(stored) == len(ids) or time.monotonic() >= settle_until:
            return stored
        time.sleep(SETTLE_POLL)


def run(backend, ls, project: int, batch: int = 50, limit: int | None = None, report: Path | None = None,
        progress: bool = True, out=sys.stdout, set_version: bool = True, sampling: str | None = None,
        unreviewed: bool = False, retry_for: float = 300.0, predict=None) -> Summary:
    """Pre-annotate `project` with `backend` (a HybridGLBackend) through `ls` (a label_studio_sdk client),
    then make it ready for review (see `ready_for_review`; set_version=False leaves its version alone).
    unreviewed: leave the tasks a person annotated alone (re-predicting after `hybridgl tune`).
    retry_for: seconds to wait for a Label Studio that stopped answering before giving up (Summary.gone).
    predict(tasks, interface) -> iterator of (task, TaskOutcome), in any order: where the model runs
    (default: `backend.predict_task` in this process; `--ray`: ray_preannotate.RayBackend.predict_stream)."""
    from tqdm import tqdm

    started = time.time()
    config = _as_dict(ls.projects.get(id=project)).get("label_config")
    interface = parse_config(config)  # TaskError("config") when the project cannot be pre-annotated
    # the version of the predictions (the backend's /predict gives them the same): it changes with
    # the parts of the config they depend on, so that a rerun after such an edit predicts again
    version = config_version(backend.model_version, interface)
    summary = Summary(model_version=version)
    # only what the run needs is kept: not the predictions' and annotations' masks (memory)
    tasks = [{"id": t.get("id"), "data": t.get("data"),
              "predictions": [{"model_version": _as_dict(p).get("model_version"), "score": _as_dict(p).get("score")}
                              for p in t.get("predictions") or []],
              "reviewed": is_reviewed(t)}
             for t in iter_tasks(ls, project, max(batch, 1))]
    summary.total = len(tasks)
    rows: dict[int, Row] = {}
    todo = []
    for task in tasks:
        if unreviewed and task["reviewed"]:
            summary.reviewed += 1
        elif has_prediction(task, version):
            summary.skipped += 1
            data = task.get("data") or {}
            rows[task["id"]] = Row(task["id"], str(data.get(interface.image_field, "")),
                                   str(data.get(interface.text_field, "") if interface.text_field else ""),
                                   existing_score(task, version), None, "existing")
        else:
            todo.append(task)
    todo = group_by_image(todo, interface)
    if limit is not None:
        summary.not_reached = max(len(todo) - limit, 0)
        todo = todo[:limit]
    print(f"project {project}: {summary.total} tasks, {summary.skipped} already pre-annotated by "
          f"{version}, " + (f"{summary.reviewed} reviewed left alone, " if unreviewed else "")
          + f"{len(todo)} to do over {len({_image_key(t, interface) for t in todo})} "
          "images", file=out, flush=True)
    connections = backend.connections_for()
    bar = tqdm(total=len(todo), unit="task", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    pending: list[tuple[int, dict]] = []
    pending_rows: list[Row] = []
    reconnect = Reconnect(lambda: label_studio_up(ls, project), retry_for, say=bar.write)

    def stored_after(exc: BaseException, ids: list[int], model_version: str) -> set[int]:
        """Once Label Studio is back from the outage `exc` met, the tasks among `ids` holding a prediction
        of `model_version`: a post may have been stored before its answer was lost (never post it
        twice); one whose answer timed out may still be running there: give it time to land."""
        settle = time.monotonic() + (SETTLE_SECONDS if is_answer_timeout(exc) else 0.0)
        for _ in range(POST_ATTEMPTS):  # (Label Studio may drop again while its predictions are checked)
            reconnect.until_back()
            try:
                return stored_tasks(ls, ids, model_version, settle)
            except Exception as again:
                if not is_connection_error(again):
                    raise
                exc = again
        # unknown what was stored, so nothing may be posted again: stop as for an outage (a rerun finishes)
        raise LabelStudioGone(f"Label Studio answers, but reading the tasks' predictions dropped the connection "
                              f"{POST_ATTEMPTS} times ({exc.__class__.__name__}: {str(exc)[:200]})")

    def flush() -> None:
        with _whole(bar.write):
            _flush()

    def _flush() -> None:
        drops = 0  # of this batch's bulk import: past POST_ATTEMPTS it is posted one by one (a bad body)
        while True:
            try:
                refused = post_predictions(ls, project, pending, summary, stored_after, bulk=drops < POST_ATTEMPTS)
                break
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                drops += 1
                stored = stored_after(exc, list(dict.fromkeys(t for t, _ in pending)), version)
                summary.predictions += sum(t in stored for t, _ in pending)
                pending[:] = [(t, p) for t, p in pending if t not in stored]
        for row in pending_rows:
            if row.task_id in refused:
                row.status, row.reason, row.score, row.margin = "failed", summary.failed[row.task_id], None, None
            else:
                summary.done += 1
            rows[row.task_id] = row
        pending.clear()
        pending_rows.clear()

    processed = 0
    misses_before = backend.counters.snapshot().get("cache.misses", 0)

    def direct(url, task_id) -> bytes:
        return backend.fetch(url, task_id, connections)

    last: list = [None, None]  # (url, bytes) of the previous download: tasks come grouped by image

    def download(task: dict) -> bytes:
        url = task["data"][interface.image_field]
        if last[0] != url:
            last[:] = [url, direct(url, task.get("id"))]
        return last[1]

    def predict_here(tasks: list[dict], interface: Interface) -> Iterator[tuple[dict, Any]]:
        # the next images download while the model works on this one (bounded: `depth` ahead)
        for task, ahead in prefetch(tasks, download, depth=2):
            fetch, fetched_ahead = (lambda url, tid: ahead.result()), True
            while True:  # a task failing because Label Studio is away is retried once it is back
                outcome = backend.predict_task(task, interface, fetch=fetch)
                if outcome.ok or outcome.error.kind not in CONNECTION_KINDS:
                    break
                if fetched_ahead:  # it may have been downloaded while Label Studio was away: try now
                    fetch, fetched_ahead = direct, False
                    continue
                if reconnect.up():
                    break
                reconnect.until_back()
            yield task, outcome

    outcomes = redo_when_back(predict, todo, interface, reconnect) if predict else predict_here(todo, interface)
    try:
        for task, outcome in outcomes:
            data = task.get("data") if isinstance(task.get("data"), dict) else {}
            image = str(data.get(interface.image_field, ""))
            expression = outcome.expression or str(data.get(interface.text_field, "") if interface.text_field else "")
            # best mask last: Label Studio's editor lists the most recent prediction first
            # not the alternatives an interrupted run already posted (one by one) before the best mask
            held = {p.get("model_version") for p in task.get("predictions") or []}
            pending.extend((task["id"], p) for p in outcome.predictions[::-1] if p["model_version"] not in held)
            if outcome.ok:
                pending_rows.append(Row(task["id"], image, expression, outcome.predictions[0]["score"],
                                        margin_of(outcome.segmentation), "predicted"))
            else:
                reason = f"{outcome.error.kind}: {outcome.error}"
                summary.failed[task["id"]] = reason
                rows[task["id"]] = Row(task["id"], image, expression, 0.0 if outcome.predictions else None,
                                       None, "failed", reason)
                bar.write(f"task {task['id']}: failed: {reason}")
            processed += 1
            if len(dict.fromkeys(t for t, _ in pending)) >= batch:  # failed tasks' score-0 predictions too
                flush()
            bar.update(1)
            bar.set_postfix(done=summary.done + len(pending_rows), failed=len(summary.failed), refresh=False)
        flush()
    except KeyboardInterrupt:
        summary.interrupted = True
        summary.not_reached += len(todo) - processed + len(pending_rows)
        bar.write("interrupted: the current batch was not posted; rerun the same command to finish")
    except LabelStudioGone as exc:
        summary.gone = str(exc)
        summary.not_reached += len(todo) - processed + len(pending_rows)
    except (RayUnavailable, DeviceFailure) as exc:
        # --ray: the model actors did not start (RayStartTimeout) or got stuck (RayStalled); in this
        # process: the GPU failed (a sticky CUDA error), so every later task would fail too
        summary.stopped = str(exc)
        try:
            flush()  # the predictions that came back are posted: the rerun does only the rest
        except LabelStudioGone as gone:
            summary.gone = str(gone)
        summary.not_reached += len(todo) - processed + len(pending_rows)
    finally:
        bar.close()
    reachable = not summary.gone  # else Label Studio is away: the rerun makes the project ready
    if reachable and (summary.skipped or summary.predictions):  # LS accepts only a version it holds predictions of
        ready_for_review(ls, project, version if set_version else None, sampling, out)
    elif reachable and sampling:
        print("no prediction of this version in the project: sampling left unchanged", file=out)
    summary.seconds = time.time() - started
    summary.prepared_images = backend.counters.snapshot().get("cache.misses", 0) - misses_before
    if report is not None:
        write_report(report, list(rows.values()), version)
        print(f"report: {report / 'scores.csv'}, {report / 'score_histogram.png'}", file=out)
    print_summary(summary, out)
    return summary


def redo_when_back(predict, tasks: list[dict], interface: Interface,
                   reconnect: Reconnect) -> Iterator[tuple[dict, Any]]:
    """The outcomes of `predict` (a stream whose images are fetched elsewhere: --ray), except that the
    tasks that failed because Label Studio was away are predicted again once `reconnect` finds it
    back (or LabelStudioGone ends the run: they were not reached). A task failing so a second time
    while Label Studio answers keeps its failure (its image host, not Label Studio, is unreachable)."""
    tried: set = set()
    while tasks:
        again = []
        for task, outcome in predict(tasks, interface):
            if outcome.ok or outcome.error.kind not in CONNECTION_KINDS or \
                    (task.get("id") in tried and reconnect.up()):
                yield task, outcome
            else:
                again.append(task)
        if again and not reconnect.up():
            reconnect.until_back()
        tried.update(t.get("id") for t in again)
        tasks = again


SAMPLING = {"sequential": "Sequential sampling", "uniform": "Uniform sampling", "uncertainty": "Uncertainty sampling"}


def ready_for_review(ls, project: int, model_version: str | None, sampling: str | None, out) -> None:
    """Set the project's model_version (and its task sampling) through Label Studio's API.

    Label Studio's Data Manager score column averages only the predictions of the project's
    model_version, its Uncertainty sampling serves the lowest score among them first, and its
    editor pre-fills the prediction of that version: with our version there, every task shows its
    best mask's confidence. (Connect Model sets the version to the model's title, which matches none
    of the stored predictions.) A failure here is reported, not fatal: the predictions are posted.
    """
    fields: dict[str, str] = {}
    if model_version:
        fields["model_version"] = model_version
    if sampling:
        fields["sampling"] = SAMPLING[sampling]
    if not fields:
        return
    try:
        ls.projects.update(id=project, **fields)
    except Exception as exc:  # noqa: BLE001 - reported; the predictions are in place
        print(f"warning: could not set the project's {' and '.join(fields)} ({exc.__class__.__name__}: "
              f"{str(exc)[:200]}); set it in Settings -> Annotation", file=out)
        return
    print("project ready for review: " + ", ".join(f"{k} = {v}" for k, v in fields.items()), file=out)


def print_summary(summary: Summary, out) -> None:
    print(f"done: {summary.done} tasks ({summary.predictions} predictions, model_version "
          f"{summary.model_version}) in {summary.seconds:.1f} s; skipped (already pre-annotated): "
          f"{summary.skipped}; failed: {len(summary.failed)}"
          + (f"; reviewed, left alone: {summary.reviewed}" if summary.reviewed else "")
          + (f"; not reached: {summary.not_reached}" if summary.not_reached else "")
          + (" (interrupted)" if summary.interrupted else ""), file=out)
    if summary.gone:
        print(f"stopped: {summary.gone}; rerun the same command when it is back to finish the "
              f"{summary.not_reached} remaining tasks (nothing is posted twice)", file=out)
    if summary.stopped:
        print(f"stopped: {summary.stopped}; the {summary.not_reached} remaining tasks were not reached: rerun "
              "to finish them (nothing is posted twice)", file=out)
    for task_id, reason in sorted(summary.failed.items()):
        print(f"  failed task {task_id}: {logsafe.escape_controls(reason)}", file=out)  # the task's data: one line
    out.flush()


# -- the review report ------------------------------------------------------------------------------
def write_report(directory: Path, rows: list[Row], model_version: str, bins: int = 10) -> None:
    """scores.csv (ascending score: failures scored 0 first; tasks without a score last) and score_histogram.png."""
    directory.mkdir(parents=True, exist_ok=True)
    scored = sorted((r for r in rows if r.score is not None), key=lambda r: (r.score, r.task_id))
    unscored = sorted((r for r in rows if r.score is None), key=lambda r: r.task_id)
    with open(directory / "scores.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["task_id", "image", "expression", "score", "margin", "status", "reason"])
        for r in scored + unscored:
            w.writerow([r.task_id, r.image, r.expression, "" if r.score is None else f"{r.score:.6f}",
                        "" if r.margin is None else f"{r.margin:.6f}", r.status, r.reason])
    histogram_png(directory / "score_histogram.png", [r.score for r in scored], bins,
                  f"HybridGL scores ({model_version}), {len(scored)} tasks")


def histogram_png(path: Path, scores: Sequence[float], bins: int, title: str) -> None:
    """A plain bar chart of the scores over [0, 1] with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw

    counts = [0] * bins
    for s in scores:
        counts[min(int(max(s, 0.0) * bins), bins - 1)] += 1
    width, height, left, bottom, top = 640, 400, 50, 40, 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 12), title, fill="black")
    plot_w, plot_h = width - left - 20, height - top - bottom
    peak = max(counts) or 1
    bar_w = plot_w / bins
    for i, c in enumerate(counts):
        x0 = left + i * bar_w
        y0 = top + plot_h * (1 - c / peak)
        d.rectangle([x0 + 2, y0, x0 + bar_w - 2, top + plot_h], fill=(70, 130, 180))
        d.text((x0 + bar_w / 2 - 6, max(y0 - 14, top - 12)), str(c), fill="black")
        d.text((x0, top + plot_h + 6), f"{i / bins:.1f}", fill="black")
    d.text((left + plot_w - 10, top + plot_h + 6), "1.0", fill="black")
    d.line([left, top + plot_h, left + plot_w, top + plot_h], fill="black")
    d.line([left, top, left, top + plot_h], fill="black")
    d.text((left + plot_w // 2 - 20, height - 18), "score", fill="black")
    img.save(path)


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m backend.preannotate", description=__doc__.split("\n\n")[0],
                                 epilog="The model is configured like the backend: HYBRIDGL_*, DEVICE, MODEL_DIR.")
    ap.add_argument("--url", default=None, help="Label Studio URL (default $LABEL_STUDIO_URL)")
    ap.add_argument("--api-key", default=None,
                    help="Label Studio access token, legacy or personal (default $LABEL_STUDIO_API_KEY)")
    ap.add_argument("--project", type=int, required=True, help="Label Studio project id")
    ap.add_argument("--batch", type=int, default=50,
                    help="tasks per page read and per batch of predictions posted (default 50)")
    ap.add_argument("--limit", type=int, default=None, help="pre-annotate at most N tasks in this run")
    ap.add_argument("--report", type=Path, default=None, metavar="DIR",
                    help="write DIR/scores.csv (tasks by ascending score) and DIR/score_histogram.png")
    ap.add_argument("--keep-project-version", action="store_true",
                    help="do not make this model version the project's (to add a version beside the one "
                         "annotators see, and compare them); by default it is set, so that the Data Manager's "
                         "Prediction score column and Uncertainty sampling read these predictions")
    ap.add_argument("--sampling", choices=sorted(SAMPLING), default=None,
                    help="also set the project's task sampling; 'uncertainty': Label All Tasks serves the "
                         "unlabeled task with the lowest score first")
    ap.add_argument("--unreviewed", action="store_true",
                    help="only tasks no person has annotated yet (re-predicting after `hybridgl tune`)")
    ap.add_argument("--retry-for", type=float, default=300.0, metavar="SECONDS",
                    help="when Label Studio stops answering, wait this long for it (with backoff) before "
                         "stopping with exit status 3 (default 300)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    add_ray_arguments(ap)
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error("--batch must be at least 1")
    if args.limit is not None and args.limit < 0:
        ap.error("--limit must not be negative")
    try:
        args.ray_options = options_from_args(args)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _whole(say: Callable[[str], Any]) -> Iterator[None]:
    """A batch's post and its counting happen whole: Ctrl-C or SIGTERM arriving meanwhile ends the run
    right after it, not between Label Studio storing the predictions and the summary counting them
    (which then called them not reached). A second one stops at once (an outage wait can be long).
    Only signals that end the run by KeyboardInterrupt, and only in the main thread (Python's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ending = {sig: h for sig in (signal.SIGINT, signal.SIGTERM)
              if (h := signal.getsignal(sig)) in (signal.default_int_handler, _interrupt)}
    caught: list[int] = []

    def defer(sig: int, frame: Any) -> None:
        if caught:
            raise KeyboardInterrupt
        caught.append(sig)
        say("interrupted: finishing the batch being posted (again to stop at once)")

    for sig in ending:
        signal.signal(sig, defer)
    try:
        yield
    finally:
        for sig, handler in ending.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None, backend=None) -> int:
    """Exit status: 0 all done, 1 some tasks failed, 2 cannot run (with --ray also: the model actors
    did not start within --ray-start-timeout; without: the GPU failed mid-run; the predictions made
    before that posted), 3 Label
    Studio unreachable (for --retry-for seconds mid-run, or at the start): rerun later to finish,
    130 interrupted."""
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logsafe.install()  # task ids and image URLs from the project are logged: no forged lines, no secrets
    try:
        settings = backend.settings if backend is not None else Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = (args.url or settings.label_studio_url or "").rstrip("/")
    key = args.api_key or settings.label_studio_api_key
    if not url or not key:
        print("error: give --url and --api-key (or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)", file=sys.stderr)
        return 2
    settings = settings.replace(label_studio_url=url, label_studio_api_key=key)
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=url, api_key=key)
    # SIGTERM (docker stop, kill) ends the run like Ctrl-C: the summary is printed, nothing half-posted
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        parse_config(_as_dict(ls.projects.get(id=args.project)).get("label_config"))  # before loading models
        run_options = dict(batch=args.batch, limit=args.limit, report=args.report, progress=not args.no_progress,
                           set_version=not args.keep_project_version, sampling=args.sampling,
                           unreviewed=args.unreviewed, retry_for=args.retry_for)
        if args.ray_options is not None:  # the models load on the Ray workers, not in this process
            from .ray_preannotate import run_on_ray

            return _exit_status(run_on_ray(settings, args.ray_options, ls, args.project, **run_options), args.json, url)
        if backend is None:
            from ._wsgi import load_backend

            backend = load_backend(settings)  # the backend's own loader: same env, same model_version
        else:
            from .images import ImageFetcher

            backend.settings = settings
            backend.fetcher = ImageFetcher(settings)
        summary = run(backend, ls, args.project, **run_options)
    except TaskError as exc:
        print(f"error: project {args.project}: {exc}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RayUnavailable, UnsupportedLabelStudio) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before pre-annotation started", file=sys.stderr)
        return 130
    except Exception as exc:  # Label Studio unreachable or refusing: say so, no traceback
        from label_studio_sdk.core.api_error import ApiError

        if is_connection_error(exc):
            print(f"error: Label Studio at {url} is unreachable ({exc.__class__.__name__}: {exc}); "
                  "rerun when it is back", file=sys.stderr)
            return EXIT_LABEL_STUDIO_GONE
        if isinstance(exc, ApiError):
            print(f"error: Label Studio at {url} answered HTTP {exc.status_code}: {str(exc.body)[:300]}",
                  file=sys.stderr)
            return 2
        import httpx

        if isinstance(exc, httpx.HTTPError):
            print(f"error: Label Studio at {url}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
            return 2
        raise
    return _exit_status(summary, args.json, url)


def _exit_status(summary: Summary, as_json: bool, url: str) -> int:
    if as_json:
        print(json.dumps(summary.to_dict()))
    if summary.interrupted:
        return 130
    if summary.gone:
        print(f"error: {summary.gone} (Label Studio at {url}): stopped, rerun to finish", file=sys.stderr)
        return EXIT_LABEL_STUDIO_GONE
    if summary.stopped:
        print(f"error: {summary.stopped}", file=sys.stderr)
        return 2
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
