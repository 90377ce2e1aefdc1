"""What the decision point says about one statement (see `policy.EffectivePolicy.decide`)."""

from __future__ import annotations

from dataclasses import dataclass

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
