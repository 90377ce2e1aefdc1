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

`python -m pgwarden_operator.admission` writes the chart's generated files from these functions
and from `rbac.py` and `config.py`: the four-eyes templates, the approver ClusterRole, the
operator's RBAC rules (named templates the chart's hand-written `operator-rbac.yaml` includes)
and `values.schema.json` (its `defaults` is the schema of `config.OperatorDefaults`, so the
chart refuses what the operator would). Tests fail when a generated file is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from pgwarden.api.resources import APPROVAL_REQUEST, GROUP
from pgwarden_operator.builders import Manifest
from pgwarden_operator.config import OperatorDefaults
from pgwarden_operator.rbac import (
    _cluster_metadata,
    approver_cluster_role,
    operator_cluster_scoped_rules,
    operator_rules,
)

__all__ = [
    "FOUR_EYES_POLICY",
    "VALIDATIONS",
    "VARIABLES",
    "approver_cluster_role",
    "four_eyes_binding",
    "four_eyes_policy",
    "render_chart",
    "render_templates",
    "values_schema",
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
RULES_TEMPLATE = "_operator-rules.tpl"
VALUES_SCHEMA = "values.schema.json"
# named templates of RULES_TEMPLATE: the namespaced rules, kopf's cluster-scoped reads
OPERATOR_RULES = "pgwarden.operatorRules"
OPERATOR_CLUSTER_RULES = "pgwarden.operatorClusterRules"
IF_FOUR_EYES = "{{- if .Values.fourEyes.enabled }}"
END = "{{- end }}"
DEFAULT_CHART = Path(__file__).resolve().parents[2] / "charts" / "pgwarden"


def _yaml(manifests: Sequence[Manifest]) -> str:
    return "---\n".join(
        yaml.safe_dump(m, sort_keys=False, default_flow_style=False, width=4096) for m in manifests
    )


def _define(name: str, rules: list[Manifest]) -> str:
    """A named template holding a YAML list of rules (it starts with a newline, so it goes
    right after `rules:`)."""
    body = yaml.safe_dump(rules, sort_keys=False, default_flow_style=False, width=4096)
    return f'{{{{- define "{name}" }}}}\n{body}{END}\n'


def render_templates() -> dict[str, str]:
    """File name -> content of the generated chart templates."""
    policy = four_eyes_policy()
    return {
        FOUR_EYES_TEMPLATE: (
            f"{HEADER}{IF_FOUR_EYES}\n"
            f"{_yaml([policy, four_eyes_binding(policy['metadata']['name'])])}{END}\n"
        ),
        APPROVER_TEMPLATE: f"{HEADER}{_yaml([approver_cluster_role()])}",
        RULES_TEMPLATE: (
            f"{HEADER}# (from pgwarden_operator/rbac.py)\n"
            + _define(OPERATOR_RULES, operator_rules())
            + _define(OPERATOR_CLUSTER_RULES, operator_cluster_scoped_rules())
        ),
    }


# JSON schema pieces of the chart's own values
_STRING: Manifest = {"type": "string"}
_STRING_MAP: Manifest = {"type": "object", "additionalProperties": {"type": "string"}}
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_QUANTITY: Manifest = {"type": ["string", "number"]}  # 100m, 128Mi, 0.5


def _object(properties: dict[str, Manifest], required: Sequence[str] = ()) -> Manifest:
    """A closed object: a misspelt key is an error (`helm install/template/lint` refuse it)."""
    out: Manifest = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = list(required)
    return out


def _strip_titles(node: object) -> None:
    """pydantic's `title`s (the field name again) only clutter the schema."""
    if isinstance(node, dict):
        if isinstance(node.get("title"), str):
            del node["title"]
        for value in node.values():
            _strip_titles(value)
    elif isinstance(node, list):
        for value in node:
            _strip_titles(value)


def values_schema() -> Manifest:
    """`values.schema.json` (JSON schema draft-07, what Helm reads): every value the chart
    takes. `defaults` is `config.OperatorDefaults`, the shape the operator itself parses."""
    defaults = OperatorDefaults.model_json_schema(
        by_alias=True, mode="validation", ref_template="#/definitions/{model}"
    )
    definitions = defaults.pop("$defs", {})
    definitions["OperatorDefaults"] = defaults
    # Sink's exactly-one-of s3 or file is a model validator, absent from its JSON schema
    definitions["Sink"].update(minProperties=1, maxProperties=1)
    _strip_titles(definitions)
    resources = _object(
        {
            "requests": {"type": "object", "additionalProperties": _QUANTITY},
            "limits": {"type": "object", "additionalProperties": _QUANTITY},
        }
    )
    schema: Manifest = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "values of the pgwarden chart",
        **_object(
            {
                "nameOverride": _STRING,
                "fullnameOverride": _STRING,
                "image": _object(
                    {
                        "repository": {"type": "string", "minLength": 1},
                        "tag": {**_STRING, "description": "default: the chart's appVersion"},
                        "digest": {"type": "string", "pattern": r"^(sha256:[a-f0-9]{64})?$"},
                        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                    },
                    required=["repository"],
                ),
                "imagePullSecrets": {
                    "type": "array",
                    "items": _object({"name": {"type": "string", "minLength": 1}}, ["name"]),
                },
                "proxyImage": _object(
                    {
                        "repository": {**_STRING, "description": "default: image.repository"},
                        "tag": {**_STRING, "description": "default: the operator's tag"},
                    }
                ),
                "watchNamespaces": {
                    "description": '[]: the release namespace; names: those; ["*"]: all',
                    "anyOf": [
                        {"const": ["*"]},
                        {
                            "type": "array",
                            "items": {"type": "string", "maxLength": 63, "pattern": _DNS_LABEL},
                        },
                    ],
                },
                "approvalRetention": {
                    "type": "string",
                    "pattern": r"^\s*\d+(\.\d+)?\s*[smhd]?\s*$",
                    "description": "how long decided ApprovalRequests are kept (90, 12h, 7d)",
                },
                "resources": resources,
                "serviceAccount": _object({"annotations": _STRING_MAP}),
                "podAnnotations": _STRING_MAP,
                "podLabels": _STRING_MAP,
                "priorityClassName": _STRING,
                "nodeSelector": _STRING_MAP,
                "tolerations": {"type": "array", "items": {"type": "object"}},
                "affinity": {"type": "object"},
                "defaults": {"$ref": "#/definitions/OperatorDefaults"},
                "fourEyes": _object({"enabled": {"type": "boolean"}}, ["enabled"]),
            },
            # what the templates look into: `--set image=null` fails here, not as a nil
            # pointer in a template
            required=[
                "image",
                "proxyImage",
                "watchNamespaces",
                "approvalRetention",
                "resources",
                "serviceAccount",
                "defaults",
                "fourEyes",
            ],
        ),
        "definitions": definitions,
    }
    return schema


def render_chart() -> dict[str, str]:
    """Path in the chart -> content of every generated file of the chart."""
    files = {f"templates/{name}": text for name, text in render_templates().items()}
    files[VALUES_SCHEMA] = json.dumps(values_schema(), indent=2) + "\n"
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pgwarden_operator.admission",
        description="write the chart's generated files (four eyes, RBAC, values schema)",
    )
    parser.add_argument("--chart", type=Path, default=DEFAULT_CHART)
    args = parser.parse_args(argv)
    for name, text in render_chart().items():
        path = args.chart / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
