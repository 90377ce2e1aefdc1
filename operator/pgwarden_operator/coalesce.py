"""Coalesced, bounded work per key: how the operator keeps a burst of events from becoming a
burst of identical API calls.

`Coalescer(work, limit).run(key, full)` waits for one run of `work(key, full)` that starts after
the call: at most `limit` runs at once, one at a time per key. Requests for a key whose run has
not started yet join that run (so fifty policy changes that touch one connection while its
render waits make one render, not fifty); a request that arrives while its key runs gets the
next run, because the running one may have read the cluster before the change. `full` is
OR-ed over the joined requests (a bundle-only render widens to a full one, never the reverse).
Every joined caller sees the run's exception, so each kopf handler retries as it would have
alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class _Run:
    done: asyncio.Future[None]
    full: bool = False


def _retrieve(fut: asyncio.Future[None]) -> None:
    # a run whose callers were all cancelled: its exception was seen by no one; that is fine
    if not fut.cancelled():
        fut.exception()


class Coalescer(Generic[K]):
    def __init__(self, work: Callable[[K, bool], Awaitable[None]], limit: int) -> None:
        self._work = work
        self._slots = asyncio.Semaphore(limit)
        self._waiting: dict[K, _Run] = {}  # requested, not started
        self._busy: dict[K, asyncio.Lock] = {}  # one run per key at a time
        self._tasks: set[asyncio.Task[None]] = set()  # strong references while they run

    async def run(self, key: K, full: bool = False) -> None:
        queued = self._waiting.get(key)
        if queued is None:
            queued = _Run(asyncio.get_running_loop().create_future())
            queued.done.add_done_callback(_retrieve)
            self._waiting[key] = queued
            task = asyncio.create_task(self._start(key, queued), name=f"coalesce {key}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        queued.full = queued.full or full
        # shield: a cancelled caller (kopf stopping a handler) does not cancel the shared run
        await asyncio.shield(queued.done)

    def pending(self) -> int:
        return len(self._waiting)

    async def _start(self, key: K, queued: _Run) -> None:
        lock = self._busy.setdefault(key, asyncio.Lock())
        try:
            async with lock, self._slots:
                # from here on, new requests wait for the next run
                self._waiting.pop(key, None)
                await self._work(key, queued.full)
        except asyncio.CancelledError:  # the operator is stopping
            if self._waiting.get(key) is queued:
                del self._waiting[key]
            queued.done.cancel()
            raise
        except Exception as e:  # delivered to every joined caller
            queued.done.set_exception(e)
        else:
            queued.done.set_result(None)
        finally:
            if not lock.locked() and key not in self._waiting:
                self._busy.pop(key, None)
