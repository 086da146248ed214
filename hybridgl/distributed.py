"""Scale out on Ray: an image-grouped pipeline of model actors (Ray Data), for whole datasets.

    items (one per image) --load (Ray tasks)--> --work (pool of model actors)--> driver

Each item is one image and everything to do on it (its expressions or tasks), so an image is
prepared once. `load(item)` fetches and decodes in plain Ray tasks, overlapping the model work;
`work(model, item, loaded)` runs in a pool of actors (`num_gpus=1` each on GPU nodes, a
configurable number of CPU actors otherwise), each building its model once with `factory()`.
Results stream back to the driver in completion order, which writes or posts them.

Faults: Ray restarts an actor whose process dies (killed, or a device failure: on an error that
`is_device_failure` recognises, a sticky CUDA error, the actor ends its process on purpose so the
device gets a fresh context; `work` must let such errors out, never turn them into the item's
failure) and retries its in-flight items on the pool; the driver keeps the first result per item (a retried item can never be written twice), and
an item that still fails is reported by index, never silently lost (`Result.error`).

Needs the `ray` extra (`pip install hybridgl[ray]`); importing this module does not import Ray.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import logging
import math
import os
import pickle
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger("hybridgl.distributed")

RETRIES = 3  # attempts per item beyond the first when its actor dies (then it is reported failed)


class RayUnavailable(RuntimeError):
    """Ray is not installed, the cluster cannot be reached, or it cannot run the model actors."""


class RayStartTimeout(RayUnavailable):
    """The model actors did not start (placed on the cluster, model built) within the start timeout."""


class RayStalled(RayUnavailable):
    """Nothing moved in the run (no item finished or passed a stage) for Ray Data's no-progress timeout."""


@dataclass(frozen=True)
class RayOptions:
    """Where to run and how many model actors.

    address: None starts a local cluster; "auto" joins the cluster `ray start` runs on this node;
      "HOST:PORT" (the head's GCS) or "ray://HOST:10001" (Ray Client) joins that one.
    actors: model actors; default one per GPU of the cluster (divided by gpus_per_actor), else 1.
    gpus_per_actor: default 1 when the cluster has GPUs, else 0; 0.5 puts two actors on a GPU.
    cpus_per_actor, load_cpus: CPUs reserved per model actor and per fetch/decode task. When the
      actors may take every CPU of the cluster's nodes (2 actors of 1 CPU on a 2-CPU machine, or 8
      GPU actors of 1 CPU on a node with 8 GPUs and 8 CPUs), the load tasks reserve none, at most one
      per actor at a time, instead: Ray Data would otherwise wait for a CPU for them, silently, until its
      no-progress timeout (30 min) ended the run with an internal error.
    start_timeout: seconds for every model actor of a run to be placed on the cluster and to build
      its model (`factory()`, in its constructor) before the run stops with RayStartTimeout. Ray
      would wait forever for resources no node has (a GPU on a CPU-only cluster); an autoscaling
      cluster may add nodes meanwhile, so the wait is bounded, not refused up front.
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    load_cpus: float = 0.25
    start_timeout: float = 1800.0

    def resources(self, cluster: dict[str, float], items: int | None = None) -> tuple[int, float, float]:
        """(actors, gpus per actor, cpus per actor) for a cluster's total resources; never more
        actors than `items` (each loads the model, minutes on a GPU, for nothing to do)."""
        gpus = float(cluster.get("GPU", 0.0))
        per_gpu = self.gpus_per_actor if self.gpus_per_actor is not None else (1.0 if gpus else 0.0)
        if self.actors is not None:
            actors = self.actors
        elif per_gpu > 0:
            actors = max(int(gpus / per_gpu), 1)
        else:
            actors = 1
        return (min(actors, max(items, 1)) if items is not None else actors), per_gpu, self.cpus_per_actor


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """--ray [ADDRESS] and the actor options, shared by `hybridgl evaluate` and `backend.preannotate`."""
    g = parser.add_argument_group("Ray (pip install 'hybridgl[ray]')")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: no ADDRESS starts a local cluster, 'auto' joins the running one, "
                        "HOST:PORT or ray://HOST:10001 joins that one")
    g.add_argument("--ray-actors", type=int, default=None, metavar="N",
                   help="model actors (default: one per GPU of the cluster, else 1)")
    g.add_argument("--ray-gpus-per-actor", type=float, default=None, metavar="G",
                   help="GPUs per model actor (default 1 with GPUs, else 0; 0.5: two actors per GPU)")
    g.add_argument("--ray-cpus-per-actor", type=float, default=1.0, metavar="C",
                   help="CPUs reserved per model actor (default 1)")
    g.add_argument("--ray-start-timeout", type=float, default=RayOptions.start_timeout, metavar="SECONDS",
                   help="stop with an error when the model actors have not all started (placed on the "
                        "cluster, model loaded) within SECONDS (default 1800: the cluster may be adding nodes)")


def options_from_args(args: argparse.Namespace) -> RayOptions | None:
    """The RayOptions of the command line, or None without --ray. Raises ValueError on bad values."""
    if getattr(args, "ray", None) is None:
        return None
    if args.ray_actors is not None and args.ray_actors < 1:
        raise ValueError("--ray-actors must be at least 1")
    for option, value in (("--ray-gpus-per-actor", args.ray_gpus_per_actor or 0.0),
                          ("--ray-cpus-per-actor", args.ray_cpus_per_actor)):
        if not math.isfinite(value) or value < 0:  # nan passed a '< 0' test
            raise ValueError(f"{option} must be a finite number, not negative (got {value})")
    if not math.isfinite(args.ray_start_timeout) or args.ray_start_timeout <= 0:
        raise ValueError(f"--ray-start-timeout must be a finite number of seconds above 0 "
                         f"(got {args.ray_start_timeout})")
    return RayOptions(address=None if args.ray == "local" else args.ray, actors=args.ray_actors,
                      gpus_per_actor=args.ray_gpus_per_actor, cpus_per_actor=args.ray_cpus_per_actor,
                      start_timeout=args.ray_start_timeout)


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable("--ray needs Ray: pip install 'hybridgl[ray]' (or -r requirements-ray.txt)") from exc
    return ray


@contextlib.contextmanager
def cluster(options: RayOptions) -> Iterator[dict[str, float]]:
    """Connected to Ray for the block (yields the cluster's resources). Reuses a connection that
    is already open; otherwise connects (or starts a local cluster) and disconnects at the end."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        main_thread = threading.current_thread() is threading.main_thread()
        on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
        try:
            ray.init(address=options.address, include_dashboard=False, logging_level=logging.WARNING,
                     configure_logging=False)
        except ConnectionError as exc:
            raise RayUnavailable(f"cannot reach the Ray cluster at {options.address}: {exc}") from exc
        if callable(on_sigterm):  # ray.init installs its own (sys.exit): the caller's handler stays in charge
            signal.signal(signal.SIGTERM, on_sigterm)
        started = True
    try:
        yield dict(ray.cluster_resources())
    finally:
        if started:
            ray.shutdown()


@dataclass
class Result:
    """What came back for items[index]: `value` from `work`, or `error` ("kind: message")."""

    index: int
    value: Any = None
    error: str | None = None
    worker: int | None = None  # PID of the actor process that produced it


# "CUDA out of memory" is not one: torch's OutOfMemoryError leaves the context usable (the allocator
# frees what the failed pass held), so it stays the failure of the item that asked too much (its
# message reads "CUDA out of memory. Tried to allocate ..."; a sticky error reads "CUDA error: ...")
DEVICE_FAILURE_SIGNS = ("CUDA error", "CUBLAS_STATUS", "cuDNN error")


class DeviceFailure(RuntimeError):
    """The accelerator failed in a way that leaves this process unable to use it: after a sticky CUDA
    error (an illegal memory access, a launch failure, CUBLAS_STATUS_..., a cuDNN error) every later
    CUDA call of the process fails too (running out of memory is not one: the item's own error).
    Never the failure of one item (image, expression, task): the process must stop taking work and
    be replaced by a fresh one. Raised from the original error (`__cause__`)."""


def is_device_failure(exc: BaseException) -> bool:
    """Whether `exc` is a device failure (see DeviceFailure): a DeviceFailure, or an error whose
    "Type: message" (or that of the error it was raised from) carries a CUDA error's signature.

    Every loop that turns an item's exception into that item's failed result asks this first and
    re-raises a device failure: a Ray model actor then exits (`_Worker`) so that Ray replaces it and
    retries the item, a single-process run stops, the HTTP backend restarts itself."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DeviceFailure):
            return True
        text = f"{type(exc).__name__}: {exc}"
        if any(sign in text for sign in DEVICE_FAILURE_SIGNS):
            return True
        exc = exc.__cause__
    return False


def _node_room(node: dict, gpus: float, cpus: float) -> float:
    """How many actors of (gpus, cpus) a node's resources could hold if nothing else ran there."""
    return min(math.floor(node.get("GPU", 0.0) / gpus + 1e-9) if gpus > 0 else math.inf,
               math.floor(node.get("CPU", 0.0) / cpus + 1e-9) if cpus > 0 else math.inf)


def _room(ray, gpus: float, cpus: float) -> tuple[list[dict], float]:
    """The live nodes' resources, and how many actors of (gpus, cpus) they could hold if nothing else ran."""
    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    return nodes, sum(_node_room(n, gpus, cpus) for n in nodes)


def _loads_may_starve(nodes: list[dict], actors: int, gpus: float, cpus: float, load_cpus: float) -> bool:
    """Whether `actors` model actors of (gpus, cpus) may leave no node `load_cpus` CPUs for a load task.
    Ray places them as it likes, so the worst placement is assumed: each node that can keep a load
    task's CPUs is filled with just enough actors to take them, and those must be no more than `actors`."""
    if load_cpus <= 0:
        return False
    needed = 0
    for node in nodes:
        spare = node.get("CPU", 0.0) - load_cpus
        if spare < -1e-9:
            continue  # never has room for a load task
        if cpus <= 0:
            return False  # the actors take no CPU: this node keeps its own
        fill = math.floor(spare / cpus + 1e-9) + 1  # actors that leave it less than load_cpus
        if fill > _node_room(node, gpus, cpus):
            return False  # it keeps a load task's CPUs however many actors it holds
        needed += fill
    return needed <= actors


def _start_timeout(ray, what: str, noun: str, actors: int, gpus: float, cpus: float,
                   timeout: float) -> RayStartTimeout:
    """The error for model actors (`noun`s) that did not start in time: what was asked, what the cluster has."""
    nodes, fits = _room(ray, gpus, cpus)
    total = ray.cluster_resources()
    plural = "s" if actors != 1 else ""
    return RayStartTimeout(
        f"the Ray cluster did not start {what} within {timeout:g} s (placed on a node, model loaded): asked for "
        f"{actors} {noun}{plural} with {gpus:g} GPU and {cpus:g} CPU each ({actors * gpus:g} GPU, "
        f"{actors * cpus:g} CPU in all); the cluster has {len(nodes)} node{'s' if len(nodes) != 1 else ''}, "
        f"{total.get('GPU', 0.0):g} GPU and {total.get('CPU', 0.0):g} CPU in all: room for "
        f"{'any number' if fits == math.inf else f'{fits:g}'} when nothing else runs there. Ask for fewer or "
        f"smaller actors (--ray-actors, --ray-gpus-per-actor, --ray-cpus-per-actor), add nodes, or give them "
        f"longer (--ray-start-timeout)")


def _stalled(timeout: float, done: int, items: int) -> RayStalled:
    """The error for a run in which nothing moved for Ray Data's no-progress timeout. Ray Data ends the
    run gracefully: an actor stuck on an item keeps its resources until the item ends or the driver
    process exits (the commands exit on this error)."""
    return RayStalled(
        f"the Ray run made no progress for {timeout:g} s: no item finished or moved on ({done} of {items} "
        f"items done, their results kept). A model actor may be stuck (a hung device, an item far slower "
        f"than the others) or the cluster's CPUs held by other work. Rerun to do the rest; for items that "
        f"legitimately take longer, set RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S=<seconds> (-1: no limit) "
        f"where the command runs")


def _not_start_timeout(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]  # logged while Ray Data handles it
    return not (type(exc).__name__ == "GetTimeoutError" and "starting actors" in str(exc))


@contextlib.contextmanager
def _quiet_start_timeout() -> Iterator[None]:
    """Without Ray Data's report of its actor pool's start timeout (an internal traceback asking for a
    Ray bug report): run_grouped raises RayStartTimeout instead, which says what was asked and what
    the cluster has."""
    logger = logging.getLogger("ray.data.exceptions")
    logger.addFilter(_not_start_timeout)
    try:
        yield
    finally:
        logger.removeFilter(_not_start_timeout)


def _actor_options() -> dict:
    """A dead actor is replaced, and its in-flight items retried, at most RETRIES times each."""
    return {"max_restarts": -1, "max_task_retries": RETRIES}


class _Load:
    """Ray Data stage 1 (plain tasks): item -> item + what `load` made of it (or why it failed)."""

    def __init__(self, load: Callable[[Any], Any]):
        self.load = load

    def __call__(self, row: dict) -> dict:
        item = pickle.loads(row["item"])
        try:
            loaded, error = self.load(item), None
        except Exception as exc:  # noqa: BLE001 - the item's problem, reported with it
            loaded, error = None, f"load: {type(exc).__name__}: {exc}"
        return {"index": row["index"], "item": row["item"], "loaded": pickle.dumps(loaded), "error": error or ""}


def hide_unassigned_gpus() -> None:
    """In a Ray actor given no GPU, CUDA sees none. Ray 2.60 stopped hiding the node's GPUs from such
    actors (CUDA_VISIBLE_DEVICES is left as the node has it), so a model loaded with the default
    device would go to GPU 0, outside Ray's accounting and beside the GPU actors. Call it before
    anything initialises CUDA in the actor."""
    import ray

    if ray.is_initialized() and not ray.get_gpu_ids():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def actor_device(device: str | None) -> str | None:
    """The device to give the model actors for the driver's own (`--device`, DEVICE). Ray makes a
    GPU actor's assigned GPUs the only ones it sees, numbered from cuda:0, so an index chosen on the
    driver ("cuda:1", its second GPU) names no GPU in an actor given one (invalid device ordinal, every
    actor failing to load) or another actor's: each actor uses the GPU Ray gave it."""
    if device is None or not device.strip():
        return device
    import torch

    try:
        parsed = torch.device(device.strip())
    except (RuntimeError, ValueError):
        return device  # refused with its own message where the model loads
    if parsed.type == "cuda" and parsed.index is not None:
        if parsed.index != 0:
            log.warning("device %s: on Ray each model actor uses the GPU Ray assigns it (its cuda:0), "
                        "not GPU %d of this machine", device, parsed.index)
        return "cuda"
    return device


def runs_on_cpu(device: str | None) -> bool:
    """Whether the model actors are told to run on the CPU: they then reserve no GPU by default."""
    return bool(device) and device.strip().lower() == "cpu"


def for_actors(device: str | None, options: RayOptions) -> tuple[str | None, RayOptions]:
    """(device, options) for model actors built with the driver's device: its GPU index dropped
    (`actor_device`), and on "cpu" no GPU reserved per actor unless asked (a reserved GPU would sit
    idle, and the GPUs' count would cap the actors)."""
    device = actor_device(device)
    if runs_on_cpu(device) and options.gpus_per_actor is None:
        options = dataclasses.replace(options, gpus_per_actor=0.0)
    return device, options


class _Worker:
    """Ray Data stage 2 (one actor each): builds the model once, then `work` per item."""

    def __init__(self, factory: Callable[[], Any], work: Callable[[Any, Any, Any], Any]):
        hide_unassigned_gpus()
        self.model, self.work, self.pid = factory(), work, os.getpid()

    def __call__(self, row: dict) -> dict:
        value, error = None, row["error"] or None
        if error is None:
            try:
                value = self.work(self.model, pickle.loads(row["item"]), pickle.loads(row["loaded"]))
            except Exception as exc:  # noqa: BLE001
                if is_device_failure(exc):
                    log.error("device failure in actor %d (%s): exiting so Ray restarts it and retries", self.pid, exc)
                    os._exit(1)
                error = f"internal: {type(exc).__name__}: {exc}"
        try:
            blob = pickle.dumps(value)
        except Exception as exc:  # noqa: BLE001 - raised here, Ray Data would drop the item as if its actor died
            blob, error = pickle.dumps(None), f"internal: {type(exc).__name__}: {exc}"
        return {"index": row["index"], "value": blob, "error": error or "", "worker": self.pid}


def run_grouped(items: Sequence[Any], load: Callable[[Any], Any], factory: Callable[[], Any],
                work: Callable[[Any, Any, Any], Any], options: RayOptions) -> Iterator[Result]:
    """One Result per item, in completion order, computed on the connected Ray cluster (see `cluster`).

    load(item) -> loaded runs in Ray tasks; work(model, item, loaded) in the actor pool, with
    model = factory() built once per actor. All three must be picklable (cloudpickle: closures
    are fine). Items whose actor died more than RETRIES times, or whose load/work raised, come
    back with `error` set; none is dropped and none comes back twice.
    """
    ray = _ray()
    import ray.data

    if not items:
        return
    actors, gpus, cpus = options.resources(ray.cluster_resources(), len(items))
    # rows carry pickled Python objects: Ray Data never has to infer Arrow types for ragged images
    ds = ray.data.from_items([{"index": i, "item": pickle.dumps(x)} for i, x in enumerate(items)],
                             override_num_blocks=len(items))
    # the dataset holds a copy of the current DataContext, which its execution reads (and the derived
    # datasets share): set there, the settings are this run's, not the caller's process-wide ones
    ctx = ds.context
    ctx.enable_progress_bars = False  # the driver shows its own progress, with ETA
    ctx.print_on_execution_start = False
    ctx.max_errored_blocks = len(items)  # an item whose retries ran out is reported, not fatal
    # the pool's start waits (at most this long) for each actor's ready ref, which resolves once its
    # constructor, the model's loading included, has run; by default (-1) Ray Data does not wait but
    # streams to the actors that started, and without any it waits forever, saying nothing
    ctx.wait_for_min_actors_s = options.start_timeout
    log.info("Ray: %d model actors (%g GPU, %g CPU each) for %d items", actors, gpus, cpus, len(items))
    nodes, fits = _room(ray, gpus, cpus)
    load_cpus, load_pool = options.load_cpus, ray.data.TaskPoolStrategy()
    if _loads_may_starve(nodes, actors, gpus, cpus, load_cpus):
        # the started actors would hold every CPU a load task could get: Ray Data starts its actors first
        # and its load tasks then stay pending, silently, until its no-progress timeout (30 min) fails the
        # run with an internal error. Without a CPU to count, it would run a load process per item at once
        load_cpus, load_pool = 0.0, ray.data.TaskPoolStrategy(size=actors)
        log.info("the model actors may take every CPU of the Ray cluster: the load tasks reserve no CPU "
                 "(at most %d at a time)", actors)
    ds = ds.map(_Load(load), num_cpus=load_cpus, compute=load_pool)
    ds = ds.map(_Worker, fn_constructor_args=(factory, work), compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=cpus, num_gpus=gpus, ray_remote_args_fn=_actor_options)
    if fits < actors:  # said now, not only when the wait for them ends (an autoscaler may add nodes meanwhile)
        log.warning("the Ray cluster has room for %g of the %d model actors asked for (%g GPU, %g CPU each) now; "
                    "the run waits up to %g s for all of them to start (--ray-start-timeout), then stops",
                    fits, actors, gpus, cpus, options.start_timeout)
    from ray.data.exceptions import ExecutionTimeoutError

    rows = iter(ds.iter_rows())
    try:
        with _quiet_start_timeout():  # the first row starts the execution, the actor pool's start among it
            head = list(itertools.islice(rows, 1))
    except ray.exceptions.GetTimeoutError:
        head = None
    except ExecutionTimeoutError:  # Ray Data's no-progress timeout: nothing moved, not even a first row
        raise _stalled(ctx.execution_no_progress_timeout_s, 0, len(items)) from None
    if head is None:
        # Ray Data leaves that pool in a reference cycle: collected now, its actors end (and free their
        # resources) and the requests for those that never started are dropped, not at some later collection
        del rows, ds
        gc.collect()
        raise _start_timeout(ray, "the model actors", "actor", actors, gpus, cpus, options.start_timeout)
    seen: set[int] = set()
    try:
        for row in itertools.chain(head, rows):
            index = int(row["index"])
            if index in seen:  # a retried item whose first result already arrived
                continue
            seen.add(index)
            yield Result(index, pickle.loads(row["value"]), row["error"] or None, int(row["worker"]))
    except ExecutionTimeoutError:  # its message advises `ds.context` settings the user cannot reach
        raise _stalled(ctx.execution_no_progress_timeout_s, len(seen), len(items)) from None
    for index in range(len(items)):
        if index not in seen:
            yield Result(index, error=f"lost: no result after {RETRIES + 1} attempts (the actor kept dying)")


def probe(factory: Callable[[], Any], fn: Callable[[Any], Any], options: RayOptions,
          timeout: float | None = None) -> Any:
    """fn(factory()) in one Ray task with a model actor's resources: what the driver needs to know
    about the workers' model (its version, on the workers' device) without loading it itself.
    RayStartTimeout after `timeout` seconds (default: options.start_timeout)."""
    ray = _ray()
    timeout = options.start_timeout if timeout is None else timeout
    _, gpus, cpus = options.resources(ray.cluster_resources())

    @ray.remote(num_gpus=gpus, num_cpus=cpus, max_retries=RETRIES)
    def _probe():
        return pickle.dumps(fn(factory()))

    ref = _probe.remote()
    try:
        return pickle.loads(ray.get(ref, timeout=timeout))
    except ray.exceptions.GetTimeoutError as exc:
        with contextlib.suppress(Exception):  # not left waiting for resources (or loading) on the cluster
            ray.cancel(ref, force=True)
        raise _start_timeout(ray, "the model probe (run first, with a model actor's resources)", "task", 1,
                             gpus, cpus, timeout) from exc
