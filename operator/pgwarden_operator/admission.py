"""Four eyes on the API server: a ValidatingAdmissionPolicy (Kubernetes >= 1.30) on approvals.

The proxy already refuses an approval whose `decidedBy` is the requester, but `decidedBy` is
whatever the approver typed. The policy ties it to the authenticated user: whoever moves a
request to Approved or Denied must record themself as `decidedBy`, and must not be the requester.

Rules (CEL, evaluated by the API server on every UPDATE of `approvalrequests` and
`approvalrequests/status`; the variables are in `VARIABLES`, the rules in `VALIDATIONS`):

1. a service account (`system:serviceaccount:...`) never approves or denies: a person decides;
2. `decidedBy` of a decision is the user making the request (ASCII case-insensitive: e-mail
   identities differ in case between an IdP and what people type);
3. four eyes: the decider is not the requester, compared like `same_person` of the proxy
   (trimmed, ASCII case-insensitive, a bare name matches the local part of an e-mail). Both
   `decidedBy` and the user name are compared, the user name also without an authenticator
   prefix (`oidc:` of `--oidc-username-prefix`, `https://issuer#`): a false match only refuses;
4. only service accounts (the proxy, the operator) write Expired and Executed;
5. `decidedBy` changes only with a decision, or by a service account (the operator clears it on
   Expired), so nobody rewrites who decided afterwards.

Not matched: CREATE. The CRD has the status subresource, so the API server drops `status` from
a create (a request is born Pending, nothing to check), and on CREATE `oldObject` is null: a rule
that touched it would fail, and with failurePolicy Fail refuse the proxy's every request.
DELETE is RBAC's business (approvers cannot delete). Which service accounts may write the status
at all is also RBAC's: the proxy's Role and the operator's ClusterRole (`rbac.py`).

`python -m pgwarden_operator.admission` writes the chart templates from these functions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from pgwarden.api.resources import APPROVAL_REQUEST, GROUP
from pgwarden_operator.builders import Manifest
from pgwarden_operator.rbac import _cluster_metadata, approver_cluster_role

__all__ = [
    "FOUR_EYES_POLICY",
    "VALIDATIONS",
    "VARIABLES",
    "approver_cluster_role",
    "four_eyes_binding",
    "four_eyes_policy",
    "render_templates",
]

ADMISSION_API_VERSION = "admissionregistration.k8s.io/v1"
FOUR_EYES_POLICY = "pgwarden-four-eyes"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


def _status_field(obj: str, field: str, absent: str) -> str:
    # nullable fields may be present with a null value; `oldObject` is null on CREATE
    return (
        f"{obj} != null && has({obj}.status) && has({obj}.status.{field})"
        f" && {obj}.status.{field} != null ? {obj}.status.{field} : {absent}"
    )


def _same_person(x: str, y: str) -> str:
    """`same_person` of the proxy on two trimmed, lower-cased CEL strings."""
    return (
        f"({x} == {y} || ({x}.contains('@') != {y}.contains('@')"
        f" && {x}.split('@')[0] == {y}.split('@')[0]))"
    )


# (name, expression): later ones may use earlier ones as `variables.NAME`
VARIABLES: list[tuple[str, str]] = [
    ("user", "request.userInfo.username"),
    ("isServiceAccount", f"variables.user.startsWith('{SERVICE_ACCOUNT_PREFIX}')"),
    # an absent status reads as Pending (the CRD's default)
    ("oldState", _status_field("oldObject", "state", "'Pending'")),
    ("newState", _status_field("object", "state", "'Pending'")),
    ("oldDecidedBy", _status_field("oldObject", "decidedBy", "''")),
    ("decidedBy", _status_field("object", "decidedBy", "''")),
    ("changes", "variables.newState != variables.oldState"),
    ("decides", "variables.changes && variables.newState in ['Approved', 'Denied']"),
    ("finishes", "variables.changes && variables.newState in ['Expired', 'Executed']"),
    ("me", "variables.user.lowerAscii()"),
    ("by", "variables.decidedBy.lowerAscii()"),
    # for four eyes: trimmed like same_person, and the user name without an authenticator's
    # prefix (up to the last ':', then up to the last '#')
    ("byTrimmed", "variables.by.trim()"),
    ("requester", "object.spec.requester.username.trim().lowerAscii()"),
    ("meUnprefixed", "variables.me.substring(variables.me.lastIndexOf(':') + 1)"),
    (
        "meBare",
        "variables.meUnprefixed.substring(variables.meUnprefixed.lastIndexOf('#') + 1).trim()",
    ),
]

# (expression, message): each must hold, else the API server refuses the write with the message
VALIDATIONS: list[tuple[str, str]] = [
    (
        "!(variables.decides && variables.isServiceAccount)",
        "a service account cannot approve or deny: a person decides",
    ),
    (
        "!variables.decides || variables.by == variables.me",
        "decidedBy must be you (the user making this request)",
    ),
    (
        "!variables.decides || !("
        + _same_person("variables.byTrimmed", "variables.requester")
        + " || "
        + _same_person("variables.meBare", "variables.requester")
        + ")",
        "four eyes: the requester cannot decide their own request",
    ),
    (
        "!variables.finishes || variables.isServiceAccount",
        "only the proxy and the operator (service accounts) write Expired and Executed",
    ),
    (
        "variables.decides || variables.isServiceAccount"
        " || variables.decidedBy == variables.oldDecidedBy",
        "decidedBy changes only with a decision (Approved or Denied)",
    ),
]


def four_eyes_policy(name: str = FOUR_EYES_POLICY) -> Manifest:
    """The ValidatingAdmissionPolicy: the rules of the module docstring."""
    return {
        "apiVersion": ADMISSION_API_VERSION,
        "kind": "ValidatingAdmissionPolicy",
        "metadata": _cluster_metadata(name, "four-eyes"),
        "spec": {
            # a rule that cannot be evaluated refuses: approving stays possible for people who
            # follow the rules, and a broken policy does not silently let self-approval through
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": ["*"],
                        "operations": ["UPDATE"],
                        "resources": [APPROVAL_REQUEST.plural, f"{APPROVAL_REQUEST.plural}/status"],
                        "scope": "Namespaced",
                    }
                ]
            },
            "variables": [{"name": n, "expression": e} for n, e in VARIABLES],
            "validations": [
                {"expression": e, "message": m, "reason": "Forbidden"} for e, m in VALIDATIONS
            ],
        },
    }


def four_eyes_binding(policy_name: str = FOUR_EYES_POLICY) -> Manifest:
    """Binds the policy everywhere (the policy's matchConstraints narrow it), refusing."""
    return {
        "apiVersion": ADMISSION_API_VERSION,
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": _cluster_metadata(policy_name, "four-eyes"),
        "spec": {"policyName": policy_name, "validationActions": ["Deny"]},
    }


# ---------------------------------------------------------------------------------- chart
HEADER = "# generated by `python -m pgwarden_operator.admission`; do not edit\n"
FOUR_EYES_TEMPLATE = "four-eyes.yaml"
APPROVER_TEMPLATE = "approver-clusterrole.yaml"
IF_FOUR_EYES = "{{- if .Values.fourEyes.enabled }}"
END = "{{- end }}"
DEFAULT_TEMPLATES = Path(__file__).resolve().parents[2] / "charts" / "pgwarden" / "templates"


def _yaml(manifests: Sequence[Manifest]) -> str:
    return "---\n".join(
        yaml.safe_dump(m, sort_keys=False, default_flow_style=False, width=4096) for m in manifests
    )


def render_templates() -> dict[str, str]:
    """File name -> content of the chart templates."""
    policy = four_eyes_policy()
    return {
        FOUR_EYES_TEMPLATE: (
            f"{HEADER}{IF_FOUR_EYES}\n"
            f"{_yaml([policy, four_eyes_binding(policy['metadata']['name'])])}{END}\n"
        ),
        APPROVER_TEMPLATE: f"{HEADER}{_yaml([approver_cluster_role()])}",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pgwarden_operator.admission",
        description="write the four-eyes policy and the approver ClusterRole into the chart",
    )
    parser.add_argument("--templates", type=Path, default=DEFAULT_TEMPLATES)
    args = parser.parse_args(argv)
    args.templates.mkdir(parents=True, exist_ok=True)
    for name, text in render_templates().items():
        (args.templates / name).write_text(text, encoding="utf-8")
        print(args.templates / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
