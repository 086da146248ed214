"""scripts/setup.sh's disk check: a fresh install is ~7 GB, so a full disk is said at once instead
of as pip's OSError halfway through. `df` is the OS's answer, faked on PATH; python is a stub
that records what setup asks of it."""
import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STUB_PYTHON = """#!/usr/bin/env bash
echo "$0 $*" >> "$CALLS"
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python"
fi
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _setup(tmp_path: Path, free_kb: int, *args: str) -> subprocess.CompletedProcess:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _executable(bin_dir / "df", "#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                                f"echo '/dev/vda 264241152 100 {free_kb} 99% /'\n")
    _executable(bin_dir / "python-stub", STUB_PYTHON)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python-stub"),
               CALLS=str(tmp_path / "calls"))
    return subprocess.run(["bash", "scripts/setup.sh", *args], cwd=repo, env=env, capture_output=True, text=True)


def test_a_full_disk_stops_before_the_venv_with_what_is_needed(tmp_path):
    done = _setup(tmp_path, 3 * 1024 * 1024, "--dev", "--e2e", "--ray")
    assert done.returncode == 1
    assert "setup needs about 8 GB free" in done.stderr and "3072 MB are free" in done.stderr
    assert not (tmp_path / "repo" / ".venv").exists() and not (tmp_path / "calls").exists()


def test_the_need_follows_the_options(tmp_path):
    # 7.5 GB: enough for the runtime and test dependencies, not for Label Studio and Ray as well
    assert _setup(tmp_path, int(7.5 * 1024 * 1024), "--dev", "--e2e", "--ray").returncode == 1
    done = _setup(tmp_path, int(7.5 * 1024 * 1024), "--dev")
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].endswith("python-stub -m venv .venv")
    assert any("-r requirements.txt -r requirements-dev.txt" in c for c in calls)


def test_an_existing_venv_is_not_checked_again(tmp_path):
    assert _setup(tmp_path, 100 * 1024 * 1024, "--dev").returncode == 0
    # the disk fills up afterwards: updating the venv in place still runs
    done = _setup(tmp_path, 1024, "--dev")
    assert done.returncode == 0, done.stderr
