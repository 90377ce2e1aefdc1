"""The operator's part of ApprovalRequests: expiry at `expiresAt`, events, and cleanup.

- create/resume: the spec is validated (invalid: a warning event `InvalidSpec`, the request is
  left alone, nothing raised); at create a Normal event `Pending: <requester> asks to run
  <statement, at most 200 characters> (<classes>) on <connection>`.
- `status.state` changes: a Normal event per decision (`Approved`/`Denied` by whom, `Expired`,
  `Executed`).
- a Pending request is expired at `spec.expiresAt`: status Expired, decidedAt = expiresAt,
  comment "no decision before the deadline". The write is a compare-and-set: the status patch
  carries the resourceVersion just read, so a decision that lands between the read and the write
  makes it fail with 409; the request is read again and, no longer Pending, left as decided (the
  CRD's transition rule refuses Approved -> Expired as a second line).
- a decided request (Denied, Expired, Executed) is deleted `PGWARDEN_APPROVAL_RETENTION` after
  its `decidedAt` (default 7d; `90`, `45s`, `30m`, `12h`, `7d`). Without decidedAt, the clock
  starts when this operator first saw it decided (a restart only delays the deletion). Approved
  requests that are never executed stay.

Scheduling: one asyncio task per request that sleeps until its next due moment (expiry or
deletion) and then acts, like a kopf daemon; it is replaced when the request changes (a watch
event) and cancelled when the request is deleted or stops needing one. Not a kopf daemon or
timer: kopf adds its finalizer to every object a daemon or timer matches (`requires_finalizer`
is fixed to True for both), and ApprovalRequests must not need the operator to be deleted. The
handlers used here (create, resume, field, event) never add a finalizer; kopf only keeps its
progress and last-handled-configuration annotations on the request (metadata: the spec stays
immutable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import kopf
from pydantic import ValidationError

from pgwarden.api.approvals import ApprovalRequestSpec, ApprovalState
from pgwarden.api.resources import API_VERSION, APPROVAL_REQUEST, GROUP, VERSION
from pgwarden_operator.k8s import ApiPermanentError, ApiTemporaryError, Obj

if TYPE_CHECKING:
    from pgwarden_operator.handlers import Operator

APPROVALS = APPROVAL_REQUEST.plural
RETENTION_ENV = "PGWARDEN_APPROVAL_RETENTION"
DEFAULT_RETENTION = timedelta(days=7)
EXPIRED_COMMENT = "no decision before the deadline"
DECIDED = frozenset({ApprovalState.DENIED, ApprovalState.EXPIRED, ApprovalState.EXECUTED})
INVALID_SPEC = "InvalidSpec"
CAS_ATTEMPTS = 5
RETRY_DELAY = 5.0  # seconds before a failed expiry or deletion is tried again

_log = logging.getLogger("pgwarden.operator.approvals")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_retention(value: str | None) -> timedelta:
    """`7d`, `12h`, `30m`, `45s` or plain seconds (`2.5`); unset or empty: 7 days."""
    if value is None or not value.strip():
        return DEFAULT_RETENTION
    m = _DURATION.match(value.lower())
    if m is None:
        raise ValueError(
            f"{RETENTION_ENV}={value!r}: expected seconds or a number with s, m, h or d"
        )
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def retention_from_env() -> timedelta:
    try:
        return parse_retention(os.environ.get(RETENTION_ENV))
    except ValueError as e:
        _log.warning("%s; using %s", e, DEFAULT_RETENTION)
        return DEFAULT_RETENTION


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t.astimezone(UTC) if t.tzinfo is not None else None


def _iso(t: datetime) -> str:
    """RFC 3339 in UTC, fractions kept (decidedAt = expiresAt to the microsecond)."""
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _state(obj: Mapping[str, Any]) -> ApprovalState | None:
    """The request's state (no status yet: Pending); None for a state there is not."""
    raw = (obj.get("status") or {}).get("state") or ApprovalState.PENDING.value
    try:
        return ApprovalState(raw)
    except ValueError:
        return None


def _spec(obj: Mapping[str, Any]) -> ApprovalRequestSpec:
    return ApprovalRequestSpec.model_validate(obj.get("spec") or {})


STATEMENT_MAX = 200  # characters of the statement an event quotes


def describe_pending(spec: ApprovalRequestSpec) -> str:
    """`Pending: alice asks to run DELETE FROM orders WHERE id = $1 (write) on orders`."""
    statement = " ".join(spec.statement.split())
    if len(statement) > STATEMENT_MAX:
        statement = statement[: STATEMENT_MAX - 3] + "..."
    classes = ", ".join(c.value for c in spec.classes)
    return (
        f"Pending: {spec.requester.username} asks to run {statement} ({classes}) "
        f"on {spec.connection}"
    )


def describe_state(state: ApprovalState, status: Mapping[str, Any]) -> str:
    by = status.get("decidedBy")
    comment = status.get("comment")
    message = state.value
    if by and state in (ApprovalState.APPROVED, ApprovalState.DENIED):
        message += f" by {by}"
    if comment:
        message += f": {comment}"
    return message


@dataclass(frozen=True)
class _Plan:
    action: str  # "expire" | "delete"
    due: datetime
    uid: str


class ApprovalKeeper:
    """Expiry and cleanup tasks for the ApprovalRequests one operator sees."""

    def __init__(self, op: Operator, *, retention: timedelta | None = None) -> None:
        self.op = op
        self.retention = retention if retention is not None else retention_from_env()
        self._tasks: dict[tuple[str, str], tuple[_Plan, asyncio.Task[None]]] = {}
        self._seen_decided: dict[str, datetime] = {}  # uid -> first seen decided

    # ------------------------------------------------------------------------------ plan
    def plan(self, obj: Mapping[str, Any], now: datetime | None = None) -> _Plan | None:
        """What is due for this request next, and when; None: nothing (for now)."""
        meta = obj.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        if meta.get("deletionTimestamp"):
            return None
        state = _state(obj)
        if state is ApprovalState.PENDING:
            try:
                spec = _spec(obj)
            except ValidationError:
                return None  # reported by the create/resume handler; left alone
            return _Plan("expire", spec.expires_at, uid)
        if state in DECIDED:
            self._seen_decided.setdefault(uid, now or datetime.now(UTC))
            decided = _parse_time((obj.get("status") or {}).get("decidedAt"))
            start = decided or self._seen_decided[uid]
            return _Plan("delete", start + self.retention, uid)
        return None  # Approved (waiting for the proxy) or an unknown state

    def observe(self, obj: Mapping[str, Any], deleted: bool = False) -> None:
        """A watch event: (re)schedule this request's task, or cancel it."""
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        plan = None if deleted else self.plan(obj)
        if deleted:
            self._seen_decided.pop(str(meta.get("uid") or ""), None)
        current = self._tasks.get(key)
        if current is not None:
            if current[0] == plan and not current[1].done():
                return  # already scheduled for exactly this
            current[1].cancel()
            del self._tasks[key]
        if plan is not None:
            task = asyncio.create_task(self._run(key, plan), name=f"approval {key[0]}/{key[1]}")
            self._tasks[key] = (plan, task)

    async def stop(self) -> None:
        tasks = [t for _, t in self._tasks.values()]
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # ------------------------------------------------------------------------------ act
    async def _run(self, key: tuple[str, str], plan: _Plan) -> None:
        namespace, name = key
        while True:
            delay = (plan.due - datetime.now(UTC)).total_seconds()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                if plan.action == "expire":
                    await self.expire(namespace, name, plan.uid)
                else:
                    await self.delete(namespace, name, plan.uid)
                return
            except ApiTemporaryError as e:
                _log.warning("ApprovalRequest %s/%s: %s; retrying", namespace, name, e)
                await asyncio.sleep(float(e.delay or RETRY_DELAY))
            except ApiPermanentError as e:
                _log.error("ApprovalRequest %s/%s: %s; giving up", namespace, name, e)
                return

    async def expire(self, namespace: str, name: str, uid: str) -> bool:
        """Pending and past expiresAt -> Expired, unless a decision wins the race."""
        api = await self.op.api()
        for _ in range(CAS_ATTEMPTS):
            live = await api.get(API_VERSION, APPROVALS, namespace, name)
            if live is None or (uid and live["metadata"].get("uid") != uid):
                return False  # gone (or a new request with the same name)
            if _state(live) is not ApprovalState.PENDING:
                return False  # decided meanwhile: the decision stands
            try:
                spec = _spec(live)
            except ValidationError:
                return False
            if datetime.now(UTC) < spec.expires_at:
                return False  # not due (the next watch event reschedules)
            patch = {
                "metadata": {"resourceVersion": live["metadata"].get("resourceVersion")},
                "status": {
                    "state": ApprovalState.EXPIRED.value,
                    "decidedAt": _iso(spec.expires_at),
                    "decidedBy": None,
                    "comment": EXPIRED_COMMENT,
                },
            }
            try:
                await api.patch(
                    API_VERSION, APPROVALS, namespace, name, patch, subresource="status"
                )
            except ApiTemporaryError as e:
                if e.status == 409:
                    continue  # changed since the read: read it again
                raise
            except ApiPermanentError as e:
                if e.status == 422:
                    continue  # the transition rule refused it: decided meanwhile
                raise
            _log.info("ApprovalRequest %s/%s expired", namespace, name)
            return True
        return False

    async def delete(self, namespace: str, name: str, uid: str) -> bool:
        api = await self.op.api()
        try:
            gone = await api.delete(API_VERSION, APPROVALS, namespace, name, uid=uid or None)
        except ApiTemporaryError as e:
            if e.status == 409:
                return False  # the uid precondition failed: a new request of that name
            raise
        if gone:
            _log.info(
                "ApprovalRequest %s/%s deleted: decided more than %s ago",
                namespace,
                name,
                self.retention,
            )
        return gone


def register(registry: kopf.OperatorRegistry, keeper: ApprovalKeeper) -> None:
    """The ApprovalRequest handlers; none of them makes kopf add a finalizer."""

    @kopf.on.create(GROUP, VERSION, APPROVALS, id="approval", registry=registry)
    async def approval_created(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        spec = _validated(body, logger)
        if spec is not None and _state(body) is ApprovalState.PENDING:
            kopf.info(body, reason=ApprovalState.PENDING.value, message=describe_pending(spec))

    @kopf.on.resume(GROUP, VERSION, APPROVALS, id="approval", registry=registry)
    async def approval_resumed(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        _validated(body, logger)

    @kopf.on.field(
        GROUP, VERSION, APPROVALS, field="status.state", id="approval-state", registry=registry
    )
    async def approval_state(body: kopf.Body, new: Any, **_: Any) -> None:
        try:
            state = ApprovalState(new)
        except ValueError:
            return
        if state is not ApprovalState.PENDING:  # Pending: the create event said it
            kopf.info(body, reason=state.value, message=describe_state(state, body.status))

    @kopf.on.event(GROUP, VERSION, APPROVALS, id="approval-schedule", registry=registry)
    async def approval_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        obj: Obj = {k: body[k] for k in body}
        keeper.observe(obj, deleted=event.get("type") == "DELETED")


def _validated(body: kopf.Body, logger: kopf.Logger) -> ApprovalRequestSpec | None:
    from pgwarden_operator.handlers import validation_message

    try:
        return _spec(body)
    except ValidationError as e:
        message = validation_message(e)
        logger.warning("ApprovalRequest: invalid spec: %s", message)
        kopf.warn(body, reason=INVALID_SPEC, message=message[:1024])
        return None
