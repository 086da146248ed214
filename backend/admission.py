"""Backpressure for /predict: a bounded number of requests may wait for (or hold) the model.

The model runs one pass at a time, so predict requests queue on its lock. Unbounded, they take
every server thread and /health, /metrics, /setup and /webhook queue behind them (a container
marked unhealthy under normal load). `Admission` lets at most HYBRIDGL_MAX_QUEUE predict
requests in; the next one is answered `503` with `Retry-After` at once (Label Studio retries),
so the server's other threads stay free for everything else.

`client_gone(environ)` tells whether the client of a request has closed its connection (Label
Studio abandons a predict after 100 s): its remaining work is then skipped, not computed.
"""
from __future__ import annotations

import contextlib
import socket
import threading
from typing import Callable, Iterator

CLIENT_GONE = "hybridgl.client_gone"  # WSGI environ key: a server's own check of the client's connection


class Admission:
    """At most `limit` predict requests inside at a time; `enter()` never blocks."""

    def __init__(self, limit: int):
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def enter(self) -> Iterator[bool]:
        """Yields True when the request got a slot (released on exit), False when the queue is full."""
        admitted = self._slots.acquire(blocking=False)
        try:
            yield admitted
        finally:
            if admitted:
                self._slots.release()


def client_gone(environ: dict) -> Callable[[], bool]:
    """A check of whether the request's client has closed its connection (False when unknown).

    Works with gunicorn (`gunicorn.socket`), Werkzeug's server (`werkzeug.socket`) and any server
    that puts its own check under `environ[CLIENT_GONE]` (Ray Serve). For a socket, a peek that
    reads an end-of-file, or a reset, means the peer is gone; pending data or nothing yet means it
    is still there.
    """
    given = environ.get(CLIENT_GONE)
    if callable(given):  # a server without a socket per request (backend/serve.py) says it itself
        return given
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if not isinstance(sock, socket.socket):
        return lambda: False

    def gone() -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except (ConnectionError, TimeoutError):
            return True
        except (OSError, ValueError):  # a TLS socket refuses flags, a closed one its fd: cannot tell
            return False

    return gone
