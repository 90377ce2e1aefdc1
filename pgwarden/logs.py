"""Structured JSON logs on stderr: one object per line, secrets never included.

Callers pass context in `extra=`; every extra field lands in the JSON object. Nothing here knows
about tokens or passwords: the code never puts them in a log call in the first place.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
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


class BatchingStreamHandler(logging.StreamHandler[TextIO]):
    """One write per event-loop turn instead of one per record.

    The proxy logs an event per statement; a write (and flush) per line was a large share of its
    CPU time. Inside a running event loop, lines wait for the end of the current turn (a burst
    of records costs one write); outside one, and at shutdown, they are written at once.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._pending.append(line)
            self._write_pending()
            return
        if not self._pending:
            loop.call_soon(self.flush)
        self._pending.append(line)

    def flush(self) -> None:
        with self.lock if self.lock is not None else _NO_LOCK:
            self._write_pending()

    def _write_pending(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self.stream.write(text)
            self.stream.flush()


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    handler = BatchingStreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    # The formatter uses none of these; computing them per record costs (one record per statement)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
