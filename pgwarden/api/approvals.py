"""ApprovalRequest: a statement the proxy holds until a person decides (field names are a contract).

`ApprovalRequestSpec` and `ApprovalRequestStatus` are the custom resource's `spec` and `status`
(the CRD is generated from them). `ApprovalRequest` is the local form the file backend stores:
`name` and `createdAt` stand in for the resource's `metadata.name` and `creationTimestamp`.

An approval covers one exact statement (fingerprint and parameters) for one identity and session,
once: Pending -> Approved | Denied | Expired, then Approved -> Executed.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from pgwarden.api.policy import Model
from pgwarden.api.statements import StatementClass

# A Kubernetes DNS label (RFC 1123): what an object name must be to be usable anywhere.
NAME_MAX = 63
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NOT_NAME_CHARS = re.compile(r"[^a-z0-9]+")
_SUFFIX_HEX = 8


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("a timestamp must include its timezone (e.g. 2030-01-01T12:00:00Z)")
    return value.astimezone(UTC)


UtcDateTime = Annotated[datetime, AfterValidator(_utc)]


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_valid_name(name: str) -> bool:
    """True for a name a request can have: a DNS label, so also a safe file name."""
    return len(name) <= NAME_MAX and _NAME.match(name) is not None


def _check_name(name: str) -> str:
    if not is_valid_name(name):
        raise ValueError(
            f"{name!r} is not a request name (lowercase letters, digits and '-', at most "
            f"{NAME_MAX} characters, starting and ending with a letter or digit)"
        )
    return name


def new_request_name(connection: str) -> str:
    """`<connection>-<8 random hex>`, sanitised to a Kubernetes name (DNS label, <= 63 chars)."""
    prefix = _NOT_NAME_CHARS.sub("-", connection.lower()).strip("-")
    prefix = prefix[: NAME_MAX - _SUFFIX_HEX - 1].rstrip("-") or "approval"
    return f"{prefix}-{secrets.token_hex(_SUFFIX_HEX // 2)}"


class Requester(Model):
    username: str = Field(min_length=1)
    groups: list[str] = Field(default_factory=list)


class ApprovalRequestSpec(Model):
    connection: str = Field(min_length=1)
    requester: Requester
    session_id: str = Field(min_length=1, alias="sessionId")
    statement: str
    fingerprint: str
    classes: list[StatementClass] = Field(min_length=1)
    policy: str = Field(description="the policy whose approvals.require holds the statement")
    expires_at: UtcDateTime = Field(alias="expiresAt")
    # Extended-protocol parameters as text (None = SQL NULL); None for a simple-protocol Query.
    # An addition to the contract: the approval covers these exact values.
    parameters: list[str | None] | None = None


class ApprovalState(StrEnum):
    PENDING = "Pending"
    APPROVED = "Approved"
    DENIED = "Denied"
    EXPIRED = "Expired"
    EXECUTED = "Executed"


# The only transitions there are; anything else is refused (see pgwarden_proxy.approvals).
TRANSITIONS: dict[ApprovalState, frozenset[ApprovalState]] = {
    ApprovalState.PENDING: frozenset(
        {ApprovalState.APPROVED, ApprovalState.DENIED, ApprovalState.EXPIRED}
    ),
    ApprovalState.APPROVED: frozenset({ApprovalState.EXECUTED}),
    ApprovalState.DENIED: frozenset(),
    ApprovalState.EXPIRED: frozenset(),
    ApprovalState.EXECUTED: frozenset(),
}


class ApprovalRequestStatus(Model):
    state: ApprovalState = ApprovalState.PENDING
    decided_by: str | None = Field(default=None, alias="decidedBy")
    decided_at: UtcDateTime | None = Field(default=None, alias="decidedAt")
    comment: str | None = None


class ApprovalRequest(Model):
    name: Annotated[str, AfterValidator(_check_name)]
    created_at: UtcDateTime = Field(alias="createdAt")
    spec: ApprovalRequestSpec
    status: ApprovalRequestStatus = Field(default_factory=ApprovalRequestStatus)

    @classmethod
    def from_resource(cls, obj: Mapping[str, Any], name: str | None = None) -> ApprovalRequest:
        """The ApprovalRequest custom resource as a request: no status yet is Pending; a
        resource the server has not stamped (no creationTimestamp) counts as created now."""
        meta = obj.get("metadata") or {}
        return cls.model_validate(
            {
                "name": meta.get("name", name),
                "createdAt": meta.get("creationTimestamp") or utcnow().isoformat(),
                "spec": obj.get("spec"),
                "status": obj.get("status") or {},
            }
        )

    def past_deadline(self, now: datetime | None = None) -> bool:
        """Still Pending although `expiresAt` has passed (nobody has written Expired yet)."""
        return self.status.state is ApprovalState.PENDING and (now or utcnow()) >= (
            self.spec.expires_at
        )

    def as_of(self, now: datetime | None = None) -> ApprovalRequest:
        """The request as it stands at `now`: a Pending request past `expiresAt` is Expired."""
        if not self.past_deadline(now):
            return self
        expired = ApprovalRequestStatus(
            state=ApprovalState.EXPIRED,
            decided_at=self.spec.expires_at,
            comment="no decision before the deadline",
        )
        return self.model_copy(update={"status": expired})
