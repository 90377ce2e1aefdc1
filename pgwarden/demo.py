"""`pgwarden demo`: the whole data path on one machine, no cluster.

A throwaway PostgreSQL with sample data (TLS, scram-sha-256), a local OIDC issuer, the proxy
(TLS on both sides), and a short scripted agent session with real psql: masked personal data, a
refused DROP, and a write held until a (scripted) reviewer approves it. Then it prints what the
proxy saw.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pgwarden.api.config import ProxyConfig
from pgwarden.embedded.certs import make_certs
from pgwarden.embedded.issuer import LocalIssuer
from pgwarden.embedded.postgres import ThrowawayPostgres

SAMPLE_DATA = """
CREATE TABLE customers (
    id     serial PRIMARY KEY,
    name   text NOT NULL,
    email  text NOT NULL,
    ssn    text,
    card   text
);
CREATE TABLE orders (
    id          serial PRIMARY KEY,
    customer_id int REFERENCES customers(id),
    total       numeric(10,2) NOT NULL,
    placed_at   timestamptz NOT NULL DEFAULT now()
);
INSERT INTO customers (name, email, ssn, card) VALUES
  ('Ada Lovelace',  'ada@example.org',   '078-05-1120', '4111 1111 1111 1111'),
  ('Alan Turing',   'alan@example.org',  '219-09-9999', '5500 0000 0000 0004'),
  ('Grace Hopper',  'grace@example.org', '457-55-5462', '3400 0000 0000 009');
INSERT INTO orders (customer_id, total)
  SELECT 1 + (g % 3), round((random() * 200)::numeric, 2) FROM generate_series(1, 250) g;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO pgwarden_demo;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO pgwarden_demo;
"""

AGENT_SCRIPT = [
    ("look around", "SELECT count(*) AS customers FROM customers"),
    (
        "read personal data (email partial, ssn redacted, card numbers found by a detector)",
        "SELECT id, name, email, ssn, card FROM customers ORDER BY id",
    ),
    ("a derived value is masked too", "SELECT upper(email) AS shouting FROM customers LIMIT 1"),
    ("aggregate", "SELECT customer_id, count(*), sum(total) FROM orders GROUP BY 1 ORDER BY 1"),
    ("two statements at once", "SELECT now(); SELECT current_user"),
    ("a failing statement", "SELECT * FROM no_such_table"),
    ("a stray DROP (the policy denies it)", "DROP TABLE orders"),
    (
        "a write waits for a person (a reviewer approves it)",
        "UPDATE orders SET total = total + 1 WHERE id = 1",
    ),
]

POLICY = {
    "connections": ["shop-db"],
    "subjects": {"groups": ["ai-agents"]},
    "access": "read-write",
    "guardrails": {"deny": ["ddl", "drop", "truncate"], "maxRows": 1000},
    "masking": [
        {"columns": ["public.customers.email"], "strategy": "partial"},
        {"columns": ["public.customers.ssn"], "strategy": "redact"},
        {"detectors": ["credit-card"], "strategy": "partial"},
    ],
    "approvals": {"require": ["write"]},
    "recording": {"level": "results"},  # the rows the agent received (masked) are kept too
}


def _reviewer(directory: Path, stop: threading.Event) -> None:
    """A person who approves every request after a short look (the demo's second pair of eyes)."""
    from pgwarden.api.approvals import ApprovalState
    from pgwarden_proxy.approvals.files import FileApprovals

    approvals = FileApprovals(directory)
    while not stop.wait(0.2):
        for req in approvals.list_requests():
            time.sleep(1.0)
            approvals.decide(
                req.name, ApprovalState.APPROVED, by="reviewer@example.com", comment="looks fine"
            )
            print(f"   (reviewer@example.com approved request {req.name})")


def _psql(port: int, token: str, ca: Path, sql: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PGPASSWORD": token,
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": str(ca),
        "PGAPPNAME": "demo-agent",
        "PGCONNECT_TIMEOUT": "10",
    }
    env.pop("PGOPTIONS", None)
    return subprocess.run(
        [
            "psql",
            "-X",
            "-h",
            "localhost",
            "-p",
            str(port),
            "-U",
            "agent",
            "-d",
            "shop",
            "-v",
            "ON_ERROR_STOP=0",
            "-c",
            sql,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def main(keep_running: bool = False) -> int:
    from pgwarden import logs
    from pgwarden_proxy.events import LogEventSink
    from pgwarden_proxy.thread import ProxyThread

    if shutil.which("psql") is None:
        print("pgwarden demo needs psql (PostgreSQL client) on PATH", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-demo-"))
    log_path = workdir / "proxy.log"
    with log_path.open("w") as log_file:
        logs.configure("info", log_file)
        print("pgwarden demo: starting a throwaway PostgreSQL (TLS, scram-sha-256) ...")
        with ThrowawayPostgres(tls=True) as pg, LocalIssuer() as issuer:
            db_password = secrets.token_urlsafe(18)
            pg.create_role("pgwarden_demo", db_password)
            pg.create_database("shop")
            pg.sql(SAMPLE_DATA, dbname="shop")
            certs = make_certs(workdir / "proxy-tls")
            recordings = workdir / "recordings"
            config = ProxyConfig.model_validate(
                {
                    "connection": "shop-db",
                    "listen": {
                        "host": "127.0.0.1",
                        "port": 0,
                        "tls": {"certFile": str(certs.cert), "keyFile": str(certs.key)},
                    },
                    "upstream": {
                        "host": "localhost",
                        "port": pg.port,
                        "database": "shop",
                        "username": "pgwarden_demo",
                        "password": db_password,
                        "sslmode": "verify-full",
                        "caFile": str(pg.ca_file),
                    },
                    "auth": {"oidc": {"issuer": issuer.issuer, "audience": "pgwarden"}},
                    "policies": [{"name": "ai-agents", "spec": POLICY}],
                    "approvals": {
                        "backend": "file",
                        "dir": str(workdir / "approvals"),
                        "holdTimeout": "60s",
                    },
                    "metrics": {"host": "127.0.0.1", "port": 0},
                    "recording": {
                        "spoolDir": str(workdir / "spool"),
                        "sink": {"file": {"dir": str(recordings)}},
                        "signingKeyFile": str(_signing_key(workdir)),
                    },
                }
            )
            stop = threading.Event()
            reviewer = threading.Thread(
                target=_reviewer, args=(workdir / "approvals", stop), daemon=True
            )
            with ProxyThread(config, sink=LogEventSink()) as proxy:
                reviewer.start()
                port = proxy.port
                print(
                    f"pgwarden demo: issuer {issuer.issuer}, proxy on localhost:{port} "
                    f"(TLS), database behind it on port {pg.port}\n"
                )
                token = issuer.mint(
                    sub="agent-7", email="agent@example.com", groups=["ai-agents"], lifetime=900
                )
                print("== An AI agent logs in with its OIDC token as the password ==\n")
                for title, sql in AGENT_SCRIPT:
                    print(f"-- {title}\n   agent> {sql}", flush=True)
                    res = _psql(port, token, certs.ca_cert, sql)
                    if res.stdout.strip():
                        print(_indent(res.stdout))
                    if res.stderr.strip():
                        print(_indent(res.stderr))
                    print()
                print("== Logins the proxy refuses ==\n")
                outsider = issuer.mint(
                    sub="x-1", email="intruder@example.com", groups=["contractors"]
                )
                expired = issuer.mint(
                    sub="agent-7",
                    email="agent@example.com",
                    groups=["ai-agents"],
                    issued_at=time.time() - 7200,
                    lifetime=600,
                )
                for title, tok in [
                    ("a token no policy grants access", outsider),
                    ("an expired token", expired),
                    ("a made-up password", "hunter2"),
                ]:
                    res = _psql(port, tok, certs.ca_cert, "SELECT 1")
                    print(f"-- {title}\n{_indent(res.stderr or res.stdout)}\n")
                stop.set()
                if keep_running:
                    _keep_running(port, certs.ca_cert, issuer)
        # the proxy has stopped: every session is closed, shipped and can be verified
        _show_recording(recordings.resolve().as_uri(), workdir / "signing.pub")
        print(f"\nStructured proxy log (JSON lines, no secrets): {log_path}")
    return 0


def _signing_key(workdir: Path) -> Path:
    """An Ed25519 key that signs each session's manifest (its public half verifies them)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    key = Ed25519PrivateKey.generate()
    path = workdir / "signing.key"
    path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    path.chmod(0o600)
    (workdir / "signing.pub").write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    return path


def _show_recording(store: str, public_key: Path) -> None:
    from pgwarden.cli import main as cli
    from pgwarden.recording.reader import list_sessions
    from pgwarden.recording.store import open_store

    recorded = open_store(store)
    (personal,) = list_sessions(recorded, statement_contains="ssn, card FROM customers")
    (approved,) = list_sessions(recorded, decision="approved")
    for title, args in [
        (
            "The recording: every session (the agent connected once per step)",
            ["sessions", "list", "--store", store],
        ),
        (
            "A session as a reviewer reads it: the write a person approved",
            ["sessions", "show", approved.session_id, "--store", store],
        ),
        (
            "A session played back: the rows the agent received, masked",
            ["sessions", "replay", personal.session_id, "--speed", "0", "--store", store],
        ),
        (
            "Verified: hash chain, counts and signed manifests",
            ["sessions", "verify", "--all", "--store", store, "--public-key", str(public_key)],
        ),
    ]:
        print(f"== {title} ==\n   $ pgwarden {' '.join(args)}\n", flush=True)
        cli(args)
        print(flush=True)


def _keep_running(port: int, ca: Path, issuer: LocalIssuer) -> None:
    token = issuer.mint(sub="you", email="you@example.com", groups=["ai-agents"], lifetime=3600)
    print("== Your turn (Ctrl-C to stop) ==\n")
    print(
        f"  PGPASSWORD='{token}' \\\n  psql 'host=localhost port={port} dbname=shop user=you "
        f"sslmode=verify-full sslrootcert={ca}'\n"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
