"""End-to-end on a kind cluster: the image, the chart's operator, a proxy it deploys, real psql
sessions with service-account tokens, approvals with kubectl, recordings in MinIO.

Run where Docker exists: `scripts/e2e` (tests/e2e/README.md). Elsewhere every test here is
skipped by conftest.py with the missing tools named.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.cluster import (
    BUCKET,
    CONNECTION,
    NAMESPACE,
    PREFIX,
    Cluster,
    E2EError,
    eventually,
)

pytestmark = pytest.mark.e2e

AGENT = f"system:serviceaccount:{NAMESPACE}:agent"
WRITER = f"system:serviceaccount:{NAMESPACE}:writer"
# sample data of manifests/postgres.yaml that policy e2e-agent-readonly masks
PERSONAL = ["alice.martin@example.com", "bob.stone@example.com", "123-45-6789", "987-65-4321"]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster.up(tmp_path_factory.mktemp("kind")) as running:
        yield running


def ok(out: subprocess.CompletedProcess[str]) -> list[str]:
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


# ---------------------------------------------------------------------------------- guardrails
def test_agent_reads_through_the_proxy(cluster: Cluster) -> None:
    assert ok(cluster.psql("agent", "SELECT id, name FROM customers ORDER BY id")) == [
        "1|Alice Martin",
        "2|Bob Stone",
    ]


def test_drop_is_refused_with_42501(cluster: Cluster) -> None:
    out = cluster.psql("agent", "DROP TABLE customers")
    assert out.returncode != 0
    assert "42501" in out.stderr  # VERBOSITY verbose: "ERROR:  42501: pgwarden: ..."
    assert "pgwarden" in out.stderr
    assert "drop" in out.stderr.lower()
    assert ok(cluster.psql("agent", "SELECT count(*) FROM customers")) == ["2"]


def test_token_of_another_audience_is_refused(cluster: Cluster) -> None:
    args, env = cluster.psql_command("agent", "SELECT 1")
    env["PGPASSWORD"] = cluster.kubectl("create", "token", "agent").strip()  # the API's audience
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0
    assert "28P01" in out.stderr or "28000" in out.stderr


def test_personal_data_is_masked(cluster: Cluster) -> None:
    rows = ok(cluster.psql("agent", "SELECT id, name, email, ssn FROM customers ORDER BY id"))
    assert [r.split("|")[:2] for r in rows] == [["1", "Alice Martin"], ["2", "Bob Stone"]]
    text = "\n".join(rows)
    for value in PERSONAL:
        assert value not in text
    # followed through expressions too (lineage), not only the bare column
    derived = ok(cluster.psql("agent", "SELECT upper(email) FROM customers WHERE id = 1"))
    assert "ALICE.MARTIN@EXAMPLE.COM" not in derived


# ---------------------------------------------------------------------------------- approvals
def pending_request(cluster: Cluster, requester: str) -> dict[str, Any] | None:
    for item in cluster.get("approvalrequests")["items"]:
        state = (item.get("status") or {}).get("state", "Pending")
        if item["spec"]["requester"]["username"] == requester and state == "Pending":
            found: dict[str, Any] = item
            return found
    return None


def decide(cluster: Cluster, sql: str, state: str) -> tuple[subprocess.Popen[str], str, str]:
    """Run `sql` as the writer, wait for its ApprovalRequest, decide it as the kubectl user
    (four eyes: decidedBy is who patches, not the requester); psql's result and the name."""
    args, env = cluster.psql_command("writer", sql)
    psql = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        request = eventually("the ApprovalRequest", lambda: pending_request(cluster, WRITER))
        assert psql.poll() is None, "the statement ran without waiting for a decision"
        assert request["spec"]["classes"] == ["write"]
        assert request["spec"]["connection"] == "orders"
        name = request["metadata"]["name"]
        status = {"status": {"state": state, "decidedBy": cluster.whoami()}}
        cluster.kubectl(
            "patch", "approvalrequest", name, "--subresource=status", "--type=merge",
            "-p", json.dumps(status),
        )  # fmt: skip
        out, err = psql.communicate(timeout=120)
    except (E2EError, AssertionError):
        psql.kill()
        raise
    return psql, out + err, name


def test_write_runs_once_approved(cluster: Cluster) -> None:
    psql, output, name = decide(
        cluster, "UPDATE orders SET state = 'shipped' WHERE id = 1", "Approved"
    )
    assert psql.returncode == 0, output
    assert "UPDATE 1" in output
    eventually(
        "the request to be Executed",
        lambda: cluster.get("approvalrequest", name)["status"]["state"] == "Executed",
    )
    assert ok(cluster.psql("agent", "SELECT state FROM orders WHERE id = 1")) == ["shipped"]


def test_denied_write_does_not_run(cluster: Cluster) -> None:
    psql, output, _ = decide(cluster, "UPDATE orders SET state = 'lost' WHERE id = 2", "Denied")
    assert psql.returncode != 0
    assert "42501" in output or "denied" in output.lower()
    assert ok(cluster.psql("agent", "SELECT state FROM orders WHERE id = 2")) == ["new"]


# ---------------------------------------------------------------------------------- recordings
def verified(cluster: Cluster, identity: str) -> list[dict[str, Any]] | None:
    """`sessions verify --all` for one identity once every session is shipped and intact."""
    out = cluster.sessions("verify", "--all", "--json", "--identity", identity)
    results = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not results:
        return None  # a session just ended may still lack its manifest: ask again
    return results


def test_recordings_in_minio_verify(cluster: Cluster) -> None:
    ok(cluster.psql("agent", "SELECT 'pgwarden-e2e-recorded'"))
    results = eventually("intact recordings in MinIO", lambda: verified(cluster, AGENT), 120)
    assert all(r["ok"] for r in results)
    listed = cluster.sessions(
        "list", "--json", "--identity", AGENT, "--statement-contains", "pgwarden-e2e-recorded"
    )
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) >= 1


def test_altered_recording_fails_verification(cluster: Cluster) -> None:
    marker = b"pgwarden-e2e-tamper"
    ok(cluster.psql("agent", f"SELECT '{marker.decode()}'"))

    def session() -> dict[str, Any] | None:
        out = cluster.sessions(
            "list", "--json", "--identity", AGENT, "--statement-contains", marker.decode()
        )
        lines = out.stdout.splitlines() if out.returncode == 0 else []
        return json.loads(lines[0]) if lines else None

    found = eventually("the recorded session", session, 120)
    eventually("its recording to be complete", lambda: verified(cluster, AGENT), 120)
    # the session's objects: sessions/CONNECTION/DAY/ID/... under the store's prefix
    s3, sid = cluster.s3_client(), found["sessionId"]
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}sessions/{CONNECTION}/")
    keys = [o["Key"] for o in listing["Contents"] if f"/{sid}/" in o["Key"]]
    bodies = {k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}
    chunk = next(k for k, body in bodies.items() if marker in body and "manifest" not in k)
    altered = bodies[chunk].replace(marker, marker.upper())  # same length, other bytes
    s3.put_object(Bucket=BUCKET, Key=chunk, Body=altered)
    try:
        out = cluster.sessions("verify", sid)
        assert out.returncode != 0
        assert "NOT INTACT" in out.stdout
    finally:
        s3.put_object(Bucket=BUCKET, Key=chunk, Body=bodies[chunk])
