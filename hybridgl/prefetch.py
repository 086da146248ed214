"""Bounded prefetch: start the input work of the next items while the model works on this one.

Fetching and decoding images (network, disk, PIL) release the GIL, so a background thread
overlaps them with the model's computation; `depth` bounds how many items are ahead (memory).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch(items: Iterable[T], load: Callable[[T], R], depth: int = 2, workers: int = 1
             ) -> Iterator[tuple[T, Future]]:
    """Yield (item, future of load(item)) in order, with up to `depth` loads running ahead.

    `future.result()` returns the loaded value or raises the load's exception, where the
    consumer would have called `load` itself. Stopping early cancels the loads not started.
    """
    if depth < 1:
        raise ValueError("depth must be at least 1")
    it = iter(items)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch")
    try:
        ahead: deque[tuple[T, Future]] = deque()
        for item in it:
            ahead.append((item, pool.submit(load, item)))
            if len(ahead) > depth:
                yield ahead.popleft()
        while ahead:
            yield ahead.popleft()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
