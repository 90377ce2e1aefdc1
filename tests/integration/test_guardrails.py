"""Guardrails cannot be dodged by phrasing, and harmless statements are never blocked.

Every statement goes through a real proxy to the session's throwaway PostgreSQL, with real
clients: psycopg (simple protocol, extended protocol with parameters, named prepared
statements), psql, asyncpg, and a raw protocol client for what drivers will not send. Three
policies do the refusing, one per proxy:

- ``guard-deny``: ``access: read-write`` and ``guardrails.deny`` = every class but read and
  transaction, so only the deny list refuses;
- ``guard-ro``: ``access: read-only`` and nothing denied;
- ``guard-writes``: ``access: read-write`` and every class denied but read, transaction and
  write; only the write-shaped disguises of other classes run against it (an unqualified
  DELETE, a SET written as an UPDATE), because there plain ``write`` does not hide them.

After each refusal the error is checked (``InsufficientPrivilege``, 42501, ``pgwarden: ``, the
policy and the class), the session's own role and settings are compared, and PostgreSQL is
asked directly, as superuser, whether anything changed: table contents (count and md5),
relations (owner, ACL, row security and relfilenode, so VACUUM FULL, CLUSTER, REINDEX and
TRUNCATE show), columns, constraints, functions, triggers, rules, policies, roles, role and
database settings, postgresql.auto.conf, large objects, the sequence, advisory locks,
maintenance counters, notifications, the configuration load time, files a server program or
COPY would have written, and whether a victim backend is still alive.

A disguise that gets through is kept as a strict xfail whose reason starts with "gap:"; a
harmless statement that is blocked would be a strict xfail starting with "false positive:".
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from pgwarden.api.config import ProxyConfig
from pgwarden.api.statements import POLICY_CLASSES, StatementClass
from pgwarden.embedded.issuer import LocalIssuer
from pgwarden_proxy.events import MemoryEventSink
from pgwarden_proxy.thread import ProxyThread
from pgwarden_proxy.wire import messages as m
from tests.integration.conftest import APP_DB, APP_USER, Database, RunningProxy, base_config
from tests.integration.rawpg import RawClient, error_fields

C = StatementClass

# --- policies ------------------------------------------------------------------------------------

DENY, RO, WRITES = "deny", "ro", "writes"
POLICY_NAMES = {DENY: "guard-deny", RO: "guard-ro", WRITES: "guard-writes"}
SUBJECTS = {"groups": ["ai-agents"]}
POLICIES: dict[str, dict[str, Any]] = {
    DENY: {
        "subjects": SUBJECTS,
        "access": "read-write",
        "guardrails": {
            "deny": [c.value for c in POLICY_CLASSES if c not in (C.READ, C.TRANSACTION)]
        },
    },
    RO: {"subjects": SUBJECTS, "access": "read-only"},
    WRITES: {
        "subjects": SUBJECTS,
        "access": "read-write",
        "guardrails": {
            "deny": [c.value for c in POLICY_CLASSES if c not in (C.READ, C.TRANSACTION, C.WRITE)]
        },
    },
}

# --- the schema every case works on --------------------------------------------------------------

SEED = r"""
DROP SCHEMA IF EXISTS guard CASCADE;
DROP SCHEMA IF EXISTS evil CASCADE;
CREATE SCHEMA guard;
CREATE TABLE guard.t (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO guard.t SELECT g, 'row ' || g FROM generate_series(1, 5) g;
CREATE SEQUENCE guard.s;
SELECT setval('guard.s', 10);
CREATE TABLE guard.words (
    id int PRIMARY KEY, "drop" text, "delete" text, "truncate" text, "grant" text
);
INSERT INTO guard.words VALUES
    (1, 'DROP TABLE guard.t', 'DELETE FROM guard.t', 'truncate guard.t',
     'GRANT ALL ON guard.t TO PUBLIC'),
    (2, 'nothing', 'to', 'see', 'here');
CREATE TABLE guard."drop table guard.t" (id int, note text);
INSERT INTO guard."drop table guard.t" VALUES (1, 'a table whose name is SQL');
CREATE TABLE guard.docs (id int PRIMARY KEY, body jsonb NOT NULL);
INSERT INTO guard.docs VALUES
    (1, '{"sql": "DROP TABLE guard.t", "cmd": "TRUNCATE"}'),
    (2, '{"sql": "SELECT 1"}');
CREATE VIEW guard.v AS SELECT id, v FROM guard.t;
CREATE MATERIALIZED VIEW guard.mv AS SELECT count(*) AS n FROM guard.t;
CREATE FUNCTION guard.one() RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT 1';
CREATE FUNCTION guard.pg_read_file(text) RETURNS text LANGUAGE sql AS $$ SELECT 'read ' || $1 $$;
CREATE PROCEDURE guard.wipe_proc() LANGUAGE sql AS 'DELETE FROM guard.t';
CREATE FUNCTION guard.wipe() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE n bigint;
BEGIN
    DELETE FROM guard.t;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
"""


def owner_dsn(db: Database) -> str:
    return (
        f"host=127.0.0.1 port={db.pg.port} dbname={APP_DB} user={APP_USER} password={db.password}"
    )


def seed(db: Database) -> None:
    """(Re)create the schema straight in PostgreSQL, as the database owner the proxy logs in as."""
    with psycopg.connect(owner_dsn(db), autocommit=True) as conn:
        conn.execute(SEED)


# What the database holds; each value is one scalar (an error name when the query fails, e.g.
# after a DROP got through).
STATE_QUERIES: dict[str, str] = {
    "t": "SELECT count(*) || ':' || md5(string_agg(t::text, ',' ORDER BY id)) FROM guard.t t",
    "words": "SELECT md5(string_agg(w::text, ',' ORDER BY id)) FROM guard.words w",
    "docs": "SELECT md5(string_agg(d::text, ',' ORDER BY id)) FROM guard.docs d",
    "mv": "SELECT n FROM guard.mv",
    "sequence": "SELECT last_value || ':' || is_called FROM guard.s",
    "relations": """
        SELECT md5(string_agg(format('%s.%s:%s:%s:%s:%s:%s', n.nspname, c.relname, c.relkind,
                   c.relowner::regrole, c.relacl, c.relrowsecurity, c.relfilenode),
                   ',' ORDER BY n.nspname, c.relname))
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\\_toast%'""",
    "columns": """
        SELECT md5(string_agg(format('%s.%s:%s', c.relname, a.attname,
                   format_type(a.atttypid, a.atttypmod)), ',' ORDER BY c.relname, a.attnum))
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'guard' AND a.attnum > 0 AND NOT a.attisdropped""",
    "constraints": """
        SELECT string_agg(conname, ',' ORDER BY conname)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = 'guard'""",
    "schemas": """
        SELECT string_agg(nspname || ':' || nspowner::regrole || ':' || coalesce(nspacl::text, ''),
                          ',' ORDER BY nspname)
        FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_t%'""",
    "functions": """
        SELECT md5(string_agg(p.oid::regprocedure || ':' || md5(coalesce(p.prosrc, '')) || ':'
                   || p.prosecdef || ':' || coalesce(p.proacl::text, '') || ':'
                   || coalesce(p.proconfig::text, ''), ',' ORDER BY p.oid))
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')""",
    "code": """
        SELECT (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal) || ':'
            || (SELECT count(*) FROM pg_rules WHERE schemaname <> 'pg_catalog') || ':'
            || (SELECT count(*) FROM pg_policies) || ':'
            || (SELECT count(*) FROM pg_event_trigger)""",
    "comments": "SELECT count(*) FROM pg_description WHERE objoid >= 16384",
    "roles": "SELECT md5(string_agg(a::text, ',' ORDER BY a.oid)) FROM pg_authid a",
    "memberships": "SELECT md5(string_agg(m::text, ',' ORDER BY m::text)) FROM pg_auth_members m",
    "role_settings": "SELECT md5(string_agg(s::text, ',' ORDER BY s::text)) "
    "FROM pg_db_role_setting s",
    "default_acl": "SELECT count(*) FROM pg_default_acl",
    "databases": """
        SELECT string_agg(datname || ':' || coalesce(datacl::text, ''), ',' ORDER BY datname)
        FROM pg_database""",
    "extensions": "SELECT string_agg(extname, ',' ORDER BY extname) FROM pg_extension",
    "tablespaces": "SELECT string_agg(spcname, ',' ORDER BY spcname) FROM pg_tablespace",
    "servers": "SELECT (SELECT count(*) FROM pg_foreign_server) || ':' "
    "|| (SELECT count(*) FROM pg_publication)",
    "slots": "SELECT count(*) FROM pg_replication_slots",
    "large_objects": "SELECT count(*) FROM pg_largeobject_metadata",
    "auto_conf": "SELECT md5(pg_read_file('postgresql.auto.conf'))",
    "conf_load_time": "SELECT pg_conf_load_time()::text",
    "advisory_locks": "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
    "maintenance": """
        SELECT coalesce(sum(vacuum_count + analyze_count), 0)
        FROM pg_stat_user_tables WHERE schemaname = 'guard'""",
}

ALL_STATE = "SELECT " + ",\n".join(f"({q})" for q in STATE_QUERIES.values())


class Observer:
    """A superuser connection straight to PostgreSQL that says what the database holds."""

    def __init__(self, db: Database) -> None:
        self.conn = psycopg.connect(db.pg.dsn(dbname=APP_DB), autocommit=True)
        self.before: dict[str, object] = {}  # at the start of the current test
        self.notifications: list[str] = []
        self.conn.add_notify_handler(lambda n: self.notifications.append(n.payload))
        self.conn.execute("LISTEN guard_ch")

    def snapshot(self) -> dict[str, object]:
        state: dict[str, object] = {}
        try:  # one round trip while nothing is missing
            row = self.conn.execute(ALL_STATE).fetchone()
            assert row is not None
            state = dict(zip(STATE_QUERIES, row, strict=True))
        except psycopg.Error:
            state = self._one_by_one()
        state["notifications"] = len(self.notifications)
        return state

    def _one_by_one(self) -> dict[str, object]:
        state: dict[str, object] = {}
        for key, query in STATE_QUERIES.items():
            try:
                row = self.conn.execute(query).fetchone()
                state[key] = None if row is None else row[0]
            except psycopg.Error as e:
                state[key] = f"error: {type(e).__name__}"
        return state

    def close(self) -> None:
        self.conn.close()


class Victim:
    """Another backend of the proxy's database user: pg_terminate_backend must not reach it."""

    def __init__(self, db: Database) -> None:
        self.conn = psycopg.connect(owner_dsn(db), autocommit=True)
        self.pid = self.conn.info.backend_pid

    def alive(self) -> bool:
        try:
            return self.conn.execute("SELECT pg_backend_pid()").fetchone() == (self.pid,)
        except psycopg.Error:
            return False

    def close(self) -> None:
        self.conn.close()


@dataclass
class Files:
    """A path no server program or COPY may create, and a file a COPY FROM could read."""

    marker: Path
    data: Path

    def substitute(self, sql: str, victim: Victim | None) -> str:
        sql = sql.replace("@MARKER@", str(self.marker)).replace("@DATAFILE@", str(self.data))
        if victim is not None:
            sql = sql.replace("@VICTIM@", str(victim.pid))
        return sql


def start_proxy(db: Database, issuer: LocalIssuer, kind: str) -> RunningProxy:
    policies = [{"name": POLICY_NAMES[kind], "spec": POLICIES[kind]}]
    config = ProxyConfig.model_validate(base_config(db.pg, db.password, issuer, policies=policies))
    sink = MemoryEventSink()
    thread = ProxyThread(config, sink=sink).start()
    return RunningProxy(thread, sink, issuer, config)


@pytest.fixture(scope="module")
def guard(db: Database) -> Iterator[None]:
    seed(db)
    yield
    with psycopg.connect(owner_dsn(db), autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS guard CASCADE; DROP SCHEMA IF EXISTS evil CASCADE")


@pytest.fixture(scope="module")
def proxies(db: Database, issuer: LocalIssuer, guard: None) -> Iterator[dict[str, RunningProxy]]:
    running = {kind: start_proxy(db, issuer, kind) for kind in POLICIES}
    yield running
    for p in running.values():
        p.thread.stop(grace=1)


@pytest.fixture(scope="module")
def observer(db: Database, guard: None) -> Iterator[Observer]:
    o = Observer(db)
    yield o
    o.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Files]:
    # /tmp itself: the server may run as another system user (postgres) than the tests
    tag = uuid.uuid4().hex[:12]
    data = Path(f"/tmp/pgwarden-guard-{tag}.data")
    data.write_text("99\tfrom a server file\n")
    data.chmod(0o644)
    f = Files(Path(f"/tmp/pgwarden-guard-{tag}.marker"), data)
    yield f
    data.unlink(missing_ok=True)
    f.marker.unlink(missing_ok=True)


def assert_unchanged(watch: Observer, after: dict[str, object] | None = None) -> None:
    after = watch.snapshot() if after is None else after
    changed = {k: (v, after[k]) for k, v in watch.before.items() if after[k] != v}
    assert not changed, f"the database changed: {changed}"


@pytest.fixture
def watch(db: Database, observer: Observer, files: Files) -> Iterator[Observer]:
    """The observer; afterwards, a test whose statement got through leaves no trace behind."""
    observer.before = observer.snapshot()
    yield observer
    files.marker.unlink(missing_ok=True)
    if observer.snapshot() != observer.before:
        seed(db)


# --- refusals ------------------------------------------------------------------------------------

FIXED = "fixed"  # read-only: the statement would change a setting the policy fixes
ALLOWED = "allowed"  # read-only: the statement is allowed (it is of class settings)
VICTIM = "@VICTIM@"  # as a parameter: the victim backend's pid


@dataclass(frozen=True)
class Case:
    cls: str  # the class guard-deny (and guard-writes) must name
    name: str
    sql: tuple[str, ...]  # each statement must be refused, in this order, on one connection
    params: tuple[object, ...] | None = None  # extended protocol when given
    prepare: bool = False  # psycopg prepare=True: a named prepared statement
    setup: tuple[str, ...] = ()  # allowed statements run first on the same connection
    in_tx: bool = False  # inside a transaction block (psycopg without autocommit)
    ro: str = ""  # the class guard-ro names: "" the same, FIXED, ALLOWED, or another class
    writes: bool = False  # also against guard-writes (write-shaped disguises)
    gap: str | None = None  # a known gap: strict xfail ...
    gap_in: tuple[str, ...] = (DENY, RO, WRITES)  # ... against these proxies
    victim: bool = field(init=False)

    def __post_init__(self) -> None:
        uses = VICTIM in " ".join(self.sql) or VICTIM in (self.params or ())
        object.__setattr__(self, "victim", uses)


def case(cls: C, name: str, *sql: str, **kw: Any) -> Case:
    return Case(cls.value, name, sql, **kw)


def cases_of(cls: C, *items: tuple[Any, ...]) -> list[Case]:
    """(name, sql) or (name, sql, {Case fields}) -> one single-statement case each."""
    return [case(cls, item[0], item[1], **(item[2] if len(item) == 3 else {})) for item in items]


DROP_CASES = [
    *cases_of(
        C.DROP,
        ("plain", "DROP TABLE guard.t"),
        ("lower-case", "drop table guard.t"),
        ("mixed-case", "DrOp TaBlE GuArD.T"),
        ("quoted-names", 'DROP TABLE "guard"."t"'),
        ("unicode-escaped-name", 'DROP TABLE U&"gu\\0061rd".t'),
        ("if-exists-cascade", "DROP TABLE IF EXISTS guard.t CASCADE"),
        ("two-tables", "DROP TABLE guard.words, guard.t"),
        ("block-comments", "/* cleanup */ DROP /* really */ TABLE/**/guard.t"),
        ("nested-comment", "/* outer /* inner; DROP */ still a comment */ DROP TABLE guard.t"),
        ("line-comments", "-- harmless, honest\nDROP TABLE guard.t -- done"),
        ("whitespace", "\n\t  DROP\n\n\tTABLE\r\n   guard.t   ;  \n"),
        ("after-select", "SELECT pg_advisory_lock(4242); DROP TABLE guard.t"),
        ("after-select-no-space", "SELECT 1;DROP TABLE guard.t;"),
        ("after-semicolon-in-string", "SELECT ';' AS x; DROP TABLE guard.t"),
        ("after-semicolon-in-dollars", "SELECT $$ ; $$; DROP TABLE guard.t"),
        ("after-semicolon-in-comment", "SELECT 1 /* ; */ ; DROP TABLE guard.t -- ;"),
        (
            "inside-begin-commit",
            "BEGIN; SELECT pg_advisory_xact_lock(4242); DROP TABLE guard.t; COMMIT",
        ),
        ("in-transaction", "DROP TABLE guard.t", {"in_tx": True}),
        ("prepared", "DROP TABLE guard.t", {"prepare": True}),
        ("schema", "DROP SCHEMA guard CASCADE"),
        ("function", "DROP FUNCTION guard.one()"),
        ("procedure", "drop procedure guard.wipe_proc"),
        ("view", "DROP VIEW guard.v"),
        ("materialized-view", "drop materialized view guard.mv"),
        ("index", "DROP INDEX guard.t_pkey"),
        ("sequence", "DROP SEQUENCE guard.s"),
        ("column", "ALTER TABLE guard.t DROP COLUMN v"),
        ("constraint", "ALTER TABLE guard.t DROP CONSTRAINT t_pkey"),
        ("owned", "DROP OWNED BY CURRENT_USER"),
        ("database", "DROP DATABASE IF EXISTS guard_nothing"),
    ),
]

TRUNCATE_CASES = cases_of(
    C.TRUNCATE,
    ("plain", "TRUNCATE guard.t"),
    ("mixed-case-options", "truncate TABLE only guard.t RESTART IDENTITY CASCADE"),
    ("comments", "TrUnCaTe/**/guard.t--gone"),
    ("two-tables", "TRUNCATE guard.words, guard.t"),
    ("after-select", "SELECT pg_advisory_lock(4242); TRUNCATE guard.t"),
    ("in-transaction", "TRUNCATE guard.t", {"in_tx": True}),
    ("prepared", "TRUNCATE guard.t", {"prepare": True}),
)

UNQUALIFIED_CASES = [
    *cases_of(
        C.UNQUALIFIED_WRITE,
        ("delete", "DELETE FROM guard.t"),
        ("update", "UPDATE guard.t SET v = 'x'"),
        ("where-true", "delete from guard.t where true"),
        ("where-1=1", "DELETE FROM guard.t WHERE 1 = 1"),
        ("where-constants", "UPDATE guard.t SET v = upper(v) WHERE 'a' = 'a'"),
        ("where-not-false", "DELETE FROM guard.t WHERE NOT false"),
        ("where-subquery", "DELETE FROM guard.t WHERE (SELECT count(*) FROM guard.words) > 0"),
        ("where-exists", "DELETE FROM guard.t WHERE EXISTS (SELECT 1)"),
        ("delete-using", "DELETE FROM guard.t USING guard.words"),
        ("update-from", 'UPDATE guard.t SET v = w."drop" FROM guard.words w'),
        ("cte", "WITH gone AS (DELETE FROM guard.t RETURNING *) SELECT count(*) FROM gone"),
        ("explain-analyze", "EXPLAIN ANALYZE DELETE FROM guard.t"),
        ("explain-analyze-options", "EXPLAIN (ANALYZE, COSTS OFF) UPDATE guard.t SET v = 'x'"),
        ("explain-analyze-on", "explain (analyze on, format json) delete from guard.t"),
        ("explain-analyze-1", "EXPLAIN (ANALYZE 1) DELETE FROM guard.t"),
        ("explain-analyze-of", "EXPLAIN (ANALYZE 'of', ANALYZE 'yes') DELETE FROM guard.t"),
        ("extended", "UPDATE guard.t SET v = %s", {"params": ("x",)}),
        ("where-parameter", "DELETE FROM guard.t WHERE %s::bool", {"params": (True,)}),
        ("prepared", "DELETE FROM guard.t WHERE %s::bool", {"params": (True,), "prepare": True}),
        ("in-transaction", "DELETE FROM guard.t", {"in_tx": True}),
        (
            "function-body-atomic",
            "CREATE FUNCTION guard.f() RETURNS void LANGUAGE sql "
            "BEGIN ATOMIC DELETE FROM guard.t; END",
        ),
        (
            "where-column-equals-itself",
            "DELETE FROM guard.t WHERE id = id",
        ),
        ("where-true-or-column", "DELETE FROM guard.t WHERE true OR id = 1"),
        ("where-or-not-false", "UPDATE guard.t SET v = 'x' WHERE id = 1 OR NOT false"),
        (
            "where-is-not-null",
            "UPDATE guard.t SET v = 'x' WHERE id IS NOT NULL",
            {
                "gap": "a WHERE that only a constraint makes true (id is the primary key) counts "
                "as qualified"
            },
        ),
        (
            "merge-on-true",
            "MERGE INTO guard.t t USING (SELECT 1) s ON true WHEN MATCHED THEN DELETE",
        ),
    ),
    case(
        C.UNQUALIFIED_WRITE,
        "sql-prepare-execute",
        "PREPARE wipe AS DELETE FROM guard.t",
        "EXECUTE wipe",
    ),
    case(
        C.UNQUALIFIED_WRITE,
        "sql-prepare-parameter",
        "PREPARE wipe2(bool) AS DELETE FROM guard.t WHERE $1",
        "EXECUTE wipe2(true)",
    ),
]
# with writes allowed, only unqualified-write stands between these and every row
UNQUALIFIED_CASES = [dataclasses.replace(c, writes=True) for c in UNQUALIFIED_CASES]

WRITE_CASES = [
    *cases_of(
        C.WRITE,
        ("insert", "INSERT INTO guard.t VALUES (100, 'new')"),
        ("insert-select", "insert into guard.t (id, v) select id + 100, v from guard.t"),
        ("upsert", "INSERT INTO guard.t VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET v = 'x'"),
        ("update", "UPDATE guard.t SET v = 'x' WHERE id = 1"),
        ("delete", "DELETE FROM guard.t WHERE id = 1"),
        ("extended", "DELETE FROM guard.t WHERE id = %s", {"params": (1,)}),
        (
            "prepared",
            "UPDATE guard.t SET v = %s WHERE id = %s",
            {"params": ("x", 1), "prepare": True},
        ),
        ("cte-delete", "WITH d AS (DELETE FROM guard.t WHERE id = 1 RETURNING *) SELECT * FROM d"),
        (
            "cte-insert-second",
            "WITH x AS (SELECT 1), i AS (INSERT INTO guard.t VALUES (100, 'cte') RETURNING id) "
            "SELECT * FROM i",
        ),
        (
            "cte-update-used-in-subquery",
            "WITH u AS (UPDATE guard.t SET v = 'x' WHERE id = 1 RETURNING id) "
            "SELECT * FROM guard.t WHERE id IN (SELECT id FROM u)",
        ),
        (
            "cte-delete-with-subquery",
            "WITH d AS (DELETE FROM guard.t WHERE id IN "
            "(SELECT id FROM guard.words WHERE id = 1) RETURNING id) SELECT count(*) FROM d",
        ),
        (
            "cte-in-subquery",
            "SELECT * FROM (WITH d AS (DELETE FROM guard.t WHERE id = 1 RETURNING id) "
            "SELECT id FROM d) s",
        ),
        ("explain-analyze", "EXPLAIN ANALYZE INSERT INTO guard.t VALUES (100, 'x')"),
        (
            "explain-analyze-true",
            "EXPLAIN (ANALYZE TRUE, BUFFERS) UPDATE guard.t SET v = 'x' WHERE id = 1",
        ),
        ("explain-json-analyze", "EXPLAIN (FORMAT JSON, ANALYZE) DELETE FROM guard.t WHERE id = 1"),
        ("for-update", "SELECT * FROM guard.t FOR UPDATE"),
        ("for-share-lower", "select * from guard.t where id = 1 for share"),
        ("for-no-key-update", "SELECT * FROM guard.t FOR NO KEY UPDATE SKIP LOCKED"),
        ("for-key-share", "SELECT id FROM guard.t FOR KEY SHARE NOWAIT"),
        ("for-update-in-cte", "WITH l AS (SELECT * FROM guard.t FOR UPDATE) SELECT * FROM l"),
        ("for-update-in-subquery", "SELECT * FROM (SELECT * FROM guard.t FOR UPDATE) s"),
        (
            "cursor-for-update",
            "DECLARE c CURSOR FOR SELECT * FROM guard.t FOR UPDATE",
            {"in_tx": True},
        ),
        ("nextval", "SELECT nextval('guard.s')"),
        ("nextval-upper-case", "SELECT NEXTVAL('guard.s')"),
        ("setval-qualified", "SELECT pg_catalog.setval('guard.s', 1)"),
        ("nextval-in-from", "SELECT * FROM nextval('guard.s')"),
        ("nextval-in-values", "VALUES (nextval('guard.s'))"),
        ("notify", "NOTIFY guard_ch, 'x'"),
        ("pg-notify", "SELECT pg_notify('guard_ch', 'x')"),
        ("lock", "LOCK TABLE guard.t IN ACCESS EXCLUSIVE MODE", {"in_tx": True}),
        (
            "merge",
            "MERGE INTO guard.t t USING (VALUES (1, 'm')) s(id, v) ON t.id = s.id "
            "WHEN MATCHED THEN UPDATE SET v = s.v",
        ),
        ("refresh", "REFRESH MATERIALIZED VIEW guard.mv"),
        ("copy-from-stdin", "COPY guard.t FROM STDIN"),
        ("copy-of-delete", "COPY (DELETE FROM guard.t WHERE id = 1 RETURNING *) TO STDOUT"),
        ("large-object", "SELECT lo_from_bytea(0, 'x')"),
    ),
    case(
        C.WRITE,
        "sql-prepare-execute",
        "PREPARE del(int) AS DELETE FROM guard.t WHERE id = $1",
        "EXECUTE del(1)",
    ),
    case(
        C.WRITE,
        "sql-prepare-redefined",
        "PREPARE p1 AS DELETE FROM guard.t WHERE id = 1",
        "EXECUTE p1",
        setup=("PREPARE p1 AS SELECT 1", "DEALLOCATE p1"),
    ),
    case(
        C.WRITE,
        "explain-analyze-execute",
        "PREPARE del2(int) AS DELETE FROM guard.t WHERE id = $1",
        "EXPLAIN ANALYZE EXECUTE del2(1)",
    ),
]

DDL_CASES = cases_of(
    C.DDL,
    ("create-table", "CREATE TABLE guard.x (a int)"),
    ("create-temp-table", "create temp table x (a int)"),
    ("create-index", "CREATE INDEX ON guard.t (v)"),
    ("add-column", "ALTER TABLE guard.t ADD COLUMN z int"),
    ("rename", "ALTER TABLE guard.t RENAME TO t2"),
    ("alter-type", "ALTER TABLE guard.t ALTER COLUMN v TYPE varchar(3)"),
    ("comment", "COMMENT ON TABLE guard.t IS 'DROP me'"),
    ("create-view", "CREATE VIEW guard.x AS SELECT 1 AS a"),
    ("create-table-as", "CREATE TABLE guard.copy AS SELECT * FROM guard.t"),
    ("create-table-as-no-data", "CREATE TABLE guard.copy AS SELECT * FROM guard.t WITH NO DATA"),
    ("select-into", "SELECT * INTO guard.copy FROM guard.t"),
    ("select-into-temp", "select * into temporary t2 from guard.t"),
    ("explain-analyze-ctas", "EXPLAIN ANALYZE CREATE TABLE guard.copy AS SELECT 1 AS a"),
    ("materialized-view", "CREATE MATERIALIZED VIEW guard.mv2 AS SELECT 1 AS a WITH NO DATA"),
    ("schema", "CREATE SCHEMA evil"),
    ("schema-with-elements", "CREATE SCHEMA evil CREATE TABLE x (a int)"),
    ("sequence", "CREATE SEQUENCE guard.s2"),
    ("alter-sequence", "ALTER SEQUENCE guard.s RESTART"),
    ("enum", "CREATE TYPE guard.mood AS ENUM ('drop')"),
    ("domain", "CREATE DOMAIN guard.d AS int"),
    ("prepared", "CREATE TABLE guard.x (a int)", {"prepare": True}),
    ("after-select", "SELECT 1; CREATE TABLE guard.x (a int)"),
    ("comments", "/* just a table */ CrEaTe/**/TABLE guard.x (a int) -- ok?"),
)

DCL_CASES = cases_of(
    C.DCL,
    ("grant", "GRANT SELECT ON guard.t TO PUBLIC"),
    ("grant-mixed-case-comment", "/* x */ gRaNt SELECT ON guard.t TO public"),
    ("grant-all-in-schema", "grant all on all tables in schema guard to public"),
    ("revoke", "REVOKE ALL ON guard.t FROM PUBLIC"),
    ("grant-role", "GRANT pg_read_server_files TO CURRENT_USER"),
    ("default-privileges", "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC"),
    ("create-role", "CREATE ROLE evil"),
    ("create-user", "CREATE USER evil PASSWORD 'evil'"),
    ("alter-role", "ALTER ROLE CURRENT_USER CREATEROLE"),
    ("password", "ALTER ROLE CURRENT_USER PASSWORD 'changed'"),
    ("role-setting", "ALTER ROLE CURRENT_USER SET work_mem = '1MB'"),
    ("owner", "ALTER TABLE guard.t OWNER TO CURRENT_USER"),
    ("row-security", "ALTER TABLE guard.t ENABLE ROW LEVEL SECURITY"),
    ("policy", "CREATE POLICY p ON guard.t USING (true)"),
    ("reassign-owned", "REASSIGN OWNED BY CURRENT_USER TO CURRENT_USER"),
    ("schema-owner", "ALTER SCHEMA guard OWNER TO CURRENT_USER"),
    ("prepared", "GRANT SELECT ON guard.t TO PUBLIC", {"prepare": True}),
    ("after-select", "SELECT 1; GRANT SELECT ON guard.t TO PUBLIC"),
    ("in-transaction", "GRANT SELECT ON guard.t TO PUBLIC", {"in_tx": True}),
)

COPY_PROGRAM_CASES = cases_of(
    C.COPY_PROGRAM,
    ("to-program", "COPY guard.t TO PROGRAM 'touch @MARKER@'"),
    ("lower-case", "copy guard.t to program 'touch @MARKER@'"),
    ("query-to-program", "COPY (SELECT * FROM guard.t) TO PROGRAM 'touch @MARKER@'"),
    ("from-program", "COPY guard.t FROM PROGRAM 'echo 99,evil' WITH (FORMAT csv)"),
    ("dollar-quoted", "/* c */ COPY guard.t TO PROGRAM $$touch @MARKER@$$"),
    ("escape-string", "COPY guard.t TO PROGRAM E'touch @MARKER@'"),
    ("columns-options", "COPY guard.t (id, v) TO PROGRAM 'touch @MARKER@' WITH (FORMAT csv)"),
    ("after-select", "SELECT 1; COPY guard.t TO PROGRAM 'touch @MARKER@'"),
    ("prepared", "COPY guard.t TO PROGRAM 'touch @MARKER@'", {"prepare": True}),
    ("in-transaction", "COPY guard.t TO PROGRAM 'touch @MARKER@'", {"in_tx": True}),
)

READ_FILE = "pg_read_file('/etc/hostname')"
SERVER_FILES_CASES = [
    *cases_of(
        C.SERVER_FILES,
        ("read-file", f"SELECT {READ_FILE}"),
        ("upper-case", "SELECT PG_READ_FILE('/etc/hostname')"),
        ("schema-qualified", f"SELECT pg_catalog.{READ_FILE}"),
        ("quoted-name", "SELECT \"pg_read_file\"('/etc/hostname')"),
        ("qualified-quoted", "SELECT pg_catalog.\"pg_read_file\"('/etc/hostname', 0, 10)"),
        ("other-schema", f"SELECT evil.{READ_FILE}"),
        ("binary-in-from", "SELECT * FROM pg_read_binary_file('/etc/hostname')"),
        ("ls-dir", "SELECT pg_ls_dir('.')"),
        ("ls-waldir", "SELECT * FROM pg_ls_waldir()"),
        ("stat-file", "SELECT pg_stat_file('postgresql.conf')"),
        ("lo-import", "SELECT lo_import('/etc/hostname')"),
        ("lo-export", "SELECT lo_export(0, '@MARKER@')"),
        ("in-where", f"SELECT 1 WHERE {READ_FILE} IS NOT NULL"),
        ("in-order-by", f"SELECT id FROM guard.t ORDER BY {READ_FILE}"),
        ("in-cte", f"WITH f AS (SELECT {READ_FILE} AS c) SELECT * FROM f"),
        ("in-scalar-subquery", f"SELECT (SELECT {READ_FILE})"),
        ("in-values", f"VALUES ({READ_FILE})"),
        ("in-lateral", f"SELECT * FROM guard.t, LATERAL {READ_FILE} f"),
        ("in-case", f"SELECT CASE WHEN id > 0 THEN {READ_FILE} END FROM guard.t"),
        ("explain-analyze", f"EXPLAIN ANALYZE SELECT {READ_FILE}"),
        # Extended protocol: the proxy decides at Execute, after Bind, where the server already
        # refuses the real builtin itself (no EXECUTE privilege). A homonym the database user may
        # run shows that the refusal is the proxy's.
        ("extended", "SELECT guard.pg_read_file(%s)", {"params": ("/etc/hostname",)}),
        (
            "prepared",
            "SELECT guard.pg_read_file(%s)",
            {"params": ("/etc/hostname",), "prepare": True},
        ),
        ("after-select", f"SELECT 1; SELECT {READ_FILE}"),
        ("copy-from-file", "COPY guard.t FROM '@DATAFILE@'"),
        ("copy-to-file", "copy guard.t to '@MARKER@'"),
        ("copy-query-to-file", "COPY (SELECT 1) TO '@MARKER@' WITH (FORMAT csv)"),
        ("load", "LOAD 'auto_explain'"),
        ("tablespace", "CREATE TABLESPACE evil LOCATION '/tmp'"),
    ),
    case(
        C.SERVER_FILES,
        "sql-prepare-execute",
        f"PREPARE rf AS SELECT {READ_FILE}",
        "EXECUTE rf",
    ),
]

ROLE = APP_USER
AUTH_CASES = cases_of(
    C.SESSION_AUTHORIZATION,
    ("set-role", f"SET ROLE {ROLE}"),
    ("set-role-none-lower", "set role none"),
    ("set-local-role", f"SET LOCAL ROLE {ROLE}", {"in_tx": True}),
    ("set-session-role", f"SET SESSION ROLE {ROLE}"),
    ("reset-role", "RESET ROLE"),
    ("set-role-default", "SET role TO DEFAULT"),
    ("set-quoted-role", f"SET \"role\" = '{ROLE}'"),
    ("comment-mixed-case", f"/* who am i */ SeT rOlE {ROLE}"),
    ("session-authorization", f"SET SESSION AUTHORIZATION {ROLE}"),
    ("session-authorization-default", "set session authorization default"),
    ("reset-session-authorization", "RESET SESSION AUTHORIZATION"),
    ("set-session-authorization-var", f"SET session_authorization = '{ROLE}'"),
    ("set-config-role", f"SELECT set_config('role', '{ROLE}', false)"),
    ("set-config-upper-case", f"SELECT set_config('ROLE', '{ROLE}', false)"),
    (
        "set-config-qualified",
        f"SELECT pg_catalog.set_config('session_authorization', '{ROLE}', false)",
    ),
    ("set-config-escape-string", f"SELECT set_config(E'r\\x6fle', '{ROLE}', false)"),
    ("set-config-in-from", f"SELECT * FROM set_config('role', '{ROLE}', false)"),
    ("set-config-computed", f"SELECT set_config(lower('ROLE'), '{ROLE}', false)", {"ro": FIXED}),
    ("set-config-concat", f"SELECT set_config('ro' || 'le', '{ROLE}', false)", {"ro": FIXED}),
    (
        "set-config-from-row",
        f"SELECT set_config(n, '{ROLE}', false) FROM (VALUES ('role')) v(n)",
        {"ro": FIXED},
    ),
    (
        "set-config-parameters",
        "SELECT set_config(%s, %s, false)",
        {"params": ("role", ROLE), "ro": FIXED},
    ),
    ("discard-all", "DISCARD ALL", {"ro": FIXED}),
    ("after-select", f"SELECT 1; SET ROLE {ROLE}"),
    ("prepared", f"SET ROLE {ROLE}", {"prepare": True}),
)

SETTINGS_CASES = cases_of(
    C.SETTINGS,
    ("search-path", "SET search_path = evil", {"ro": ALLOWED}),
    ("lower-case", "set work_mem = '1MB'", {"ro": ALLOWED}),
    ("comment-mixed-case", "/* tune */ sEt WORK_MEM to '1MB'", {"ro": ALLOWED}),
    ("set-local", "SET LOCAL work_mem = '1MB'", {"in_tx": True, "ro": ALLOWED}),
    ("time-zone", "SET TIME ZONE 'UTC'", {"ro": ALLOWED}),
    ("statement-timeout", "SET statement_timeout = 0", {"ro": ALLOWED}),
    ("reset", "RESET work_mem", {"ro": ALLOWED}),
    ("discard-plans", "DISCARD PLANS", {"ro": ALLOWED}),
    ("set-config", "SELECT set_config('search_path', 'evil', false)", {"ro": ALLOWED}),
    (
        "set-config-parameter",
        "SELECT set_config('work_mem', %s, false)",
        {"params": ("1MB",), "ro": ALLOWED},
    ),
    (
        "set-config-other-schema",
        "SELECT evil.set_config('search_path', 'evil', false)",
        {"ro": ALLOWED},
    ),
    ("after-select", "SELECT 1; SET search_path = evil", {"ro": ALLOWED}),
    ("reset-all", "RESET ALL", {"ro": FIXED}),
    ("read-only-off", "SET default_transaction_read_only = off", {"ro": FIXED}),
    ("read-only-default", "SET default_transaction_read_only TO DEFAULT", {"ro": FIXED}),
    ("reset-read-only", "RESET default_transaction_read_only", {"ro": FIXED}),
    (
        "set-config-read-only",
        "SELECT set_config('default_transaction_read_only', 'off', false)",
        {"ro": FIXED},
    ),
    (
        "set-config-transaction-read-only",
        "SELECT set_config('transaction_read_only', 'off', true)",
        {"in_tx": True, "ro": FIXED},
    ),
    (
        "set-local-transaction-read-only",
        "SET LOCAL transaction_read_only = off",
        {"in_tx": True, "ro": FIXED},
    ),
    ("begin-read-write", "BEGIN READ WRITE", {"ro": FIXED}),
    (
        "start-transaction-read-write",
        "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
        {"ro": FIXED},
    ),
    ("set-transaction-read-write", "SET TRANSACTION READ WRITE", {"in_tx": True, "ro": FIXED}),
    (
        "session-characteristics",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        {"ro": FIXED},
    ),
    ("alter-database", f"ALTER DATABASE {APP_DB} SET work_mem = '1MB'", {"ro": C.DDL.value}),
    ("prepared", "SET search_path = evil", {"prepare": True, "ro": ALLOWED}),
    # UPDATE pg_settings is SET: the view's rule calls set_config. (role and
    # session_authorization are not in the view, so it cannot SET ROLE.)
    (
        "update-pg-settings",
        "UPDATE pg_settings SET setting = '1MB' WHERE name = 'work_mem'",
        {"ro": FIXED, "writes": True},
    ),
    (
        "update-pg-settings-read-only",
        "UPDATE pg_settings SET setting = 'off' WHERE name = 'default_transaction_read_only'",
        {"ro": FIXED},
    ),
)

PROCEDURAL_CASES = cases_of(
    C.PROCEDURAL,
    ("do", "DO $$ BEGIN DELETE FROM guard.t; END $$"),
    ("do-tagged-lower", "do $x$ begin execute 'drop table guard.t'; end $x$"),
    ("do-language", "DO LANGUAGE plpgsql $body$ BEGIN TRUNCATE guard.t; END $body$"),
    ("do-plain-string", "DO 'BEGIN TRUNCATE guard.t; END'"),
    ("do-escape-string", "DO E'BEGIN\\n  DELETE FROM guard.t;\\nEND'"),
    ("do-comment", "/* maintenance */ Do $$ begin null; end $$"),
    ("do-after-select", "SELECT 1; DO $$ BEGIN NULL; END $$"),
    ("call", "CALL guard.wipe_proc()"),
    ("call-upper-case", "call GUARD.WIPE_PROC()"),
    ("call-quoted", 'CALL "guard"."wipe_proc"()'),
    ("call-prepared", "CALL guard.wipe_proc()", {"prepare": True}),
    ("call-in-transaction", "CALL guard.wipe_proc()", {"in_tx": True}),
    ("create-function", "CREATE FUNCTION guard.f() RETURNS int LANGUAGE sql AS 'SELECT 1'"),
    (
        "replace-function",
        "CREATE OR REPLACE FUNCTION guard.one() RETURNS int LANGUAGE sql "
        "AS $$ DELETE FROM guard.t RETURNING 1 $$",
    ),
    (
        "create-procedure",
        "CREATE PROCEDURE guard.p2() LANGUAGE sql AS $$ DELETE FROM guard.t $$",
    ),
    ("security-definer", "ALTER FUNCTION guard.one() SECURITY DEFINER"),
    (
        "trigger",
        "CREATE TRIGGER trg BEFORE INSERT ON guard.t FOR EACH ROW EXECUTE FUNCTION guard.one()",
    ),
    ("rule", "CREATE RULE r AS ON INSERT TO guard.t DO INSTEAD NOTHING"),
    ("query-to-xml", "SELECT query_to_xml('DELETE FROM guard.t RETURNING *', true, true, '')"),
    (
        "query-to-xml-parameter",
        "SELECT query_to_xml(%s, true, true, '')",
        {"params": ("DELETE FROM guard.t RETURNING *",)},
    ),
    ("table-to-xml", "SELECT table_to_xml('guard.t', true, true, '')"),
    (
        "cursor-to-xml",
        "SELECT cursor_to_xml('c', 1, true, true, '')",
        {"setup": ("DECLARE c CURSOR FOR SELECT * FROM guard.t",), "in_tx": True},
    ),
    ("ts-stat", "SELECT * FROM ts_stat('SELECT to_tsvector(v) FROM guard.t')"),
    ("dblink-exec", "SELECT dblink_exec('dbname=app', 'DROP TABLE guard.t')"),
    ("dblink-qualified", "SELECT * FROM public.dblink('dbname=app', 'SELECT 1') AS r(a int)"),
    (
        "ts-rewrite-runs-sql",
        "SELECT ts_rewrite('a'::tsquery, "
        "'SELECT ''a''::tsquery, ''b''::tsquery WHERE pg_terminate_backend(@VICTIM@, 5000)')",
    ),
    (
        "user-function-from-select",
        "SELECT guard.wipe()",  # volatile: procedural and write
    ),
    ("user-function-quoted", 'SELECT "guard"."wipe"()'),
)

ADMIN_CASES = cases_of(
    C.ADMIN,
    ("vacuum", "VACUUM guard.t"),
    ("vacuum-full-lower", "vacuum full guard.t"),
    ("vacuum-options", "VACUUM (VERBOSE, ANALYZE) guard.t"),
    ("analyze", "ANALYZE guard.t"),
    ("analyse-british", "analyse guard.t"),
    ("checkpoint", "CHECKPOINT"),
    ("checkpoint-comment", "checkpoint -- now"),
    ("cluster", "CLUSTER guard.t USING t_pkey"),
    ("reindex", "REINDEX TABLE guard.t"),
    ("alter-system", "ALTER SYSTEM SET work_mem = '1MB'"),
    ("alter-system-reset", "alter system reset all", {"ro": FIXED}),
    ("reload-conf", "SELECT pg_reload_conf()"),
    ("reload-conf-qualified", "SELECT pg_catalog.pg_reload_conf()"),
    ("terminate-backend", "SELECT pg_terminate_backend(@VICTIM@)"),
    (
        "terminate-backend-upper-from",
        "SELECT PG_TERMINATE_BACKEND(pid) FROM pg_stat_activity WHERE pid = @VICTIM@",
    ),
    ("terminate-backend-parameter", "SELECT pg_terminate_backend(%s)", {"params": (VICTIM,)}),
    (
        "terminate-backend-prepared",
        "SELECT pg_terminate_backend(%s)",
        {"params": (VICTIM,), "prepare": True},
    ),
    ("cancel-backend", "SELECT pg_cancel_backend(@VICTIM@)"),
    ("stat-reset", "SELECT pg_stat_reset()"),
    ("stat-reset-table", "SELECT pg_stat_reset_single_table_counters('guard.t'::regclass)"),
    ("switch-wal", "SELECT pg_switch_wal()"),
    ("create-extension", "CREATE EXTENSION dblink"),
    ("replication-slot", "SELECT pg_create_logical_replication_slot('evil', 'test_decoding')"),
    ("after-select", "SELECT 1; VACUUM guard.t"),
    ("prepared", "VACUUM guard.t", {"prepare": True}),
)

CASES: list[Case] = [
    *DROP_CASES,
    *TRUNCATE_CASES,
    *UNQUALIFIED_CASES,
    *WRITE_CASES,
    *DDL_CASES,
    *DCL_CASES,
    *COPY_PROGRAM_CASES,
    *SERVER_FILES_CASES,
    *AUTH_CASES,
    *SETTINGS_CASES,
    *PROCEDURAL_CASES,
    *ADMIN_CASES,
]


def refusal_params() -> list[Any]:
    out = []
    for c in CASES:
        kinds = [DENY] + ([RO] if c.ro != ALLOWED else []) + ([WRITES] if c.writes else [])
        for kind in kinds:
            marks = []
            if c.gap is not None and kind in c.gap_in:
                marks.append(pytest.mark.xfail(strict=True, reason=f"gap: {c.gap}"))
            out.append(pytest.param(kind, c, id=f"{kind}-{c.cls}-{c.name}", marks=marks))
    return out


def expected_message(kind: str, c: Case) -> str:
    policy = POLICY_NAMES[kind]
    if kind in (DENY, WRITES):
        return f'statements of class "{c.cls}" are denied by policy "{policy}"'
    if c.ro == FIXED:
        return f'which policy "{policy}" fixes for this session'
    return f'it is of class "{c.ro or c.cls}", and policy "{policy}" grants read-only access'


def assert_pgwarden_refusal(error: psycopg.Error, expected: str) -> None:
    diag = error.diag
    assert diag.sqlstate == "42501"
    message = diag.message_primary or ""
    assert message.startswith("pgwarden: "), message
    assert expected in message, message


# The session's own identity and settings, read through the proxy before and after a refusal.
SESSION_STATE = (
    "SELECT current_user::text, session_user::text, current_setting('role'), "
    "current_setting('search_path'), current_setting('work_mem'), current_setting('TimeZone'), "
    "current_setting('default_transaction_read_only'), current_setting('statement_timeout')"
)


def test_the_matrix_covers_every_denied_class() -> None:
    covered = {c.cls for c in CASES}
    denied = set(POLICIES[DENY]["guardrails"]["deny"])
    assert covered == denied
    assert len(CASES) == len({(c.cls, c.name) for c in CASES})


@pytest.mark.parametrize(("kind", "c"), refusal_params())
def test_disguised_statement_is_refused_and_changes_nothing(
    proxies: dict[str, RunningProxy],
    db: Database,
    watch: Observer,
    files: Files,
    kind: str,
    c: Case,
) -> None:
    victim = Victim(db) if c.victim else None
    params = None
    if c.params is not None:
        params = tuple(victim.pid if p == VICTIM and victim else p for p in c.params)
    errors: list[psycopg.Error | None] = []
    try:
        with psycopg.connect(proxies[kind].dsn(), autocommit=not c.in_tx) as conn:
            for sql in c.setup:
                conn.execute(files.substitute(sql, victim))
            session = conn.execute(SESSION_STATE).fetchone()
            for sql in c.sql:
                try:
                    conn.execute(files.substitute(sql, victim), params, prepare=c.prepare or None)
                except psycopg.Error as e:
                    errors.append(e)
                else:
                    errors.append(None)
                if c.in_tx:
                    if isinstance(errors[-1], psycopg.errors.InsufficientPrivilege):
                        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                            conn.execute("SELECT 1")  # the server's transaction failed too
                    conn.rollback()
            after = watch.snapshot()  # while the session is open: its locks would show
            now = conn.execute(SESSION_STATE).fetchone()
        # what got through shows first, then how it was (not) refused
        assert_unchanged(watch, after)
        assert now == session, "the session's role or settings changed"
        assert not files.marker.exists(), "a server program or COPY wrote a file"
        if victim is not None:
            assert victim.alive(), "another backend was terminated"
        for i, error in enumerate(errors):
            assert isinstance(error, psycopg.errors.InsufficientPrivilege), (
                f"not refused by pgwarden: {error!r}"
            )
            if i > 0 and "cannot classify it" in str(error):
                # an EXECUTE whose PREPARE was refused: the statement does not exist, in the
                # server nor in the proxy, so it is refused as unknown
                continue
            assert_pgwarden_refusal(error, expected_message(kind, c))
    finally:
        if victim is not None:
            victim.close()


def test_refusals_are_recorded(proxies: dict[str, RunningProxy], watch: Observer) -> None:
    proxy = proxies[DENY]
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT 1; DROP TABLE guard.t")
    events = [e for e in proxy.sink.statements if e.statement == "DROP TABLE guard.t"]
    assert events
    assert events[-1].decision == "refuse"
    assert events[-1].policy == POLICY_NAMES[DENY]


# --- refusals with other clients -----------------------------------------------------------------

PSQL = ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1"]


def psql(
    proxy: RunningProxy, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PSQL, *args],
        env=proxy.libpq_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("kind", [DENY, RO])
@pytest.mark.parametrize(
    ("sql", "cls"),
    [
        ("DROP TABLE guard.t", "drop"),
        ("SELECT 1; TRUNCATE guard.t", "truncate"),
        ("/* x */ delete FROM guard.t", "unqualified-write"),
        ("COPY guard.t TO PROGRAM 'touch @MARKER@'", "copy-program"),
        ("SELECT pg_catalog.pg_read_file('/etc/hostname')", "server-files"),
        (f"SET ROLE {ROLE}", "session-authorization"),
        ("DO $$ BEGIN DELETE FROM guard.t; END $$", "procedural"),
        ("VACUUM FULL guard.t", "admin"),
    ],
)
def test_psql_sees_the_refusal(
    proxies: dict[str, RunningProxy], watch: Observer, files: Files, kind: str, sql: str, cls: str
) -> None:
    out = psql(proxies[kind], "-c", files.substitute(sql, None))
    assert out.returncode != 0
    assert out.stdout == ""
    assert out.stderr.startswith("ERROR:  pgwarden: "), out.stderr
    assert f'class "{cls}"' in out.stderr
    assert f'"{POLICY_NAMES[kind]}"' in out.stderr
    assert_unchanged(watch)
    assert not files.marker.exists()


def test_asyncpg_refusals(proxies: dict[str, RunningProxy], watch: Observer) -> None:

    async def run() -> list[str]:
        messages = []
        conn = await asyncpg.connect(proxies[DENY].url())
        try:
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError) as e:
                await conn.execute("DROP TABLE guard.t")  # simple protocol
            messages.append(e.value.message)
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError) as e:
                await conn.fetch("SELECT guard.pg_read_file($1)", "/etc/hostname")  # extended
            messages.append(e.value.message)
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError) as e:
                await conn.execute("UPDATE guard.t SET v = $1", "x")
            messages.append(e.value.message)
            assert await conn.fetchval("SELECT count(*) FROM guard.t") == 5
        finally:
            await conn.close()
        return messages

    messages = asyncio.run(run())
    assert all(msg.startswith("pgwarden: ") for msg in messages), messages
    assert 'class "drop"' in messages[0]
    assert 'class "server-files"' in messages[1]
    assert 'class "unqualified-write"' in messages[2]
    assert all(f'policy "{POLICY_NAMES[DENY]}"' in msg for msg in messages)
    assert_unchanged(watch)


# --- transaction blocks --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [DENY, RO])
def test_psycopg_refusal_aborts_the_transaction(
    proxies: dict[str, RunningProxy], watch: Observer, kind: str
) -> None:
    with psycopg.connect(proxies[kind].dsn()) as conn:
        assert conn.execute("SELECT count(*) FROM guard.t").fetchone() == (5,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("DELETE FROM guard.t WHERE id = 1")
        assert_pgwarden_refusal(e.value, 'class "write"')
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM guard.t").fetchone() == (5,)
        conn.commit()
    assert_unchanged(watch)


@pytest.mark.parametrize("kind", [DENY, RO])
def test_psql_refusal_aborts_the_transaction(
    proxies: dict[str, RunningProxy], watch: Observer, kind: str
) -> None:
    script = (
        "BEGIN;\n"
        "SELECT count(*) FROM guard.t;\n"
        "DROP TABLE guard.t;\n"
        "SELECT 'not reached';\n"
        "ROLLBACK;\n"
        "SELECT 'after ' || count(*) FROM guard.t;\n"
    )
    out = subprocess.run(
        ["psql", "-X", "-q", "-At", "-f", "-"],  # no ON_ERROR_STOP: psql goes on
        env=proxies[kind].libpq_env(),
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.stdout.splitlines() == ["5", "after 5"], out.stderr
    errors = [line for line in out.stderr.splitlines() if "ERROR:" in line]
    assert len(errors) == 2, out.stderr
    assert "ERROR:  pgwarden: DROP TABLE is refused" in errors[0]
    assert 'class "drop"' in errors[0]
    assert "current transaction is aborted" in errors[1]
    assert_unchanged(watch)


def test_asyncpg_refusal_aborts_the_transaction(
    proxies: dict[str, RunningProxy], watch: Observer
) -> None:

    async def run() -> None:
        conn = await asyncpg.connect(proxies[DENY].url())
        try:
            tx = conn.transaction()
            await tx.start()
            assert await conn.fetchval("SELECT count(*) FROM guard.t") == 5
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError) as e:
                await conn.execute("TRUNCATE guard.t")
            assert e.value.message.startswith("pgwarden: ")
            assert 'class "truncate"' in e.value.message
            with pytest.raises(asyncpg.exceptions.InFailedSQLTransactionError):
                await conn.fetchval("SELECT 1")
            await tx.rollback()
            assert await conn.fetchval("SELECT count(*) FROM guard.t") == 5
        finally:
            await conn.close()

    asyncio.run(run())
    assert_unchanged(watch)


# --- harmless statements that merely contain dangerous words -------------------------------------


@dataclass(frozen=True)
class Harmless:
    name: str
    sql: str  # @P@ is the parameter: 'p' for psql, %s = "p" for psycopg
    rows: list[tuple[str, ...]]
    false_positive: str | None = None


HARMLESS = [
    # an immutable user-defined function cannot change data: it is a read
    Harmless("immutable-user-function", "SELECT guard.one()::text AS s, @P@::text", [("1", "p")]),
    Harmless(
        "literal-drop", "SELECT 'DROP TABLE guard.t' AS s, @P@::text", [("DROP TABLE guard.t", "p")]
    ),
    Harmless(
        "literal-with-semicolons",
        "SELECT 'x''; DROP TABLE guard.t; --' AS s, @P@::text",
        [("x'; DROP TABLE guard.t; --", "p")],
    ),
    Harmless(
        "dollar-quoted-delete",
        "SELECT $$DELETE FROM guard.t$$ AS s, @P@::text",
        [("DELETE FROM guard.t", "p")],
    ),
    Harmless(
        "tagged-dollar-quotes",
        "SELECT $x$TRUNCATE guard.t; DROP SCHEMA guard CASCADE$x$ AS s, @P@::text",
        [("TRUNCATE guard.t; DROP SCHEMA guard CASCADE", "p")],
    ),
    Harmless(
        "dollar-quoted-do",
        "SELECT $do$DO $$BEGIN DELETE FROM guard.t; END$$$do$ AS s, @P@::text",
        [("DO $$BEGIN DELETE FROM guard.t; END$$", "p")],
    ),
    Harmless(
        "escape-string",
        "SELECT E'UPDATE guard.t SET v = \\'x\\'' AS s, @P@::text",
        [("UPDATE guard.t SET v = 'x'", "p")],
    ),
    Harmless(
        "unicode-escape-string",
        "SELECT U&'\\0044ROP TABLE guard.t' AS s, @P@::text",
        [("DROP TABLE guard.t", "p")],
    ),
    Harmless("block-comment", "SELECT /* DROP TABLE guard.t; */ @P@::text AS p", [("p",)]),
    Harmless("nested-comment", "SELECT /* a /* TRUNCATE guard.t; */ b */ @P@::text AS p", [("p",)]),
    Harmless("line-comment", "SELECT @P@::text AS p -- ; DROP TABLE guard.t", [("p",)]),
    Harmless(
        "keyword-columns",
        'SELECT "drop", "delete", "truncate", "grant" FROM guard.words '
        "WHERE id = 1 AND @P@::text = 'p'",
        [
            (
                "DROP TABLE guard.t",
                "DELETE FROM guard.t",
                "truncate guard.t",
                "GRANT ALL ON guard.t TO PUBLIC",
            )
        ],
    ),
    Harmless(
        "keyword-column-and-alias",
        'SELECT w."delete" AS "drop table guard.t; --" FROM guard.words w '
        "WHERE w.id = 2 AND @P@::text = 'p'",
        [("to",)],
    ),
    Harmless(
        "table-named-like-sql",
        "SELECT note FROM guard.\"drop table guard.t\" WHERE @P@::text = 'p'",
        [("a table whose name is SQL",)],
    ),
    Harmless(
        "json-containment",
        "SELECT body->>'sql' FROM guard.docs WHERE body @> '{\"cmd\": \"TRUNCATE\"}' "
        "AND @P@::text = 'p'",
        [("DROP TABLE guard.t",)],
    ),
    Harmless(
        "json-built",
        "SELECT jsonb_build_object('cmd', 'DELETE FROM guard.t', 'p', @P@::text)::text",
        [('{"p": "p", "cmd": "DELETE FROM guard.t"}',)],
    ),
    Harmless(
        "like-truncate",
        "SELECT count(*) FROM guard.words WHERE \"truncate\" LIKE '%truncate%' AND @P@::text = 'p'",
        [("1",)],
    ),
    Harmless(
        "ilike-delete",
        "SELECT string_agg(v, ',' ORDER BY id) FROM guard.t "
        "WHERE v NOT ILIKE '%delete%' AND @P@::text = 'p'",
        [("row 1,row 2,row 3,row 4,row 5",)],
    ),
    Harmless(
        "function-names-in-literal",
        "SELECT 'pg_read_file(''/etc/passwd''), pg_terminate_backend(1)' AS s, @P@::text",
        [("pg_read_file('/etc/passwd'), pg_terminate_backend(1)", "p")],
    ),
    Harmless(
        "set-role-in-literal",
        "SELECT 'SET ROLE postgres; SELECT set_config(''role'', ''x'', false)' AS s, @P@::text",
        [("SET ROLE postgres; SELECT set_config('role', 'x', false)", "p")],
    ),
    Harmless(
        "format-copy-program",
        "SELECT format('%s TO PROGRAM %L', 'COPY guard.t', 'rm -rf /'), @P@::text",
        [("COPY guard.t TO PROGRAM 'rm -rf /'", "p")],
    ),
    Harmless(
        "admin-words",
        "SELECT lower('VACUUM FULL; CHECKPOINT; ALTER SYSTEM SET fsync = off'), @P@::text",
        [("vacuum full; checkpoint; alter system set fsync = off", "p")],
    ),
    Harmless(
        "for-update-in-literal",
        "SELECT 'SELECT * FROM guard.t FOR UPDATE' AS s, @P@::text",
        [("SELECT * FROM guard.t FOR UPDATE", "p")],
    ),
    Harmless(
        "regexp-replace",
        "SELECT regexp_replace('drop table guard.t', 'drop', 'keep'), @P@::text",
        [("keep table guard.t", "p")],
    ),
    Harmless(
        "keyword-aliases",
        'SELECT \'grant\'::text AS "grant", @P@::text AS "revoke"',
        [("grant", "p")],
    ),
    Harmless(
        "reading-role-setting",
        "SELECT current_setting('role'), @P@::text",
        [("none", "p")],
    ),
    Harmless(
        "reading-pg-settings",
        "SELECT name FROM pg_settings WHERE name = 'work_mem' AND @P@::text = 'p'",
        [("work_mem",)],
    ),
    Harmless(
        "explain-without-analyze",
        "EXPLAIN (COSTS OFF) DELETE FROM guard.t WHERE v = @P@::text",
        [("Delete on t",), ("  ->  Seq Scan on t",), ("        Filter: (v = 'p'::text)",)],
    ),
]


def harmless_params() -> list[Any]:
    out = []
    for h in HARMLESS:
        for kind in (DENY, RO):
            marks = []
            if h.false_positive:
                marks.append(
                    pytest.mark.xfail(strict=True, reason=f"false positive: {h.false_positive}")
                )
            out.append(pytest.param(kind, h, id=f"{kind}-{h.name}", marks=marks))
    return out


@pytest.mark.parametrize(("kind", "h"), harmless_params())
def test_harmless_statement_runs_through_psql(
    proxies: dict[str, RunningProxy], kind: str, h: Harmless
) -> None:
    out = psql(proxies[kind], "-c", h.sql.replace("@P@", "'p'"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == "\n".join("|".join(r) for r in h.rows)


@pytest.mark.parametrize(("kind", "h"), harmless_params())
def test_harmless_statement_runs_with_a_parameter(
    proxies: dict[str, RunningProxy], kind: str, h: Harmless
) -> None:
    sql = h.sql.replace("%", "%%").replace("@P@", "%s")
    with psycopg.connect(proxies[kind].dsn(), autocommit=True) as conn:
        rows = conn.execute(sql, ("p",)).fetchall()
    assert [tuple("" if v is None else str(v) for v in r) for r in rows] == h.rows


# --- protocol-level disguises (a raw client sends what drivers will not) --------------------------


def parse(name: str, sql: str) -> bytes:
    return m.frame(b"P", m.cstr(name) + m.cstr(sql) + b"\x00\x00")


def bind_execute(statement: str) -> bytes:
    body = m.cstr("") + m.cstr(statement) + b"\x00\x00" * 3
    return m.frame(b"B", body) + m.frame(b"E", m.cstr("") + b"\x00\x00\x00\x00") + m.sync()


def query(sql: bytes) -> bytes:
    return m.frame(b"Q", sql + b"\x00")


def errors_of(messages: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [error_fields(body) for t, body in messages if t == b"E"]


def until_ready(c: RawClient, count: int = 1) -> list[tuple[bytes, bytes]]:
    """Messages up to the count-th ReadyForQuery, or until the proxy ends the session."""
    out: list[tuple[bytes, bytes]] = []
    try:
        while count:
            msg = c.recv()
            out.append(msg)
            if msg[0] == b"Z":
                count -= 1
            elif msg[0] == b"E" and b"SFATAL" in msg[1]:
                break
    except (ConnectionError, TimeoutError):
        pass
    return out


def test_a_failed_parse_does_not_rebind_a_statement_name(
    proxies: dict[str, RunningProxy], watch: Observer
) -> None:
    c = RawClient(proxies[DENY].port)
    try:
        assert c.startup(proxies[DENY].token())[-1][0] == b"Z"
        c.send(parse("s1", "DELETE FROM guard.t") + m.sync())  # Parse alone runs nothing
        assert [t for t, _ in until_ready(c)] == [b"1", b"Z"]
        c.send(parse("s1", "SELECT 1") + m.sync())
        assert [e["C"] for e in errors_of(until_ready(c))] == ["42P05"]
        c.send(bind_execute("s1"))
        errors = errors_of(until_ready(c))
    finally:
        c.close()
    assert_unchanged(watch)
    assert errors, "Bind/Execute of s1 ran"
    assert errors[0]["C"] == "42501"
    assert errors[0]["M"].startswith("pgwarden: ")


def test_a_failed_sql_prepare_does_not_rebind_a_statement_name(
    proxies: dict[str, RunningProxy], watch: Observer
) -> None:
    c = RawClient(proxies[DENY].port)
    try:
        assert c.startup(proxies[DENY].token())[-1][0] == b"Z"
        c.send(parse("p", "DELETE FROM guard.t") + m.sync())
        assert [t for t, _ in until_ready(c)] == [b"1", b"Z"]
        c.send(query(b"PREPARE p AS SELECT 1"))
        assert [e["C"] for e in errors_of(until_ready(c))] == ["42P05"]
        c.send(query(b"EXECUTE p"))
        errors = errors_of(until_ready(c))
    finally:
        c.close()
    assert_unchanged(watch)
    assert errors, "EXECUTE p ran"
    assert errors[0]["C"] == "42501"
    assert errors[0]["M"].startswith("pgwarden: ")


# The proxy reads both with the settings of login (UTF8, standard_conforming_strings on): one
# string literal. The server reads the second under the SET that arrived just before it.
PIPELINED = {
    "standard-conforming-strings": (
        b"SET standard_conforming_strings = off",
        b"SELECT 'a\\'' , pg_terminate_backend(@VICTIM@, 5000) -- '",
    ),
    "client-encoding-sjis": (
        b"SET client_encoding = 'SJIS'",
        b"SELECT E'\x95\\', pg_terminate_backend(@VICTIM@, 5000) --'",
    ),
}


@pytest.mark.parametrize("name", list(PIPELINED))
def test_a_statement_pipelined_behind_a_parser_setting_is_not_misread(
    proxies: dict[str, RunningProxy], db: Database, watch: Observer, name: str
) -> None:
    setting, payload = PIPELINED[name]
    victim = Victim(db)
    try:
        c = RawClient(proxies[RO].port)
        try:
            assert c.startup(proxies[RO].token())[-1][0] == b"Z"
            payload = payload.replace(b"@VICTIM@", str(victim.pid).encode())
            c.send(query(setting) + query(payload))
            until_ready(c, 2)
        finally:
            c.close()
        time.sleep(0.2)
        assert victim.alive(), "the pipelined statement terminated another backend"
    finally:
        victim.close()
