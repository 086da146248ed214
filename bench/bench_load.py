"""/health and /metrics latency while many /predict requests are in flight, on the production server.

    python bench/bench_load.py [--clients 50] [--threads 8] [--max-queue 4] [--compare-unbounded]

Starts docker/start.sh (gunicorn, one worker, gthread) on the tiny models with the prepared-image
cache off (every predict runs SAM), fires --clients concurrent predicts that, like Label Studio,
retry after a 503's Retry-After until answered, and meanwhile probes /health and /metrics every
0.2 s (each probe on its own connection, as a health checker does). Prints latency percentiles and
the predicts' outcomes; --compare-unbounded runs the same load with a queue as large as the load
(the behaviour before the bounded queue). It asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib import error, request

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from harness import free_port  # noqa: E402
from serve_tiny import tiny_environment  # noqa: E402
from tiny_models import GOLDEN_DIR  # noqa: E402

CONFIG = ("<View><Image name='image' value='$image'/><Text name='t' value='$text'/>"
          "<BrushLabels name='m' toName='image'><Label value='A'/></BrushLabels></View>")


def http(url: str, body: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status, dict(r.headers)
    except error.HTTPError as exc:
        exc.read()
        return exc.code, dict(exc.headers)


def start_server(work: Path, threads: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HYBRIDGL_", "LABEL_STUDIO_"))},
           **tiny_environment(work), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "PORT": str(port), "THREADS": str(threads),
           "HYBRIDGL_MAX_QUEUE": str(max_queue), "HYBRIDGL_RETRY_AFTER": "1", "HYBRIDGL_CACHE_IMAGES": "0",
           "MODEL_DIR": str(work / "model-dir"), "HYBRIDGL_SKIP_DOWNLOAD": "1", "LOG_LEVEL": "WARNING",
           "LOCAL_FILES_DOCUMENT_ROOT": str(GOLDEN_DIR)}
    proc = subprocess.Popen(["bash", str(ROOT / "docker" / "start.sh")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit("the server did not start")
        try:
            http(url + "/health", timeout=5)
            return proc, url
        except (error.URLError, ConnectionError, OSError):
            if time.time() > deadline:
                raise SystemExit("the server did not answer in time")
            time.sleep(0.3)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_load(url: str, clients: int) -> dict:
    scenes = sorted(p.parent.name for p in GOLDEN_DIR.glob("*/image.png"))
    outcomes: list[tuple[int, int, float]] = []  # (final status, 503s received, seconds)
    done = threading.Event()
    latencies: dict[str, list[float]] = {"/health": [], "/metrics": []}

    def client(i: int) -> None:
        body = {"tasks": [{"id": i, "data": {"image": f"/data/local-files/?d={scenes[i % len(scenes)]}/image.png",
                                             "text": "the thing on the left"}}], "label_config": CONFIG}
        refused, t0 = 0, time.perf_counter()
        while True:
            status, headers = http(url + "/predict", body)
            if status != 503:
                break
            refused += 1
            time.sleep(float(headers.get("Retry-After", 1)))
        outcomes.append((status, refused, time.perf_counter() - t0))

    def probe_once(path: str) -> None:
        t0 = time.perf_counter()
        http(url + path, timeout=600)
        latencies[path].append(time.perf_counter() - t0)

    def prober() -> None:  # one probe every 0.2 s, each on its own thread: a stuck probe does not stop sampling
        probes = []
        while not done.is_set():
            for path in latencies:
                probes.append(threading.Thread(target=probe_once, args=(path,)))
                probes[-1].start()
            time.sleep(0.2)
        for t in probes:
            t.join()

    probe = threading.Thread(target=prober)
    workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    probe.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    done.set()
    probe.join()
    return {"wall": wall, "outcomes": outcomes, "latencies": latencies}


def report(label: str, result: dict) -> None:
    statuses = [s for s, _, _ in result["outcomes"]]
    print(f"{label}: {len(statuses)} predicts, {statuses.count(200)} answered 200, "
          f"{sum(r for _, r, _ in result['outcomes'])} refusals (503) retried, all done in {result['wall']:.1f} s")
    for path, values in result["latencies"].items():
        print(f"  {path:9s} n={len(values):4d}  p50 {statistics.median(values):6.3f} s  "
              f"p99 {percentile(values, 0.99):6.3f} s  max {max(values):6.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--compare-unbounded", action="store_true")
    args = ap.parse_args()
    configs = [(f"HYBRIDGL_MAX_QUEUE={args.max_queue}", args.max_queue)]
    if args.compare_unbounded:
        configs.append((f"unbounded (HYBRIDGL_MAX_QUEUE={args.clients})", args.clients))
    print(f"{args.clients} concurrent predicts, THREADS={args.threads}, tiny models on CPU, SAM on every predict")
    for label, max_queue in configs:
        with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
            proc, url = start_server(Path(tmp), args.threads, max_queue)
            try:
                report(label, run_load(url, args.clients))
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(60)


if __name__ == "__main__":
    main()
