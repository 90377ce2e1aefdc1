"""The statement-class vocabulary shared by the proxy, policies and recordings (a contract)."""

from __future__ import annotations

from enum import StrEnum


class StatementClass(StrEnum):
    READ = "read"
    WRITE = "write"
    UNQUALIFIED_WRITE = "unqualified-write"  # UPDATE/DELETE without WHERE
    DDL = "ddl"
    DROP = "drop"
    TRUNCATE = "truncate"
    DCL = "dcl"
    COPY_PROGRAM = "copy-program"
    SERVER_FILES = "server-files"
    SESSION_AUTHORIZATION = "session-authorization"
    SETTINGS = "settings"
    PROCEDURAL = "procedural"  # DO, CALL, CREATE FUNCTION/PROCEDURE
    ADMIN = "admin"
    TRANSACTION = "transaction"
    UNKNOWN = "unknown"  # the parser could not place it: refused wherever a policy restricts


# Classes a policy may name in `guardrails.deny` / `approvals.require` (everything but unknown,
# which is always refused where anything is restricted).
POLICY_CLASSES = tuple(c for c in StatementClass if c is not StatementClass.UNKNOWN)
