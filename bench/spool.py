"""The recording spool's write rate on this machine's disk.

    .venv/bin/python bench/spool.py [--seconds 5] [--dir DIR]

Three figures, each with realistic statement events (chained, ~450 bytes):
- `written`: events written as fast as one thread can (what a read costs the event loop),
  fsynced in the background within 50 ms;
- `fsynced, 1 waiter` and `fsynced, 32 waiters`: events that wait for their fsync (what a write
  costs), one at a time and from 32 concurrent sessions (group commit shares each fsync).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from pgwarden.api.config import Recording
from pgwarden.recording.store import FileStore
from pgwarden_proxy.events import StatementEvent
from pgwarden_proxy.recording.recorder import Recorder, SessionRecorder


def event(session: str, i: int) -> StatementEvent:
    return StatementEvent(
        session_id=session,
        connection="bench",
        identity="bench@example.com",
        statement=f"SELECT abalance FROM pgbench_accounts WHERE aid = {i}",
        fingerprint="5d0b1e2f3a4c6d7e",
        classes=("read",),
        command="SELECT",
        parameters=None,
        protocol="simple",
        decision="allow",
        policy="bench",
        start=time.time(),
    )


async def written(rec: SessionRecorder, seconds: float) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        for _ in range(1000):
            rec.statement(event(rec.session_id, n), sync=False)
            n += 1
        await asyncio.sleep(0)
    return n, time.perf_counter() - t0


async def fsynced(recorder: Recorder, sessions: list[SessionRecorder], seconds: float) -> int:
    done = 0
    deadline = time.perf_counter() + seconds
    loop = asyncio.get_running_loop()

    async def one(rec: SessionRecorder) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            ticket = rec.statement(event(rec.session_id, done), sync=True)
            durable: asyncio.Future[bool] = loop.create_future()
            recorder.when_durable(ticket, durable.set_result)
            assert await durable
            done += 1

    await asyncio.gather(*(one(s) for s in sessions))
    return done


async def main(seconds: float, directory: Path) -> None:
    config = Recording.model_validate(
        {"spoolDir": str(directory / "spool"), "sink": {"file": {"dir": str(directory / "rec")}}}
    )
    recorder = Recorder(config, "bench", FileStore(directory / "rec"))
    recorder.start()
    try:
        one = recorder.open_session("w" * 32, "bench@example.com", "statements", {})
        n, took = await written(one, seconds)
        size = len(event("x" * 32, 123456).statement) + 380  # about the encoded size
        print(f"written            {n / took:10.0f} events/s  (~{n / took * size / 1e6:.0f} MB/s)")
        for waiters in (1, 32):
            sessions = [
                recorder.open_session(f"{waiters:02d}{i:030d}", "bench@example.com", "x", {})
                for i in range(waiters)
            ]
            t0 = time.perf_counter()
            done = await fsynced(recorder, sessions, seconds)
            rate = done / (time.perf_counter() - t0)
            label = f"fsynced, {waiters} waiter{'s' if waiters > 1 else ''}"
            print(f"{label:18} {rate:10.0f} events/s")
        stats = recorder.spool.stats
        print(
            f"\n{stats.batches} fsyncs, {stats.fsync_seconds / max(stats.batches, 1) * 1e6:.0f} µs "
            "each on average"
        )
    finally:
        await recorder.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--dir", type=Path, help="where the spool goes (default: a temporary dir)")
    args = ap.parse_args()
    where = args.dir or Path(tempfile.mkdtemp(prefix="pgwarden-spool-bench-"))
    try:
        asyncio.run(main(args.seconds, where))
    finally:
        if args.dir is None:
            shutil.rmtree(where, ignore_errors=True)
