"""The file backend: one JSON file per request in a directory (local use, the demo, tests).

`<dir>/<name>.json` holds the whole `ApprovalRequest`, camelCase as in the custom resource. Every
change is a compare-and-set under an exclusive `flock` on `<dir>/.lock`: re-read, check the
transition, write a temp file in the same directory, fsync, rename over. So the proxy expiring a
request and a person approving it at the same moment never both win, and readers never see half a
file. Blocking file work runs in a worker thread; `wait` polls, which is plenty for a person's
decision and needs no extra dependency.

This backend trusts whoever can write the directory: `decidedBy` is what the approver says it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from pgwarden.api.approvals import (
    NAME_MAX,
    ApprovalRequest,
    ApprovalRequestSpec,
    ApprovalRequestStatus,
    ApprovalState,
    is_valid_name,
    new_request_name,
    utcnow,
)
from pgwarden_proxy.approvals.backend import (
    ApprovalError,
    UnknownApproval,
    expiry_comment,
    finish_comment,
    seconds_left,
    transition,
    validation_summary,
)

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.15  # seconds between two looks at a request `wait` is waiting on
LOCK_TIMEOUT = 10.0  # seconds to get the directory lock before giving up with an error
LOCK_FILE = ".lock"
SUFFIX = ".json"
FILE_MODE = 0o600
DIR_MODE = 0o750


class FileApprovals:
    """Implements `ApprovalBackend` over a directory; the sync methods serve the CLI."""

    def __init__(
        self, directory: Path, *, create: bool = True, poll_interval: float = POLL_INTERVAL
    ) -> None:
        self.directory = directory.absolute()
        if create:
            self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        elif not self.directory.is_dir():
            raise ApprovalError(f"{self.directory} is not a directory (of approval requests)")
        self.poll_interval = poll_interval

    # -- the proxy's side (ApprovalBackend) ------------------------------------------------------

    async def submit(self, spec: ApprovalRequestSpec) -> str:
        return (await asyncio.to_thread(self.create, spec)).name

    async def wait(self, name: str, timeout: float) -> ApprovalRequestStatus:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        give_up = loop.time() + max(timeout, 0.0)
        while True:
            req = self._stored(name)
            if req.status.state is not ApprovalState.PENDING:
                return req.status
            left = seconds_left(req, give_up - loop.time())
            if left <= 0:
                why = expiry_comment(req, timeout)
                return (await asyncio.to_thread(self._expire, name, why)).status
            await asyncio.sleep(min(self.poll_interval, left))

    async def finish(self, name: str, state: ApprovalState, comment: str | None = None) -> None:
        comment = finish_comment(state, comment)
        await asyncio.to_thread(self._change, name, state, None, comment)

    def how_to_decide(self, name: str) -> str:
        where = shlex.quote(str(self.directory))
        return (
            f"a person approves with `pgwarden approvals approve {name} --dir {where}` "
            f"or denies with `pgwarden approvals deny {name} --dir {where}`"
        )

    # -- synchronous API (the CLI, and the worker threads above) ---------------------------------

    def create(self, spec: ApprovalRequestSpec) -> ApprovalRequest:
        """Store a new Pending request under a fresh name."""
        with self._locked():
            while True:
                name = new_request_name(spec.connection)
                if not self._path(name).exists():
                    break
            req = ApprovalRequest(name=name, created_at=utcnow(), spec=spec)
            self._write(req)
        return req

    def get(self, name: str) -> ApprovalRequest:
        """The request as it stands now (Pending past its `expiresAt` reads as Expired)."""
        return self._stored(name).as_of(utcnow())

    def list_requests(self, *, include_all: bool = False) -> list[ApprovalRequest]:
        """Pending requests (every request with `include_all`), oldest first.

        Files that are not requests are skipped with a warning.
        """
        now = utcnow()
        found = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path.name.startswith("."):
                continue
            try:
                req = self._load(path).as_of(now)
            except FileNotFoundError:
                continue  # removed since the directory was read
            except (OSError, ApprovalError) as e:
                log.warning("skipping %s: %s", path, e)
                continue
            if include_all or req.status.state is ApprovalState.PENDING:
                found.append(req)
        found.sort(key=lambda r: (r.created_at, r.name))
        return found

    def decide(
        self, name: str, state: ApprovalState, *, by: str, comment: str | None = None
    ) -> ApprovalRequest:
        """A person's decision: Approved or Denied (ApprovalError when it cannot be taken)."""
        if state not in (ApprovalState.APPROVED, ApprovalState.DENIED):
            raise ValueError(f"a person decides Approved or Denied, not {state}")
        return self._change(name, state, by, comment)

    # -- internals -------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if not is_valid_name(name):
            raise ApprovalError(
                f"{name!r} is not a request name (lowercase letters, digits and '-', "
                f"at most {NAME_MAX} characters)"
            )
        return self.directory / f"{name}{SUFFIX}"

    def _load(self, path: Path) -> ApprovalRequest:
        """Raises FileNotFoundError, or ApprovalError for anything that is not a request."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise ApprovalError(f"{path}: cannot read it: {e.strerror}") from e
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        try:
            req = ApprovalRequest.model_validate_json(data)
        except ValidationError as e:
            why = validation_summary(e)
            raise ApprovalError(f"{path} is not an approval request: {why}") from e
        if path.name != f"{req.name}{SUFFIX}":
            raise ApprovalError(f"{path} holds request {req.name!r}: the file name must match")
        return req

    def _stored(self, name: str) -> ApprovalRequest:
        """The request exactly as recorded (no deadline applied)."""
        try:
            return self._load(self._path(name))
        except FileNotFoundError:
            raise UnknownApproval(f"no approval request {name} in {self.directory}") from None

    def _change(
        self, name: str, state: ApprovalState, by: str | None, comment: str | None
    ) -> ApprovalRequest:
        """Compare-and-set: the transition is checked against the file as it is under the lock."""
        with self._locked():
            req = self._stored(name)
            if state is ApprovalState.EXPIRED and req.status.state is ApprovalState.EXPIRED:
                return req  # the proxy withdrawing what already expired: nothing to do
            if req.past_deadline() and state is not ApprovalState.EXPIRED:
                # record what every reader already reports; `transition` below refuses with why
                self._write(
                    transition(
                        req, ApprovalState.EXPIRED, comment="no decision before the deadline"
                    )
                )
            updated = transition(req, state, by=by, comment=comment)
            self._write(updated)
            return updated

    def _expire(self, name: str, comment: str) -> ApprovalRequest:
        """Expired, unless a decision got there first: then that decision stands."""
        with self._locked():
            req = self._stored(name)
            if req.status.state is not ApprovalState.PENDING:
                return req
            updated = transition(req, ApprovalState.EXPIRED, comment=comment)
            self._write(updated)
            return updated

    def _write(self, req: ApprovalRequest) -> None:
        data = (req.model_dump_json(by_alias=True, indent=2) + "\n").encode()
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{req.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), FILE_MODE)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(req.name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename durable where the filesystem can
            dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        path = self.directory / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError as e:
            raise ApprovalError(f"{path}: cannot open the lock file: {e.strerror}") from e
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ApprovalError(
                            f"{path} stayed locked for {LOCK_TIMEOUT:g}s; another pgwarden "
                            "process holds it (try again, or look for a stuck process)"
                        ) from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # releases the lock
