"""The plugin's side of the Kubernetes API: one `Api` per command, failures as one-line
messages that say what was being done and what RBAC it needs, and who the caller is.

Failures the user can act on (unreachable, 401, 403, 404) are `PluginError`: printed as one line,
exit code 1, no traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pgwarden.kubectl.kubeconfig import Login
from pgwarden_operator.k8s import Api, ApiPermanentError, ApiTemporaryError, Obj

AUTHENTICATION_API = "authentication.k8s.io/v1"


class PluginError(Exception):
    """An expected failure, said in one line (exit code 1)."""


def open_api(login: Login) -> Api:
    """The client for the login's API server (create it in the event loop that uses it)."""
    return Api.from_connection_info(login.info)


def failure(
    e: ApiTemporaryError | ApiPermanentError, login: Login, doing: str, needs: str, missing: str
) -> PluginError:
    """`e` as a message a person can act on: `cannot DOING: why; what to do`."""
    server = login.info.server
    if e.status is None:
        cause = e.__cause__ or e
        return PluginError(
            f"cannot {doing}: the Kubernetes API at {server} is unreachable "
            f"({type(cause).__name__}: {cause}); check {login.source}"
        )
    # k8s.py says "METHOD URL: HTTP 403: the API server's message"
    said = str(e).split(": HTTP ", 1)[-1]
    if e.status == 401:
        return PluginError(
            f"cannot {doing}: the Kubernetes API at {server} did not accept your credentials "
            f"(HTTP {said}); log in again or check the user of {login.source}"
        )
    if e.status == 403:
        return PluginError(f"cannot {doing}: forbidden (HTTP {said}); it needs {needs}")
    if e.status == 404:
        return PluginError(f"cannot {doing}: {missing} (HTTP {said})")
    return PluginError(f"cannot {doing}: HTTP {said}")


@contextlib.contextmanager
def calling(login: Login, doing: str, *, needs: str, missing: str = "not found") -> Iterator[None]:
    """Turns the API client's errors raised inside into `PluginError`s about `doing`."""
    try:
        yield
    except (ApiTemporaryError, ApiPermanentError) as e:
        raise failure(e, login, doing, needs, missing) from None


# ---------------------------------------------------------------------------------- who am I
class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class UserInfo(_Answer):
    username: str = ""
    groups: list[str] = Field(default_factory=list)


class SelfSubjectReviewStatus(_Answer):
    user_info: UserInfo = Field(default_factory=UserInfo, alias="userInfo")


class SelfSubjectReview(_Answer):
    status: SelfSubjectReviewStatus = Field(default_factory=SelfSubjectReviewStatus)


async def whoami(api: Api, login: Login) -> UserInfo:
    """Who the API server says the caller is (SelfSubjectReview, GA in Kubernetes 1.28): the
    user name the four-eyes admission policy compares `decidedBy` with, exactly."""
    review = {"apiVersion": AUTHENTICATION_API, "kind": "SelfSubjectReview"}
    with calling(
        login,
        "ask the API server who you are",
        needs="create selfsubjectreviews.authentication.k8s.io (every authenticated user has "
        "it through the system:basic-user ClusterRole)",
        missing="this API server has no SelfSubjectReview (authentication.k8s.io/v1, "
        "Kubernetes >= 1.28), so the plugin cannot tell who you are and writes no decision",
    ):
        answer = await api.create(review)
    try:
        user = SelfSubjectReview.model_validate(answer).status.user_info
    except ValidationError:
        user = UserInfo()
    if not user.username.strip():
        raise PluginError(
            "the API server did not say who you are (SelfSubjectReview without a user name); "
            "the plugin writes no decision without it"
        )
    return user


# ---------------------------------------------------------------------------------- output
def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart; the last one is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in rows
    )


def dump(value: Any, fmt: str) -> None:
    """`-o json|yaml`: as kubectl prints an object, but non-ASCII characters escaped, so a
    statement cannot hide part of itself from the approver (bidirectional overrides)."""
    if fmt == "json":
        sys.stdout.write(json.dumps(value, indent=4) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(value, sort_keys=False))


def as_list(items: Sequence[Obj]) -> Obj:
    """Several objects as kubectl prints them: a v1 List."""
    return {"apiVersion": "v1", "kind": "List", "items": list(items), "metadata": {}}
