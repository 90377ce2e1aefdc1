"""The interface every approval backend implements, and the rules every backend shares.

The proxy submits a request, waits for a decision, and marks the outcome. How a person decides
depends on the backend (`how_to_decide` tells the agent, in the notice it receives).
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from pydantic import ValidationError

from pgwarden.api.approvals import (
    TRANSITIONS,
    ApprovalRequest,
    ApprovalRequestSpec,
    ApprovalRequestStatus,
    ApprovalState,
    utcnow,
)


class ApprovalError(Exception):
    """A request that cannot be read or changed as asked; the message says why and what now."""


class UnknownApproval(ApprovalError):
    """No request of that name."""


class ApprovalBackend(Protocol):
    async def submit(self, spec: ApprovalRequestSpec) -> str:
        """Store a new Pending request; return its name."""
        ...

    # not asyncio.timeout: at the timeout the backend records Expired, it is not a cancellation
    async def wait(self, name: str, timeout: float) -> ApprovalRequestStatus:  # noqa: ASYNC109
        """Return once the request is no longer Pending.

        At `timeout` seconds, or at the request's `expiresAt` if earlier, record Expired (only if
        still Pending: a decision that arrived first wins) and return the recorded status.
        """
        ...

    async def finish(self, name: str, state: ApprovalState, comment: str | None = None) -> None:
        """The proxy's part: Executed once an approved statement ran, or Expired (withdrawn)."""
        ...

    def how_to_decide(self, name: str) -> str:
        """One line telling a person how to approve or deny, shown to the agent in a notice."""
        ...


def validation_summary(err: ValidationError) -> str:
    """The first few problems of a stored request that does not parse, on one line."""
    parts = []
    for item in err.errors()[:3]:
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    more = err.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def seconds_left(req: ApprovalRequest, give_up_in: float) -> float:
    """How long a wait goes on: until the proxy's hold timeout or the request's expiresAt."""
    return min(give_up_in, (req.spec.expires_at - utcnow()).total_seconds())


def expiry_comment(req: ApprovalRequest, timeout: float) -> str:
    """Why a wait that ran out records Expired."""
    if req.past_deadline():
        return "no decision before the deadline"
    return f"no decision within {timeout:g}s"


def finish_comment(state: ApprovalState, comment: str | None) -> str | None:
    """`ApprovalBackend.finish`'s arguments checked; a withdrawal gets a default comment."""
    if state not in (ApprovalState.EXECUTED, ApprovalState.EXPIRED):
        raise ValueError(f"the proxy finishes a request as Executed or Expired, not {state}")
    if state is ApprovalState.EXPIRED and comment is None:
        return "withdrawn by the proxy"
    return comment


def when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def same_person(a: str, b: str) -> bool:
    """Whether two identities name the same person (four eyes).

    Case-insensitive; a bare user name also matches the local part of an e-mail identity, so an
    OS user `alice` cannot approve a request of `alice@example.com` (false matches only refuse).
    """
    x, y = a.strip().casefold(), b.strip().casefold()
    if x == y:
        return True
    if ("@" in x) != ("@" in y):
        return x.split("@", 1)[0] == y.split("@", 1)[0]
    return False


def _refusal(req: ApprovalRequest, new: ApprovalState, now: datetime) -> str:
    name, st = req.name, req.status
    by = f" by {st.decided_by}" if st.decided_by else ""
    if new is ApprovalState.PENDING:
        return f"request {name} cannot go back to Pending"
    at = f" at {when(st.decided_at)}" if st.decided_at else ""
    if req.past_deadline(now):
        return (
            f"request {name} expired at {when(req.spec.expires_at)} without a decision; "
            "the agent must run the statement again to ask anew"
        )
    if st.state is ApprovalState.EXPIRED:
        return (
            f"request {name} expired{at} without a decision; "
            "the agent must run the statement again to ask anew"
        )
    if st.state is ApprovalState.EXECUTED:
        return (
            f"request {name} was approved{by}{at} and has already been executed; "
            "an approval covers one execution"
        )
    if st.state is ApprovalState.PENDING:
        return f"request {name} is still pending; only an approved request can be {new.lower()}"
    return f"request {name} was already {st.state.lower()}{by}{at}"


def transition(
    req: ApprovalRequest,
    new: ApprovalState,
    *,
    by: str | None = None,
    comment: str | None = None,
    now: datetime | None = None,
) -> ApprovalRequest:
    """The request after moving to `new`, or ApprovalError when that move is not allowed.

    Approved needs `by`, a person other than the requester. A Pending request past `expiresAt`
    can only become Expired. Executed keeps who decided and when; a comment is appended.
    """
    now = now or utcnow()
    current = req.status.state
    if new not in TRANSITIONS[current] or (
        req.past_deadline(now) and new is not ApprovalState.EXPIRED
    ):
        raise ApprovalError(_refusal(req, new, now))
    if new is ApprovalState.APPROVED:
        if not by or not by.strip():
            raise ApprovalError(f"approving request {req.name} needs the approver's name")
        if same_person(by, req.spec.requester.username):
            raise ApprovalError(
                f"{by} cannot approve request {req.name}: it was made by "
                f"{req.spec.requester.username}, and a request needs a second person (four eyes)"
            )
    if new is ApprovalState.EXECUTED:
        notes = [c for c in (req.status.comment, comment) if c]
        status = req.status.model_copy(
            update={"state": new, "comment": "; ".join(notes) if notes else None}
        )
    else:
        status = ApprovalRequestStatus(state=new, decided_by=by, decided_at=now, comment=comment)
    return req.model_copy(update={"status": status})
