"""Riding out a Label Studio that goes away during a batch run (a restart, a network cut).

`python -m backend.preannotate` calls `Reconnect.until_back()` when a call to Label Studio fails
to connect: it probes Label Studio with a growing pause (1, 2, 4, ... up to 30 s) and returns once
it answers; after `retry_for` seconds of one outage it raises `LabelStudioGone`, and the run stops
with a clear message and its own exit status instead of failing every remaining task.
"""
from __future__ import annotations

import time
from typing import Any, Callable

# a task failing with one of these may be Label Studio's fault rather than the task's: probe first
CONNECTION_KINDS = ("unreachable", "fetch")
GATEWAY_STATUSES = (502, 503, 504)  # a proxy in front of a Label Studio that is down or restarting


class LabelStudioGone(Exception):
    """Label Studio did not answer for the whole retry window."""


def is_connection_error(exc: BaseException) -> bool:
    """Whether an SDK call failed because Label Studio could not be reached (not because it refused)."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, ApiError) and exc.status_code in GATEWAY_STATUSES


def label_studio_up(ls: Any, project: int) -> bool:
    """One probe: can the project be read (any answer but a connection failure counts as up)?"""
    try:
        ls.projects.get(id=project)
        return True
    except Exception as exc:  # noqa: BLE001 - classified below
        if is_connection_error(exc):
            return False
        return True


class Reconnect:
    """Waits, with exponential backoff, for `probe()` to be True; at most `retry_for` seconds per outage."""

    def __init__(self, probe: Callable[[], bool], retry_for: float, first: float = 1.0, cap: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 say: Callable[[str], None] = print, where: str = "Label Studio"):
        self.probe, self.retry_for, self.first, self.cap = probe, retry_for, first, cap
        self.sleep, self.clock, self.say, self.where = sleep, clock, say, where
        self.outages = 0

    def up(self) -> bool:
        return self.probe()

    def until_back(self) -> None:
        """Return once Label Studio answers; raise LabelStudioGone after retry_for seconds."""
        self.outages += 1
        start, pause = self.clock(), self.first
        self.say(f"{self.where} does not answer: retrying for up to {self.retry_for:g} s")
        while True:
            left = self.retry_for - (self.clock() - start)
            if left <= 0:
                raise LabelStudioGone(f"{self.where} did not answer for {self.retry_for:g} s")
            self.sleep(min(pause, left))
            pause = min(pause * 2, self.cap)
            if self.probe():
                self.say(f"{self.where} answers again after {self.clock() - start:.0f} s: resuming")
                return
