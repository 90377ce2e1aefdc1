"""A throwaway PostgreSQL server on loopback, for tests, benchmarks and ``pgwarden demo``."""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

from pgwarden.embedded.certs import make_certs

__all__ = ["ThrowawayPostgres", "find_bindir", "libpq_dsn"]

AuthMethod = Literal["scram-sha-256", "md5", "password"]

SERVER_USER = "postgres"
BINDIR_ENV = "PGWARDEN_PG_BINDIR"

# Fast and forgiving: the data is thrown away, so durability buys nothing.
_DEFAULT_SETTINGS: dict[str, str] = {
    "max_connections": "300",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
_DEFAULT_HBA = [
    "local all all scram-sha-256",
    "host all all 127.0.0.1/32 scram-sha-256",
]
_PORT_TAKEN = re.compile(
    r"could not bind|Address already in use|could not create any TCP/IP sockets"
)


def find_bindir() -> Path:
    """Directory holding ``initdb`` and ``pg_ctl``.

    Order: ``$PGWARDEN_PG_BINDIR``, ``pg_config --bindir``, the newest
    ``/usr/lib/postgresql/*/bin`` (Debian keeps server binaries off PATH), then PATH.
    """
    explicit = os.environ.get(BINDIR_ENV)
    if explicit:
        path = Path(explicit)
        if not _has_server_binaries(path):
            raise RuntimeError(f"{BINDIR_ENV}={explicit} does not contain initdb and pg_ctl")
        return path
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))
    debian = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(debian, key=lambda p: int(p.parent.name), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for candidate in candidates:
        if _has_server_binaries(candidate):
            return candidate
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install the PostgreSQL server "
        f"package or set {BINDIR_ENV} to the directory that holds them"
    )


def _has_server_binaries(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in ("initdb", "pg_ctl"))


def libpq_dsn(params: Mapping[str, object]) -> str:
    """A libpq ``key=value`` connection string, quoting values only where libpq needs it."""
    parts = []
    for key, value in params.items():
        text = str(value)
        if text == "" or re.search(r"[\s'\\]", text):
            text = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _conf_value(value: str) -> str:
    # postgresql.conf strings treat a backslash as an escape, unlike standard SQL literals.
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGOPTIONS... from the caller's shell must not steer our server or psql;
    # the C locale keeps server messages in English so the log can be matched.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


class ThrowawayPostgres:
    """A private PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 only.

    As root (containers, CI) the server runs as the ``postgres`` system user, because initdb and
    postgres refuse to run as root.
    """

    host = "127.0.0.1"
    superuser = SERVER_USER

    def __init__(
        self,
        *,
        tls: bool = False,
        tls_hostnames: Sequence[str] = ("localhost",),
        tls_ips: Sequence[str] = ("127.0.0.1",),
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.tls = tls
        self.tls_hostnames = tuple(tls_hostnames)
        self.tls_ips = tuple(tls_ips)
        self.settings = dict(settings or {})
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self.ca_file: Path | None = None
        self.base_dir: Path | None = None
        self.data_dir = Path()
        self.log_file = Path()
        self._bindir: Path | None = None
        self._settings: dict[str, str] = {}
        self._hba_roles: list[str] = []
        self._running = False
        self._owner: pwd.struct_passwd | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Create and start a fresh cluster, or restart this one after :meth:`stop`.

        A restart keeps the data and the port, so clients can test riding out an outage.
        """
        if self._running:
            raise RuntimeError("this ThrowawayPostgres is already running")
        if self.base_dir is not None:
            self._start_server(keep_port=True)
            return
        self._bindir = find_bindir()
        if os.geteuid() == 0:
            try:
                self._owner = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise RuntimeError(
                    f"running as root needs a '{SERVER_USER}' system user to run the server as"
                ) from None
        self.base_dir = Path(tempfile.mkdtemp(prefix="pgwarden-pg-"))
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "server.log"
        self._hba_roles = []
        atexit.register(self._cleanup)
        try:
            self._initdb()
            self._configure()
            self._start_server(keep_port=False)
        except BaseException:
            self._cleanup()
            raise

    def stop(self) -> None:
        """Stop the server; calling it again, or before start, does nothing."""
        if not self._running:
            return
        self._running = False
        fast = self._pg_ctl("stop", "-m", "fast", "-t", "30", check=False)
        if fast.returncode != 0 and self._pid_alive():
            self._pg_ctl("stop", "-m", "immediate", "-t", "30", check=False)

    def _cleanup(self) -> None:
        self.stop()
        atexit.unregister(self._cleanup)
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._cleanup()

    # -- setup -------------------------------------------------------------------------------

    def _initdb(self) -> None:
        assert self.base_dir is not None
        self._chown(self.base_dir)
        pwfile = self.base_dir / "pwfile"
        self._write(pwfile, self.password + "\n")
        try:
            self._run_server_tool(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SERVER_USER,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
                timeout=180,
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _configure(self) -> None:
        assert self.base_dir is not None
        socket_dir = self.base_dir / "sock"
        socket_dir.mkdir(mode=0o700)
        self._chown(socket_dir)
        settings = {
            **_DEFAULT_SETTINGS,
            "listen_addresses": self.host,
            "unix_socket_directories": str(socket_dir),
        }
        if self.tls:
            certs = make_certs(
                self.base_dir / "tls", hostnames=self.tls_hostnames, ips=self.tls_ips
            )
            self._chown(self.base_dir / "tls", recursive=True)
            self.ca_file = certs.ca_cert
            settings |= {
                "ssl": "on",
                "ssl_cert_file": str(certs.cert),
                "ssl_key_file": str(certs.key),
            }
        settings |= self.settings
        # Our settings live in their own file so a port retry rewrites them without touching
        # the stock postgresql.conf; the include comes last so it wins.
        self._settings = settings
        with (self.data_dir / "postgresql.conf").open("a") as f:
            f.write("\ninclude 'pgwarden.conf'\n")
        self._write_hba()

    def _write_settings(self) -> None:
        lines = [
            f"{k} = {_conf_value(v)}" for k, v in {**self._settings, "port": str(self.port)}.items()
        ]
        self._write(self.data_dir / "pgwarden.conf", "\n".join(lines) + "\n")

    def _write_hba(self) -> None:
        self._write(
            self.data_dir / "pg_hba.conf", "\n".join([*self._hba_roles, *_DEFAULT_HBA]) + "\n"
        )

    def _start_server(self, *, keep_port: bool) -> None:
        for attempt in range(2):
            if not keep_port:
                self.port = _free_port(self.host)
                self._write_settings()
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            result = self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log_file), check=False)
            if result.returncode == 0:
                self._running = True
                return
            tail = self._log_tail(log_offset)
            # Another process can grab the port between our probe and the server's bind.
            if attempt == 0 and not keep_port and _PORT_TAKEN.search(tail):
                continue
            # pg_ctl gives up after the timeout but may leave a half-started server behind.
            if self._pid_alive():
                self._running = True
            raise RuntimeError(
                f"PostgreSQL failed to start on port {self.port} "
                f"(pg_ctl exit {result.returncode}): {result.stderr.strip()}\n"
                f"--- tail of {self.log_file} ---\n{tail}"
            )

    def _log_tail(self, offset: int = 0, lines: int = 30) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def _pid_alive(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    # -- running tools -----------------------------------------------------------------------

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run_server_tool("pg_ctl", "-D", str(self.data_dir), *args, check=check)

    def _run_server_tool(
        self, tool: str, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        assert self._bindir is not None
        command = [str(self._bindir / tool), *args]
        if self._owner is not None:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        result = subprocess.run(
            command,
            cwd=self.base_dir,  # the server user may not be able to enter the caller's cwd
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{tool} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result

    def _write(self, path: Path, text: str) -> None:
        """Write a file that the server user owns and only it can read."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self._chown(path)

    def _chown(self, path: Path, *, recursive: bool = False) -> None:
        if self._owner is None:
            return
        uid, gid = self._owner.pw_uid, self._owner.pw_gid
        os.chown(path, uid, gid)
        if recursive:
            for child in path.rglob("*"):
                os.chown(child, uid, gid)

    def _psql(self) -> str:
        assert self._bindir is not None
        local = self._bindir / "psql"
        found = str(local) if os.access(local, os.X_OK) else shutil.which("psql")
        if found is None:
            raise RuntimeError("psql not found next to initdb nor on PATH")
        return found

    # -- public helpers ----------------------------------------------------------------------

    def sql(self, statement: str, *, dbname: str = "postgres") -> str:
        """Run SQL as the superuser through psql and return its unaligned, tuples-only output."""
        if not self._running:
            raise RuntimeError("the server is not running")
        env = _clean_env() | {"PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}
        command = [self._psql(), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        command += ["-h", self.host, "-p", str(self.port), "-U", self.superuser, "-d", dbname]
        # SQL goes in on stdin: no argv length limit, and psql splits multi-statement scripts.
        result = subprocess.run(
            [*command, "-f", "-"],
            input=statement,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed (exit {result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def dsn(
        self,
        *,
        user: str | None = None,
        password: str | None = None,
        dbname: str = "postgres",
        **extra: str,
    ) -> str:
        """libpq connection string; ``user`` defaults to the superuser and its password."""
        params: dict[str, str] = {
            "host": self.host,
            "port": str(self.port),
            "user": user or self.superuser,
            "dbname": dbname,
        }
        if password is not None:
            params["password"] = password
        elif user is None or user == self.superuser:
            params["password"] = self.password
        return libpq_dsn(params | extra)

    def create_role(
        self,
        name: str,
        password: str,
        *,
        auth: AuthMethod = "scram-sha-256",
        superuser: bool = False,
        login: bool = True,
    ) -> None:
        """Create a role that logs in from 127.0.0.1 with the given authentication method."""
        options = ("LOGIN" if login else "NOLOGIN") + (" SUPERUSER" if superuser else "")
        # A password stored as a SCRAM verifier would make an md5 hba line silently upgrade
        # to SCRAM, so md5 roles must store an md5 hash for the md5 exchange to really happen.
        encryption = "md5" if auth == "md5" else "scram-sha-256"
        self.sql(
            f"SET password_encryption = {_literal(encryption)};\n"
            f"CREATE ROLE {_ident(name)} {options} PASSWORD {_literal(password)};"
        )
        if auth != "scram-sha-256":
            # pg_hba is first-match, so a role's own line must precede the catch-all line.
            self._hba_roles.append(f"host all {_ident(name)} 127.0.0.1/32 {auth}")
            self._write_hba()
            self.sql("SELECT pg_catalog.pg_reload_conf()")

    def create_database(self, name: str, owner: str | None = None) -> None:
        owner_clause = f" OWNER {_ident(owner)}" if owner else ""
        self.sql(f"CREATE DATABASE {_ident(name)}{owner_clause}")
