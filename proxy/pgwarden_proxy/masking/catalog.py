"""What masking needs to know of the database's catalog, read over one connection and cached.

A RowDescription names a result column's origin by table OID and attribute number; lineage needs
the columns of the relations a statement names; a view's columns are judged by the table columns
its definition depends on. All of it is read from the catalog on first use, on a connection of
the proxy's own (the upstream credential, read-only, short statement timeout), and cached until a
DDL statement passes through the proxy (`invalidate`) or the cache ages out.

The catalog connection sees committed objects only: a table created in a session's open
transaction is unknown here, which the masking rules treat as holding no masked column (its
data can only have come through statements that the same rules already masked or refused).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pgwarden.api.config import Upstream
from pgwarden_proxy.upstream import UpstreamConnection, UpstreamError, connect
from pgwarden_proxy.wire import messages as m

log = logging.getLogger("pgwarden.catalog")

_MAX_AGE = 300.0  # seconds: DDL run outside the proxy is seen within this time
_MESSAGE_LIMIT = 64 * 1024 * 1024
# The catalog connection must never write, wait on locks for long, or run a client's code.
_SESSION_SETTINGS = {
    "default_transaction_read_only": "on",
    "statement_timeout": "5000",
    "lock_timeout": "2000",
    "search_path": "pg_catalog",
    "application_name": "pgwarden-catalog",
    "client_encoding": "UTF8",
}


BUILTIN_SCHEMAS = frozenset({"pg_catalog", "information_schema"})


class CatalogError(Exception):
    """The catalog could not be read (the database is down, or refused the query)."""


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    schema: str
    name: str
    kind: str  # pg_class.relkind: r table, v view, m matview, f foreign, p partitioned
    columns: tuple[str | None, ...]  # by attnum - 1; None for a dropped column
    # views and materialized views: the (table OID, attnum) columns their definition reads
    depends_on: frozenset[tuple[int, int]] = frozenset()

    def column(self, attnum: int) -> str | None:
        return self.columns[attnum - 1] if 0 < attnum <= len(self.columns) else None

    @property
    def live_columns(self) -> list[str]:
        return [c for c in self.columns if c is not None]


def literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings is on: the proxy refuses it off)."""
    if "\x00" in value:
        raise ValueError("NUL in a catalog name")
    return "'" + value.replace("'", "''") + "'"


def _in_list(values: Iterable[str]) -> str:
    return ", ".join(literal(v) for v in sorted(set(values))) or "NULL"


class Catalog:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self._conn: UpstreamConnection | None = None
        self._lock = asyncio.Lock()
        self._by_oid: dict[int, Relation] = {}
        self._by_name: dict[str, list[Relation]] = {}  # relname -> relations in any schema
        # lower-case proname -> (schema, volatile) of every function of that name
        self._functions: dict[str, frozenset[tuple[str, bool]]] = {}
        self._loaded_at = time.monotonic()
        self.generation = 0  # changes whenever the cache is dropped

    # ------------------------------------------------------------------ cache
    def invalidate(self) -> None:
        self._by_oid.clear()
        self._by_name.clear()
        self._functions.clear()
        self._loaded_at = time.monotonic()
        self.generation += 1

    def _expire(self) -> None:
        if time.monotonic() - self._loaded_at > _MAX_AGE:
            self.invalidate()

    def by_oid(self, oid: int) -> Relation | None:
        return self._by_oid.get(oid)

    def named(self, name: str) -> list[Relation]:
        """Relations called `name` ("table" in any schema, or "schema.table"), from the cache."""
        schema, _, rel = name.rpartition(".")
        found = self._by_name.get(rel, [])
        return [r for r in found if r.schema == schema] if schema else list(found)

    def function_schemas(self, name: str) -> frozenset[str] | None:
        defs = self._functions.get(name)
        return None if defs is None else frozenset(schema for schema, _ in defs)

    def functions_known(self, names: Iterable[str]) -> bool:
        self._expire()
        return all(n.rpartition(".")[2] in self._functions for n in names)

    def user_functions(self, name: str) -> tuple[bool, bool] | None:
        """Whether a function of this name is defined outside the built-in schemas, and whether
        such a definition is volatile (may change data); None when not loaded."""
        defs = self._functions.get(name)
        if defs is None:
            return None
        user = [volatile for schema, volatile in defs if schema not in BUILTIN_SCHEMAS]
        return bool(user), any(user)

    def knows(self, relations: Iterable[str], functions: Iterable[str]) -> bool:
        self._expire()
        return all(n.rpartition(".")[2] in self._by_name for n in relations) and all(
            f.rpartition(".")[2] in self._functions for f in functions
        )

    # ------------------------------------------------------------------ loading
    async def load(self, relations: Iterable[str], functions: Iterable[str]) -> None:
        """Read the relations (and what views among them depend on) and functions not cached."""
        self._expire()
        rel_names = {n.rpartition(".")[2] for n in relations} - self._by_name.keys()
        fn_names = {f.rpartition(".")[2] for f in functions} - self._functions.keys()
        if not rel_names and not fn_names:
            return
        async with self._lock:
            generation = self.generation
            if rel_names:
                rels = await self._relations(f"c.relname IN ({_in_list(rel_names)})")
                for name in rel_names:
                    self._by_name.setdefault(name, [])
                await self._add(rels)
            if fn_names:
                # lower(): the classifier folds names, and a quoted "MyFunc" must be found
                rows = await self._query(
                    "SELECT lower(p.proname), n.nspname, p.provolatile = 'v' FROM pg_proc p "  # noqa: S608 (quoted by literal())
                    "JOIN pg_namespace n ON n.oid = p.pronamespace "
                    f"WHERE lower(p.proname) IN ({_in_list(fn_names)})"
                )
                defs: dict[str, set[tuple[str, bool]]] = {name: set() for name in fn_names}
                for proname, nspname, volatile in rows:
                    defs.setdefault(str(proname), set()).add((str(nspname), volatile == "t"))
                if generation == self.generation:
                    self._functions.update({k: frozenset(v) for k, v in defs.items()})

    async def load_oids(self, oids: Iterable[int]) -> None:
        missing = {o for o in oids if o and o not in self._by_oid}
        if missing:
            async with self._lock:
                oid_list = ", ".join(str(o) for o in sorted(missing))
                await self._add(await self._relations(f"c.oid IN ({oid_list})"))

    async def _add(self, rels: list[Relation]) -> None:
        """Cache relations; views pull in the relations they depend on, to any depth."""
        for _ in range(16):  # views of views; a deeper chain is cut off (and logged)
            for r in rels:
                self._by_oid[r.oid] = r
                same = [x for x in self._by_name.setdefault(r.name, []) if x.oid != r.oid]
                self._by_name[r.name] = [*same, r]
            deps = {oid for r in rels for oid, _ in r.depends_on} - self._by_oid.keys()
            if not deps:
                return
            oid_list = ", ".join(str(o) for o in sorted(deps))
            rels = await self._relations(f"c.oid IN ({oid_list})")
        log.warning("view dependencies nested deeper than 16 levels were not followed")

    async def _relations(self, where: str) -> list[Relation]:
        rows = await self._query(
            "SELECT c.oid, n.nspname, c.relname, c.relkind, "  # noqa: S608 (where: literals, OIDs)
            "coalesce((SELECT string_agg(CASE WHEN a.attisdropped THEN '' ELSE a.attname END, "
            "E'\\x1f' ORDER BY a.attnum) FROM pg_attribute a "
            "WHERE a.attrelid = c.oid AND a.attnum > 0), ''), "
            "CASE WHEN c.relkind IN ('v', 'm') THEN (SELECT string_agg(DISTINCT "
            "d.refobjid::text || ':' || d.refobjsubid::text, ',') FROM pg_rewrite w "
            "JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid "
            "WHERE w.ev_class = c.oid AND d.refclassid = 'pg_class'::regclass "
            "AND d.refobjsubid > 0 AND d.refobjid <> c.oid) END "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p') AND {where}"
        )
        out = []
        for oid, schema, name, kind, cols, deps in rows:
            depends = frozenset(
                (int(a), int(b)) for a, b in (d.split(":") for d in (deps or "").split(",") if d)
            )
            out.append(
                Relation(
                    int(str(oid)),
                    str(schema),
                    str(name),
                    str(kind),
                    tuple(c or None for c in cols.split("\x1f")) if cols else (),
                    depends,
                )
            )
        return out

    # ------------------------------------------------------------------ the connection
    async def _query(self, sql: str) -> list[tuple[str | None, ...]]:
        try:
            return await self._simple_query(sql)
        except (UpstreamError, OSError, ConnectionError, CatalogError) as e:
            # one retry on a fresh connection: the old one may have been closed by the server
            self.close()
            log.info("catalog connection lost; reconnecting", extra={"error": str(e)})
            try:
                return await self._simple_query(sql)
            except (UpstreamError, OSError, ConnectionError) as e2:
                self.close()
                raise CatalogError(f"cannot read the database catalog: {e2}") from e2

    async def _simple_query(self, sql: str) -> list[tuple[str | None, ...]]:
        if self._conn is None or self._conn.endpoint.closed:
            self._conn = await connect(self.upstream, _SESSION_SETTINGS)
        ep = self._conn.endpoint
        ep.write(m.frame(b"Q", m.cstr(sql)))
        rows: list[tuple[str | None, ...]] = []
        error: str | None = None
        while True:
            t, body = await ep.read_message(_MESSAGE_LIMIT)
            if t == b"D":
                r = m.Reader(body)
                values: list[str | None] = []
                for _ in range(r.int16()):
                    n = r.int32()
                    values.append(None if n < 0 else r.raw(n).decode())
                rows.append(tuple(values))
            elif t == b"E":
                error = m.parse_fields(body).get("M", "error")
            elif t == b"Z":
                break
        if error is not None:
            raise CatalogError(f"the catalog query failed: {error}")
        return rows

    def close(self) -> None:
        if self._conn is not None:
            self._conn.endpoint.close()
            self._conn = None
