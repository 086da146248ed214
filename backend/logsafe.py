"""Secrets never reach the logs: query strings (presigned-URL signatures, a webhook secret),
Authorization values and the backend's own secrets are redacted from every record, at every level.
Nor can a request forge a log line: control characters in a message (a newline in a task id, project
id, image URL or webhook field) are escaped, so every record stays one line (a traceback: its own
lines, with each exception's message on one).

`RedactingFilter` is installed on the process's log handlers (`install`), so it also covers records
of other libraries (urllib3 logs request lines with their query at DEBUG, werkzeug logs every request).
The access log of gunicorn is written without query strings in the first place (docker/start.sh).
"""
from __future__ import annotations

import logging
import re
import threading
import traceback
from collections import OrderedDict
from typing import Iterable

REDACTED = "[redacted]"
# a query string after a URL or a path: "http://h/p?sig=..", "GET /webhook?secret=.. HTTP/1.1"
_QUERY = re.compile(r"((?:\b[a-zA-Z][a-zA-Z0-9+.-]*://|(?<![\w.])/)[^\s?#\"'<>]*)\?[^\s\"'<>]*")
_AUTH = re.compile(r"\b(Token|Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{4,}", re.IGNORECASE)
# what can end or rewrite a line (newlines, CR, terminal escapes, Unicode line separators); tab cannot
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def escape_controls(text: str, keep: str = "") -> str:
    """`text` with its control characters (except those in `keep`) written as escapes: \\n, \\r, \\x1b."""
    def escaped(m: re.Match) -> str:
        c = m.group()
        if c in keep:
            return c
        return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")

    return _CONTROL.sub(escaped, text)


def format_exception(exc_info) -> str:
    """The traceback of `exc_info` as logging writes it, but with each exception's message (and notes)
    of the chain on one line: the message holds request data (an image URL, a task id), and a newline
    in it started a line of the sender's choosing; the traceback's own lines are kept."""
    text = logging.Formatter().formatException(exc_info)
    seen, pending = set(), [exc_info[1]]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        pending += [exc.__cause__, exc.__context__]
        message = traceback.format_exception_only(type(exc), exc)[0]  # "Type: message\n"; the notes follow
        notes = getattr(exc, "__notes__", None)
        for part in [message.rstrip("\n"), *(notes if isinstance(notes, (list, tuple)) else ())]:
            if isinstance(part, str) and _CONTROL.search(part):
                text = text.replace(part, escape_controls(part))
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and traceback) with secrets replaced by [redacted] and control
    characters escaped (a traceback keeps its own newlines, not those of the exceptions' messages)."""

    def __init__(self, secrets: Iterable[str] = (), keep: int = 256):
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: OrderedDict[str, None] = OrderedDict()
        self._pinned: set[str] = set()  # the configured secrets: never pushed out by /setup tokens
        self.keep = keep  # /setup tokens are added per request: the most recent ones are kept
        self.add(*secrets, pinned=True)

    def add(self, *secrets: str | None, pinned: bool = False) -> None:
        with self._lock:
            for secret in secrets:
                if secret and len(secret) >= 4:  # shorter would redact ordinary words
                    if pinned:
                        self._pinned.add(secret)
                        continue
                    self._secrets[secret] = None
                    self._secrets.move_to_end(secret)
            while len(self._secrets) > self.keep:
                self._secrets.popitem(last=False)

    def redact(self, text: str) -> str:
        text = _AUTH.sub(lambda m: f"{m.group(1)} {REDACTED}", _QUERY.sub(rf"\1?{REDACTED}", text))
        with self._lock:
            secrets = sorted(self._pinned.union(self._secrets), key=len, reverse=True)
        for secret in secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logged as it stands
            message = str(record.msg)
        record.msg, record.args = escape_controls(self.redact(message)), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = format_exception(record.exc_info)
        if record.exc_text:
            record.exc_text = escape_controls(self.redact(record.exc_text), keep="\n")
        if record.stack_info:
            record.stack_info = escape_controls(self.redact(record.stack_info), keep="\n")
        return True


REDACTOR = RedactingFilter()  # one per process, as logging itself is


def install(redactor: RedactingFilter = REDACTOR, loggers: Iterable[str] = ("", "gunicorn.error", "gunicorn.access",
                                                                 "werkzeug", "ray.serve")) -> None:
    """Adds `redactor` to every handler of these loggers (the root's catch all propagated records; Ray
    Serve's do not propagate, and in a replica they write what the app prints too), and to Python's
    last-resort handler, which writes WARNING and above where no handler was configured (a Ray worker)."""
    handlers = [h for name in loggers for h in logging.getLogger(name).handlers]
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if redactor not in handler.filters:
            handler.addFilter(redactor)
