"""hybridgl.allocator: freed memory kept for the next pass (glibc), measured as page faults in real
processes; the programs that load a model apply it, the user's own settings and opt-out win."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from serve_tiny import tiny_environment  # noqa: E402
from tiny_models import TINY_CLIP_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")

# A 64 MB tensor filled and freed 40 times, as a pass's activations are; minor page faults of the last 10
# rounds. With the thresholds raised the heap grows for the first rounds (glibc's memalign asks for a
# little more than a freed block holds, and small allocations made while the first blocks were alive sit
# after them) and then serves every block again; how many rounds that takes depends on the heap's layout
# (6 were not always enough), so the first 30 are left to it.
FAULTS = """
import json, resource, sys, torch
from hybridgl import allocator
changed = allocator.keep_freed_memory() if sys.argv[1] == "tune" else False
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 << 20)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"changed": changed, "applied": allocator.applied(), "faults": sum(faults[30:])}))
"""


def run(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES",
                                                                           "HYBRIDGL_MALLOC"))},
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1", **(env or {})}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    plain = run(FAULTS, "plain")
    tuned = run(FAULTS, "tune")
    assert not plain["applied"] and tuned["changed"] and tuned["applied"]
    assert plain["faults"] > 10 * 10_000  # each 64 MB block mapped afresh: ~16k pages each time
    assert tuned["faults"] < plain["faults"] / 10


@pytest.mark.parametrize("env", [{"HYBRIDGL_MALLOC_TUNING": "0"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_the_users_settings_and_opt_out_are_left_alone(env):
    result = run(FAULTS, "tune", env=env)
    assert not result["changed"] and not result["applied"]


def test_the_programs_loaders_apply_it(tmp_path):
    cli = run(f"""
import argparse, json
from hybridgl import allocator, cli
args = argparse.Namespace(clip={str(TINY_CLIP_DIR)!r}, sam="none", sam_checkpoint=None, parser="rules",
                          device="cpu", offline=True, config=None, set=[])
before = allocator.applied()
cli.load_model(args, need_sam=False)
print(json.dumps({{"before": before, "after": allocator.applied()}}))
""")
    assert cli == {"before": False, "after": True}
    backend = run("""
import json
from hybridgl import allocator
from backend._wsgi import load_backend
before = allocator.applied()
load_backend()
print(json.dumps({"before": before, "after": allocator.applied()}))
""", env=tiny_environment(tmp_path))
    assert backend == {"before": False, "after": True}
