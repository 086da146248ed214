"""The bounded prefetch helper: order, overlap, bounded look-ahead, errors where they belong."""
from __future__ import annotations

import threading

import pytest

from hybridgl.prefetch import prefetch


def test_results_in_order_and_the_next_load_runs_while_the_consumer_works():
    started = {i: threading.Event() for i in range(6)}

    def load(i: int) -> int:
        started[i].set()
        return i * i

    out = []
    for i, fut in prefetch(range(6), load, depth=2):
        out.append((i, fut.result()))
        if i + 1 < 6:  # while "the model" works on item i, item i+1 is already being loaded
            assert started[i + 1].wait(10)
    assert out == [(i, i * i) for i in range(6)]


def test_look_ahead_is_bounded():
    started: list[int] = []
    release = threading.Event()

    def load(i: int) -> int:
        started.append(i)
        release.wait(5)
        return i

    gen = prefetch(range(100), load, depth=3)
    item, fut = next(gen)
    assert item == 0
    assert len(started) <= 4  # the one handed out and at most 3 ahead
    release.set()
    assert fut.result() == 0
    gen.close()  # stopping early: loads not yet started are cancelled
    assert len(started) <= 5


def test_a_failed_load_raises_at_its_item_only():
    def load(i: int) -> int:
        if i == 1:
            raise OSError("broken image")
        return i

    results = []
    for i, fut in prefetch(range(3), load):
        try:
            results.append(fut.result())
        except OSError as exc:
            results.append(str(exc))
    assert results == [0, "broken image", 2]


def test_depth_must_be_positive():
    with pytest.raises(ValueError):
        next(prefetch([1], lambda x: x, depth=0))
