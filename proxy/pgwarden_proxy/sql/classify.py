"""Split, fingerprint and classify SQL with PostgreSQL's own grammar (pglast / libpg_query).

`analyze()` turns a query string into one `StatementInfo` per statement. It parses once with
`pglast.parser.parse_sql_json` and walks the decoded JSON (dicts and lists): building pglast's
Python AST objects costs about six times as much. Node types are found by their single key
(`{"SelectStmt": {...}}`); fields with a fixed node type are stored without that wrapper, so a
RangeVar is recognised by its `relname` key and a FuncCall by its `funcformat` key wherever they
appear.

Rules that hold everywhere:

- A statement may have several classes. Nested statements and function calls count wherever they
  occur (CTEs, subqueries, CREATE SCHEMA elements, view/rule/function bodies, column defaults):
  stored code runs later under another statement's classes, so it is judged when it is stored.
  The one exception is EXPLAIN without ANALYZE, which plans but never runs its statement.
- Statement node types are listed in `STATEMENT_TABLE`; anything else that the parser calls a
  statement (`...Stmt`) is `unknown`, at the top or nested (fail closed).
- `read` is added by every SELECT/VALUES/TABLE query node, so a write with a subquery (or
  `INSERT ... VALUES`) carries `read` besides `write`.
- A query string that does not parse yields one `unknown` entry with `error` set; libpg_query
  rejects the whole string, so nothing of a partly valid string is classified.

Choices that are not obvious (statement → classes: why):

- `SELECT ... FOR UPDATE/NO KEY UPDATE/SHARE/KEY SHARE` → read, write: it takes row locks
  (PostgreSQL refuses it in read-only transactions).
- `SELECT ... INTO t`, `CREATE TABLE AS`, `CREATE MATERIALIZED VIEW` → ddl, write, read: both
  create and fill a table; `WITH NO DATA` drops write.
- `EXPLAIN` without ANALYZE → read only: the statement is planned, never run (its functions and
  relations are still listed). `EXPLAIN ANALYZE stmt` → read + the classes of stmt.
- `UPDATE`/`DELETE` without WHERE, or whose WHERE refers to no column (`WHERE true`,
  `WHERE 1=1`), or that always holds by its shape (`WHERE id = id`, `WHERE true OR id = 1`,
  `NOT false`) → + unqualified-write: they touch every row. `WHERE CURRENT OF` is qualified.
  What only a constraint makes true (`WHERE id IS NOT NULL` on a primary key) is not seen.
  `MERGE` whose join condition is such, with a `WHEN MATCHED` UPDATE or DELETE →
  + unqualified-write.
- `UPDATE pg_settings` → + settings, settings `*`: the view's rule calls set_config().
- `NOTIFY`, `pg_notify()` → write: PostgreSQL allows them in read-only transactions, but they
  wake other sessions (queue workers), a side effect outside this session.
- `LISTEN`, `UNLISTEN`, `FETCH`, `MOVE`, `CLOSE` → read: session-local; a cursor's query is
  classified at `DECLARE c CURSOR FOR q`, which takes the classes of q.
- `PREPARE p AS q` → the classes of q, `prepares="p"`. `EXECUTE p` → unknown, `executes="p"`:
  the session substitutes the classes recorded at PREPARE (unknown if there are none).
- `DEALLOCATE` → read: it only forgets a prepared statement; drivers issue it routinely.
- `DISCARD ALL` → settings, session-authorization, settings `*`: it runs RESET ALL and
  SET SESSION AUTHORIZATION DEFAULT. Other `DISCARD`s → settings.
- `RESET ALL` → settings, settings `*`: it also resets default_transaction_read_only.
- `SET/RESET ROLE`, `SET/RESET SESSION AUTHORIZATION`, `set_config('role' or
  'session_authorization', ...)` → session-authorization (not settings); settings names the
  parameter. `set_config(expr, ...)` with a computed name → settings, session-authorization,
  settings `*`: the name could be 'role'.
- `BEGIN`/`START TRANSACTION`/`SET TRANSACTION ... READ WRITE` → transaction, settings,
  settings `transaction_read_only`: it lifts a read-only default (the read-only guard keys on
  it). The same with only READ ONLY / ISOLATION LEVEL / DEFERRABLE, and
  `SET TRANSACTION SNAPSHOT` → transaction: transaction-scoped, only tightening (pg_dump uses
  them); `SET CONSTRAINTS` → transaction.
- `SET SESSION CHARACTERISTICS AS TRANSACTION ...` → settings, settings `default_transaction_*`
  (+ `transaction_read_only` for READ WRITE): it changes the session's defaults.
- `ALTER SYSTEM SET` → admin, settings. `ALTER DATABASE/ROLE ... SET` → ddl/dcl, settings (of
  future sessions). A `SET` clause of CREATE/ALTER FUNCTION adds settings (or
  session-authorization): it applies whenever the function runs.
- `CREATE TRIGGER`, `CREATE RULE` → ddl, procedural: they attach code that runs on other
  statements. `CREATE EVENT TRIGGER`, `CREATE LANGUAGE` → ddl, procedural, admin.
- `DROP` of anything → ddl, drop (+ dcl for roles, policies and DROP OWNED; + admin for
  databases, extensions, servers, FDWs, languages, ...). `ALTER TABLE ... DROP COLUMN/CONSTRAINT`
  and `ALTER DOMAIN ... DROP CONSTRAINT` → ddl, drop.
- `ALTER ... OWNER TO`, row-level security switches, policies, `SECURITY LABEL`,
  `REASSIGN OWNED` → ddl, dcl: they change who may see or do what.
- `CREATE/ALTER/DROP TABLESPACE` → ddl, server-files, admin: server directories.
  `LOAD 'lib'` → admin, server-files: it loads and runs a server-side file.
- `CREATE EXTENSION`, servers, FDWs, user mappings, publications, subscriptions,
  `CREATE/DROP DATABASE` → ddl, admin. `VACUUM`, `ANALYZE`, `CLUSTER`, `REINDEX`,
  `CHECKPOINT` → admin only: no logical data change.
- `LOCK`, `REFRESH MATERIALIZED VIEW` → write. `TRUNCATE` → truncate, write.
- `COPY ... FROM STDIN` → write, `COPY ... TO STDOUT` → read (plus the classes of a
  `COPY (query)`); a server file adds server-files, `PROGRAM` adds copy-program.
- A builtin's name called in another schema (`ext.dblink(...)`, `x.pg_read_file(...)`) gets the
  builtin's class: extensions live in any schema, and a homonym is refused rather than missed.

Function calls map to classes through `BUILTIN_FUNCTION_CLASSES` and `FUNCTION_PREFIX_CLASSES`
(matched on the lower-cased bare name). Function references that are not calls (GRANT EXECUTE ON
FUNCTION, CREATE CAST WITH FUNCTION) are covered by the statement's own dcl/ddl class.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from pglast import parser as _pg

from pgwarden.api.statements import StatementClass

__all__ = [
    "BUILTIN_FUNCTION_CLASSES",
    "FUNCTION_PREFIX_CLASSES",
    "STATEMENT_TABLE",
    "Analyzer",
    "StatementInfo",
    "analyze",
    "function_class",
]

_READ: Final = StatementClass.READ
_WRITE: Final = StatementClass.WRITE
_UNQUALIFIED: Final = StatementClass.UNQUALIFIED_WRITE
_DDL: Final = StatementClass.DDL
_DROP: Final = StatementClass.DROP
_TRUNCATE: Final = StatementClass.TRUNCATE
_DCL: Final = StatementClass.DCL
_PROGRAM: Final = StatementClass.COPY_PROGRAM
_FILES: Final = StatementClass.SERVER_FILES
_AUTH: Final = StatementClass.SESSION_AUTHORIZATION
_SETTINGS: Final = StatementClass.SETTINGS
_PROC: Final = StatementClass.PROCEDURAL
_ADMIN: Final = StatementClass.ADMIN
_TX: Final = StatementClass.TRANSACTION
_UNKNOWN: Final = StatementClass.UNKNOWN

_UNKNOWN_ONLY: Final = frozenset({_UNKNOWN})
_NOTHING: Final[frozenset[str]] = frozenset()


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """What the proxy knows about one statement of a query string."""

    text: str  # this statement's own text, stripped
    fingerprint: str | None  # pglast fingerprint (hex); None when unparseable
    command: str  # short command name: "SELECT", "CREATE TABLE", "SET", "UNKNOWN", ...
    classes: frozenset[StatementClass]  # never empty for analyze() results
    functions: frozenset[str]  # lower-case; "schema.fn" as written and the bare "fn"
    # relations referenced, as written ("schema.table" or "table"); CTE names included
    relations: frozenset[str]
    prepares: str | None  # PREPARE name AS ...
    executes: str | None  # EXECUTE name: the session substitutes the classes recorded at PREPARE
    error: str | None  # the parser's message when unparseable
    settings: frozenset[str] = _NOTHING  # lower-case parameter names touched; "*" = unknown/all
    deallocates: str | None = None  # DEALLOCATE name; "*" for DEALLOCATE ALL and DISCARD ALL


# --- function calls ------------------------------------------------------------------------------

_SERVER_FILE_FUNCTIONS = (
    "pg_read_file",
    "pg_read_binary_file",
    "pg_file_read",
    "pg_stat_file",
    "pg_ls_dir",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_ls_logicalsnapdir",
    "pg_ls_logicalmapdir",
    "pg_ls_replslotdir",
    "pg_ls_summariesdir",
    # adminpack (removed in PostgreSQL 17, still present on older servers)
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_file_sync",
    "pg_logdir_ls",
    # server-side large-object import/export read and write server files
    "lo_import",
    "lo_export",
)
_ADMIN_FUNCTIONS = (
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_rotate_logfile_old",
    "pg_promote",
    "pg_switch_wal",
    "pg_switch_xlog",
    "pg_create_restore_point",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_replication_slot_advance",
    "pg_sync_replication_slots",
    "pg_logical_emit_message",
    "pg_log_backend_memory_contexts",
    "pg_log_standby_snapshot",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
    "pg_xlog_replay_pause",
    "pg_xlog_replay_resume",
    "pg_stat_statements_reset",
    "pg_import_system_collations",
    "pg_restore_relation_stats",
    "pg_restore_attribute_stats",
    "pg_clear_relation_stats",
    "pg_clear_attribute_stats",
)
# Functions that run SQL given as text (or dump whole tables by name): what they touch is
# invisible to the parser.
_PROCEDURAL_FUNCTIONS = (
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",  # ts_rewrite(query, 'SELECT target, substitute ...') runs its text
    "dblink",
    "dblink_exec",
    "dblink_open",
    "dblink_fetch",
    "dblink_send_query",
    "dblink_get_result",
    "dblink_connect",
    "dblink_connect_u",
)
_WRITE_FUNCTIONS = (
    "nextval",
    "setval",
    "pg_notify",
    "lo_unlink",
    "lo_create",
    "lo_creat",
    "lo_put",
    "lo_from_bytea",
    "lowrite",
    "lo_truncate",
    "lo_truncate64",
)
_READ_FUNCTIONS = (
    "lo_get",
    "loread",
    "lo_open",
    "lo_close",
    "lo_lseek",
    "lo_lseek64",
    "lo_tell",
    "lo_tell64",
)

# Function (lower-case bare name) -> class its call adds. `set_config` is refined by its first
# argument: 'role'/'session_authorization' (or a non-literal name) is session-authorization.
BUILTIN_FUNCTION_CLASSES: Final[Mapping[str, StatementClass]] = MappingProxyType(
    {
        **dict.fromkeys(_SERVER_FILE_FUNCTIONS, _FILES),
        **dict.fromkeys(_ADMIN_FUNCTIONS, _ADMIN),
        **dict.fromkeys(_PROCEDURAL_FUNCTIONS, _PROC),
        **dict.fromkeys(_WRITE_FUNCTIONS, _WRITE),
        **dict.fromkeys(_READ_FUNCTIONS, _READ),
        "set_config": _SETTINGS,
    }
)
# Families matched by prefix, so members added by later versions are not missed.
FUNCTION_PREFIX_CLASSES: Final[tuple[tuple[str, StatementClass], ...]] = (
    ("dblink", _PROC),
    ("pg_background_", _PROC),
    ("pg_ls_", _FILES),
    ("pg_stat_reset", _ADMIN),
    ("pg_replication_origin_", _ADMIN),
    ("pg_logical_slot_", _ADMIN),
)
_PREFIXES: Final = tuple(p for p, _ in FUNCTION_PREFIX_CLASSES)
_AUTH_SETTINGS: Final = frozenset({"role", "session_authorization"})


def function_class(name: str) -> StatementClass | None:
    """The class a call of `name` (bare or schema-qualified, any case) adds, if any."""
    bare = name.rpartition(".")[2].lower()
    cls = BUILTIN_FUNCTION_CLASSES.get(bare)
    if cls is None and bare.startswith(_PREFIXES):
        for prefix, pcls in FUNCTION_PREFIX_CLASSES:
            if bare.startswith(prefix):
                return pcls
    return cls


# --- statements ----------------------------------------------------------------------------------

_S: Final = frozenset  # keeps the table below readable

# Node type -> (command, base classes). Refiners below add classes that depend on the node's
# content (and may rename the command); node types missing here are unknown.
STATEMENT_TABLE: Final[Mapping[str, tuple[str, frozenset[StatementClass]]]] = MappingProxyType(
    {
        # queries and data changes
        "SelectStmt": ("SELECT", _S({_READ})),  # + write for FOR UPDATE, + ddl/write for INTO
        "InsertStmt": ("INSERT", _S({_WRITE})),
        "UpdateStmt": ("UPDATE", _S({_WRITE})),  # + unqualified-write
        "DeleteStmt": ("DELETE", _S({_WRITE})),  # + unqualified-write
        "MergeStmt": ("MERGE", _S({_WRITE})),
        "CopyStmt": ("COPY", _S()),  # read/write, server-files, copy-program
        "ExplainStmt": ("EXPLAIN", _S({_READ})),  # + the inner classes with ANALYZE
        "DeclareCursorStmt": ("DECLARE CURSOR", _S()),  # the inner query's classes
        "FetchStmt": ("FETCH", _S({_READ})),
        "ClosePortalStmt": ("CLOSE CURSOR", _S({_READ})),
        "VariableShowStmt": ("SHOW", _S({_READ})),
        "ListenStmt": ("LISTEN", _S({_READ})),
        "UnlistenStmt": ("UNLISTEN", _S({_READ})),
        "NotifyStmt": ("NOTIFY", _S({_WRITE})),
        "LockStmt": ("LOCK TABLE", _S({_WRITE})),
        "RefreshMatViewStmt": ("REFRESH MATERIALIZED VIEW", _S({_WRITE})),
        "TruncateStmt": ("TRUNCATE TABLE", _S({_TRUNCATE, _WRITE})),
        "PrepareStmt": ("PREPARE", _S()),  # the inner statement's classes
        "ExecuteStmt": ("EXECUTE", _S({_UNKNOWN})),  # resolved by the session
        "DeallocateStmt": ("DEALLOCATE", _S({_READ})),
        # sessions and transactions
        "VariableSetStmt": ("SET", _S()),  # settings / session-authorization / transaction
        "DiscardStmt": ("DISCARD", _S({_SETTINGS})),
        "TransactionStmt": ("TRANSACTION", _S({_TX})),  # + settings for READ WRITE
        "ConstraintsSetStmt": ("SET CONSTRAINTS", _S({_TX})),
        # code
        "DoStmt": ("DO", _S({_PROC})),
        "CallStmt": ("CALL", _S({_PROC})),
        "CreateFunctionStmt": ("CREATE FUNCTION", _S({_DDL, _PROC})),
        "AlterFunctionStmt": ("ALTER FUNCTION", _S({_DDL, _PROC})),
        "CreateTrigStmt": ("CREATE TRIGGER", _S({_DDL, _PROC})),
        "RuleStmt": ("CREATE RULE", _S({_DDL, _PROC})),
        "CreateEventTrigStmt": ("CREATE EVENT TRIGGER", _S({_DDL, _PROC, _ADMIN})),
        "AlterEventTrigStmt": ("ALTER EVENT TRIGGER", _S({_DDL, _ADMIN})),
        "CreatePLangStmt": ("CREATE LANGUAGE", _S({_DDL, _PROC, _ADMIN})),
        "ReturnStmt": ("RETURN", _S()),  # only inside a SQL function body
        # schema objects
        "CreateStmt": ("CREATE TABLE", _S({_DDL})),
        "CreateTableAsStmt": ("CREATE TABLE AS", _S({_DDL})),  # + write unless WITH NO DATA
        "ViewStmt": ("CREATE VIEW", _S({_DDL})),
        "IndexStmt": ("CREATE INDEX", _S({_DDL})),
        "CreateSeqStmt": ("CREATE SEQUENCE", _S({_DDL})),
        "AlterSeqStmt": ("ALTER SEQUENCE", _S({_DDL})),
        "CreateSchemaStmt": ("CREATE SCHEMA", _S({_DDL})),
        "CreateDomainStmt": ("CREATE DOMAIN", _S({_DDL})),
        "AlterDomainStmt": ("ALTER DOMAIN", _S({_DDL})),  # + drop for DROP CONSTRAINT
        "CreateEnumStmt": ("CREATE TYPE", _S({_DDL})),
        "CreateRangeStmt": ("CREATE TYPE", _S({_DDL})),
        "CompositeTypeStmt": ("CREATE TYPE", _S({_DDL})),
        "AlterEnumStmt": ("ALTER TYPE", _S({_DDL})),
        "AlterTypeStmt": ("ALTER TYPE", _S({_DDL})),
        "DefineStmt": ("CREATE", _S({_DDL})),  # aggregates, operators, types, collations, ...
        "CreateStatsStmt": ("CREATE STATISTICS", _S({_DDL})),
        "AlterStatsStmt": ("ALTER STATISTICS", _S({_DDL})),
        "CreateCastStmt": ("CREATE CAST", _S({_DDL})),
        "CreateTransformStmt": ("CREATE TRANSFORM", _S({_DDL})),
        "CreateConversionStmt": ("CREATE CONVERSION", _S({_DDL})),
        "CreateOpClassStmt": ("CREATE OPERATOR CLASS", _S({_DDL})),
        "CreateOpFamilyStmt": ("CREATE OPERATOR FAMILY", _S({_DDL})),
        "AlterOpFamilyStmt": ("ALTER OPERATOR FAMILY", _S({_DDL})),
        "AlterOperatorStmt": ("ALTER OPERATOR", _S({_DDL})),
        "AlterCollationStmt": ("ALTER COLLATION", _S({_DDL})),
        "AlterTSConfigurationStmt": ("ALTER TEXT SEARCH CONFIGURATION", _S({_DDL})),
        "AlterTSDictionaryStmt": ("ALTER TEXT SEARCH DICTIONARY", _S({_DDL})),
        "CreateForeignTableStmt": ("CREATE FOREIGN TABLE", _S({_DDL})),
        "ImportForeignSchemaStmt": ("IMPORT FOREIGN SCHEMA", _S({_DDL})),
        "AlterTableStmt": ("ALTER TABLE", _S({_DDL})),  # + drop / dcl by subcommand
        "ReplicaIdentityStmt": ("ALTER TABLE", _S({_DDL})),  # only inside ALTER TABLE
        "RenameStmt": ("ALTER", _S({_DDL})),  # + dcl for roles
        "AlterObjectSchemaStmt": ("ALTER", _S({_DDL})),
        "AlterObjectDependsStmt": ("ALTER", _S({_DDL})),
        "AlterOwnerStmt": ("ALTER", _S({_DDL, _DCL})),
        "CommentStmt": ("COMMENT", _S({_DDL})),
        "SecLabelStmt": ("SECURITY LABEL", _S({_DDL, _DCL})),
        "DropStmt": ("DROP", _S({_DDL, _DROP})),  # + dcl / admin by object type
        # privileges and roles
        "GrantStmt": ("GRANT", _S({_DCL})),
        "GrantRoleStmt": ("GRANT", _S({_DCL})),
        "AlterDefaultPrivilegesStmt": ("ALTER DEFAULT PRIVILEGES", _S({_DCL})),
        "CreateRoleStmt": ("CREATE ROLE", _S({_DCL})),
        "AlterRoleStmt": ("ALTER ROLE", _S({_DCL})),
        "AlterRoleSetStmt": ("ALTER ROLE", _S({_DCL, _SETTINGS})),
        "DropRoleStmt": ("DROP ROLE", _S({_DDL, _DROP, _DCL})),
        "DropOwnedStmt": ("DROP OWNED", _S({_DDL, _DROP, _DCL})),
        "ReassignOwnedStmt": ("REASSIGN OWNED", _S({_DDL, _DCL})),
        "CreatePolicyStmt": ("CREATE POLICY", _S({_DDL, _DCL})),
        "AlterPolicyStmt": ("ALTER POLICY", _S({_DDL, _DCL})),
        # server administration
        "AlterSystemStmt": ("ALTER SYSTEM", _S({_ADMIN, _SETTINGS})),
        "CheckPointStmt": ("CHECKPOINT", _S({_ADMIN})),
        "VacuumStmt": ("VACUUM", _S({_ADMIN})),
        "ClusterStmt": ("CLUSTER", _S({_ADMIN})),
        "ReindexStmt": ("REINDEX", _S({_ADMIN})),
        "LoadStmt": ("LOAD", _S({_ADMIN, _FILES})),
        "CreatedbStmt": ("CREATE DATABASE", _S({_DDL, _ADMIN})),
        "AlterDatabaseStmt": ("ALTER DATABASE", _S({_DDL, _ADMIN})),
        "AlterDatabaseRefreshCollStmt": ("ALTER DATABASE", _S({_DDL, _ADMIN})),
        "AlterDatabaseSetStmt": ("ALTER DATABASE", _S({_DDL, _SETTINGS})),
        "DropdbStmt": ("DROP DATABASE", _S({_DDL, _DROP, _ADMIN})),
        "CreateTableSpaceStmt": ("CREATE TABLESPACE", _S({_DDL, _FILES, _ADMIN})),
        "AlterTableSpaceOptionsStmt": ("ALTER TABLESPACE", _S({_DDL, _FILES, _ADMIN})),
        "DropTableSpaceStmt": ("DROP TABLESPACE", _S({_DDL, _DROP, _FILES, _ADMIN})),
        "AlterTableMoveAllStmt": ("ALTER TABLE", _S({_DDL, _ADMIN})),
        "CreateExtensionStmt": ("CREATE EXTENSION", _S({_DDL, _ADMIN})),
        "AlterExtensionStmt": ("ALTER EXTENSION", _S({_DDL, _ADMIN})),
        "AlterExtensionContentsStmt": ("ALTER EXTENSION", _S({_DDL, _ADMIN})),
        "CreateAmStmt": ("CREATE ACCESS METHOD", _S({_DDL, _ADMIN})),
        "CreateFdwStmt": ("CREATE FOREIGN DATA WRAPPER", _S({_DDL, _ADMIN})),
        "AlterFdwStmt": ("ALTER FOREIGN DATA WRAPPER", _S({_DDL, _ADMIN})),
        "CreateForeignServerStmt": ("CREATE SERVER", _S({_DDL, _ADMIN})),
        "AlterForeignServerStmt": ("ALTER SERVER", _S({_DDL, _ADMIN})),
        "CreateUserMappingStmt": ("CREATE USER MAPPING", _S({_DDL, _ADMIN})),
        "AlterUserMappingStmt": ("ALTER USER MAPPING", _S({_DDL, _ADMIN})),
        "DropUserMappingStmt": ("DROP USER MAPPING", _S({_DDL, _DROP, _ADMIN})),
        "CreatePublicationStmt": ("CREATE PUBLICATION", _S({_DDL, _ADMIN})),
        "AlterPublicationStmt": ("ALTER PUBLICATION", _S({_DDL, _ADMIN})),
        "CreateSubscriptionStmt": ("CREATE SUBSCRIPTION", _S({_DDL, _ADMIN})),
        "AlterSubscriptionStmt": ("ALTER SUBSCRIPTION", _S({_DDL, _ADMIN})),
        "DropSubscriptionStmt": ("DROP SUBSCRIPTION", _S({_DDL, _DROP, _ADMIN})),
    }
)

# DROP of these object types adds a class besides ddl + drop.
_DROP_EXTRA: Final[Mapping[str, StatementClass]] = {
    "OBJECT_POLICY": _DCL,
    "OBJECT_EXTENSION": _ADMIN,
    "OBJECT_FOREIGN_SERVER": _ADMIN,
    "OBJECT_FDW": _ADMIN,
    "OBJECT_PUBLICATION": _ADMIN,
    "OBJECT_EVENT_TRIGGER": _ADMIN,
    "OBJECT_ACCESS_METHOD": _ADMIN,
    "OBJECT_LANGUAGE": _ADMIN,
}
# DROP of these names relations (as lists of name parts rather than RangeVars).
_DROP_RELATIONS: Final = frozenset(
    {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE"}
)
# ALTER TABLE subcommands that add a class besides ddl.
_ALTER_TABLE_EXTRA: Final[Mapping[str, StatementClass]] = {
    "AT_DropColumn": _DROP,
    "AT_DropConstraint": _DROP,
    "AT_EnableRowSecurity": _DCL,
    "AT_DisableRowSecurity": _DCL,
    "AT_ForceRowSecurity": _DCL,
    "AT_NoForceRowSecurity": _DCL,
    "AT_ChangeOwner": _DCL,
}
_OBJECT_WORDS: Final[Mapping[str, str]] = {
    "OBJECT_MATVIEW": "MATERIALIZED VIEW",
    "OBJECT_FDW": "FOREIGN DATA WRAPPER",
    "OBJECT_FOREIGN_SERVER": "SERVER",
    "OBJECT_TSCONFIGURATION": "TEXT SEARCH CONFIGURATION",
    "OBJECT_TSDICTIONARY": "TEXT SEARCH DICTIONARY",
    "OBJECT_TSPARSER": "TEXT SEARCH PARSER",
    "OBJECT_TSTEMPLATE": "TEXT SEARCH TEMPLATE",
    "OBJECT_OPCLASS": "OPERATOR CLASS",
    "OBJECT_OPFAMILY": "OPERATOR FAMILY",
    "OBJECT_STATISTIC_EXT": "STATISTICS",
    "OBJECT_TABCONSTRAINT": "TABLE",
    "OBJECT_DOMCONSTRAINT": "DOMAIN",
    "OBJECT_COLUMN": "TABLE",
    "OBJECT_ATTRIBUTE": "TYPE",
    "OBJECT_LARGEOBJECT": "LARGE OBJECT",
}
_LOCK_COMMANDS: Final[Mapping[str, str]] = {
    "LCS_FORKEYSHARE": "SELECT FOR KEY SHARE",
    "LCS_FORSHARE": "SELECT FOR SHARE",
    "LCS_FORNOKEYUPDATE": "SELECT FOR NO KEY UPDATE",
    "LCS_FORUPDATE": "SELECT FOR UPDATE",
}
_TRANSACTION_COMMANDS: Final[Mapping[str, str]] = {
    "TRANS_STMT_BEGIN": "BEGIN",
    "TRANS_STMT_START": "START TRANSACTION",
    "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK",
    "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
    "TRANS_STMT_RELEASE": "RELEASE",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK TO SAVEPOINT",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}
_ROLE_COMMANDS: Final[Mapping[str, str]] = {
    "ROLESTMT_ROLE": "CREATE ROLE",
    "ROLESTMT_USER": "CREATE USER",
    "ROLESTMT_GROUP": "CREATE GROUP",
}


def _object_words(objtype: str | None) -> str:
    if not objtype:
        return "OBJECT"
    return _OBJECT_WORDS.get(objtype) or objtype.removeprefix("OBJECT_").replace("_", " ")


class _Acc:
    """What a walk collects for one statement."""

    __slots__ = ("classes", "executes", "functions", "relations", "settings")

    def __init__(self, functions: set[str], relations: set[str]) -> None:
        self.classes: set[StatementClass] = set()
        self.settings: set[str] = set()
        self.functions = functions
        self.relations = relations
        self.executes: str | None = None

    def shadow(self) -> _Acc:
        """For code that is planned but not run: keep the names, drop the classes."""
        return _Acc(self.functions, self.relations)


_Node = dict[str, Any]
_Refiner = Callable[[_Node, _Acc, str], tuple[str, _Acc]]


def _const_str(node: Any) -> str | None:
    """The value of a string literal (possibly cast), else None."""
    while type(node) is dict:
        if "A_Const" in node:
            sval = node["A_Const"].get("sval")
            return None if sval is None else str(sval.get("sval", ""))
        cast = node.get("TypeCast")
        if cast is None:
            return None
        node = cast.get("arg")
    return None


def _read_write(options: Any) -> bool:
    """Whether transaction modes include READ WRITE (an unreadable value counts as READ WRITE)."""
    for item in options or ():
        elem = item.get("DefElem") if type(item) is dict else None
        if elem and elem.get("defname") == "transaction_read_only":
            arg = elem.get("arg")
            const = arg.get("A_Const") if type(arg) is dict else None
            if not const or not (const.get("ival") or {}).get("ival"):
                return True
    return False


def _mode_names(options: Any) -> list[str]:
    names = []
    for item in options or ():
        elem = item.get("DefElem") if type(item) is dict else None
        if elem and elem.get("defname"):
            names.append(str(elem["defname"]).lower())
    return names


def _has_column_ref(where: Any) -> bool:
    """Whether a WHERE clause refers to any column (or is CURRENT OF): a cheap test for
    clauses like `WHERE true` or `WHERE 1=1` that select every row."""
    stack = [where]
    while stack:
        obj = stack.pop()
        if type(obj) is dict:
            if "ColumnRef" in obj or "CurrentOfExpr" in obj:
                return True
            stack.extend(obj.values())
        elif type(obj) is list:
            stack.extend(obj)
    return False


def _r_select(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    if node.get("intoClause"):
        acc.classes.update((_DDL, _WRITE))
        return "SELECT INTO", acc
    locks = node.get("lockingClause")
    if locks:
        acc.classes.add(_WRITE)
        first = locks[0].get("LockingClause", {}) if type(locks[0]) is dict else {}
        return _LOCK_COMMANDS.get(first.get("strength", ""), "SELECT FOR UPDATE"), acc
    return command, acc


def _without_locations(obj: Any) -> Any:
    if type(obj) is dict:
        return {k: _without_locations(v) for k, v in obj.items() if k != "location"}
    if type(obj) is list:
        return [_without_locations(v) for v in obj]
    return obj


def _operator(expr: _Node) -> str | None:
    names = expr.get("name") or ()
    last = names[-1] if names else None
    return last.get("String", {}).get("sval") if type(last) is dict else None


def _always_true(node: Any) -> bool:
    """A condition that holds for every row, by its shape: `true`, `x = x` (any column or
    constant compared with itself), and AND/OR/NOT of such. What a constraint implies
    (`id IS NOT NULL` on a primary key) is not known here."""
    if type(node) is not dict:
        return False
    if "A_Const" in node:
        return node["A_Const"].get("boolval", {}).get("boolval") is True
    if "BoolExpr" in node:
        b = node["BoolExpr"]
        args = b.get("args") or []
        op = b.get("boolop")
        if op == "OR_EXPR":
            return any(_always_true(a) for a in args)
        if op == "AND_EXPR":
            return bool(args) and all(_always_true(a) for a in args)
        return op == "NOT_EXPR" and len(args) == 1 and _always_false(args[0])
    if "A_Expr" in node:
        e = node["A_Expr"]
        if e.get("kind") == "AEXPR_OP" and _operator(e) in ("=", ">=", "<="):
            return bool(_without_locations(e.get("lexpr")) == _without_locations(e.get("rexpr")))
    return False


def _always_false(node: Any) -> bool:
    if type(node) is not dict:
        return False
    if "A_Const" in node:
        return node["A_Const"].get("boolval", {}).get("boolval") is not True and (
            "boolval" in node["A_Const"]
        )
    if "BoolExpr" in node:
        b = node["BoolExpr"]
        args = b.get("args") or []
        op = b.get("boolop")
        if op == "AND_EXPR":
            return any(_always_false(a) for a in args)
        if op == "OR_EXPR":
            return bool(args) and all(_always_false(a) for a in args)
        return op == "NOT_EXPR" and len(args) == 1 and _always_true(args[0])
    if "A_Expr" in node:
        e = node["A_Expr"]
        if e.get("kind") == "AEXPR_OP" and _operator(e) in ("<>", "!=", "<", ">"):
            return bool(_without_locations(e.get("lexpr")) == _without_locations(e.get("rexpr")))
    return False


def _selects_every_row(where: Any) -> bool:
    return where is None or not _has_column_ref(where) or _always_true(where)


def _r_qualified(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    if _selects_every_row(node.get("whereClause")):
        acc.classes.add(_UNQUALIFIED)
    relation = node.get("relation") or {}
    if command == "UPDATE" and relation.get("relname") == "pg_settings":
        # the view's rule calls set_config(): an UPDATE of it is a SET of any parameter
        acc.classes.add(_SETTINGS)
        acc.settings.add("*")
    return command, acc


def _r_merge(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    # WHEN MATCHED ... UPDATE/DELETE touches every target row the join condition matches
    matched = any(
        (c.get("MergeWhenClause") or {}).get("matchKind") == "MERGE_WHEN_MATCHED"
        and (c.get("MergeWhenClause") or {}).get("commandType") in ("CMD_UPDATE", "CMD_DELETE")
        for c in node.get("mergeWhenClauses") or ()
        if type(c) is dict
    )
    if matched and _selects_every_row(node.get("joinCondition")):
        acc.classes.add(_UNQUALIFIED)
    return command, acc


def _r_copy(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    if node.get("is_program"):
        acc.classes.add(_PROGRAM)
    elif node.get("filename") is not None:
        acc.classes.add(_FILES)
    acc.classes.add(_WRITE if node.get("is_from") else _READ)
    return command, acc


def _r_explain(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    analyze = False
    for item in node.get("options") or ():
        elem = item.get("DefElem") if type(item) is dict else None
        if not elem or elem.get("defname") != "analyze":
            continue
        arg = elem.get("arg")
        if arg is None:
            analyze = True
        elif "Integer" in arg:
            analyze = analyze or bool(arg["Integer"].get("ival"))
        elif "String" in arg:
            analyze = analyze or arg["String"].get("sval", "").lower() not in ("false", "off")
        else:  # not a form PostgreSQL accepts as false: assume it runs
            analyze = True
    return command, acc if analyze else acc.shadow()


def _r_create_table_as(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    into = node.get("into") or {}
    if not into.get("skipData"):
        acc.classes.add(_WRITE)
    if node.get("objtype") == "OBJECT_MATVIEW":
        command = "CREATE MATERIALIZED VIEW"
    return command, acc


def _r_execute(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    acc.executes = str(node.get("name", ""))
    return command, acc


def _r_deallocate(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    return ("DEALLOCATE ALL" if node.get("isall") else command), acc


def _r_fetch(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    return ("MOVE" if node.get("ismove") else command), acc


def _r_variable_set(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    kind = node.get("kind", "")
    name = node.get("name")
    if kind == "VAR_RESET_ALL":
        acc.classes.add(_SETTINGS)
        acc.settings.add("*")
        return "RESET", acc
    if kind == "VAR_SET_MULTI":
        args = node.get("args")
        if name == "TRANSACTION":
            acc.classes.add(_TX)
            if _read_write(args):
                acc.classes.add(_SETTINGS)
                acc.settings.add("transaction_read_only")
            return "SET TRANSACTION", acc
        if name == "SESSION CHARACTERISTICS":
            acc.classes.add(_SETTINGS)
            acc.settings.update("default_" + n for n in _mode_names(args))
            if _read_write(args):
                acc.settings.update(("transaction_read_only", "default_transaction_read_only"))
            return "SET SESSION CHARACTERISTICS", acc
        if name == "TRANSACTION SNAPSHOT":
            acc.classes.add(_TX)
            return "SET TRANSACTION SNAPSHOT", acc
        acc.classes.add(_UNKNOWN)
        return command, acc
    if not name:
        acc.classes.add(_UNKNOWN)
        return command, acc
    lname = str(name).lower()
    acc.settings.add(lname)
    acc.classes.add(_AUTH if lname in _AUTH_SETTINGS else _SETTINGS)
    return ("RESET" if kind == "VAR_RESET" else "SET"), acc


def _r_set_nested(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    """ALTER SYSTEM / DATABASE / ROLE ... SET: settings of future sessions."""
    setstmt = node.get("setstmt") or {}
    name = setstmt.get("name")
    acc.settings.add("*" if setstmt.get("kind") == "VAR_RESET_ALL" or not name else name.lower())
    return command, acc


def _r_discard(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    target = str(node.get("target", ""))
    if target == "DISCARD_ALL":
        acc.classes.add(_AUTH)
        acc.settings.update(("*", "session_authorization"))
    return target.replace("_", " ") or command, acc


def _r_transaction(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    kind = node.get("kind", "")
    if kind in ("TRANS_STMT_BEGIN", "TRANS_STMT_START") and _read_write(node.get("options")):
        acc.classes.add(_SETTINGS)
        acc.settings.add("transaction_read_only")
    cmd = _TRANSACTION_COMMANDS.get(kind)
    if cmd is None:
        acc.classes.add(_UNKNOWN)
        return command, acc
    return cmd, acc


def _r_vacuum(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    return ("VACUUM" if node.get("is_vacuumcmd") else "ANALYZE"), acc


def _r_drop(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    rtype = node.get("removeType", "")
    extra = _DROP_EXTRA.get(rtype)
    if extra is not None:
        acc.classes.add(extra)
    if rtype in _DROP_RELATIONS:
        for obj in node.get("objects") or ():
            items = obj.get("List", {}).get("items", ()) if type(obj) is dict else ()
            parts = [i["String"]["sval"] for i in items if type(i) is dict and "String" in i]
            if parts:
                acc.relations.add(".".join(parts))
    return "DROP " + _object_words(rtype), acc


def _r_alter_table(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    for cmd in node.get("cmds") or ():
        sub = cmd.get("AlterTableCmd", {}).get("subtype") if type(cmd) is dict else None
        extra = _ALTER_TABLE_EXTRA.get(sub or "")
        if extra is not None:
            acc.classes.add(extra)
    return "ALTER " + _object_words(node.get("objtype", "OBJECT_TABLE")), acc


def _r_alter_domain(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    if node.get("subtype") == "X":  # DROP CONSTRAINT
        acc.classes.add(_DROP)
    return command, acc


def _r_alter_object(field: str) -> _Refiner:
    def refine(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
        objtype = node.get(field)
        if objtype == "OBJECT_COLUMN":  # RENAME COLUMN of a table, view, ...
            objtype = node.get("relationType", objtype)
        if objtype == "OBJECT_ROLE":
            acc.classes.add(_DCL)
            return "ALTER ROLE", acc
        return "ALTER " + _object_words(objtype), acc

    return refine


def _r_create_function(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    return ("CREATE PROCEDURE" if node.get("is_procedure") else command), acc


def _r_alter_function(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    return "ALTER " + _object_words(node.get("objtype", "OBJECT_FUNCTION")), acc


def _r_define(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    return "CREATE " + _object_words(node.get("kind")), acc


def _r_grant(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    return ("GRANT" if node.get("is_grant") else "REVOKE"), acc


def _r_create_role(node: _Node, acc: _Acc, command: str) -> tuple[str, _Acc]:
    return _ROLE_COMMANDS.get(node.get("stmt_type", ""), command), acc


_REFINERS: Final[Mapping[str, _Refiner]] = {
    "SelectStmt": _r_select,
    "UpdateStmt": _r_qualified,
    "DeleteStmt": _r_qualified,
    "MergeStmt": _r_merge,
    "CopyStmt": _r_copy,
    "ExplainStmt": _r_explain,
    "CreateTableAsStmt": _r_create_table_as,
    "ExecuteStmt": _r_execute,
    "DeallocateStmt": _r_deallocate,
    "FetchStmt": _r_fetch,
    "VariableSetStmt": _r_variable_set,
    "AlterSystemStmt": _r_set_nested,
    "AlterDatabaseSetStmt": _r_set_nested,
    "AlterRoleSetStmt": _r_set_nested,
    "DiscardStmt": _r_discard,
    "TransactionStmt": _r_transaction,
    "VacuumStmt": _r_vacuum,
    "DropStmt": _r_drop,
    "AlterTableStmt": _r_alter_table,
    "AlterDomainStmt": _r_alter_domain,
    "RenameStmt": _r_alter_object("renameType"),
    "AlterObjectSchemaStmt": _r_alter_object("objectType"),
    "AlterOwnerStmt": _r_alter_object("objectType"),
    "AlterObjectDependsStmt": _r_alter_object("objectType"),
    "CreateFunctionStmt": _r_create_function,
    "AlterFunctionStmt": _r_alter_function,
    "DefineStmt": _r_define,
    "GrantStmt": _r_grant,
    "GrantRoleStmt": _r_grant,
    "CreateRoleStmt": _r_create_role,
}


def _visit(key: str, node: _Node, acc: _Acc) -> tuple[str, _Acc]:
    """Classify one statement node; returns its command and the collector for its children."""
    command, classes = STATEMENT_TABLE[key]
    if classes:
        acc.classes.update(classes)
    refine = _REFINERS.get(key)
    if refine is None:
        return command, acc
    return refine(node, acc, command)


def _func_call(node: _Node, acc: _Acc) -> None:
    names = [str(n["String"]["sval"]).lower() for n in node.get("funcname", ()) if "String" in n]
    if not names:
        return
    bare = names[-1]
    acc.functions.add(bare)
    if len(names) > 1:
        acc.functions.add(".".join(names))
    cls = BUILTIN_FUNCTION_CLASSES.get(bare)
    if cls is None:
        if bare.startswith(_PREFIXES):
            cls = function_class(bare)
        if cls is None:
            return
    if bare == "set_config":
        args = node.get("args")
        name = _const_str(args[0]) if args else None
        if name is None:  # computed name: it could be 'role'
            acc.settings.add("*")
            acc.classes.update((_SETTINGS, _AUTH))
            return
        name = name.lower()
        acc.settings.add(name)
        cls = _AUTH if name in _AUTH_SETTINGS else _SETTINGS
    acc.classes.add(cls)


def _relation(node: _Node) -> str | None:
    rel = node["relname"]
    if type(rel) is not str:
        return None
    schema = node.get("schemaname")
    if not schema:
        return rel
    catalog = node.get("catalogname")
    return f"{catalog}.{schema}.{rel}" if catalog else f"{schema}.{rel}"


# Wrapped nodes that never contain a statement, a function call or a relation: not descended.
_LEAVES: Final = frozenset(
    {
        "A_Const",
        "String",
        "Integer",
        "Float",
        "Boolean",
        "BitString",
        "ColumnRef",
        "ParamRef",
        "A_Star",
        "TypeName",
    }
)


def _walk(root: Any, acc: _Acc) -> None:
    """Visit every node under `root`; iterative, as deep expressions must not hit the
    recursion limit."""
    stack = [root]
    pop, push, extend = stack.pop, stack.append, stack.extend
    statements, leaves, dict_, list_ = STATEMENT_TABLE, _LEAVES, dict, list
    while stack:
        obj = pop()
        kind = type(obj)
        if kind is list_:
            extend(obj)
            continue
        if kind is not dict_:
            continue
        if len(obj) == 1:
            for key, val in obj.items():  # the single entry; a loop is the cheapest way to get it
                if key in leaves:
                    pass
                elif key in statements:
                    _command, child = _visit(key, val, acc)
                    if child is acc:
                        push(val)
                    else:  # EXPLAIN without ANALYZE: names only
                        _walk(val, child)
                else:
                    if key[-4:] == "Stmt" and key[0].isupper():  # a statement the table lacks
                        acc.classes.add(_UNKNOWN)
                    push(val)
            continue
        # RangeVar and FuncCall often sit in typed fields without their wrapper key.
        if "relname" in obj:
            rel = _relation(obj)
            if rel is not None:
                acc.relations.add(rel)
        elif "funcformat" in obj:
            _func_call(obj, acc)
        extend(obj.values())


def fingerprint(text: str) -> str | None:
    try:
        return _pg.fingerprint(text)
    except Exception:
        return None


def _failure(sql: str, error: str) -> StatementInfo:
    return StatementInfo(
        text=sql.strip(),
        fingerprint=None,
        command="UNKNOWN",
        classes=_UNKNOWN_ONLY,
        functions=_NOTHING,
        relations=_NOTHING,
        prepares=None,
        executes=None,
        error=error,
    )


def _statement(text: str, stmt: Any) -> StatementInfo:
    functions: set[str] = set()
    relations: set[str] = set()
    acc = _Acc(functions, relations)
    command = "UNKNOWN"
    prepares: str | None = None
    deallocates: str | None = None
    error: str | None = None
    try:
        if type(stmt) is not dict or len(stmt) != 1:
            raise ValueError("unexpected parse tree")
        ((key, node),) = stmt.items()
        if key in STATEMENT_TABLE:
            command, child = _visit(key, node, acc)
            if key == "PrepareStmt":
                prepares = str(node.get("name", ""))
            elif key == "DeallocateStmt":
                deallocates = str(node.get("name") or "*")
            elif key == "DiscardStmt" and node.get("target") == "DISCARD_ALL":
                deallocates = "*"
        else:
            acc.classes.add(_UNKNOWN)
            child = acc
        _walk(node, child)
    except Exception as e:  # a tree shape this code does not expect: fail closed
        acc.classes.add(_UNKNOWN)
        error = f"cannot classify: {type(e).__name__}: {e}"
    return StatementInfo(
        text=text,
        fingerprint=fingerprint(text),
        command=command,
        classes=frozenset(acc.classes) if acc.classes else _UNKNOWN_ONLY,
        functions=frozenset(functions),
        relations=frozenset(relations),
        prepares=prepares,
        executes=acc.executes,
        error=error,
        settings=frozenset(acc.settings) if acc.settings else _NOTHING,
        deallocates=deallocates,
    )


def analyze(sql: str) -> tuple[StatementInfo, ...]:
    """One StatementInfo per statement of `sql`; `()` when it holds no statement."""
    if "\x00" in sql:
        # PostgreSQL rejects such a Query message; libpg_query would stop reading at the NUL.
        return (_failure(sql.replace("\x00", "\\0"), "query string contains a NUL byte"),)
    try:
        tree = json.loads(_pg.parse_sql_json(sql))
    except _pg.ParseError as e:
        return (_failure(sql, str(e.args[0]) if e.args else str(e)),)
    except Exception as e:  # unencodable text, nesting deeper than the JSON decoder allows, ...
        return (_failure(sql, f"{type(e).__name__}: {e}"),)
    stmts = tree.get("stmts") or ()
    if not stmts:
        return ()
    out: list[StatementInfo] = []
    # stmt_location/stmt_len are byte offsets into the UTF-8 text.
    if sql.isascii():
        for entry in stmts:
            start = entry.get("stmt_location", 0)
            length = entry.get("stmt_len", 0)
            text = sql[start : start + length] if length else sql[start:]
            out.append(_statement(text.strip(), entry.get("stmt")))
    else:
        raw = sql.encode()
        for entry in stmts:
            start = entry.get("stmt_location", 0)
            length = entry.get("stmt_len", 0)
            piece = raw[start : start + length] if length else raw[start:]
            out.append(_statement(piece.decode("utf-8", "replace").strip(), entry.get("stmt")))
    return tuple(out)


class Analyzer:
    """`analyze()` with a bounded cache keyed by the exact query text.

    Not by fingerprint: fingerprints ignore literals, and a literal can change the class
    (`set_config('role', ...)`). Eviction drops the oldest insertion (FIFO): a hit is then a
    single dict lookup, and a hot statement that falls out is re-parsed once in ~15 µs.
    """

    __slots__ = ("_cache", "_chars", "_max_chars", "_max_entries")

    def __init__(self, max_entries: int = 10_000, max_chars: int = 16 * 1024 * 1024) -> None:
        self._cache: dict[str, tuple[StatementInfo, ...]] = {}
        self._max_entries = max(1, max_entries)
        self._max_chars = max_chars  # bounds memory when clients send large, unique texts
        self._chars = 0

    def analyze(self, sql: str) -> tuple[StatementInfo, ...]:
        hit = self._cache.get(sql)
        if hit is not None:
            return hit
        result = analyze(sql)
        size = len(sql)
        if size > self._max_chars:
            return result
        cache = self._cache
        while cache and (len(cache) >= self._max_entries or self._chars + size > self._max_chars):
            oldest = next(iter(cache))
            del cache[oldest]
            self._chars -= len(oldest)
        cache[sql] = result
        self._chars += size
        return result

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()
        self._chars = 0
