"""A local Ray cluster on 127.0.0.1 for a test module, and its model actors' processes.

2 CPUs, a 200 MB object store and no dashboard: small enough for a shared CI machine. Its workers
import the tests' tiny models (`tiny_models:...` SAM builders), so PYTHONPATH holds the tests folder.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("HYBRIDGL_REQUIRE_E2E") == "1":  # CI installs the extra: a missing Ray is a failure there
    import ray
else:
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (bash scripts/setup.sh --ray)")


@pytest.fixture(scope="module")
def ray_address():
    """The GCS address of a local cluster started for the module (commands join it with --ray ADDRESS)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] + ([old] if old else []))
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def driver_environment(env: dict) -> dict:
    """`env` plus this process's Ray variables: a driver joining the cluster needs its auth mode
    (RAY_AUTH_MODE=token, set by ray.init here; the token is in ~/.ray/auth_token)."""
    return {**env, **{k: v for k, v in os.environ.items() if k.startswith("RAY_")}}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def model_actor_pids() -> list[int]:
    """Processes of this test process's Ray cluster (its descendants) that run a model actor."""
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "_Worker" in cmd and "ray::" in cmd:
            pids.append(pid)
    return pids
