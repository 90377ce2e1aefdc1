"""The kind-based end-to-end suite: it needs a Docker engine and kind, which CI machines lack."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def _docker_engine_running() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = []
    if not _docker_engine_running():
        missing.append("a running Docker engine")
    if shutil.which("kind") is None:
        missing.append("kind")
    if shutil.which("kubectl") is None:
        missing.append("kubectl")
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"e2e suite needs {', '.join(missing)} (none on this machine)")
    for item in items:
        if "tests/e2e" in str(item.fspath):
            item.add_marker(skip)
