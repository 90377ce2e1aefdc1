"""`approvals`, `approve`, `deny`: the ApprovalRequests proxies hold statements with.

A decision is what the proxy (`pgwarden_proxy.approvals.kubernetes`) and the operator read: a
merge patch of the status subresource made by the proxy's own rules (`transition`: state,
`decidedBy`, `decidedAt` now, `comment`), carrying the resourceVersion it was checked against,
so a decision or expiry written in between is a conflict, read again and checked again.
`decidedBy` is the user name the API server knows the caller by (SelfSubjectReview), which is
exactly what the four-eyes admission policy (`pgwarden_operator.admission`) demands. What that
policy and the CRD refuse is refused here first, with a clearer message: a request that is not
Pending or is past `expiresAt`, a service account deciding, the requester deciding.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime

from pydantic import ValidationError

from pgwarden.api.approvals import ApprovalRequest, ApprovalState, utcnow
from pgwarden.api.resources import API_VERSION, APPROVAL_REQUEST
from pgwarden.display import age, approval_details, printable, shorten
from pgwarden.kubectl.client import (
    PluginError,
    as_list,
    calling,
    dump,
    failure,
    open_api,
    table,
    whoami,
)
from pgwarden.kubectl.kubeconfig import Login
from pgwarden_operator.k8s import Api, ApiPermanentError, ApiTemporaryError, Obj
from pgwarden_proxy.approvals.backend import (
    ApprovalError,
    same_person,
    transition,
    validation_summary,
)

PLURAL = APPROVAL_REQUEST.plural
READ_RBAC = "get and list on approvalrequests.pgwarden.io (the pgwarden-approver ClusterRole)"
DECIDE_RBAC = "patch on approvalrequests/status (the pgwarden-approver ClusterRole)"
CRD_MISSING = "the API server has no approvalrequests.pgwarden.io: is pgwarden's CRD installed?"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
CONFLICT_RETRIES = 5
STATEMENT_WIDTH = 60


def parse(obj: Obj) -> ApprovalRequest:
    """The resource as the proxy reads it: an absent status is Pending."""
    return ApprovalRequest.from_resource(obj)


def _until(moment: datetime, now: datetime) -> str:
    return age(now, moment) if moment > now else "expired"


async def list_approvals(args: argparse.Namespace, login: Login) -> int:
    namespace = None if args.all_namespaces else login.namespace
    where = "all namespaces" if namespace is None else f"namespace {namespace}"
    async with open_api(login) as api:
        if args.name is not None:
            return await _show(api, login, args, where)
        with calling(
            login, f"list approvalrequests in {where}", needs=READ_RBAC, missing=CRD_MISSING
        ):
            objs = await api.list(API_VERSION, PLURAL, namespace)
    now = utcnow()
    shown: list[tuple[Obj, ApprovalRequest]] = []
    for obj in objs:
        try:
            req = parse(obj).as_of(now)  # past expiresAt is Expired, written or not
        except ValidationError as e:
            name = (obj.get("metadata") or {}).get("name")
            print(f"skipping approvalrequest {name}: {validation_summary(e)}", file=sys.stderr)
            continue
        if args.all or req.status.state is ApprovalState.PENDING:
            shown.append((obj, req))
    shown.sort(key=lambda x: (str(x[0]["metadata"].get("namespace")), x[1].created_at))
    if args.output:
        dump(as_list([o for o, _ in shown]), args.output)
    elif not shown:
        print(f"No {'' if args.all else 'pending '}approval requests in {where}.", file=sys.stderr)
    else:
        print(_approvals_table(shown, now, namespaces=namespace is None, states=args.all))
    return 0


async def _show(api: Api, login: Login, args: argparse.Namespace, where: str) -> int:
    what = f"approvalrequest {args.name} in {where}"
    with calling(login, f"read {what}", needs=READ_RBAC):
        obj = await api.get(API_VERSION, PLURAL, login.namespace, args.name)
    if obj is None:
        raise PluginError(f"approvalrequest {args.name} not found in {where}")
    if args.output:
        dump(obj, args.output)
        return 0
    now = utcnow()
    try:
        req = parse(obj).as_of(now)
    except ValidationError as e:
        raise PluginError(f"{what} is not a valid request: {validation_summary(e)}") from None
    print(f"namespace:   {login.namespace}")
    print(approval_details(req, now))
    return 0


def _approvals_table(
    shown: list[tuple[Obj, ApprovalRequest]], now: datetime, *, namespaces: bool, states: bool
) -> str:
    head = ["NAME", "CONNECTION", "REQUESTER", "CLASSES", "POLICY", "AGE", "EXPIRES IN"]
    rows = [
        (["NAMESPACE"] if namespaces else []) + head + (["STATE"] if states else []) + ["STATEMENT"]
    ]
    for obj, r in shown:
        pending = r.status.state is ApprovalState.PENDING
        rows.append(
            ([str(obj["metadata"].get("namespace"))] if namespaces else [])
            + [
                r.name,
                printable(r.spec.connection),
                printable(r.spec.requester.username),
                ",".join(r.spec.classes),
                printable(r.spec.policy),
                age(r.created_at, now),
                _until(r.spec.expires_at, now) if pending else "-",
            ]
            + ([r.status.state.value] if states else [])
            + [shorten(printable(r.spec.statement), STATEMENT_WIDTH)]
        )
    return table(rows)


def decides_own(user: str, requester: str) -> bool:
    """Four eyes as the admission policy sees it: the user name, and the user name without an
    authenticator's prefix (`oidc:`, `https://issuer#`), compared like the proxy does."""
    bare = user[user.rfind(":") + 1 :]
    bare = bare[bare.rfind("#") + 1 :]
    return same_person(user, requester) or same_person(bare, requester)


async def decide(args: argparse.Namespace, login: Login) -> int:
    state = ApprovalState.APPROVED if args.command == "approve" else ApprovalState.DENIED
    name, namespace = args.name, login.namespace
    what = f"approvalrequest {name} in namespace {namespace}"
    async with open_api(login) as api:
        me = (await whoami(api, login)).username
        if me.startswith(SERVICE_ACCOUNT_PREFIX):
            raise PluginError(f"{me} is a service account; a person approves or denies")
        refused: PluginError | None = None  # the API server's 422, if the request is still open
        for _ in range(CONFLICT_RETRIES):
            with calling(login, f"read {what}", needs=READ_RBAC):
                obj = await api.get(API_VERSION, PLURAL, namespace, name)
            if obj is None:
                raise PluginError(f"approvalrequest {name} not found in namespace {namespace}")
            try:
                req = parse(obj)
            except ValidationError as e:
                raise PluginError(
                    f"{what} is not a valid request: {validation_summary(e)}"
                ) from None
            if refused is not None and req.status.state is ApprovalState.PENDING:
                raise refused
            requester = req.spec.requester.username
            if decides_own(me, requester):
                raise PluginError(
                    f"you ({me}) made request {name} (requester {printable(requester)}); "
                    "another person must decide it (four eyes)"
                )
            try:
                updated = transition(req, state, by=me, comment=args.comment)
            except ApprovalError as e:
                raise PluginError(str(e)) from None
            patch = {
                "metadata": {"resourceVersion": obj["metadata"].get("resourceVersion")},
                "status": updated.status.model_dump(mode="json", by_alias=True),
            }
            doing = f"{args.command} {what}"
            try:
                written = await api.patch(
                    API_VERSION, PLURAL, namespace, name, patch, subresource="status"
                )
            except ApiTemporaryError as e:
                if e.status == 409:
                    continue  # written in between (a decision, an expiry): read it again
                raise failure(e, login, doing, DECIDE_RBAC, "not found") from None
            except ApiPermanentError as e:
                if e.status != 422:
                    raise failure(e, login, doing, DECIDE_RBAC, "not found") from None
                # the CRD's transition rule: decided in between? the next read tells
                refused = failure(e, login, doing, DECIDE_RBAC, "not found")
                continue
            if written is None:
                raise PluginError(f"{what} was deleted meanwhile")
            print(
                f"{state.lower()} {name}: {', '.join(req.spec.classes)} on "
                f"{printable(req.spec.connection)}, requested by {printable(requester)}; "
                f"decidedBy {me}"
            )
            return 0
    raise refused or PluginError(f"{what} kept changing; try again")
