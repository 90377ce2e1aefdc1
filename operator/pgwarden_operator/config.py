"""The operator's own configuration, read from its environment (the Helm chart sets it).

Defaults for DatabaseConnections, from `PGWARDEN_DEFAULTS` (JSON or YAML text) or
`PGWARDEN_DEFAULTS_FILE` (the path of such a file: the chart mounts its ConfigMap there):

    {"oidc": {"issuer": "https://idp.example.com", "audience": "pgwarden"},
     "recording": {"sink": {"s3": {"bucket": "audit", "prefix": "pgwarden/"}}}}

A connection without `spec.auth` gets `oidc`, one without `spec.recording.sink` gets the
sink. What a connection gives replaces the default as a whole, never field by field: half of
one issuer's settings merged with half of another's would describe neither (`builders`
applies them). Neither variable set: no defaults, every connection names its own issuer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field

from pgwarden.api.config import ConfigError, Oidc, parse_model
from pgwarden.api.policy import Model
from pgwarden.api.resources import ConnectionRecording

__all__ = [
    "DEFAULTS_ENV",
    "DEFAULTS_FILE_ENV",
    "ConfigError",
    "OperatorDefaults",
    "load_defaults",
    "parse_defaults",
]

DEFAULTS_ENV = "PGWARDEN_DEFAULTS"
DEFAULTS_FILE_ENV = "PGWARDEN_DEFAULTS_FILE"


class OperatorDefaults(Model):
    """What a DatabaseConnection gets for what it leaves out (the chart's `defaults` value)."""

    oidc: Oidc | None = Field(default=None, description="for connections without spec.auth")
    recording: ConnectionRecording = Field(
        default_factory=ConnectionRecording,
        description="recording.sink: for connections without spec.recording.sink",
    )


def parse_defaults(text: str, source: str) -> OperatorDefaults:
    """`text` (JSON or YAML) as defaults; errors name `source` and the field."""
    return parse_model(text, OperatorDefaults, source, "defaults", empty=True)


def load_defaults(environ: Mapping[str, str] | None = None) -> OperatorDefaults:
    """The defaults from the environment (see the module docstring). Raises ConfigError."""
    env = os.environ if environ is None else environ
    text, path = env.get(DEFAULTS_ENV), env.get(DEFAULTS_FILE_ENV)
    if text and path:
        raise ConfigError(f"set {DEFAULTS_ENV} or {DEFAULTS_FILE_ENV}, not both")
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{DEFAULTS_FILE_ENV}={path}: cannot read: {e.strerror}") from e
        return parse_defaults(text, f"{DEFAULTS_FILE_ENV}={path}")
    if text:
        return parse_defaults(text, DEFAULTS_ENV)
    return OperatorDefaults()
