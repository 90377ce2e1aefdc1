"""The effective policy of a session, and the access and guardrail decisions it makes.

Combination follows ARCHITECTURE.md: grants add up (`read-write` only if some matching policy
grants it), restrictions add up (every denied class and function, the smallest `maxRows` and
`statementTimeout`). A statement the parser could not place (`unknown`) is refused wherever
anything is restricted. Refusals are `42501` errors that name the policy, the class, and what
the agent may do instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pgwarden.api.config import NamedPolicy
from pgwarden.api.policy import Access
from pgwarden.api.statements import StatementClass
from pgwarden_proxy.auth.oidc import Identity
from pgwarden_proxy.decision import ALLOW, Decision
from pgwarden_proxy.masking.rules import MaskRules
from pgwarden_proxy.sql.classify import StatementInfo
from pgwarden_proxy.wire.messages import ErrorInfo

C = StatementClass

# What read-only access permits: reading, transaction control and (presentation) settings.
READ_ONLY_CLASSES = frozenset({C.READ, C.TRANSACTION, C.SETTINGS})

# Where a class is refused, what the agent can do instead.
_INSTEAD: dict[StatementClass, str] = {
    C.WRITE: "this session may read (SELECT) but not change data",
    C.UNQUALIFIED_WRITE: "add a WHERE clause that selects the rows to change",
    C.DDL: "schema changes go through your migration process, not this session",
    C.DROP: "dropping objects is not possible through this session; ask a person to do it",
    C.TRUNCATE: "use DELETE with a WHERE clause, if writes are allowed",
    C.DCL: "privileges are managed by the database administrators",
    C.COPY_PROGRAM: "COPY to or from a server program is not possible; use COPY ... TO STDOUT",
    C.SERVER_FILES: "reading or writing server files is not possible; query tables instead",
    C.SESSION_AUTHORIZATION: "the session's role is fixed by pgwarden; do not SET ROLE",
    C.SETTINGS: "keep the session's settings as they are",
    C.PROCEDURAL: "write the logic as plain SQL statements instead of DO, CALL or functions",
    C.ADMIN: "administrative commands and functions are for the database administrators",
    C.TRANSACTION: "run statements without explicit transaction control",
    C.READ: "this policy does not allow reading either; ask for a policy that does",
    C.UNKNOWN: "pgwarden could not parse this statement; rewrite it in plain PostgreSQL SQL",
}


# A refusal names the most specific class it can: DROP TABLE is "drop" before it is "ddl".
_SPECIFIC_FIRST = {
    c: i
    for i, c in enumerate(
        [
            C.DROP,
            C.TRUNCATE,
            C.UNQUALIFIED_WRITE,
            C.COPY_PROGRAM,
            C.SERVER_FILES,
            C.SESSION_AUTHORIZATION,
            C.DCL,
            C.ADMIN,
            C.PROCEDURAL,
            C.SETTINGS,
            C.DDL,
            C.WRITE,
            C.TRANSACTION,
            C.READ,
            C.UNKNOWN,
        ]
    )
}


def _specific_first(classes: frozenset[StatementClass]) -> list[StatementClass]:
    return sorted(classes, key=lambda c: _SPECIFIC_FIRST.get(c, len(_SPECIFIC_FIRST)))


def _refusal(message: str, hint: str) -> ErrorInfo:
    return ErrorInfo("42501", f"pgwarden: {message}", hint=hint)


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """Every matching policy of a session, combined once at login."""

    policies: tuple[str, ...]
    read_write: str | None  # the policy that grants read-write; None: read-only
    deny: dict[StatementClass, str]  # class -> the (first) policy that denies it
    deny_functions: dict[str, str]  # lower-case function name -> policy
    max_rows: int | None
    statement_timeout: timedelta | None
    timeout_policy: str | None = None  # the policy whose statementTimeout is the smallest
    max_rows_policy: str | None = None  # the policy whose maxRows is the smallest
    approvals: dict[StatementClass, str] = field(default_factory=dict)  # class -> policy
    masking: MaskRules = field(default_factory=MaskRules)
    # "results" when any matching policy asks for it (more evidence is the stricter choice)
    recording_level: str = "statements"
    # decide()'s answers by statement: id -> (the StatementInfo, its decision). The info is
    # kept, so its id is not reused while its entry is here; most statements a session runs
    # are the same objects again (the analyzer's cache, prepared statements).
    _decided: dict[int, tuple[StatementInfo, Decision]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def combine(cls, policies: Sequence[NamedPolicy]) -> EffectivePolicy:
        ordered = sorted(policies, key=lambda p: p.name)
        deny: dict[StatementClass, str] = {}
        deny_functions: dict[str, str] = {}
        max_rows: int | None = None
        timeout: timedelta | None = None
        timeout_policy: str | None = None
        max_rows_policy: str | None = None
        read_write: str | None = None
        approvals: dict[StatementClass, str] = {}
        for p in ordered:
            for c in p.spec.approvals.require:
                approvals.setdefault(c, p.name)
            g = p.spec.guardrails
            for c in g.deny:
                deny.setdefault(c, p.name)
            for f in g.deny_functions:
                deny_functions.setdefault(f.lower(), p.name)
            if g.max_rows is not None and (max_rows is None or g.max_rows < max_rows):
                max_rows, max_rows_policy = g.max_rows, p.name
            if g.statement_timeout is not None and (
                timeout is None or g.statement_timeout < timeout
            ):
                timeout, timeout_policy = g.statement_timeout, p.name
            if p.spec.access is Access.READ_WRITE and read_write is None:
                read_write = p.name
        names = tuple(p.name for p in ordered)
        return cls(
            names,
            read_write,
            deny,
            deny_functions,
            max_rows,
            timeout,
            timeout_policy,
            max_rows_policy,
            approvals,
            MaskRules.combine(ordered),
            "results"
            if any(p.spec.recording.level == "results" for p in ordered)
            else "statements",
        )

    def rows_cut_notice(self, dropped: int) -> ErrorInfo:
        return ErrorInfo(
            "01000",
            f"pgwarden: the result was cut at {self.max_rows} rows (maxRows of policy "
            f'"{self.max_rows_policy}"); {dropped} more rows were not sent',
            "WARNING",
            hint="select fewer rows: add a WHERE clause or LIMIT, or aggregate",
        )

    def upstream_settings(self) -> dict[str, str]:
        """Startup parameters of the database session: its defaults, which RESET returns to."""
        settings: dict[str, str] = {}
        if self.read_write is None:
            settings["default_transaction_read_only"] = "on"
        if self.statement_timeout is not None:
            ms = max(1, round(self.statement_timeout.total_seconds() * 1000))
            settings["statement_timeout"] = str(ms)
        return settings

    @property
    def fixed_settings(self) -> dict[str, str]:
        """Settings the client may not change (lower-case name -> the policy that fixes it)."""
        fixed: dict[str, str] = {}
        if self.read_write is None and self.policies:
            for name in ("default_transaction_read_only", "transaction_read_only", "*"):
                fixed[name] = self.policies[0]
        if self.timeout_policy is not None:
            fixed["statement_timeout"] = fixed["*"] = self.timeout_policy
        return fixed

    @property
    def restricts(self) -> bool:
        return (
            self.read_write is None
            or bool(self.deny)
            or bool(self.deny_functions)
            or self.max_rows is not None
            or bool(self.approvals)
            or bool(self.masking)
        )

    def as_dict(self) -> dict[str, Any]:
        """For the session's first event: what this session may do, and why."""
        return {
            "policies": list(self.policies),
            "access": "read-write" if self.read_write else "read-only",
            "deny": sorted(self.deny),
            "denyFunctions": sorted(self.deny_functions),
            "maxRows": self.max_rows,
            "statementTimeout": (
                self.statement_timeout.total_seconds() if self.statement_timeout else None
            ),
            "approvals": sorted(self.approvals),
            "masking": self.masking.as_list(),
            "recording": self.recording_level,
        }

    def decide(self, st: StatementInfo) -> Decision:
        """The decision on `st` (remembered: it depends only on the policy and `st`)."""
        known = self._decided.get(id(st))
        if known is not None and known[0] is st:
            return known[1]
        decision = self._decide(st)
        if len(self._decided) >= 4096:
            self._decided.clear()
        self._decided[id(st)] = (st, decision)
        return decision

    def _decide(self, st: StatementInfo) -> Decision:
        what = st.command or "this statement"
        if not self.policies:  # a reload took this identity's last policy away
            return Decision(
                False,
                None,
                _refusal(
                    f"{what} is refused: no AccessPolicy grants this identity access to this "
                    "connection any more",
                    "ask a platform engineer to add you or one of your groups to the subjects "
                    "of an AccessPolicy for this connection",
                ),
            )
        if C.UNKNOWN in st.classes and self.restricts:
            reason = f" ({st.error})" if st.error else ""
            names = ", ".join(self.policies)
            return Decision(
                False,
                self.policies[0] if self.policies else None,
                _refusal(
                    f"{what} is refused: pgwarden cannot classify it{reason}, and policy "
                    f'"{names}" restricts this session, so unknown statements are not run',
                    _INSTEAD[C.UNKNOWN],
                ),
            )
        fixed = self.fixed_settings
        for name in sorted(st.settings & fixed.keys()):
            shown = "every setting" if name == "*" else f'"{name}"'
            return Decision(
                False,
                fixed[name],
                _refusal(
                    f'{what} is refused: it would change {shown}, which policy "{fixed[name]}" '
                    "fixes for this session",
                    "leave these settings as they are; other settings (search_path, "
                    "DateStyle, ...) can be changed",
                ),
            )
        for c in _specific_first(st.classes):
            policy = self.deny.get(c)
            if policy is not None:
                return Decision(
                    False,
                    policy,
                    _refusal(
                        f'{what} is refused: statements of class "{c}" are denied by policy '
                        f'"{policy}"',
                        _INSTEAD[c],
                    ),
                )
        if self.read_write is None:
            beyond = _specific_first(st.classes - READ_ONLY_CLASSES - {C.UNKNOWN})
            if beyond:
                c = beyond[0]
                names = ", ".join(f'"{n}"' for n in self.policies)
                return Decision(
                    False,
                    self.policies[0] if self.policies else None,
                    _refusal(
                        f'{what} is refused: it is of class "{c}", and policy {names} grants '
                        "read-only access",
                        f"{_INSTEAD.get(c, _INSTEAD[C.WRITE])}; read-only sessions may run "
                        "SELECT, SET and transaction control",
                    ),
                )
        for f in sorted(st.functions):
            policy = self.deny_functions.get(f)
            if policy is not None:
                return Decision(
                    False,
                    policy,
                    _refusal(
                        f'{what} is refused: it calls the function "{f}", denied by policy '
                        f'"{policy}"',
                        "compute the result without that function",
                    ),
                )
        for c in _specific_first(st.classes):
            policy = self.approvals.get(c)
            if policy is not None:
                return Decision(True, policy, hold=c)
        return ALLOW

    def masking_refusal(self, st: StatementInfo, why: str) -> Decision:
        rule = self.masking.columns[0] if self.masking.columns else None
        policy = rule.policy if rule else (self.policies[0] if self.policies else None)
        return Decision(
            False,
            policy,
            _refusal(
                f"{st.command or 'this statement'} is refused: {why} (masking of policy "
                f'"{policy}")',
                "select the columns you need directly, with built-in functions only, or leave "
                "out the masked columns",
            ),
        )


class PolicyStore:
    """The effective policy of each identity, combined once and cached until the next reload.

    `generation` changes whenever the policies do, so a running session notices a reload at its
    next statement and takes the new effective policy from then on.
    """

    def __init__(self, policies_for: Callable[[Identity], list[NamedPolicy]]) -> None:
        self._policies_for = policies_for
        self._cache: dict[tuple[str, frozenset[str]], EffectivePolicy] = {}
        self.generation = 0

    def reloaded(self) -> None:
        self._cache = {}
        self.generation += 1

    def effective(self, identity: Identity) -> EffectivePolicy:
        key = (identity.username, identity.groups)
        eff = self._cache.get(key)
        if eff is None:
            if len(self._cache) >= 10_000:  # bounded: identities come and go
                self._cache.clear()
            eff = self._cache[key] = EffectivePolicy.combine(self._policies_for(identity))
        return eff
