"""The shipper in a child process of its own.

Shipping is Python work (reading each record, grouping it by session, encoding indexes) at a
few microseconds a record, two records a statement. In the proxy's process that work held the
GIL the event loop needs at every callback: the loop thread switched to and from the shipper's
thread over and over (pgbench -S -M prepared -c 8, recording on: the loop thread's CPU per
statement 102-128 us with the shipper in a thread, 94-109 us with it in a process; throughput
0.46 against 0.55 of the unrecorded proxy). A child process also keeps an S3 client that hangs or
leaks away from the data path.

The child reads sealed segments from the spool directory, uploads them, removes them, and
reports over a pipe: each removed segment's size (the parent's spool accounting, which decides
when the spool is full), and the shipper's status (for metrics and refusal messages). The
parent tells it when a segment was sealed, and when to stop. The child dies with the parent
(PR_SET_PDEATHSIG, and the pipe's end), so a restarted proxy never ships beside an old child.
If the child dies on its own, the parent starts another one.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from pgwarden import logs
from pgwarden.api.config import Recording
from pgwarden.recording.store import Store
from pgwarden_proxy.recording.shipper import Shipper, load_signing_key
from pgwarden_proxy.recording.spool import SealedSegments, Spool

log = logging.getLogger("pgwarden.recording")

# after `stop`'s own time is up: how long the child may take to exit before it is killed
EXIT_GRACE = 5.0
# a child that died on its own is restarted after this long (doubling up to RESTART_MAX)
RESTART_DELAY, RESTART_MAX = 1.0, 30.0
_PR_SET_PDEATHSIG = 1


class ShipperProcess:
    """The parent's side: starts the child, forwards wake-ups, and keeps what it reports (the
    same attributes as a Shipper's, read by metrics and refusal messages)."""

    def __init__(
        self,
        config: Recording,
        spool: Spool,
        store: Store,
        *,
        backoff: tuple[float, float] = (0.2, 30.0),
    ) -> None:
        self.config = config
        self.spool = spool
        self.store = store
        self.backoff = backoff
        load_signing_key(config)  # a bad key fails here, at start, not in the child
        self.error: str | None = None
        self.objects = 0
        self.segments = 0
        self.failures = 0
        self.last_success = 0.0
        self.restarts = 0
        # what the shipper processes before this one reported: the metrics count on
        self._before = (0, 0, 0)  # objects, segments, failures
        self._proc: subprocess.Popen[bytes] | None = None
        self._from_child: Connection | None = None
        self._to_child: Connection | None = None
        self._send_lock = threading.Lock()  # wake() comes from the spool's writer thread
        self._spawn_lock = threading.Lock()  # a restart and stop() do not cross
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """(On a thread that outlives the shipping, the event loop's: PR_SET_PDEATHSIG sends
        the child its SIGKILL when the thread that started it ends.)"""
        self._spawn()
        self._reader = threading.Thread(
            target=self._read, name="pgwarden-shipper-reports", daemon=True
        )
        self._reader.start()

    def wake(self) -> None:
        self._send(("wake",))

    def stop(self, timeout: float) -> bool:
        """Ship what is sealed, for up to `timeout` seconds; True when nothing is left."""
        with self._spawn_lock:
            self._stopping.set()
            proc = self._proc
        if proc is not None:
            self._send(("stop", timeout))
            try:
                proc.wait(timeout + EXIT_GRACE)
            except subprocess.TimeoutExpired:  # stuck in a call to the sink: the next start
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(EXIT_GRACE)
        return not self.spool.sealed()

    # ------------------------------------------------------------------ internals
    def _spawn(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        # the child imports what this process imports, from wherever it found it
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            self._proc = subprocess.Popen(
                # -P: not the working directory first on the path, only PYTHONPATH's
                [sys.executable, "-P", "-m", __name__, str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                stdout=2,  # (the pipe is the channel; anything printed goes to the log)
                env=env,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._from_child = Connection(from_child_r, writable=False)
        to_child = Connection(to_child_w, readable=False)
        with self._send_lock:
            self._to_child = to_child
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        self._send(("setup", self.config, self.store, self.backoff, level, os.getpid()))

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            if self._to_child is None:
                return
            with contextlib.suppress(OSError):  # the child is gone: _read restarts it
                self._to_child.send(message)

    def _read(self) -> None:
        delay = RESTART_DELAY
        while True:
            reports = self._from_child
            assert reports is not None
            try:
                while True:
                    self._on_report(reports.recv())
                    delay = RESTART_DELAY
            except (EOFError, OSError):
                pass
            proc = self._proc
            code = proc.wait() if proc is not None else None
            reports.close()
            with self._send_lock:
                if self._to_child is not None:
                    self._to_child.close()
                    self._to_child = None
            if self._stopping.is_set():
                return
            self.error = f"the shipper process exited (code {code}); restarting it"
            log.error("recording: the shipper process exited, restarting it", extra={"code": code})
            self.failures += 1  # (the ship_failures metric: a crash is a failed attempt too)
            self._before = (self.objects, self.segments, self.failures)
            while True:
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, RESTART_MAX)
                with self._spawn_lock:
                    if self._stopping.is_set():
                        return
                    try:
                        self._spawn()
                    except OSError as e:  # (out of processes or descriptors): try again later
                        self.error = f"the shipper process cannot be started: {e}"
                        log.error(
                            "recording: the shipper process cannot be started",
                            extra={"error": str(e)},
                        )
                        continue
                    self.restarts += 1
                    break

    def _on_report(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "shipped":
            self.spool.released(message[1])
        elif kind == "status":
            _, self.error, objects, segments, failures, last_success = message
            self.last_success = max(self.last_success, last_success)
            before = self._before
            self.objects, self.segments = before[0] + objects, before[1] + segments
            self.failures = before[2] + failures


# ---------------------------------------------------------------------------------- the child
def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(0)


def child(to_child: Connection, from_child: Connection) -> None:
    kind, config, store, backoff, level, parent = to_child.recv()
    assert kind == "setup"
    _die_with_parent(parent)
    logs.configure(level if level in ("debug", "info", "warning", "error") else "info")
    lock = threading.Lock()

    def report(message: tuple[Any, ...]) -> None:
        with lock:
            from_child.send(message)

    def status(s: Shipper) -> None:
        report(("status", s.error, s.objects, s.segments, s.failures, s.last_success))

    shipper = Shipper(
        SealedSegments(config.spool_dir, on_removed=lambda size: report(("shipped", size))),
        store,
        signing_key=load_signing_key(config),
        backoff=backoff,
        on_status=status,
    )
    shipper.start()
    while True:
        try:
            message = to_child.recv()
        except EOFError:  # the parent is gone: what is left ships at its next start
            logs.flush()
            os._exit(0)
        if message[0] == "wake":
            shipper.wake()
        elif message[0] == "stop":
            shipper.stop(message[1])
            status(shipper)
            logs.flush()
            return


def main(argv: list[str]) -> None:
    # SIGINT and SIGTERM go to the whole process group: the parent decides when the child stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child(Connection(int(argv[0]), writable=False), Connection(int(argv[1]), readable=False))


if __name__ == "__main__":
    main(sys.argv[1:])
