"""The operator's coalesced work queue: joined requests, one run per key, a bound on runs."""

from __future__ import annotations

import asyncio

import pytest

from pgwarden_operator.coalesce import Coalescer


class Recorder:
    def __init__(self) -> None:
        self.runs: list[tuple[str, bool]] = []
        self.running: dict[str, int] = {}
        self.peak = 0
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def work(self, key: str, full: bool) -> None:
        self.running[key] = self.running.get(key, 0) + 1
        assert self.running[key] == 1, "two runs of one key at once"
        self.peak = max(self.peak, sum(self.running.values()))
        self.runs.append((key, full))
        try:
            await self.gate.wait()
            if self.fail is not None:
                raise self.fail
        finally:
            self.running[key] -= 1


async def test_requests_waiting_for_a_run_share_it() -> None:
    rec = Recorder()
    q: Coalescer[str] = Coalescer(rec.work, limit=1)
    first = asyncio.create_task(q.run("a"))
    await asyncio.sleep(0)  # "a" runs (and holds the only slot)
    waiting = [asyncio.create_task(q.run("b", full=(i == 3))) for i in range(10)]
    await asyncio.sleep(0)
    assert q.pending() == 1
    rec.gate.set()
    await asyncio.gather(first, *waiting)
    # ten requests for "b" made one run, widened to full by the one that asked for it
    assert rec.runs == [("a", False), ("b", True)]


async def test_a_request_during_a_run_gets_a_run_of_its_own() -> None:
    """The running one may have read the cluster before the change that caused the request."""
    rec = Recorder()
    q: Coalescer[str] = Coalescer(rec.work, limit=4)
    first = asyncio.create_task(q.run("a"))
    await asyncio.sleep(0)
    second = asyncio.create_task(q.run("a"))
    third = asyncio.create_task(q.run("a"))
    await asyncio.sleep(0)
    rec.gate.set()
    await asyncio.gather(first, second, third)
    assert rec.runs == [("a", False), ("a", False)]


async def test_runs_are_bounded() -> None:
    rec = Recorder()
    q: Coalescer[str] = Coalescer(rec.work, limit=3)
    tasks = [asyncio.create_task(q.run(str(i))) for i in range(20)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert rec.peak == 3
    rec.gate.set()
    await asyncio.gather(*tasks)
    assert sorted(k for k, _ in rec.runs) == sorted(str(i) for i in range(20))
    assert rec.peak == 3


async def test_every_joined_caller_sees_the_failure_and_the_next_request_runs_again() -> None:
    rec = Recorder()
    rec.fail = RuntimeError("API server unreachable")
    q: Coalescer[str] = Coalescer(rec.work, limit=1)
    blocker = asyncio.create_task(q.run("x"))
    await asyncio.sleep(0)
    joined = [asyncio.create_task(q.run("k")) for _ in range(3)]
    rec.gate.set()
    results = await asyncio.gather(blocker, *joined, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    rec.fail = None
    await q.run("k")
    assert rec.runs[-1] == ("k", False)


async def test_a_cancelled_caller_does_not_cancel_the_shared_run() -> None:
    rec = Recorder()
    q: Coalescer[str] = Coalescer(rec.work, limit=1)
    impatient = asyncio.create_task(q.run("k"))
    patient = asyncio.create_task(q.run("k"))
    await asyncio.sleep(0)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    rec.gate.set()
    await patient
    assert rec.runs == [("k", False)]
