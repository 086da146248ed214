"""`backend.preannotate.run` in process: a fake Label Studio SDK client and a fake backend (fast); the real
backend on the tiny models where its device must fail."""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

import httpx

from backend import preannotate
from backend.labeling import TaskError, config_version, parse_config
from backend.model import Counters, TaskOutcome

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Text name="expr" value="$text"/>
  <BrushLabels name="mask" toName="image"><Label value="Target"/></BrushLabels>
</View>"""
VERSION = "hybridgl-test"  # the model's
POSTED = config_version(VERSION, parse_config(CONFIG))  # its predictions' for CONFIG


class FakeLS:
    """What preannotate uses of label_studio_sdk.LabelStudio, over an in-memory project."""

    def __init__(self, tasks: list[dict]):
        self.tasks_by_id = {t["id"]: dict(t, predictions=[]) for t in tasks}
        self.imports: list[list[dict]] = []  # bodies of the bulk imports that were stored
        self.creates: list[dict] = []
        self.down = False
        self.on_import = None  # called with the body before storing (may raise)
        self.on_stored = None  # called once a bulk import is stored, before its answer goes back
        self.on_create = None
        self.on_list = None  # called with each page of the task list once it is read
        self.config = CONFIG  # the project's labelling config
        self.project: dict = {}  # the fields the run set on the project (model_version, sampling)
        ls = self
        self.projects = SimpleNamespace(get=self._get, update=lambda id, **f: self.project.update(f),
                                        import_predictions=self._import)
        self.tasks = SimpleNamespace(list=self._list)
        self.predictions = SimpleNamespace(create=self._create,
                                           list=lambda task: [dict(p) for p in ls.tasks_by_id[task]["predictions"]])

    def _check(self):
        if self.down:
            raise httpx.ConnectError("down")

    def _get(self, id):
        self._check()
        return {"id": id, "label_config": self.config}

    def _list(self, project, page, page_size, fields, query=None):
        """Label Studio's paging: by offset (page, page_size) over the tasks by id, after the Data
        Manager query's filters (here only the one on the task id, anything else is an error)."""
        self._check()
        ids = sorted(self.tasks_by_id)
        for f in (json.loads(query)["filters"]["items"] if query else []):
            assert (f["filter"], f["operator"], f["type"]) == ("filter:tasks:id", "greater", "Number"), f
            ids = [i for i in ids if i > f["value"]]
        assert not query or json.loads(query).get("ordering", ["tasks:id"]) == ["tasks:id"], query
        chunk = ids[(page - 1) * page_size: page * page_size]
        answer = SimpleNamespace(items=[dict(self.tasks_by_id[i]) for i in chunk],
                                 response=SimpleNamespace(total=len(ids)))
        if self.on_list:
            self.on_list(answer)
        return answer

    def _store(self, p: dict):
        self.tasks_by_id[p["task"]]["predictions"].append(
            {"model_version": p["model_version"], "score": p["score"], "result": p["result"]})

    def _known(self, task_id):
        from label_studio_sdk.core.api_error import ApiError

        if task_id not in self.tasks_by_id:
            raise ApiError(status_code=400, body={"task": [f"Invalid pk \"{task_id}\" - object does not exist."]})

    def _import(self, project, request):
        self._check()
        for p in request:
            self._known(p["task"])
        kept = self.on_import(request) if self.on_import else None  # may raise, or keep only some
        kept = request if kept is None else kept
        self.imports.append(kept)
        for p in kept:
            self._store(p)
        if self.on_stored:
            self.on_stored()
        return SimpleNamespace(created=len(kept))

    def _create(self, task, result, score, model_version):
        self._check()
        self._known(task)
        p = {"task": task, "result": result, "score": score, "model_version": model_version}
        if self.on_create:
            self.on_create(p)
        self.creates.append(p)
        self._store(p)

    def predictions_of(self, task_id: int) -> list[dict]:
        return self.tasks_by_id[task_id]["predictions"]


class FakeBackend:
    """predict_task: a prediction scored by the task's data['score'], or the failure data['fail'] names."""

    def __init__(self, alternatives: int = 1):
        self.model_version = VERSION
        self.counters = Counters()
        self.alternatives = alternatives
        self.predicted: list[int] = []
        self.on_predict = None

    def connections_for(self, project=None):
        return []

    def fetch(self, url, task_id, connections=None):
        return b"image"

    def predict_task(self, task, interface, fetch=None):
        version = config_version(self.model_version, interface)  # as HybridGLBackend names them
        self.predicted.append(task["id"])
        if self.on_predict:
            self.on_predict(task)
        data = task["data"]
        if "fail" in data:
            err = TaskError(data["fail"], "bad")
            return TaskOutcome(task["id"], [{"result": [], "score": 0.0, "model_version": version}], err)
        fetch(data["image"], task["id"])
        score = data.get("score", 0.5)
        region = {"from_name": interface.brush_name, "to_name": interface.image_name,
                  "value": {"brushlabels": [interface.label]}}
        preds = [{"result": [dict(region, rank=r)], "score": score - r / 100,
                  "model_version": version if r == 0 else f"{version}-rank{r + 1}"} for r in range(self.alternatives)]
        ranking = [{"score": score, "index": 0}, {"score": score - 0.1, "index": 1}]
        return TaskOutcome(task["id"], preds, None, data.get("text"), SimpleNamespace(ranking=ranking))


def tasks(n: int, **data) -> list[dict]:
    return [{"id": i, "data": {"image": f"/data/upload/{i}.png", "text": "the cup", **data}}
            for i in range(1, n + 1)]


def run(backend, ls, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("retry_for", 0.0)
    return preannotate.run(backend, ls, 1, out=io.StringIO(), **kw)


def test_failed_tasks_count_toward_the_batch_so_an_interruption_loses_at_most_one_batch():
    """Failure predictions (score 0) are work too: posted every --batch tasks, not held to the end."""
    ls, backend = FakeLS(tasks(6, fail="missing_image")), FakeBackend()
    posted_before = []
    backend.on_predict = lambda task: posted_before.append(sum(len(b) for b in ls.imports))
    s = run(backend, ls, batch=2)
    assert len(s.failed) == 6
    assert posted_before == [0, 0, 2, 2, 4, 4]  # each pair posted before the next task is predicted
    assert [len(b) for b in ls.imports] == [2, 2, 2]


def test_a_sigterm_while_a_batch_is_posted_ends_the_run_once_the_batch_is_counted():
    """The signal lands once Label Studio has stored a batch, before its answer is read (the e2e
    interruption test sends it the moment the predictions show): those tasks are done, not 'not
    reached' (a summary of 0 done while Label Studio held 2 predictions)."""
    import os
    import signal

    ls, backend = FakeLS(tasks(6)), FakeBackend()
    ls.on_stored = lambda: os.kill(os.getpid(), signal.SIGTERM) if len(ls.imports) == 1 else None
    previous = signal.signal(signal.SIGTERM, preannotate._interrupt)  # as main() installs it
    try:
        s = run(backend, ls, batch=2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert s.interrupted
    assert [t for t in ls.tasks_by_id if ls.predictions_of(t)] == [1, 2]
    assert (s.done, s.predictions, s.not_reached) == (2, 2, 4)


def refuse_bulk(request):
    from label_studio_sdk.core.api_error import ApiError

    raise ApiError(status_code=400, body={"detail": "a task of the batch was deleted"})


def versions(ls: FakeLS, task_id: int) -> list[str]:
    return sorted(p["model_version"] for p in ls.predictions_of(task_id))


def test_a_rerun_after_a_task_was_half_posted_adds_only_its_missing_predictions():
    """Posting one by one (the bulk import refused), a kill between a task's alternative and its best
    mask left the alternative alone: the rerun must not post that alternative a second time."""
    ls, backend = FakeLS(tasks(2)), FakeBackend(alternatives=2)
    ls.on_import = refuse_bulk

    def kill_at_second_create(p):
        if len(ls.creates) == 1:
            raise KeyboardInterrupt  # SIGTERM, as main() turns it
    ls.on_create = kill_at_second_create
    assert run(backend, ls, batch=2).interrupted
    assert versions(ls, 1) == [f"{POSTED}-rank2"]  # rank 2 posted first (the best mask goes last)
    ls.on_import = ls.on_create = None
    s = run(backend, ls, batch=2)
    assert s.done == 2 and not s.failed
    assert versions(ls, 1) == versions(ls, 2) == [POSTED, f"{POSTED}-rank2"]


def test_label_studio_dropping_again_while_the_run_checks_what_was_stored_is_waited_for(monkeypatch):
    """A restart that drops the connection twice (the bulk import, then the check of what it stored)
    is one more outage to wait for, not a crash that loses the summary and the report."""
    monkeypatch.setattr(preannotate.Reconnect, "until_back", lambda self: None)  # no sleeping
    ls, backend = FakeLS(tasks(3)), FakeBackend()
    drops = {"import": 1, "list": 1}
    real_list = ls.predictions.list

    def flaky_import(request):
        if drops["import"]:
            drops["import"] -= 1
            raise httpx.ConnectError("restarting")
    ls.on_import = flaky_import

    def flaky_list(task):
        if drops["list"]:
            drops["list"] -= 1
            raise httpx.ReadError("restarting again")
        return real_list(task=task)
    ls.predictions.list = flaky_list
    s = run(backend, ls, batch=3, retry_for=60.0)
    assert s.done == 3 and not s.failed and not s.gone
    assert all(versions(ls, t) == [POSTED] for t in (1, 2, 3))


def test_predictions_label_studio_silently_drops_are_reported_failed_not_done():
    """Label Studio answers 201 to a bulk import but leaves out the predictions that do not match the
    project's labelling config (say it was edited mid-run): those tasks failed, they are not done."""
    ls, backend = FakeLS(tasks(4)), FakeBackend()
    ls.on_import = lambda request: [p for p in request if p["task"] != 3]  # {"created": 3}
    s = run(backend, ls, batch=4)
    assert versions(ls, 3) == [] and s.predictions == 3
    assert s.done == 3 and list(s.failed) == [3] and s.failed[3].startswith("post: ")


def test_sigterm_on_ray_ends_the_run_like_ctrl_c(monkeypatch, capsys):
    """ray.init installs its own SIGTERM handler (sys.exit(15)) over the one main() set: with --ray,
    a SIGTERM must still end the run as documented (summary printed, exit status 130). The real
    distributed.cluster runs, over a stand-in for Ray whose init does what ray.init does."""
    import os
    import signal
    import sys

    import label_studio_sdk

    from backend import ray_preannotate
    from hybridgl import distributed

    ls = FakeLS(tasks(6))

    class FakeRay:
        initialized = False

        def is_initialized(self):
            return self.initialized

        def init(self, **kwargs):
            self.initialized = True
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init does

        def cluster_resources(self):
            return {"CPU": 2.0}

        def shutdown(self):
            self.initialized = False

    class Backend(FakeBackend):
        def __init__(self, settings, options):
            super().__init__()

        def predict_stream(self, todo, interface):
            for task in todo:
                if task["id"] == 4:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield task, self.predict_task(task, interface, fetch=lambda url, tid: b"")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(label_studio_sdk, "LabelStudio", lambda base_url, api_key: ls)
    monkeypatch.setattr(distributed, "_ray", FakeRay)
    monkeypatch.setattr(ray_preannotate, "RayBackend", Backend)
    try:
        rc = preannotate.main(["--url", "http://ls.invalid", "--api-key", "k", "--project", "1", "--batch", "2",
                               "--no-progress", "--json", "--ray", "127.0.0.1:6379"])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert rc == 130
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["interrupted"] and s["done"] == 2 and s["done"] + s["not_reached"] == 6, s


def test_an_import_that_timed_out_and_lands_later_is_not_posted_twice(monkeypatch):
    """A bulk import whose answer timed out may still be running in Label Studio: the check of what it
    stored ran at once, found nothing yet, and the batch was posted again (duplicates once the first
    import committed). After a read timeout the check now waits for the import to land (up to
    SETTLE_SECONDS) before posting again; after a refused connection it does not wait."""
    monkeypatch.setattr(preannotate.Reconnect, "until_back", lambda self: None)
    monkeypatch.setattr(preannotate, "SETTLE_POLL", 0.01)
    ls, backend = FakeLS(tasks(3)), FakeBackend()
    late: list = []
    checks = {"n": 0}
    real_list = ls.predictions.list

    def slow_import(request):
        if not late:
            late.append(list(request))
            raise httpx.ReadTimeout("no answer in time")
    ls.on_import = slow_import

    def listing(task):
        checks["n"] += 1
        if late and checks["n"] == 4:  # Label Studio commits the first import during the check
            for p in late.pop():
                ls._store(p)
        return real_list(task=task)
    ls.predictions.list = listing
    s = run(backend, ls, batch=3, retry_for=60.0)
    assert s.done == 3 and not s.failed
    assert all(versions(ls, t) == [POSTED] for t in (1, 2, 3))  # once each
    assert len(ls.imports) == 0  # nothing posted again: the late import holds them


def test_tasks_deleted_while_the_task_list_is_read_leave_no_other_task_out():
    """Label Studio pages the task list by offset: tasks deleted once the first page was read shifted
    the later pages, so as many tasks slid past a page boundary unread and the run left them out
    (exit status 0, nothing reported). The list is now read after the last task id seen, which no
    deletion shifts."""
    ls, backend = FakeLS(tasks(8)), FakeBackend()

    def delete_the_first_two(page):  # once the first page is read
        ls.on_list = None
        del ls.tasks_by_id[1], ls.tasks_by_id[2]
    ls.on_list = delete_the_first_two
    s = run(backend, ls, batch=3)
    assert sorted(set(backend.predicted) & set(ls.tasks_by_id)) == [3, 4, 5, 6, 7, 8]
    assert all(versions(ls, t) == [POSTED] for t in ls.tasks_by_id)
    assert sorted(s.failed) == [1, 2]  # listed, then deleted: their predictions could not be posted


def test_label_studio_going_away_while_posting_one_by_one_is_waited_for(monkeypatch):
    """After a refused bulk import the predictions are posted one by one; Label Studio going away
    there marked the task being posted and every later one "refused". It is now waited for as on
    the other paths: a prediction stored before its answer was lost is not posted again, one not
    stored is posted once it is back, and only a task Label Studio answers with a 4xx is refused."""
    from label_studio_sdk.core.api_error import ApiError

    monkeypatch.setattr(preannotate.Reconnect, "until_back", lambda self: None)
    ls, backend = FakeLS(tasks(4)), FakeBackend()
    ls.on_import = refuse_bulk
    outages = {1: "stored, answer lost", 3: "refused connection"}

    def on_create(p):
        what = outages.pop(p["task"], None)
        if what == "stored, answer lost":
            ls._store(p)
            raise httpx.RemoteProtocolError("Label Studio went away before answering")
        if what == "refused connection":
            raise httpx.ConnectError("Label Studio is restarting")
        if p["task"] == 2:
            raise ApiError(status_code=400, body={"result": ["not valid for this task"]})
    ls.on_create = on_create
    s = run(backend, ls, batch=4, retry_for=60.0)
    assert not s.gone and list(s.failed) == [2] and s.failed[2].startswith("post: Label Studio refused")
    assert s.done == 3 and s.predictions == 3
    assert [versions(ls, t) for t in (1, 2, 3, 4)] == [[POSTED], [], [POSTED], [POSTED]]  # once each


def test_a_rerun_after_the_labelling_config_was_edited_predicts_again():
    """Predictions name the config's tags and carry its label: once the BrushLabels tag is renamed or
    the label changed, Label Studio no longer shows them. The rerun skipped every task that held a
    prediction of the model's version all the same; the version now depends on those parts of the
    config, so the rerun predicts again, and an unchanged config still skips everything."""
    ls, backend = FakeLS(tasks(3)), FakeBackend()
    first = run(backend, ls, batch=3)
    assert first.done == 3 and ls.project["model_version"] == first.model_version
    again = run(backend, ls, batch=3)
    assert (again.done, again.skipped, again.model_version) == (0, 3, first.model_version)

    for edit in [('name="mask"', 'name="brush"'), ('value="Target"', 'value="Object"')]:  # tag renamed, label changed
        ls.config = ls.config.replace(*edit)
        s = run(backend, ls, batch=3)
        assert (s.done, s.skipped) == (3, 0) and ls.project["model_version"] == s.model_version
        # the predictions of the project's version, those Label Studio shows, name the config's tags now
        shown = [p for t in (1, 2, 3) for p in ls.predictions_of(t) if p["model_version"] == s.model_version]
        now = parse_config(ls.config)
        assert len(shown) == 3 and all((r["from_name"], r["to_name"], r["value"]["brushlabels"]) == (
            now.brush_name, now.image_name, [now.label]) for p in shown for r in p["result"])
        assert run(backend, ls, batch=3).skipped == 3  # and a rerun of the same config adds nothing
    assert s.model_version.startswith(VERSION + "-")  # readable: the model's version, then the config's part


def test_a_failure_reason_cannot_forge_a_line_of_the_printed_summary():
    """The summary's "failed task" lines carry reasons made of the task's own data (its image URL, its
    expression): a newline there printed a line of its own, as if the run had said it."""
    ls, backend = FakeLS(tasks(1, fail="missing_image\ndone: 0 tasks; failed: 0")), FakeBackend()
    out = io.StringIO()
    preannotate.run(backend, ls, 1, out=out, progress=False, retry_for=0.0)
    lines = out.getvalue().splitlines()
    assert len([ln for ln in lines if ln.startswith("done:")]) == 1, lines
    assert [ln for ln in lines if "failed task" in ln] == \
        ["  failed task 1: missing_image\\ndone: 0 tasks; failed: 0: bad"]


def test_a_label_studio_that_ignores_the_task_id_filter_ends_the_run_with_a_message(monkeypatch, capsys):
    """An older or proxied Label Studio that drops the Data Manager query would serve the first page
    forever: the run stops with a message and exit status 2, not a traceback."""
    import label_studio_sdk

    from backend.settings import Settings

    ls = FakeLS(tasks(3))
    listing = ls._list
    ls.tasks = SimpleNamespace(list=lambda project, page, page_size, fields, query=None:
                               listing(project, page, page_size, fields))
    monkeypatch.setattr(label_studio_sdk, "LabelStudio", lambda base_url, api_key: ls)
    backend = FakeBackend()
    backend.settings = Settings()
    code = preannotate.main(["--url", "http://ls.invalid", "--api-key", "k", "--project", "1", "--no-progress"],
                            backend=backend)
    err = capsys.readouterr().err
    assert code == 2 and "ignored the filter on task ids" in err and "Traceback" not in err, err
    assert backend.predicted == [] and ls.imports == []


def test_model_actors_that_cannot_start_end_the_run_with_exit_2_and_what_came_back_posted(monkeypatch, capsys):
    """With --ray, each round of predictions (the first; a redo of the tasks Label Studio's outage
    failed) starts a pool of model actors; one that does not start in time raises RayStartTimeout from
    the stream. The predictions that came back before it are posted (they were not lost with the
    unposted batch), the other tasks are not reached, the summary is printed, and the run ends with
    exit status 2 and the error."""
    import label_studio_sdk

    from backend import ray_preannotate
    from hybridgl import distributed

    class Backend(FakeBackend):
        after = 3  # tasks predicted before the pool fails to start

        def __init__(self, settings, options):
            super().__init__()

        def predict_stream(self, todo, interface):
            for task in todo[:self.after]:
                yield task, self.predict_task(task, interface, fetch=lambda url, tid: b"")
            raise distributed.RayStartTimeout("the Ray cluster did not start the model actors within 5 s")

    class FakeRay:
        def is_initialized(self):
            return True  # joined already: cluster() does not connect

        def cluster_resources(self):
            return {"CPU": 2.0}

    monkeypatch.setattr(distributed, "_ray", FakeRay)
    monkeypatch.setattr(ray_preannotate, "RayBackend", Backend)
    for after in (3, 0):
        Backend.after = after
        ls = FakeLS(tasks(6))
        monkeypatch.setattr(label_studio_sdk, "LabelStudio", lambda base_url, api_key: ls)
        rc = preannotate.main(["--url", "http://ls.invalid", "--api-key", "k", "--project", "1", "--batch", "5",
                               "--no-progress", "--json", "--ray", "127.0.0.1:6379", "--ray-start-timeout", "5"])
        captured = capsys.readouterr()
        assert rc == 2, captured
        assert "error: the Ray cluster did not start the model actors within 5 s" in captured.err
        s = json.loads(captured.out.strip().splitlines()[-1])
        assert s["done"] == after and s["not_reached"] == 6 - after and not s["failed"], s
        assert "did not start the model actors" in s["stopped"]
        assert [t for t in range(1, 7) if versions(ls, t)] == list(range(1, after + 1))  # posted, once each
        assert all(versions(ls, t) == [POSTED] for t in range(1, after + 1))


def test_a_prediction_whose_post_always_drops_the_connection_is_reported_not_posted_forever(monkeypatch):
    """A post that drops the connection every time while Label Studio answers otherwise (a body that
    crashes its worker behind a proxy: 502) was waited for and posted again forever, the run never
    ending. The bulk import is now tried POST_ATTEMPTS times, then the batch is posted one by one, and
    a prediction whose own post drops that often is reported failed (a rerun tries it again)."""
    from label_studio_sdk.core.api_error import ApiError

    monkeypatch.setattr(preannotate.Reconnect, "until_back", lambda self: None)
    ls, backend = FakeLS(tasks(4)), FakeBackend()
    attempts = {"import": 0, "create": 0}

    def poison(what, task_ids):
        attempts[what] += 1
        assert attempts[what] < 50, "posted again and again"
        if 3 in task_ids:
            raise ApiError(status_code=502, body="Bad Gateway")

    ls.on_import = lambda body: poison("import", [p["task"] for p in body])
    ls.on_create = lambda p: poison("create", [p["task"]])
    s = run(backend, ls, batch=4, retry_for=60.0)
    assert not s.gone and list(s.failed) == [3] and "connection" in s.failed[3], s.failed
    assert attempts == {"import": preannotate.POST_ATTEMPTS, "create": 3 + preannotate.POST_ATTEMPTS}
    assert s.done == 3 and s.predictions == 3
    assert [versions(ls, t) for t in (1, 2, 3, 4)] == [[POSTED], [POSTED], [], [POSTED]]


def test_reading_what_was_stored_that_always_drops_stops_the_run_instead_of_spinning(monkeypatch):
    """After an import whose answer was lost the run reads each task's predictions before posting
    again (never twice); a read that drops the connection every time while Label Studio answers
    otherwise was retried forever. After POST_ATTEMPTS the run stops as for an outage (a rerun
    finishes; nothing is posted twice)."""
    from label_studio_sdk.core.api_error import ApiError

    monkeypatch.setattr(preannotate.Reconnect, "until_back", lambda self: None)
    ls, backend = FakeLS(tasks(2)), FakeBackend()
    reads = []

    def import_then_drop(body):
        raise httpx.RemoteProtocolError("the answer was lost")

    def read(task):
        reads.append(task)
        assert len(reads) < 50, "read again and again"
        raise ApiError(status_code=502, body="Bad Gateway")

    ls.on_import = import_then_drop
    ls.predictions.list = read
    s = run(backend, ls, batch=2, retry_for=60.0)
    assert s.gone and "predictions" in s.gone and len(reads) == preannotate.POST_ATTEMPTS, (s.gone, reads)
    assert ls.creates == [] and s.done == 0


def test_a_device_failure_stops_the_run_with_its_summary_and_posts_what_was_predicted(monkeypatch, capsys):
    """The real backend on the tiny models, whose GPU fails (a sticky CUDA error, simulated by a hook on
    the tiny CLIP) on the second image: the run must not mark that task and every later one failed
    (a rerun would skip nothing, but the report would blame the tasks): it stops as when the model cannot
    run, with the predictions made before posted, the rest not reached, the summary and exit status 2."""
    import label_studio_sdk

    from backend.model import HybridGLBackend
    from backend.settings import Settings
    from test_backend import IMAGE_A, IMAGE_B, TOKEN, FakeLabelStudio
    from tiny_models import CUDA_ERROR, StickyCudaError, tiny_hybridgl, vision_entry

    model = tiny_hybridgl(sam=True)
    files = FakeLabelStudio({"a.png": IMAGE_A, "b.png": IMAGE_B})
    try:
        project = [{"id": i, "data": {"image": f"/data/upload/1/{name}", "text": "the cup"}}
                   for i, name in enumerate(["a.png", "a.png", "b.png", "b.png"], start=1)]
        interface = parse_config(CONFIG)

        def fetch(url, task_id):
            return IMAGE_A if url.endswith("a.png") else IMAGE_B

        counting = HybridGLBackend(model, Settings())
        with StickyCudaError(vision_entry(model), after=10**9) as first_image:  # the device's work for a.png
            assert all(counting.predict_task(t, interface, fetch=fetch).ok for t in project[:2])

        ls = FakeLS(project)
        monkeypatch.setattr(label_studio_sdk, "LabelStudio", lambda base_url, api_key: ls)
        backend = HybridGLBackend(model, Settings())
        with StickyCudaError(vision_entry(model), after=first_image.calls):
            rc = preannotate.main(["--url", files.url, "--api-key", TOKEN, "--project", "1", "--no-progress",
                                   "--json"], backend=backend)
    finally:
        files.close()
    captured = capsys.readouterr()
    assert rc == 2, captured
    s = json.loads(captured.out.strip().splitlines()[-1])
    assert s["done"] == 2 and s["not_reached"] == 2 and s["failed"] == 0, s  # task 3 is not blamed
    assert s["stopped"].startswith("device failure on cpu (task 3): RuntimeError: " + CUDA_ERROR)
    assert [t for t in range(1, 5) if versions(ls, t)] == [1, 2]  # the batch predicted before it, posted
    version = config_version(backend.model_version, interface)
    assert all(versions(ls, t) == [version] for t in (1, 2))
    assert ls.project.get("model_version") == version  # and the project made ready for them
    assert f"error: device failure on cpu (task 3): RuntimeError: {CUDA_ERROR}" in captured.err
