"""End-to-end on a kind cluster (run where Docker exists; see README).

The cluster suite arrives with the operator and the chart; until then this only proves the
cluster is reachable, so nothing here pretends to test what does not exist yet.
"""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.e2e


def test_kind_cluster_is_reachable() -> None:
    out = subprocess.run(["kubectl", "get", "nodes"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
