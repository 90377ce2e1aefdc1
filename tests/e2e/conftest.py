"""The kind-based end-to-end suite: it needs a Docker engine, kind, kubectl, helm and psql, which
CI machines lack; there every test of tests/e2e is skipped, naming what is missing."""

from __future__ import annotations

import shutil
import subprocess

import pytest

TOOLS = ("kind", "kubectl", "helm", "psql")


def _docker_engine_running() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def missing_tools() -> list[str]:
    missing = [] if _docker_engine_running() else ["a running Docker engine"]
    return missing + [tool for tool in TOOLS if shutil.which(tool) is None]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    e2e = [item for item in items if "tests/e2e" in str(item.fspath)]
    if not e2e:
        return
    missing = missing_tools()
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"e2e suite needs {', '.join(missing)} (not on this machine)")
    for item in e2e:
        item.add_marker(skip)
