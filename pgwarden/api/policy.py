"""AccessPolicy.spec: who may do what through a connection (field names are a contract)."""

from __future__ import annotations

import re
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator

from pgwarden.api.statements import StatementClass

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> timedelta:
    """Accept `30s`, `500ms`, `5m`, `1h`, a bare number of seconds, or a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return timedelta(seconds=float(value))
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2)])
    raise ValueError(f"{value!r} is not a duration; write e.g. 500ms, 30s, 5m or 1h")


def _format_duration(value: timedelta) -> str:
    ms = round(value.total_seconds() * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


Duration = Annotated[
    timedelta, BeforeValidator(parse_duration), PlainSerializer(_format_duration, return_type=str)
]


class Model(BaseModel):
    """Base for every external shape: unknown fields are errors, names are camelCase."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Access(StrEnum):
    READ_ONLY = "read-only"
    READ_WRITE = "read-write"


class Subjects(Model):
    groups: list[str] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)


class Guardrails(Model):
    deny: list[StatementClass] = Field(default_factory=list)
    deny_functions: list[str] = Field(default_factory=list, alias="denyFunctions")
    max_rows: int | None = Field(default=None, ge=1, alias="maxRows")
    statement_timeout: Duration | None = Field(default=None, alias="statementTimeout")


class MaskStrategy(StrEnum):
    REDACT = "redact"
    PARTIAL = "partial"
    HASH = "hash"
    NULL = "null"


class Detector(StrEnum):
    EMAIL = "email"
    CREDIT_CARD = "credit-card"
    US_SSN = "us-ssn"
    PHONE = "phone"
    IBAN = "iban"
    IP_ADDRESS = "ip-address"
    SECRET = "secret"


def glob_parts(glob: str) -> tuple[str, str, str]:
    """`schema.table.column` globs; shorter ones leave out leading parts (`*.ssn`: any table)."""
    parts = glob.lower().split(".")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise ValueError(
            f"{glob!r} is not a column glob: write schema.table.column, table.column or column "
            "(each part may use * and ?)"
        )
    s, t, c = ["*"] * (3 - len(parts)) + parts
    return s, t, c


class MaskingRule(Model):
    columns: list[str] = Field(default_factory=list)
    detectors: list[Detector] = Field(default_factory=list)
    strategy: MaskStrategy = MaskStrategy.REDACT

    @model_validator(mode="after")
    def _something_to_mask(self) -> MaskingRule:
        if not self.columns and not self.detectors:
            raise ValueError("a masking rule needs columns or detectors")
        for glob in self.columns:
            glob_parts(glob)
        return self


class Approvals(Model):
    require: list[StatementClass] = Field(default_factory=list)


class PolicyRecording(Model):
    level: Literal["statements", "results"] = "statements"


class AccessPolicySpec(Model):
    connections: list[str] = Field(default_factory=lambda: ["*"])
    subjects: Subjects = Field(default_factory=Subjects)
    access: Access = Access.READ_ONLY
    guardrails: Guardrails = Field(default_factory=Guardrails)
    masking: list[MaskingRule] = Field(default_factory=list)
    approvals: Approvals = Field(default_factory=Approvals)
    recording: PolicyRecording = Field(default_factory=PolicyRecording)

    def selects(self, connection: str) -> bool:
        return "*" in self.connections or connection in self.connections

    def grants(self, username: str, groups: frozenset[str] | set[str]) -> bool:
        return username in self.subjects.users or any(g in groups for g in self.subjects.groups)
