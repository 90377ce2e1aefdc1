"""The masking rules of a session: every matching policy's column rules and detectors, combined.

Restrictions add up (ARCHITECTURE.md): a column matched by several rules gets the strongest
strategy, in the order null > redact > hash > partial (what reveals least wins), and so does a
detector named by several policies.

Column globs are `schema.table.column`; a shorter glob leaves out the leading parts: `table.column`
means that table in any schema, `column` that column anywhere (`*.ssn` = any table's ssn). Names
compare case-insensitively, so a glob never misses a quoted mixed-case identifier.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pgwarden.api.config import NamedPolicy
from pgwarden.api.policy import Detector, MaskStrategy, glob_parts

# What reveals least ranks highest.
STRENGTH = {
    MaskStrategy.PARTIAL: 1,
    MaskStrategy.HASH: 2,
    MaskStrategy.REDACT: 3,
    MaskStrategy.NULL: 4,
}


def _part_regex(part: str) -> str:
    return "".join("[^.]*" if ch == "*" else "[^.]" if ch == "?" else re.escape(ch) for ch in part)


@dataclass(frozen=True, slots=True)
class ColumnRule:
    glob: str
    strategy: MaskStrategy
    policy: str
    _regex: re.Pattern[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        regex = r"\.".join(_part_regex(p) for p in glob_parts(self.glob))
        object.__setattr__(self, "_regex", re.compile(regex + r"\Z"))

    def matches(self, schema: str, table: str, column: str) -> bool:
        return self._regex.match(f"{schema}.{table}.{column}".lower()) is not None


def strongest(rules: Iterable[ColumnRule | None]) -> ColumnRule | None:
    best: ColumnRule | None = None
    for r in rules:
        if r is not None and (best is None or STRENGTH[r.strategy] > STRENGTH[best.strategy]):
            best = r
    return best


@dataclass(frozen=True)
class MaskRules:
    columns: tuple[ColumnRule, ...] = ()
    detectors: tuple[tuple[Detector, MaskStrategy, str], ...] = ()  # detector, strategy, policy
    _memo: dict[tuple[str, str, str], ColumnRule | None] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )
    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # rules are dictionary keys on every statement (plans, rewriters): hash them once
        object.__setattr__(self, "_hash", hash((self.columns, self.detectors)))

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def combine(cls, policies: Iterable[NamedPolicy]) -> MaskRules:
        columns: list[ColumnRule] = []
        detectors: dict[Detector, tuple[MaskStrategy, str]] = {}
        for p in sorted(policies, key=lambda p: p.name):
            for rule in p.spec.masking:
                columns.extend(ColumnRule(g, rule.strategy, p.name) for g in rule.columns)
                for d in rule.detectors:
                    had = detectors.get(d)
                    if had is None or STRENGTH[rule.strategy] > STRENGTH[had[0]]:
                        detectors[d] = (rule.strategy, p.name)
        return cls(tuple(columns), tuple((d, s, p) for d, (s, p) in sorted(detectors.items())))

    def __bool__(self) -> bool:
        return bool(self.columns or self.detectors)

    def for_column(self, schema: str, table: str, column: str) -> ColumnRule | None:
        key = (schema, table, column)
        try:
            return self._memo[key]
        except KeyError:
            pass
        rule = strongest(r for r in self.columns if r.matches(schema, table, column))
        if len(self._memo) < 100_000:
            self._memo[key] = rule
        return rule

    def as_list(self) -> list[dict[str, object]]:
        """For the session's first event."""
        out: list[dict[str, object]] = [
            {"column": r.glob, "strategy": str(r.strategy), "policy": r.policy}
            for r in self.columns
        ]
        out += [{"detector": str(d), "strategy": str(s), "policy": p} for d, s, p in self.detectors]
        return out
