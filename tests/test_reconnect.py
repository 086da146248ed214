"""Reconnect: the backoff and the bounded wait of preannotate when Label Studio goes away."""
from __future__ import annotations

import httpx
import pytest
from label_studio_sdk.core.api_error import ApiError

from backend.reconnect import LabelStudioGone, Reconnect, is_connection_error


class Clock:
    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_waits_with_backoff_until_label_studio_answers():
    clock, answers = Clock(), iter([False, False, False, True])
    said = []
    r = Reconnect(lambda: next(answers), retry_for=300, sleep=clock.sleep, clock=lambda: clock.now, say=said.append)
    r.until_back()
    assert clock.sleeps == [1, 2, 4, 8] and "answers again after 15 s" in said[-1]


def test_gives_up_after_the_retry_window():
    clock = Clock()
    r = Reconnect(lambda: False, retry_for=100, sleep=clock.sleep, clock=lambda: clock.now, say=lambda _: None)
    with pytest.raises(LabelStudioGone, match="did not answer for 100 s"):
        r.until_back()
    assert clock.sleeps == [1, 2, 4, 8, 16, 30, 30, 9] and clock.now == 100  # capped pauses, never past the window


def test_connection_errors_are_told_from_refusals():
    assert is_connection_error(httpx.ConnectError("refused"))
    assert is_connection_error(httpx.ReadTimeout("slow"))
    assert is_connection_error(ApiError(status_code=502, body="bad gateway"))
    assert not is_connection_error(ApiError(status_code=400, body="bad request"))
    assert not is_connection_error(ValueError("x"))
