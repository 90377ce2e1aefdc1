"""The operator's configuration from its environment (config.py) and its command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgwarden.cli import build_parser
from pgwarden_operator import config, main

OIDC = {"issuer": "https://idp.example.com", "audience": "pgwarden"}
SINK = {"s3": {"bucket": "audit", "prefix": "pgwarden/"}}
DOC = {"oidc": OIDC, "recording": {"sink": SINK}}


def test_no_variables_no_defaults() -> None:
    assert config.load_defaults({}) == config.OperatorDefaults()
    assert config.load_defaults({config.DEFAULTS_ENV: ""}).oidc is None


def test_defaults_from_the_variable_json_or_yaml() -> None:
    from_json = config.load_defaults({config.DEFAULTS_ENV: json.dumps(DOC)})
    from_yaml = config.load_defaults(
        {config.DEFAULTS_ENV: "oidc: {issuer: https://idp.example.com}\n"}
    )
    assert from_json.oidc is not None
    assert from_json.oidc.issuer == "https://idp.example.com"
    assert from_json.recording.sink is not None
    assert from_json.recording.sink.s3 is not None
    assert from_json.recording.sink.s3.bucket == "audit"
    assert from_yaml.oidc == from_json.oidc


def test_defaults_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "defaults.json"
    path.write_text(json.dumps(DOC))
    got = config.load_defaults({config.DEFAULTS_FILE_ENV: str(path)})
    assert got == config.OperatorDefaults.model_validate(DOC)
    path.write_text("{}")  # what the chart renders without defaults
    assert config.load_defaults({config.DEFAULTS_FILE_ENV: str(path)}) == config.OperatorDefaults()


@pytest.mark.parametrize(
    ("doc", "complaint"),
    [
        ({"oidc": {"audience": "x"}}, "oidc.issuer: Field required"),
        ({"oidc": {**OIDC, "usernameClam": "sub"}}, "oidc.usernameClam: unknown field"),
        ({"recording": {"sink": {}}}, "recording.sink"),
        ({"recording": {"sink": {"s3": {"bucket": "ab"}}}}, "recording.sink.s3.bucket"),
        ({"sink": SINK}, "sink: unknown field"),
        ([OIDC], "must be a mapping"),
    ],
)
def test_bad_defaults_name_the_variable_and_the_field(doc: object, complaint: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load_defaults({config.DEFAULTS_ENV: json.dumps(doc)})
    assert str(e.value).startswith(config.DEFAULTS_ENV)
    assert complaint in str(e.value)


def test_unusable_sources(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load_defaults({config.DEFAULTS_FILE_ENV: str(tmp_path / "missing.json")})
    with pytest.raises(config.ConfigError, match="not valid YAML \\(nor JSON\\)"):
        config.load_defaults({config.DEFAULTS_ENV: "{oidc: ["})
    with pytest.raises(config.ConfigError, match="not both"):
        config.load_defaults({config.DEFAULTS_ENV: "{}", config.DEFAULTS_FILE_ENV: "/x"})


# ---------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    ("argv", "namespaces", "everywhere"),
    [
        ([], None, False),
        (["--namespace", "a"], ["a"], False),
        (["--namespace", "a", "--namespace=b"], ["a", "b"], False),
        (["--all-namespaces"], None, True),
    ],
)
def test_operator_scope_flags(
    argv: list[str], namespaces: list[str] | None, everywhere: bool
) -> None:
    args = build_parser().parse_args(["operator", *argv])
    assert (args.namespace, args.all_namespaces, args.liveness) == (namespaces, everywhere, None)


def test_a_namespace_and_all_namespaces_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "--namespace", "a", "--all-namespaces"])


def test_without_a_namespace_the_operator_says_how_to_give_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(main.POD_NAMESPACE_ENV, raising=False)
    monkeypatch.setattr(main, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "none")
    assert main.run([], all_namespaces=False) == 2
    assert "--namespace NS or --all-namespaces" in capsys.readouterr().err


def test_bad_defaults_stop_the_operator_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(config.DEFAULTS_ENV, json.dumps({"oidc": {}}))
    monkeypatch.delenv(config.DEFAULTS_FILE_ENV, raising=False)
    assert main.run(["data"], all_namespaces=False) == 2
    assert "oidc.issuer: Field required" in capsys.readouterr().err
