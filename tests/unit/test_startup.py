from __future__ import annotations

import pytest

from pgwarden_proxy.startup import StartupRefused, check_startup, python_codec


def test_allowed_parameters_and_options_are_forwarded() -> None:
    req = check_startup(
        {
            "user": "x",
            "database": "app",
            "application_name": "a",
            "DateStyle": "ISO",
            "options": r"-c search_path=public -c application_name=with\ space --TimeZone=UTC",
        },
        database="app",
    )
    assert req.forwarded == {
        "application_name": "with space",
        "DateStyle": "ISO",
        "search_path": "public",
        "TimeZone": "UTC",
    }


@pytest.mark.parametrize(
    "params",
    [
        {"statement_timeout": "0"},
        {"options": "-c role=postgres"},
        {"options": "-c standard_conforming_strings=off"},
        {"options": "-P"},
        {"client_encoding": "SJIS"},
        {"session_authorization": "postgres"},
    ],
)
def test_other_parameters_are_refused(params: dict[str, str]) -> None:
    with pytest.raises(StartupRefused) as e:
        check_startup({"user": "x", "database": "app", **params}, database="app")
    assert e.value.info.sqlstate == "42501"


def test_database_defaults_to_the_user_name_like_postgresql() -> None:
    with pytest.raises(StartupRefused) as e:
        check_startup({"user": "app2"}, database="app")
    assert e.value.info.sqlstate == "3D000"
    assert check_startup({"user": "app"}, database="app").database == "app"


def test_codecs() -> None:
    assert python_codec("UTF8") == "utf-8"
    assert python_codec("SQL_ASCII") == "latin-1"
    assert python_codec("LATIN1") == "latin-1"
