"""The interface every approval backend implements, and the rules every backend shares.

The proxy submits a request, waits for a decision, and marks the outcome. How a person decides
depends on the backend (`how_to_decide` tells the agent, in the notice it receives).
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

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
