"""glibc's allocator told to keep freed memory for reuse, in a process that runs the method.

Each pass allocates and frees tensors of tens of MB (SAM's MLP activations, attention scores,
batches of CLIP tokens). glibc serves blocks above its mmap threshold (128 KB, rising to at most
32 MB as large blocks are freed) with fresh mmaps that it unmaps when they are freed, and it trims
the heap's free top above 128 KB: every pass then takes page faults on fresh, zeroed pages. On 2
cores of an AMD EPYC that was ~2 million minor faults and 3-4 s of kernel time per new image (SAM
ViT-B, 25 masks): raising both thresholds to 256 MB took `prepare` from 11.5 s to 9.9 s, for 5 %
more resident memory (2.18 -> 2.29 GB). The heap grows for the first passes and then settles:
glibc's memalign (torch's allocations) asks for slightly more than a freed block of the same size
holds, so a block freed between live small allocations is reused only by smaller ones; over 40 new
images of random sizes with 16 prepared images cached, resident memory moved within 2.19-2.41 GB
(glibc as it is: 1.96-2.25 GB) with no upward trend (bench/bench_allocator.py).

The settings are the process's, so the programs apply them when they load a model (`hybridgl`'s
CLI, the backend; a Ray actor or replica loads through them), not the library: a program that
imports hybridgl keeps its allocator as it is unless it calls `keep_freed_memory`. Nothing is
changed off glibc, where the user set glibc's own variables (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES), or with HYBRIDGL_MALLOC_TUNING=0.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading

log = logging.getLogger(__name__)

THRESHOLD = 256 << 20  # bytes: larger than any block a pass frees and allocates again
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_lock = threading.Lock()
_applied = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to THRESHOLD for this process, once; True if they
    are (now or already) raised, False where nothing was changed (see the module's docstring)."""
    global _applied
    with _lock:
        if _applied:
            return True
        if os.environ.get("HYBRIDGL_MALLOC_TUNING", "1") == "0":
            return False
        if any(name in os.environ for name in _USER_SETTINGS):
            log.debug("glibc malloc settings come from the environment: left as they are")
            return False
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return False
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return False
        _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
        return _applied


def applied() -> bool:
    """Whether `keep_freed_memory` changed this process's allocator."""
    return _applied
