"""Statement classification: every class, nested statements, splitting, fingerprints, caching."""

from __future__ import annotations

import pglast.ast
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgwarden.api.statements import StatementClass
from pgwarden_proxy.sql.classify import (
    BUILTIN_FUNCTION_CLASSES,
    STATEMENT_TABLE,
    Analyzer,
    StatementInfo,
    analyze,
    function_class,
)

R = StatementClass.READ
W = StatementClass.WRITE
UW = StatementClass.UNQUALIFIED_WRITE
DDL = StatementClass.DDL
DROP = StatementClass.DROP
TRUNC = StatementClass.TRUNCATE
DCL = StatementClass.DCL
PROG = StatementClass.COPY_PROGRAM
FILES = StatementClass.SERVER_FILES
AUTH = StatementClass.SESSION_AUTHORIZATION
SET = StatementClass.SETTINGS
PROC = StatementClass.PROCEDURAL
ADMIN = StatementClass.ADMIN
TX = StatementClass.TRANSACTION
UNKNOWN = StatementClass.UNKNOWN

# (sql, exact classes)
CASES: list[tuple[str, set[StatementClass]]] = [
    # read
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 12345", {R}),
    ("VALUES (1), (2)", {R}),
    ("TABLE t", {R}),
    ("SHOW work_mem", {R}),
    ("SELECT * FROM a JOIN b USING (id) WHERE a.x IN (SELECT y FROM c)", {R}),
    ("SELECT currval('s'), lo_get(1)", {R}),
    ("LISTEN chan", {R}),
    ("UNLISTEN *", {R}),
    ("FETCH 10 FROM c", {R}),
    ("MOVE c", {R}),
    ("CLOSE c", {R}),
    ("DECLARE c CURSOR FOR SELECT * FROM t", {R}),
    ("COPY t TO STDOUT", {R}),
    ("COPY (SELECT * FROM t) TO STDOUT WITH (FORMAT csv)", {R}),
    ("EXPLAIN SELECT * FROM t", {R}),
    ("EXPLAIN UPDATE t SET a = 1", {R}),
    ("EXPLAIN (ANALYZE false) DELETE FROM t", {R}),
    ("EXPLAIN (ANALYZE off) DELETE FROM t", {R}),
    ("EXPLAIN (ANALYZE 0) DELETE FROM t", {R}),
    ("EXPLAIN SELECT pg_read_file('/etc/passwd')", {R}),
    ("DEALLOCATE p", {R}),
    ("DEALLOCATE ALL", {R}),
    # write (also nested)
    ("INSERT INTO t DEFAULT VALUES", {W}),
    ("INSERT INTO t (a) VALUES (1)", {R, W}),
    ("INSERT INTO t SELECT * FROM u ON CONFLICT (a) DO UPDATE SET b = 1", {R, W}),
    ("UPDATE t SET a = 1 WHERE id = 2", {W}),
    ("DELETE FROM t WHERE id = 2", {W}),
    ("DELETE FROM t WHERE CURRENT OF c", {W}),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", {W}),
    ("WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d", {R, W}),
    ("SELECT * FROM t FOR UPDATE", {R, W}),
    ("SELECT * FROM t FOR KEY SHARE", {R, W}),
    ("SELECT * FROM (SELECT * FROM t FOR SHARE) s", {R, W}),
    ("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", {R, W}),
    ("EXPLAIN ANALYZE UPDATE t SET a = 1 WHERE id = 1", {R, W}),
    ("EXPLAIN (ANALYZE, BUFFERS) INSERT INTO t VALUES (1)", {R, W}),
    ("COPY t FROM STDIN", {W}),
    ("COPY (DELETE FROM t WHERE id = 1 RETURNING *) TO STDOUT", {R, W}),
    ("NOTIFY chan, 'payload'", {W}),
    ("SELECT pg_notify('chan', 'payload')", {R, W}),
    ("SELECT nextval('s')", {R, W}),
    ("SELECT pg_catalog.setval('s', 1)", {R, W}),
    ("SELECT lo_unlink(1), lo_from_bytea(0, 'x')", {R, W}),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", {W}),
    ("REFRESH MATERIALIZED VIEW m", {W}),
    ("SELECT * INTO n FROM t", {R, W, DDL}),
    ("CREATE TABLE n AS SELECT * FROM t", {R, W, DDL}),
    ("CREATE MATERIALIZED VIEW m AS SELECT * FROM t", {R, W, DDL}),
    ("CREATE MATERIALIZED VIEW m AS SELECT * FROM t WITH NO DATA", {R, DDL}),
    ("CREATE TABLE n AS WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", {R, W, UW, DDL}),
    # unqualified-write
    ("UPDATE t SET a = 1", {W, UW}),
    ("DELETE FROM t", {W, UW}),
    ("DELETE FROM t USING u", {W, UW}),
    ("UPDATE t SET a = 1 WHERE true", {W, UW}),
    ("DELETE FROM t WHERE 1 = 1", {W, UW}),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", {R, W, UW}),
    ("WITH u AS (UPDATE t SET a = 1 RETURNING a) SELECT * FROM u", {R, W, UW}),
    ("EXPLAIN (ANALYZE) DELETE FROM t", {R, W, UW}),
    ("EXPLAIN (ANALYZE true) DELETE FROM t", {R, W, UW}),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", {R, W, UW}),
    ("MERGE INTO t USING s ON true WHEN MATCHED THEN UPDATE SET a = 1", {W, UW}),
    ("MERGE INTO t USING s ON 1 = 1 WHEN MATCHED THEN DELETE", {W, UW}),
    ("MERGE INTO t USING s ON t.id = t.id WHEN MATCHED THEN DELETE", {W, UW}),
    ("DELETE FROM t WHERE id = id", {W, UW}),
    ("DELETE FROM t WHERE t.id >= t.id", {W, UW}),
    ("DELETE FROM t WHERE true OR id = 1", {W, UW}),
    ("DELETE FROM t WHERE id = 1 OR NOT false", {W, UW}),
    ("DELETE FROM t WHERE lower(v) = lower(v)", {W, UW}),
    ("DELETE FROM t WHERE id = 1 AND id = id", {W}),
    ("DELETE FROM t WHERE id = 1 OR id = 2", {W}),
    ("DELETE FROM t WHERE id <> id", {W}),
    ("DELETE FROM t WHERE deleted_at IS NOT NULL", {W}),
    ("MERGE INTO t USING s ON true WHEN NOT MATCHED THEN INSERT VALUES (1)", {W}),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = 1", {W}),
    ("UPDATE pg_settings SET setting = '1MB' WHERE name = 'work_mem'", {W, SET}),
    ("UPDATE pg_catalog.pg_settings SET setting = 'x' WHERE name = 'y'", {W, SET}),
    ("SELECT ts_rewrite('a'::tsquery, 'SELECT 1')", {R, PROC}),
    # ddl
    ("CREATE TABLE t (a int)", {DDL}),
    ("CREATE TABLE t (a int DEFAULT nextval('s'))", {DDL, W}),
    ("CREATE INDEX i ON t (a)", {DDL}),
    ("ALTER TABLE t ADD COLUMN b int", {DDL}),
    ("ALTER TABLE t REPLICA IDENTITY FULL", {DDL}),
    ("ALTER TABLE t RENAME TO u", {DDL}),
    ("ALTER TABLE t SET SCHEMA s", {DDL}),
    ("COMMENT ON TABLE t IS 'x'", {DDL}),
    ("CREATE VIEW v AS SELECT * FROM t", {DDL, R}),
    ("CREATE SCHEMA s", {DDL}),
    ("CREATE SEQUENCE s", {DDL}),
    ("CREATE TYPE mood AS ENUM ('a', 'b')", {DDL}),
    ("CREATE DOMAIN d AS int CHECK (VALUE > 0)", {DDL}),
    ("CREATE AGGREGATE ag (int) (sfunc = f, stype = int)", {DDL}),
    ("IMPORT FOREIGN SCHEMA r FROM SERVER s INTO l", {DDL}),
    ("CREATE FOREIGN TABLE f (a int) SERVER s", {DDL}),
    ("CREATE SCHEMA s CREATE TABLE t (a int) GRANT SELECT ON t TO r", {DDL, DCL}),
    # drop
    ("DROP TABLE t", {DDL, DROP}),
    ("DROP INDEX IF EXISTS i", {DDL, DROP}),
    ("DROP FUNCTION f(int)", {DDL, DROP}),
    ("ALTER TABLE t DROP COLUMN a", {DDL, DROP}),
    ("ALTER TABLE t DROP CONSTRAINT c", {DDL, DROP}),
    ("ALTER DOMAIN d DROP CONSTRAINT c", {DDL, DROP}),
    ("DROP POLICY p ON t", {DDL, DROP, DCL}),
    ("DROP OWNED BY r", {DDL, DROP, DCL}),
    ("DROP ROLE r", {DDL, DROP, DCL}),
    ("DROP EXTENSION e", {DDL, DROP, ADMIN}),
    ("DROP DATABASE d", {DDL, DROP, ADMIN}),
    ("DROP SUBSCRIPTION s", {DDL, DROP, ADMIN}),
    # truncate
    ("TRUNCATE t", {TRUNC, W}),
    ("TRUNCATE TABLE a, b RESTART IDENTITY CASCADE", {TRUNC, W}),
    # dcl
    ("GRANT SELECT ON t TO r", {DCL}),
    ("REVOKE SELECT ON t FROM r", {DCL}),
    ("GRANT pg_read_server_files TO bob", {DCL}),
    ("CREATE ROLE r LOGIN", {DCL}),
    ("CREATE USER u", {DCL}),
    ("CREATE GROUP g", {DCL}),
    ("ALTER ROLE r SUPERUSER", {DCL}),
    ("ALTER ROLE r RENAME TO s", {DDL, DCL}),
    ("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO r", {DCL}),
    ("ALTER TABLE t OWNER TO r", {DDL, DCL}),
    ("ALTER FUNCTION f() OWNER TO r", {DDL, DCL}),
    ("ALTER TABLE t ENABLE ROW LEVEL SECURITY", {DDL, DCL}),
    ("ALTER TABLE t NO FORCE ROW LEVEL SECURITY", {DDL, DCL}),
    ("CREATE POLICY p ON t USING (owner = current_user)", {DDL, DCL}),
    ("ALTER POLICY p ON t USING (true)", {DDL, DCL}),
    ("REASSIGN OWNED BY a TO b", {DDL, DCL}),
    ("SECURITY LABEL ON TABLE t IS 'x'", {DDL, DCL}),
    # copy-program / server-files
    ("COPY t TO PROGRAM 'gzip > /tmp/t.gz'", {R, PROG}),
    ("COPY t FROM PROGRAM 'curl http://x'", {W, PROG}),
    ("COPY t FROM '/etc/passwd'", {W, FILES}),
    ("COPY (SELECT 1) TO '/tmp/x'", {R, FILES}),
    ("SELECT pg_read_file('/etc/passwd')", {R, FILES}),
    ("SELECT * FROM t WHERE a IN (SELECT pg_catalog.pg_read_file('x'))", {R, FILES}),
    ("SELECT * FROM pg_ls_dir('.')", {R, FILES}),
    ("SELECT pg_ls_waldir(), pg_stat_file('x')", {R, FILES}),
    ("SELECT pg_read_binary_file('x')", {R, FILES}),
    ("SELECT lo_import('/etc/passwd')", {R, FILES}),
    ("SELECT lo_export(1, '/tmp/x')", {R, FILES}),
    ("SELECT pg_file_write('x', 'y', false)", {R, FILES}),
    ("CREATE TABLESPACE ts LOCATION '/data/ts'", {DDL, FILES, ADMIN}),
    ("ALTER TABLESPACE ts SET (seq_page_cost = 1)", {DDL, FILES, ADMIN}),
    ("CREATE VIEW v AS SELECT pg_read_file('x')", {DDL, R, FILES}),
    ("ALTER TABLE t ADD COLUMN c text DEFAULT pg_read_file('x')", {DDL, FILES}),
    ("LOAD 'auto_explain'", {ADMIN, FILES}),
    # session-authorization
    ("SET ROLE admin", {AUTH}),
    ("SET LOCAL ROLE admin", {AUTH}),
    ("RESET ROLE", {AUTH}),
    ("SET SESSION AUTHORIZATION bob", {AUTH}),
    ("SET SESSION AUTHORIZATION DEFAULT", {AUTH}),
    ("RESET SESSION AUTHORIZATION", {AUTH}),
    ("SELECT set_config('role', 'admin', false)", {R, AUTH}),
    ("SELECT set_config('ROLE'::text, 'admin', false)", {R, AUTH}),
    ("SELECT pg_catalog.set_config('session_authorization', 'x', true)", {R, AUTH}),
    ("SELECT set_config(current_user, 'x', false)", {R, AUTH, SET}),
    ("DISCARD ALL", {SET, AUTH}),
    # settings
    ("SET search_path = public", {SET}),
    ("SET LOCAL statement_timeout = 0", {SET}),
    ("SET TIME ZONE 'UTC'", {SET}),
    ("RESET work_mem", {SET}),
    ("RESET ALL", {SET}),
    ("SET transaction_read_only = off", {SET}),
    ("SELECT set_config('search_path', 'x', false)", {R, SET}),
    ("DISCARD PLANS", {SET}),
    ("DISCARD TEMP", {SET}),
    ("ALTER SYSTEM SET work_mem = '1GB'", {ADMIN, SET}),
    ("ALTER SYSTEM RESET ALL", {ADMIN, SET}),
    ("ALTER DATABASE d SET work_mem = '1MB'", {DDL, SET}),
    ("ALTER ROLE r SET search_path = x", {DCL, SET}),
    ("SET TRANSACTION READ WRITE", {TX, SET}),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", {SET}),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", {SET}),
    ("BEGIN READ WRITE", {TX, SET}),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE", {TX, SET}),
    # procedural
    ("DO $$ BEGIN PERFORM 1; END $$", {PROC}),
    ("DO LANGUAGE plpgsql 'BEGIN END'", {PROC}),
    ("CALL p(1)", {PROC}),
    ("CALL p(pg_read_file('x'))", {PROC, FILES}),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", {DDL, PROC}),
    ("CREATE OR REPLACE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC SELECT 1; END", {DDL, PROC, R}),
    ("CREATE FUNCTION f() RETURNS bigint RETURN nextval('s')", {DDL, PROC, W}),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = x AS 'SELECT 1'",
        {DDL, PROC, SET},
    ),
    ("ALTER FUNCTION f() STABLE", {DDL, PROC}),
    ("CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()", {DDL, PROC}),
    ("CREATE RULE r AS ON INSERT TO t DO INSTEAD NOTHING", {DDL, PROC}),
    ("CREATE RULE r AS ON INSERT TO t DO ALSO DELETE FROM u", {DDL, PROC, W, UW}),
    ("CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION f()", {DDL, PROC, ADMIN}),
    ("SELECT query_to_xml('SELECT * FROM secrets', true, false, '')", {R, PROC}),
    ("SELECT table_to_xml('secrets', true, false, '')", {R, PROC}),
    ("SELECT database_to_xml(true, false, '')", {R, PROC}),
    ("SELECT * FROM dblink('dbname=x', 'SELECT 1') AS t(a int)", {R, PROC}),
    ("SELECT ext.dblink_exec('DELETE FROM t')", {R, PROC}),
    ("SELECT dblink_build_sql_insert('t', '1', 1, '{1}', '{1}')", {R, PROC}),
    # admin
    ("SELECT pg_terminate_backend(123)", {R, ADMIN}),
    ("SELECT pg_cancel_backend(pid) FROM pg_stat_activity", {R, ADMIN}),
    ("SELECT pg_reload_conf()", {R, ADMIN}),
    ("SELECT pg_switch_wal()", {R, ADMIN}),
    ("SELECT pg_create_logical_replication_slot('s', 'pgoutput')", {R, ADMIN}),
    ("SELECT pg_stat_reset_shared('bgwriter')", {R, ADMIN}),
    ("SELECT pg_log_backend_memory_contexts(1)", {R, ADMIN}),
    ("CHECKPOINT", {ADMIN}),
    ("VACUUM t", {ADMIN}),
    ("VACUUM (ANALYZE) t", {ADMIN}),
    ("ANALYZE t", {ADMIN}),
    ("CLUSTER t USING i", {ADMIN}),
    ("REINDEX TABLE t", {ADMIN}),
    ("CREATE DATABASE d", {DDL, ADMIN}),
    ("CREATE EXTENSION dblink", {DDL, ADMIN}),
    ("CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw", {DDL, ADMIN}),
    ("CREATE USER MAPPING FOR r SERVER s OPTIONS (user 'x')", {DDL, ADMIN}),
    ("CREATE FOREIGN DATA WRAPPER w", {DDL, ADMIN}),
    ("CREATE PUBLICATION p FOR ALL TABLES", {DDL, ADMIN}),
    ("CREATE SUBSCRIPTION s CONNECTION 'x' PUBLICATION p", {DDL, ADMIN}),
    # transaction
    ("BEGIN", {TX}),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY", {TX}),
    ("START TRANSACTION", {TX}),
    ("COMMIT", {TX}),
    ("END", {TX}),
    ("ROLLBACK", {TX}),
    ("ABORT", {TX}),
    ("SAVEPOINT s", {TX}),
    ("RELEASE SAVEPOINT s", {TX}),
    ("ROLLBACK TO SAVEPOINT s", {TX}),
    ("PREPARE TRANSACTION 'x'", {TX}),
    ("COMMIT PREPARED 'x'", {TX}),
    ("ROLLBACK PREPARED 'x'", {TX}),
    ("SET TRANSACTION READ ONLY", {TX}),
    ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", {TX}),
    ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", {TX}),
    ("SET CONSTRAINTS ALL DEFERRED", {TX}),
    # prepared statements
    ("PREPARE p AS DELETE FROM t WHERE id = $1", {W}),
    ("PREPARE p (int) AS UPDATE t SET a = $1", {W, UW}),
    ("EXECUTE p(1)", {UNKNOWN}),
]


def one(sql: str) -> StatementInfo:
    infos = analyze(sql)
    assert len(infos) == 1, infos
    return infos[0]


@pytest.mark.parametrize(("sql", "classes"), CASES, ids=[c[0][:60] for c in CASES])
def test_classes(sql: str, classes: set[StatementClass]) -> None:
    info = one(sql)
    assert info.classes == classes, (sql, info)
    assert info.error is None
    assert info.fingerprint is not None
    assert info.command != "UNKNOWN"
    assert info.text == sql


def test_every_class_is_covered() -> None:
    covered = set().union(*(c for _, c in CASES))
    assert covered == set(StatementClass)


def test_every_parser_statement_is_in_the_table() -> None:
    # Upgrading pglast must not silently turn new statement types into misclassifications:
    # they are unknown (refused) until they are listed.
    not_raw = {"RawStmt", "SetOperationStmt", "PLAssignStmt"}
    names = {n for n in dir(pglast.ast) if n.endswith("Stmt")} - not_raw
    assert names - set(STATEMENT_TABLE) == set()
    assert set(STATEMENT_TABLE) - names == set()


@pytest.mark.parametrize(
    ("sql", "command"),
    [
        ("SELECT 1", "SELECT"),
        ("SELECT * INTO n FROM t", "SELECT INTO"),
        ("SELECT * FROM t FOR NO KEY UPDATE", "SELECT FOR NO KEY UPDATE"),
        ("INSERT INTO t VALUES (1)", "INSERT"),
        ("CREATE TABLE t (a int)", "CREATE TABLE"),
        ("CREATE TABLE n AS SELECT 1", "CREATE TABLE AS"),
        ("CREATE MATERIALIZED VIEW m AS SELECT 1", "CREATE MATERIALIZED VIEW"),
        ("CREATE PROCEDURE p() LANGUAGE sql AS 'SELECT 1'", "CREATE PROCEDURE"),
        ("DROP MATERIALIZED VIEW m", "DROP MATERIALIZED VIEW"),
        ("DROP TABLE t", "DROP TABLE"),
        ("ALTER INDEX i RENAME TO j", "ALTER INDEX"),
        ("ALTER VIEW v RENAME COLUMN a TO b", "ALTER VIEW"),
        ("ALTER TABLE t RENAME CONSTRAINT a TO b", "ALTER TABLE"),
        ("ALTER TYPE ty RENAME ATTRIBUTE a TO b", "ALTER TYPE"),
        ("ALTER ROLE a RENAME TO b", "ALTER ROLE"),
        ("ALTER TABLE t ADD COLUMN a int", "ALTER TABLE"),
        ("EXPLAIN SELECT 1", "EXPLAIN"),
        ("COPY t TO STDOUT", "COPY"),
        ("SET search_path = x", "SET"),
        ("RESET ALL", "RESET"),
        ("SET TRANSACTION READ ONLY", "SET TRANSACTION"),
        ("BEGIN", "BEGIN"),
        ("START TRANSACTION", "START TRANSACTION"),
        ("END", "COMMIT"),
        ("ABORT", "ROLLBACK"),
        ("VACUUM t", "VACUUM"),
        ("ANALYZE t", "ANALYZE"),
        ("GRANT SELECT ON t TO r", "GRANT"),
        ("REVOKE SELECT ON t FROM r", "REVOKE"),
        ("CREATE USER u", "CREATE USER"),
        ("DISCARD ALL", "DISCARD ALL"),
        ("PREPARE p AS SELECT 1", "PREPARE"),
        ("EXECUTE p", "EXECUTE"),
        ("DECLARE c CURSOR FOR SELECT 1", "DECLARE CURSOR"),
        ("MOVE c", "MOVE"),
    ],
)
def test_command(sql: str, command: str) -> None:
    assert one(sql).command == command


def test_settings_names() -> None:
    assert one("SET search_path = public").settings == {"search_path"}
    assert one("SET TIME ZONE 'UTC'").settings == {"timezone"}
    assert one("SET ROLE admin").settings == {"role"}
    assert one("RESET ALL").settings == {"*"}
    assert one("SELECT set_config('Search_Path', 'x', false)").settings == {"search_path"}
    assert one("SELECT set_config($1, $2, false)").settings == {"*"}
    assert one("SET TRANSACTION READ WRITE").settings == {"transaction_read_only"}
    assert one("BEGIN READ WRITE").settings == {"transaction_read_only"}
    assert one("START TRANSACTION READ WRITE").settings == {"transaction_read_only"}
    assert one("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE").settings == {
        "default_transaction_read_only",
        "transaction_read_only",
    }
    assert one("SET TRANSACTION READ ONLY").settings == frozenset()
    assert one("ALTER SYSTEM SET work_mem = 1").settings == {"work_mem"}
    assert "*" in one("DISCARD ALL").settings
    assert one("SELECT 1").settings == frozenset()


def test_functions_and_relations() -> None:
    info = one("SELECT pg_catalog.PG_READ_FILE('x'), now() FROM s.t JOIN u ON true, db.s.v")
    assert info.functions == {"pg_catalog.pg_read_file", "pg_read_file", "now"}
    assert info.relations == {"s.t", "u", "db.s.v"}
    assert one('SELECT * FROM "Mixed"."Case"').relations == {"Mixed.Case"}
    assert one("INSERT INTO t SELECT * FROM u").relations == {"t", "u"}
    assert one("DROP TABLE a.b, c").relations == {"a.b", "c"}
    assert one("CALL s.p(1)").functions == {"s.p", "p"}
    # a function name in a string is not a call
    assert one("SELECT 'pg_read_file(1)'").classes == {R}


def test_prepare_and_execute() -> None:
    prep = one("PREPARE del AS DELETE FROM t WHERE id = $1")
    assert (prep.prepares, prep.executes, prep.command) == ("del", None, "PREPARE")
    ex = one("EXECUTE del(1)")
    assert (ex.prepares, ex.executes, ex.classes) == (None, "del", frozenset({UNKNOWN}))
    # EXPLAIN ANALYZE and CREATE TABLE AS run the prepared statement; plain EXPLAIN does not.
    assert one("EXPLAIN ANALYZE EXECUTE del(1)").executes == "del"
    assert one("CREATE TABLE n AS EXECUTE del(1)").executes == "del"
    plain = one("EXPLAIN EXECUTE del(1)")
    assert (plain.executes, plain.classes) == (None, frozenset({R}))


def test_multi_statement_string() -> None:
    infos = analyze("SELECT 1; DROP TABLE t")
    assert [i.text for i in infos] == ["SELECT 1", "DROP TABLE t"]
    assert [i.classes for i in infos] == [{R}, {DDL, DROP}]
    assert [i.command for i in infos] == ["SELECT", "DROP TABLE"]


def test_statement_text_uses_byte_offsets() -> None:
    infos = analyze("SELECT 'héllo ✓';\n  /* c */ UPDATE t SET a = 'ü' ;; SELECT 3")
    assert [i.text for i in infos] == ["SELECT 'héllo ✓'", "UPDATE t SET a = 'ü'", "SELECT 3"]


def test_explain_lists_names_without_running_them() -> None:
    info = one("EXPLAIN SELECT pg_read_file('x') FROM t")
    assert info.classes == {R}
    assert info.functions == {"pg_read_file"}
    assert info.relations == {"t"}


@pytest.mark.parametrize("sql", ["", "   ", "\n\t", ";", " ; ;", "-- just a comment", "/* c */"])
def test_nothing_to_run(sql: str) -> None:
    assert analyze(sql) == ()


@pytest.mark.parametrize(
    "sql",
    [
        "garbage",
        "SELECT FROM WHERE",
        "SELECT 1; DROP TABLE",
        "SELECT 'unterminated",
        "select \ud800",
    ],
)
def test_unparseable_is_unknown(sql: str) -> None:
    (info,) = analyze(sql)
    assert info.classes == {UNKNOWN}
    assert info.command == "UNKNOWN"
    assert info.error
    assert info.fingerprint is None


def test_nul_byte_is_unknown() -> None:
    # libpg_query would stop at the NUL and miss the DROP.
    (info,) = analyze("SELECT 1\x00; DROP TABLE t")
    assert info.classes == {UNKNOWN}
    assert info.error is not None
    assert "NUL" in info.error


def test_fingerprints() -> None:
    assert one("SELECT 1").fingerprint == one("SELECT 2").fingerprint
    assert one("SELECT * FROM a").fingerprint != one("SELECT * FROM b").fingerprint
    fp = one("SELECT abalance FROM pgbench_accounts WHERE aid = 1").fingerprint
    assert fp is not None
    assert int(fp, 16) >= 0
    # fingerprints ignore literals; classes must not (hence the cache keys on exact text)
    role = one("SELECT set_config('role', 'x', false)")
    path = one("SELECT set_config('search_path', 'x', false)")
    assert role.fingerprint == path.fingerprint
    assert role.classes != path.classes


def test_builtin_function_table() -> None:
    assert BUILTIN_FUNCTION_CLASSES["pg_read_file"] is FILES
    assert BUILTIN_FUNCTION_CLASSES["lo_import"] is FILES
    assert BUILTIN_FUNCTION_CLASSES["nextval"] is W
    assert BUILTIN_FUNCTION_CLASSES["pg_terminate_backend"] is ADMIN
    assert BUILTIN_FUNCTION_CLASSES["query_to_xml"] is PROC
    assert function_class("PG_CATALOG.PG_READ_FILE") is FILES
    assert function_class("ext.dblink_get_notify") is PROC  # by prefix
    assert function_class("pg_stat_reset_backend_stats") is ADMIN
    assert function_class("now") is None
    with pytest.raises(TypeError):
        BUILTIN_FUNCTION_CLASSES["now"] = R  # type: ignore[index]


def test_analyzer_caches_identical_objects() -> None:
    a = Analyzer()
    first = a.analyze("SELECT 1")
    assert a.analyze("SELECT 1") is first
    assert a.analyze("".join(["SELECT ", "1"])) is first  # equal text, another str object
    assert a.analyze("SELECT 2") is not first
    assert a.analyze("") == ()


def test_analyzer_evicts_beyond_max_entries() -> None:
    a = Analyzer(max_entries=2)
    x = a.analyze("SELECT 1")
    a.analyze("SELECT 2")
    a.analyze("SELECT 3")
    assert len(a) == 2
    again = a.analyze("SELECT 1")  # evicted, analysed anew
    assert again == x
    assert again is not x
    assert len(a) == 2


def test_analyzer_bounds_cached_text() -> None:
    a = Analyzer(max_chars=20)
    a.analyze("SELECT 1")
    a.analyze("SELECT 22")
    assert len(a) == 2
    a.analyze("SELECT 333")  # 8 + 9 + 10 > 20: the oldest goes
    assert len(a) == 2
    long = "SELECT " + "1" * 30
    assert a.analyze(long) is not a.analyze(long)  # longer than the whole budget: not cached
    a.clear()
    assert len(a) == 0


def test_unknown_statement_type_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import pgwarden_proxy.sql.classify as classify

    table = dict(classify.STATEMENT_TABLE)
    del table["DropStmt"]
    del table["DeleteStmt"]
    monkeypatch.setattr(classify, "STATEMENT_TABLE", table)
    info = one("DROP TABLE t")
    assert (info.classes, info.command) == (frozenset({UNKNOWN}), "UNKNOWN")
    nested = one("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d")
    assert nested.classes == {R, UNKNOWN}


_TOKENS = [
    "SELECT", "INSERT", "INTO", "UPDATE", "DELETE", "FROM", "WHERE", "SET", "VALUES", "WITH",
    "AS", "(", ")", ",", ";", "*", "=", "t", "u", "a", "1", "'x'", "$1", "pg_read_file('x')",
    "set_config('role', 'x', false)", "EXPLAIN", "ANALYZE", "COPY", "TO", "STDOUT", "PROGRAM",
    "BEGIN", "READ", "WRITE", "CREATE", "TABLE", "DROP", "ROLE", "RETURNING", "FOR", "SHARE",
    "PREPARE", "EXECUTE", "p", "DO", "$$x$$", "CALL", "RESET", "ALL", "TRUNCATE", "--", "\n",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_analyze_never_raises_on_text(sql: str) -> None:
    check_total(sql)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=14).map(" ".join))
def test_analyze_never_raises_on_sqlish_text(sql: str) -> None:
    check_total(sql)


def check_total(sql: str) -> None:
    infos = analyze(sql)
    for info in infos:
        assert info.classes
        assert info.classes <= set(StatementClass)
        if info.error is not None:
            assert UNKNOWN in info.classes
    assert Analyzer().analyze(sql) == infos


def test_deep_nesting_is_handled() -> None:
    deep = "SELECT " + "(" * 5000 + "1" + ")" * 5000
    (info,) = analyze(deep)
    assert info.classes in ({R}, {UNKNOWN})
    deep_list = "SELECT " + " + ".join(["a"] * 20000)
    assert analyze(deep_list)[0].classes in ({R}, {UNKNOWN})
