"""`python -m backend.preannotate --ray [ADDRESS]`: the batch pre-annotation with the model on Ray.

The driver (this process) does what `preannotate.run` always does: lists the project's tasks, skips
those already predicted by this model_version, posts predictions batch by batch, reports and
resumes. Only the prediction moves: the tasks to do, grouped by image, go through
`hybridgl.distributed.run_grouped`: Ray tasks fetch each image once from Label Studio while a pool
of model actors (each a `HybridGLBackend` built by the backend's own loader from the driver's
settings) predicts its tasks. The driver never loads a model: the model_version it skips and posts
with is asked of a worker (`distributed.probe`), and every result must carry that same version.
"""
from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

from hybridgl import distributed

from .images import ImageFetcher, LabelStudioConnection
from .labeling import Interface, TaskError
from .model import Counters, TaskOutcome, fetch_image
from .settings import Settings


def _build(settings: Settings):
    """On each worker: the backend, loaded as the server loads it (same settings, same version)."""
    from . import logsafe
    from ._wsgi import load_backend

    logsafe.install()  # as in the server: the tasks' ids and URLs logged here can forge no line
    return load_backend(settings)


def _version(backend) -> str:
    return backend.model_version


@functools.lru_cache(maxsize=4)
def _fetcher(settings: Settings) -> ImageFetcher:
    """One fetcher per worker process (it keeps Label Studio access tokens between images)."""
    return ImageFetcher(settings)


def _fetch(settings: Settings, item: tuple) -> dict:
    """Ray task: the bytes of one image group's file (or why they could not be read), fetched once."""
    interface, tasks, connections = item
    data = tasks[0].get("data")
    url = data.get(interface.image_field) if isinstance(data, dict) else None
    if not isinstance(url, str):  # predict_task reports the task's missing image itself
        return {}
    try:
        return {"raw": fetch_image(_fetcher(settings), url, tasks[0].get("id"), connections)}
    except TaskError as exc:
        return {"error": (exc.kind, str(exc))}


def _predict(backend, item: tuple, loaded: dict) -> dict:
    """On a model actor: every task of one image (one SAM pass: the backend's cache serves the rest)."""
    interface, tasks, _ = item

    def fetch(url: str, task_id: Any) -> bytes:
        if "error" in loaded:
            raise TaskError(*loaded["error"])
        return loaded["raw"]

    misses = backend.counters.snapshot().get("cache.misses", 0)
    outcomes = []
    for task in tasks:
        o = backend.predict_task(task, interface, fetch=fetch)
        # plain values only (TaskError does not pickle); of the segmentation the report needs the ranking
        outcomes.append({"predictions": o.predictions, "error": (o.error.kind, str(o.error)) if o.error else None,
                         "expression": o.expression, "seconds": o.seconds,
                         "ranking": o.segmentation.ranking[:2] if o.segmentation is not None else None})
    return {"outcomes": outcomes, "model_version": backend.model_version,
            "prepared": backend.counters.snapshot().get("cache.misses", 0) - misses}


def _outcome(task: dict, value: dict) -> TaskOutcome:
    ranking = value["ranking"]
    return TaskOutcome(task.get("id"), value["predictions"],
                       TaskError(*value["error"]) if value["error"] else None, value["expression"],
                       SimpleNamespace(ranking=ranking) if ranking is not None else None, value["seconds"])


class RayBackend:
    """What `preannotate.run` needs of a backend (model_version, counters, connections), with the
    predictions made on the Ray cluster (`predict_stream`)."""

    def __init__(self, settings: Settings, options: distributed.RayOptions):
        device, options = distributed.for_actors(settings.device, options)
        self.settings, self.options = dataclasses.replace(settings, device=device), options
        self.counters = Counters()
        self.model_version = distributed.probe(functools.partial(_build, self.settings), _version, options)

    def connections_for(self, project: Any = None) -> list[LabelStudioConnection]:
        return [LabelStudioConnection(self.settings.label_studio_url, self.settings.label_studio_api_key)]

    def predict_stream(self, tasks: Sequence[dict], interface: Interface) -> Iterator[tuple[dict, TaskOutcome]]:
        """(task, outcome) for every task, image by image as the actors finish them."""
        groups: OrderedDict[Any, list[dict]] = OrderedDict()
        for task in tasks:
            url = (task.get("data") or {}).get(interface.image_field) if isinstance(task.get("data"), dict) else None
            groups.setdefault(url if isinstance(url, str) else ("task", task.get("id")), []).append(task)
        connections = self.connections_for()
        items = [(interface, group, connections) for group in groups.values()]
        for result in distributed.run_grouped(items, functools.partial(_fetch, self.settings),
                                              functools.partial(_build, self.settings), _predict, self.options):
            group = items[result.index][1]
            if result.error is None and result.value["model_version"] != self.model_version:
                result.error = (f"version: a worker's model_version is {result.value['model_version']}, not "
                                f"{self.model_version} (nodes hold different weights or settings)")
            if result.error is not None:
                kind, _, message = result.error.partition(": ")
                for task in group:
                    yield task, TaskOutcome(task.get("id"), error=TaskError(kind, message))
                continue
            self.counters.add("cache.misses", result.value["prepared"])
            for task, value in zip(group, result.value["outcomes"]):
                yield task, _outcome(task, value)


def run_on_ray(settings: Settings, options: distributed.RayOptions, ls, project: int, **run_options):
    """`preannotate.run` with the predictions made on Ray (connects, or starts a local cluster)."""
    from .preannotate import run

    with distributed.cluster(options):  # (which keeps main()'s SIGTERM handler: the run ends like Ctrl-C)
        backend = RayBackend(settings, options)
        return run(backend, ls, project, predict=backend.predict_stream, **run_options)
