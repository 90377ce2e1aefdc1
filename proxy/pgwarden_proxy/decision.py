"""The decision point: every statement passes here before it is forwarded.

`policy.PolicyDecider` implements `Decider` with access and guardrails; masking and approvals
plug in here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pgwarden_proxy.auth.oidc import Identity
from pgwarden_proxy.sql.classify import StatementInfo
from pgwarden_proxy.wire.messages import ErrorInfo


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str | None = None
    error: ErrorInfo | None = None  # what the client is told when refused

    @property
    def word(self) -> str:
        return "allow" if self.allowed else "refuse"


ALLOW = Decision(True)


class Decider(Protocol):
    def decide(
        self, identity: Identity, statement: StatementInfo, params: Sequence[str | None] | None
    ) -> Decision: ...
