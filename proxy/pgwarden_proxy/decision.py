"""What the decision point says about one statement (see `policy.EffectivePolicy.decide`)."""

from __future__ import annotations

from dataclasses import dataclass

from pgwarden.api.statements import StatementClass
from pgwarden_proxy.wire.messages import ErrorInfo


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str | None = None
    error: ErrorInfo | None = None  # what the client is told when refused
    hold: StatementClass | None = None  # allowed once a person approves (the class that needs it)

    @property
    def word(self) -> str:
        if not self.allowed:
            return "refuse"
        return "allow" if self.hold is None else "hold"


ALLOW = Decision(True)
