"""Before a statement runs: which of its output columns must be masked, or why it must not run.

Direct column references are found again in each result's RowDescription (see `rows.py`); what
the plan adds is lineage: an output computed from a masked column (an expression, an aggregate,
a whole-row reference, a JSON constructor, ...) is masked with the strongest rule of the columns
it derives from. Where masking applies, a statement is refused when:

- its lineage cannot be established and it reads a relation that has a masked column,
- it writes values derived from a masked column somewhere (INSERT ... SELECT, CREATE TABLE AS),
  where they would be readable unmasked,
- it calls a function defined outside pg_catalog (pgwarden cannot see what it reads), or a
  built-in that runs SQL given as text or dumps whole tables (`query_to_xml`, `dblink`, ...),
  or it is a DO block (an anonymous function, just as opaque),
- it is a `COPY ... TO STDOUT` in binary format whose columns need masking.

Plans are cached per statement fingerprint (literal values do not change lineage) and rule set,
and dropped with the catalog cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pglast
from pglast.parser import normalize, parse_sql_json
from pglast.stream import RawStream

from pgwarden_proxy.masking.catalog import BUILTIN_SCHEMAS, Catalog, Relation
from pgwarden_proxy.masking.lineage import SQL_TEXT_FUNCTIONS, LineageUnknown, lineage
from pgwarden_proxy.masking.rules import ColumnRule, MaskRules, strongest
from pgwarden_proxy.sql.classify import StatementInfo

log = logging.getLogger("pgwarden.masking")

# Built-ins whose output escapes lineage: those that run SQL given as text or dump a relation
# (lineage.py refuses them too), and those that read a relation or a large object by name.
UNMASKABLE_FUNCTIONS = SQL_TEXT_FUNCTIONS | frozenset(
    {"ts_stat", "pg_get_keywords", "lo_export", "lo_get", "loread"}
)
_CACHE_LIMIT = 10_000
# A DO block is an anonymous function: like a function defined outside pg_catalog, its code can
# read a masked column and hand the value on (a NOTICE, an error, a write to another table).
_DO_REFUSAL_TEXT = (
    "it runs a DO block: with masking in force only built-in functions may run, because "
    "pgwarden cannot see what the block's code reads"
)


@dataclass(frozen=True, slots=True)
class StatementPlan:
    """How one statement's results are masked, decided before it runs."""

    refusal: str | None = None  # why the statement must not run (the agent reads this)
    # per output column, the rule of the masked columns it derives from (lineage); None when the
    # statement reads no masked column, so results need only the RowDescription check
    outputs: tuple[ColumnRule | None, ...] | None = None
    copy_format: str | None = None  # COPY ... TO STDOUT: text, csv or binary
    cursor: str | None = None  # DECLARE c: FETCH c takes this plan
    prepared: str | None = None  # PREPARE p: EXECUTE p takes this plan

    @property
    def masks_outputs(self) -> bool:
        return self.outputs is not None and any(r is not None for r in self.outputs)


NO_PLAN = StatementPlan()
_DO_REFUSAL = StatementPlan(refusal=_DO_REFUSAL_TEXT)


def column_rule(
    catalog: Catalog, rules: MaskRules, rel: Relation, attnum: int
) -> ColumnRule | None:
    """The rule of one relation column; a view's column takes every rule its definition reads."""
    name = rel.column(attnum)
    rule = rules.for_column(rel.schema, rel.name, name) if name is not None else None
    if not rel.depends_on:
        return rule
    # Which view column a base column feeds is not in the catalog: every column of a view that
    # reads a masked column is masked (over-masking a view beats leaking through one).
    return strongest([rule, *(_base_rule(catalog, rules, oid, n) for oid, n in rel.depends_on)])


def _base_rule(catalog: Catalog, rules: MaskRules, oid: int, attnum: int) -> ColumnRule | None:
    base = catalog.by_oid(oid)
    return None if base is None else column_rule(catalog, rules, base, attnum)


def relation_rules(catalog: Catalog, rules: MaskRules, rel: Relation) -> list[ColumnRule | None]:
    return [column_rule(catalog, rules, rel, i + 1) for i in range(len(rel.columns))]


class Planner:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._cache: dict[tuple[MaskRules, str, int], StatementPlan] = {}

    def cached(self, info: StatementInfo, rules: MaskRules) -> StatementPlan | None:
        """The plan if it needs no catalog read (None: call `prepare` first)."""
        if not rules.columns:
            return _copy_plan(info) if rules.detectors and info.command == "COPY" else NO_PLAN
        if info.command == "DO":
            return _DO_REFUSAL
        if not info.relations and not info.functions:
            return NO_PLAN
        return self._cache.get((rules, _cache_key(info), self.catalog.generation))

    async def prepare(self, infos: Sequence[StatementInfo], rules: MaskRules) -> None:
        """Read what the statements need from the catalog, and plan them."""
        missing = [i for i in infos if self.cached(i, rules) is None]
        if not missing:
            return
        await self.catalog.load(
            {r for i in missing for r in i.relations}, {f for i in missing for f in i.functions}
        )
        for info in missing:
            plan = self._plan(info, rules)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[(rules, _cache_key(info), self.catalog.generation)] = plan

    # ------------------------------------------------------------------ planning
    def _plan(self, info: StatementInfo, rules: MaskRules) -> StatementPlan:
        catalog = self.catalog
        copy = _copy_plan(info) if info.command == "COPY" else None
        if copy is NO_PLAN:  # COPY ... FROM: a write, nothing comes back
            return NO_PLAN
        for name in sorted(f for f in info.functions if "." not in f):
            refusal = self._function_refusal(name)
            if refusal is not None:
                return StatementPlan(refusal=refusal)
        relations = [r for name in info.relations for r in catalog.named(name)]
        masked = sorted(
            {
                f"{r.schema}.{r.name}"
                for r in relations
                if any(rule is not None for rule in relation_rules(catalog, rules, r))
            }
        )
        if not masked:
            return copy if copy is not None and rules.detectors else NO_PLAN
        sql, cursor, prepared = _inner_query(info)
        schema: dict[str, dict[str, list[str]]] = {}
        for r in relations:
            schema.setdefault(r.schema, {})[r.name] = r.live_columns
        try:
            # The session's search_path is not known here: every schema holding a named
            # relation is searched (public first). Where a name is ambiguous, `_rule` takes the
            # strongest rule of all its schemas, so the guess can over-mask, never leak.
            others = sorted(schema.keys() - {"public", "pg_catalog"})
            result = lineage(sql, schema, ("pg_catalog", "public", *others))
        except LineageUnknown as e:
            return StatementPlan(
                refusal=f"{info.command or 'this statement'} reads {', '.join(masked)}, which "
                f"has masked columns, and pgwarden cannot tell which results derive from them "
                f"({e})"
            )
        except Exception as e:  # a lineage bug must refuse, never leak
            log.warning("lineage failed", extra={"error": repr(e), "command": info.command})
            return StatementPlan(
                refusal=f"{info.command or 'this statement'} reads {', '.join(masked)}, which "
                "has masked columns, and pgwarden could not analyse it"
            )
        copied = sorted(
            f"{s}.{t}.{c}" for s, t, c in result.writes_from if self._rule(s, t, c, rules)
        )
        if copied:
            return StatementPlan(
                refusal=f"{info.command or 'this statement'} would write values of the masked "
                f"column(s) {', '.join(copied)} where they could be read unmasked"
            )
        outputs = tuple(
            strongest(self._rule(s, t, c, rules) for s, t, c in sources)
            for sources in result.outputs
        )
        if copy is not None and copy.refusal is not None:
            return copy
        copy_format = copy.copy_format if copy is not None else None
        return StatementPlan(None, outputs, copy_format, cursor, prepared)

    def _rule(self, schema: str, table: str, column: str, rules: MaskRules) -> ColumnRule | None:
        """A base column's rule; with one name in several schemas, the strongest of them."""
        found = self.catalog.named(f"{schema}.{table}") or self.catalog.named(table)
        out: list[ColumnRule | None] = [rules.for_column(schema, table, column)]
        for rel in found:
            if column in rel.columns:
                out.append(column_rule(self.catalog, rules, rel, rel.columns.index(column) + 1))
        return strongest(out)

    def _function_refusal(self, name: str) -> str | None:
        if name in UNMASKABLE_FUNCTIONS:
            return (
                f'it calls "{name}", which reads tables or runs SQL given as text, so its '
                "result cannot be masked"
            )
        schemas = self.catalog.function_schemas(name) or frozenset()
        foreign = sorted(schemas - BUILTIN_SCHEMAS)
        if foreign:
            return (
                f'it calls "{name}", defined in schema {", ".join(foreign)}: with masking in '
                "force only built-in functions may run, because pgwarden cannot see what a "
                "function reads"
            )
        return None


# Statements whose plan depends on more than their shape (cursor and statement names, options).
_BY_TEXT = frozenset({"DECLARE CURSOR", "PREPARE", "COPY"})


def _cache_key(info: StatementInfo) -> str:
    """Lineage does not depend on literal values: statements that differ only in them share a
    plan, so a query sent with ever new constants is analysed once. Not the fingerprint: it
    ignores the order of the select list, and that order is what a plan is about."""
    if info.fingerprint is None or info.command in _BY_TEXT:
        return info.text
    try:
        return "n:" + normalize(info.text)
    except pglast.parser.ParseError:
        return info.text


def _inner_query(info: StatementInfo) -> tuple[str, str | None, str | None]:
    """The query whose lineage counts: DECLARE and PREPARE are planned by their query."""
    if info.command not in ("DECLARE CURSOR", "PREPARE"):
        return info.text, None, None
    stmt: Any = pglast.parse_sql(info.text)[0].stmt
    name = getattr(stmt, "portalname", None) or getattr(stmt, "name", None)
    query = str(RawStream()(stmt.query))
    if info.command == "DECLARE CURSOR":
        return query, name, None
    return query, None, name


def fetch_cursor(info: StatementInfo) -> str | None:
    """The cursor a FETCH or MOVE reads from."""
    if info.command not in ("FETCH", "MOVE"):
        return None
    try:
        stmt = json.loads(parse_sql_json(info.text))["stmts"][0]["stmt"]
    except (pglast.parser.ParseError, KeyError, IndexError, ValueError):
        return None
    name = stmt.get("FetchStmt", {}).get("portalname")
    return name if isinstance(name, str) else None


_BINARY_COPY = StatementPlan(
    refusal="COPY ... TO STDOUT in binary format cannot be masked; use the text or csv format",
    copy_format="binary",
)


def _copy_plan(info: StatementInfo) -> StatementPlan:
    """COPY ... TO STDOUT under masking: text and csv rows are masked, binary is refused."""
    try:
        stmt = json.loads(parse_sql_json(info.text))["stmts"][0]["stmt"]["CopyStmt"]
    except (pglast.parser.ParseError, KeyError, IndexError, ValueError):
        return _BINARY_COPY  # cannot tell: treated as the format that cannot be masked
    if stmt.get("is_from"):
        return NO_PLAN
    fmt = "text"
    for opt in stmt.get("options", []):
        d = opt.get("DefElem", {})
        if d.get("defname") == "format":
            fmt = str(d.get("arg", {}).get("String", {}).get("sval", "binary")).lower()
    return _BINARY_COPY if fmt == "binary" else StatementPlan(copy_format=fmt)
