"""Structured JSON logs on stderr: one object per line, secrets never included.

Callers pass context in `extra=`; every extra field lands in the JSON object. Nothing here knows
about tokens or passwords: the code never puts them in a log call in the first place.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import sys
import threading
import time
from typing import Any, TextIO

import orjson

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
_second: list[Any] = [None, ""]  # the last second formatted, and its text


def _log_time(ts: float) -> str:
    """`datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")` with a Z, the
    date part formatted once a second (a record per statement): the same rounding (to the
    microsecond, half to even), then the milliseconds cut."""
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    sec = int(whole)
    if us >= 1_000_000:
        sec += 1
        us -= 1_000_000
    elif us < 0:
        sec -= 1
        us += 1_000_000
    if sec != _second[0]:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{us // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _log_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = record.__dict__
        for key in [k for k in fields if k not in _STANDARD]:
            if not key.startswith("_"):
                out[key] = fields[key]
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        try:  # without OPT_NON_STR_KEYS (slower) unless a key needs it: the same text
            return orjson.dumps(out, default=str).decode()
        except TypeError:
            return orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


# How long a line may wait in a running event loop before it is written. Logs are not the
# evidence (the recording is, fsynced before a statement runs), so a short delay is fine, and it
# turns a write per statement into one per few hundred.
FLUSH_DELAY = 0.02


class BatchingStreamHandler(logging.StreamHandler[TextIO]):
    """A write every few milliseconds instead of one per record.

    The proxy logs an event per statement; a write (and flush) per line was a large share of its
    CPU time. Inside a running event loop, lines wait up to FLUSH_DELAY (a burst of records costs
    one write); outside one, and at shutdown, they are written at once.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._pending_lock = threading.Lock()  # other threads log too (the shipper)
        # the loop a flush is scheduled on, and its thread; asyncio.get_running_loop() costs a
        # getpid() system call, which is slow enough here to matter once per statement
        self._due_loop: asyncio.AbstractEventLoop | None = None
        self._due_thread = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self.add_line(line)

    def add_line(self, line: str) -> None:
        """Queue one formatted line (ending in a newline) behind those already waiting."""
        with self._pending_lock:
            self._pending.append(line)
        loop = self._due_loop
        if loop is not None and self._due_thread == threading.get_ident() and not loop.is_closed():
            return  # a flush is due on this thread's loop
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._due_loop, self._due_thread = loop, threading.get_ident()
        loop.call_later(FLUSH_DELAY, self._flush_due)

    def _flush_due(self) -> None:
        self._due_loop = None
        self.flush()

    def flush(self) -> None:
        # the handler's lock around taking and writing: two flushes keep the lines in order
        with self.lock if self.lock is not None else _NO_LOCK:
            with self._pending_lock:
                pending, self._pending = self._pending, []
            if pending:
                self.stream.write("".join(pending))
                self.stream.flush()


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


_configured: list[BatchingStreamHandler] = []  # the handler configure() installed, if any


def event_writer(logger: logging.Logger) -> BatchingStreamHandler | None:
    """The handler to give `logger`'s INFO lines to directly, when configure() set logging up and
    nothing changed since (no other handler, e.g. a test's capture): then a per-statement event
    can skip building a LogRecord and formatting it field by field."""
    if not _configured or not logger.isEnabledFor(logging.INFO):
        return None
    handler = _configured[0]
    handlers = logging.root.handlers
    if logger.handlers or len(handlers) != 1 or handlers[0] is not handler:
        return None
    if logger.filters or handler.filters:
        return None
    return handler


def event_line(logger: str, msg: str, event: dict[str, Any]) -> str:
    """The line JsonFormatter writes for an INFO record with `extra={"event": event}`."""
    return (
        f'{{"time":"{_log_time(time.time())}","level":"info","logger":{_quoted(logger)},'
        f'"msg":{_quoted(msg)},"event":{orjson.dumps(event, default=str).decode()}}}\n'
    )


@functools.lru_cache(maxsize=64)
def _quoted(text: str) -> str:
    return orjson.dumps(text).decode()


def flush() -> None:
    """Write the lines still waiting: when an event loop stops, its pending flush never runs."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    handler = BatchingStreamHandler(stream or sys.stderr)
    _configured[:] = [handler]
    handler.setFormatter(JsonFormatter())
    # The formatter uses none of these; computing them per record costs (one record per statement)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
