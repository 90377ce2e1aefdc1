"""`pgwarden demo`, the README's first command, runs through and shows what it promises."""

from __future__ import annotations

import subprocess

from tests.integration.test_operations import PGWARDEN


def test_demo_runs_and_ends_with_a_verified_recording() -> None:
    out = subprocess.run(
        [*PGWARDEN, "demo"], capture_output=True, text=True, timeout=240, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "a***@example.org" in text  # masked column
    assert "ada@example.org" not in text
    assert 'DROP TABLE is refused: statements of class "drop"' in text
    assert "UPDATE 1" in text  # approved by the scripted reviewer
    assert "Approved by reviewer@example.com" in text  # ... and so recorded
    assert "[redacted]" in text  # the replay shows the masked rows the agent received
    assert "0 NOT INTACT" in text
    assert "signature valid" in text
