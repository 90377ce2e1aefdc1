"""Direct vs pgbouncer vs pgwarden, interleaved in one run, reported as ratios.

    .venv/bin/python bench/run.py [--seconds 8] [--rounds 3] [--scale 10] [--only NAME ...]

Everything runs on this machine: a throwaway PostgreSQL, pgbouncer (session pooling, installed
from Debian when absent and running as root), and `pgwarden proxy` as its own process with its
default configuration (statement events to the JSON log, here a file). Workloads are pgbench
(select-only simple and prepared at 1 and 8 clients, tpcb-like at 8) and a 1M-row read with psql.
A second pgwarden ("policy") runs a realistic policy: guardrails, one masked column
(`pgbench_accounts.filler`, which the 1M-row read returns) and three content detectors.
A third ("recorded") records every session (spool fsynced on this disk, file sink).
Rounds interleave the targets so that drift on a shared machine hits all of them alike;
the report gives the median of each and the ratios. Numbers depend on the machine: compare
ratios, not absolute values.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from pgwarden.embedded.issuer import LocalIssuer
from pgwarden.embedded.postgres import ThrowawayPostgres

ROOT = Path(__file__).resolve().parent.parent
USER, DB = "bench", "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    name: str
    port: int
    password: str


def as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def start_pgbouncer(
    pg: ThrowawayPostgres, password: str, workdir: Path
) -> tuple[subprocess.Popen[bytes], Target]:
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(exe).exists():
        if os.geteuid() != 0:
            sys.exit("bench: pgbouncer is not installed (apt-get install pgbouncer)")
        print("bench: installing pgbouncer from Debian", file=sys.stderr)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "pgbouncer"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdout=subprocess.DEVNULL,
        )
        exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    port = free_port()
    d = workdir / "pgbouncer"
    d.mkdir()
    (d / "users.txt").write_text(f'"{USER}" "{password}"\n')
    (d / "pgbouncer.ini").write_text(f"""[databases]
{DB} = host=127.0.0.1 port={pg.port} dbname={DB}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {d}/users.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 50
logfile = {d}/pgbouncer.log
pidfile = {d}/pgbouncer.pid
""")
    if os.geteuid() == 0:  # pgbouncer runs as the postgres user: it must reach its files
        workdir.chmod(0o711)
        shutil.chown(d, "postgres")
        for f in d.iterdir():
            shutil.chown(f, "postgres")
    proc = subprocess.Popen(as_server_user([exe, "-q", str(d / "pgbouncer.ini")]))  # log: file only
    wait_port(port)
    return proc, Target("pgbouncer", port, password)


# What a cautious team would give an agent that may write: guardrails, masking, detectors.
REALISTIC_POLICY: dict[str, object] = {
    "subjects": {"groups": ["bench"]},
    "access": "read-write",
    "guardrails": {
        "deny": ["ddl", "drop", "truncate", "dcl", "admin", "server-files", "copy-program"],
        "statementTimeout": "60s",
    },
    "masking": [
        {"columns": ["public.pgbench_accounts.filler"], "strategy": "redact"},
        {"detectors": ["email", "credit-card", "us-ssn"], "strategy": "partial"},
    ],
}


def start_pgwarden(
    pg: ThrowawayPostgres,
    password: str,
    issuer: LocalIssuer,
    workdir: Path,
    statement_log: bool,
    name: str = "pgwarden",
    policy: dict[str, object] | None = None,
    recording: bool = False,
) -> tuple[subprocess.Popen[bytes], Target]:
    port = free_port()
    config = {
        "connection": "bench",
        "listen": {"host": "127.0.0.1", "port": port, "insecurePlaintext": True},
        "upstream": {
            "host": "127.0.0.1",
            "port": pg.port,
            "database": DB,
            "username": USER,
            "password": password,
            "sslmode": "disable",
        },
        "auth": {"oidc": {"issuer": issuer.issuer, "audience": "pgwarden"}},
        "policies": [
            {
                "name": "bench",
                "spec": policy or {"subjects": {"groups": ["bench"]}, "access": "read-write"},
            }
        ],
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        # with recording on, the default (unset) logs no statements: the recording keeps them
        "logging": {} if recording and statement_log else {"statements": statement_log},
    }
    if recording:  # spool and recordings on this machine's disk, fsynced as in production
        config["recording"] = {
            "spoolDir": str(workdir / f"{name}-spool"),
            "sink": {"file": {"dir": str(workdir / f"{name}-recordings")}},
        }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (workdir / f"{name}.log").open("w")
    exe = str(Path(sys.executable).with_name("pgwarden"))
    proc = subprocess.Popen([exe, "proxy", "--config", str(path)], stderr=log)
    wait_port(port)
    token = issuer.mint(sub="bench", email="bench@example.com", groups=["bench"], lifetime=6 * 3600)
    return proc, Target(name, port, token)


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"bench: nothing listening on port {port}")


def env_for(t: Target) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGHOST="127.0.0.1",
        PGPORT=str(t.port),
        PGUSER=USER,
        PGDATABASE=DB,
        PGPASSWORD=t.password,
        PGSSLMODE="disable",
    )
    return env


_TPS = re.compile(r"tps = ([\d.]+) \((?:without initial connection time|excluding)")


def pgbench(args: list[str], seconds: int) -> Callable[[Target], float]:
    def run(t: Target) -> float:
        out = subprocess.run(
            ["pgbench", "-n", "-T", str(seconds), *args],
            env=env_for(t),
            capture_output=True,
            text=True,
            timeout=seconds + 120,
        )
        m = _TPS.search(out.stdout)
        if out.returncode != 0 or not m:
            raise RuntimeError(f"pgbench on {t.name} failed: {out.stderr[-2000:]}")
        return float(m.group(1))

    return run


def big_read(t: Target) -> float:
    """Rows per second of a 1M-row SELECT read by psql (the whole result, to /dev/null)."""
    start = time.perf_counter()
    out = subprocess.run(
        [
            "psql",
            "-X",
            "-A",
            "-t",
            "-o",
            "/dev/null",
            "-c",
            "SELECT aid, bid, abalance, filler FROM pgbench_accounts WHERE aid <= 1000000",
        ],
        env=env_for(t),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"psql on {t.name} failed: {out.stderr}")
    return 1_000_000 / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=int, default=10, help="pgbench scale (10 = 1M accounts)")
    ap.add_argument("--only", nargs="*", help="workload names to run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--no-statement-log",
        action="store_true",
        help="run pgwarden with logging.statements: false (events of sessions only)",
    )
    args = ap.parse_args()
    s = args.seconds
    workloads: dict[str, tuple[str, Callable[[Target], float]]] = {
        "select-simple-c1": ("tps", pgbench(["-S", "-M", "simple", "-c", "1"], s)),
        "select-prepared-c1": ("tps", pgbench(["-S", "-M", "prepared", "-c", "1"], s)),
        "select-simple-c8": ("tps", pgbench(["-S", "-M", "simple", "-c", "8", "-j", "2"], s)),
        "select-prepared-c8": ("tps", pgbench(["-S", "-M", "prepared", "-c", "8", "-j", "2"], s)),
        "tpcb-prepared-c8": ("tps", pgbench(["-M", "prepared", "-c", "8", "-j", "2"], s)),
        "read-1M-rows": ("rows/s", big_read),
    }
    if args.scale < 10:
        del workloads["read-1M-rows"]
    if args.only:
        workloads = {k: v for k, v in workloads.items() if k in args.only}
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    settings = {"shared_buffers": "256MB", "max_connections": "200", "synchronous_commit": "off"}
    with ThrowawayPostgres(settings=settings) as pg, LocalIssuer() as issuer:
        try:
            password = secrets.token_urlsafe(16)
            pg.create_role(USER, password)
            pg.create_database(DB, owner=USER)
            direct = Target("direct", pg.port, password)
            print(f"bench: pgbench -i -s {args.scale} ...", file=sys.stderr)
            subprocess.run(
                ["pgbench", "-i", "-q", "-s", str(args.scale)],
                env=env_for(direct),
                check=True,
                capture_output=True,
            )
            bouncer_proc, bouncer = start_pgbouncer(pg, password, workdir)
            procs.append(bouncer_proc)
            warden_proc, warden = start_pgwarden(
                pg, password, issuer, workdir, not args.no_statement_log
            )
            procs.append(warden_proc)
            policy_proc, policy = start_pgwarden(
                pg,
                password,
                issuer,
                workdir,
                not args.no_statement_log,
                "policy",
                REALISTIC_POLICY,
            )
            procs.append(policy_proc)
            recorded_proc, recorded = start_pgwarden(
                pg, password, issuer, workdir, not args.no_statement_log, "recorded",
                recording=True,
            )  # fmt: skip
            procs.append(recorded_proc)
            targets = [direct, bouncer, warden, policy, recorded]
            results: dict[str, dict[str, list[float]]] = {
                w: {t.name: [] for t in targets} for w in workloads
            }
            for r in range(args.rounds):
                for wname, (_, fn) in workloads.items():
                    k = r % len(targets)
                    order = targets[k:] + targets[:k]  # rotate who goes first
                    for t in order:
                        results[wname][t.name].append(fn(t))
                print(f"bench: round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for p in procs:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    report(workloads, results, args)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(
    workloads: dict[str, tuple[str, Callable[[Target], float]]],
    results: dict[str, dict[str, list[float]]],
    args: argparse.Namespace,
) -> None:
    print(
        f"\n{os.cpu_count()} cores; {args.rounds} interleaved rounds of {args.seconds}s; "
        "median of rounds\n"
    )
    print("policy = pgwarden with guardrails, one masked column and three detectors")
    print(
        "recorded = pgwarden recording every statement (spool fsynced, file sink; by default"
        " its statements are not also logged)\n"
    )
    head = (
        f"{'workload':20} {'unit':7} {'direct':>9} {'pgbouncer':>9} {'pgwarden':>9} "
        f"{'policy':>9} {'recorded':>9} {'bouncer/dir':>11} {'warden/dir':>10} "
        f"{'warden/bnc':>10} {'policy/warden':>13} {'policy/dir':>10} {'rec/warden':>10}"
    )
    print(head)
    print("-" * len(head))
    summary = {}
    for wname, (unit, _) in workloads.items():
        med = {t: statistics.median(v) for t, v in results[wname].items()}
        d, b, w, p = med["direct"], med["pgbouncer"], med["pgwarden"], med["policy"]
        rec = med["recorded"]
        print(
            f"{wname:20} {unit:7} {d:9.0f} {b:9.0f} {w:9.0f} {p:9.0f} {rec:9.0f} {b / d:11.2f} "
            f"{w / d:10.2f} {w / b:10.2f} {p / w:13.2f} {p / d:10.2f} {rec / w:10.2f}"
        )
        summary[wname] = {
            "unit": unit,
            "median": med,
            "runs": results[wname],
            "pgbouncer/direct": b / d,
            "pgwarden/direct": w / d,
            "pgwarden/pgbouncer": w / b,
            "policy/pgwarden": p / w,
            "policy/direct": p / d,
            "recorded/pgwarden": rec / w,
        }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
