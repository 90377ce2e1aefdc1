"""The four-eyes ValidatingAdmissionPolicy, its binding and the approver ClusterRole of the chart.

Honest limits: nothing here evaluates CEL. The rules are spelled out twice in this file, as the
exact CEL strings the policy must carry and as `mirror()`, a line-by-line Python rendering of the
same rules, run over a table of cases; so a reviewer reads the rules in one place and checks the
two renderings against each other by eye. Whether the API server evaluates the CEL as the mirror
does is only shown by a real API server (tests/e2e, kind >= 1.30).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from pgwarden_operator import admission, rbac
from pgwarden_proxy.approvals.backend import same_person

K8S_VERSION = "1.31"  # ValidatingAdmissionPolicy is GA (admissionregistration/v1) since 1.30
CHART = Path(__file__).resolve().parents[2] / "charts" / "pgwarden"

POLICY = admission.four_eyes_policy()
BINDING = admission.four_eyes_binding(POLICY["metadata"]["name"])
MANIFESTS = {
    "policy": POLICY,
    "binding": BINDING,
    "approver": admission.approver_cluster_role(),
}

SA_PREFIX = "system:serviceaccount:"
MSG_SERVICE_ACCOUNT = "a service account cannot approve or deny: a person decides"
MSG_YOU = "decidedBy must be you (the user making this request)"
MSG_FOUR_EYES = "four eyes: the requester cannot decide their own request"
MSG_FINISH = "only the proxy and the operator (service accounts) write Expired and Executed"
MSG_DECIDED_BY = "decidedBy changes only with a decision (Approved or Denied)"


# ------------------------------------------------------------------ the rules, in one place
def _status(obj: str, field: str, absent: str) -> str:
    return (
        f"{obj} != null && has({obj}.status) && has({obj}.status.{field})"
        f" && {obj}.status.{field} != null ? {obj}.status.{field} : {absent}"
    )


def _same(x: str, y: str) -> str:
    return (
        f"({x} == {y} || ({x}.contains('@') != {y}.contains('@')"
        f" && {x}.split('@')[0] == {y}.split('@')[0]))"
    )


CEL_VARIABLES = {
    "user": "request.userInfo.username",
    "isServiceAccount": "variables.user.startsWith('system:serviceaccount:')",
    "oldState": _status("oldObject", "state", "'Pending'"),
    "newState": _status("object", "state", "'Pending'"),
    "oldDecidedBy": _status("oldObject", "decidedBy", "''"),
    "decidedBy": _status("object", "decidedBy", "''"),
    "changes": "variables.newState != variables.oldState",
    "decides": "variables.changes && variables.newState in ['Approved', 'Denied']",
    "finishes": "variables.changes && variables.newState in ['Expired', 'Executed']",
    "me": "variables.user.lowerAscii()",
    "by": "variables.decidedBy.lowerAscii()",
    "byTrimmed": "variables.by.trim()",
    "requester": "object.spec.requester.username.trim().lowerAscii()",
    "meUnprefixed": "variables.me.substring(variables.me.lastIndexOf(':') + 1)",
    "meBare": "variables.meUnprefixed.substring(variables.meUnprefixed.lastIndexOf('#') + 1)"
    ".trim()",
}
CEL_VALIDATIONS = {
    MSG_SERVICE_ACCOUNT: "!(variables.decides && variables.isServiceAccount)",
    MSG_YOU: "!variables.decides || variables.by == variables.me",
    MSG_FOUR_EYES: "!variables.decides || !("
    + _same("variables.byTrimmed", "variables.requester")
    + " || "
    + _same("variables.meBare", "variables.requester")
    + ")",
    MSG_FINISH: "!variables.finishes || variables.isServiceAccount",
    MSG_DECIDED_BY: "variables.decides || variables.isServiceAccount"
    " || variables.decidedBy == variables.oldDecidedBy",
}


def _lower_ascii(s: str) -> str:
    # CEL lowerAscii(): only A-Z change (the proxy's casefold() also folds non-ASCII)
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in s)


def _same_cel(x: str, y: str) -> bool:
    return x == y or (("@" in x) != ("@" in y) and x.split("@")[0] == y.split("@")[0])


def mirror(
    user: str,
    requester: str,
    old_state: str | None,
    new_state: str | None,
    old_by: str | None,
    by: str | None,
) -> str | None:
    """The message of the first rule the write breaks (the API server reports the first), or
    None. Line by line the CEL above (None: an absent or null field)."""
    is_sa = user.startswith(SA_PREFIX)
    old_state, new_state = old_state or "Pending", new_state or "Pending"
    old_by, by = old_by or "", by or ""
    changes = new_state != old_state
    decides = changes and new_state in ("Approved", "Denied")
    finishes = changes and new_state in ("Expired", "Executed")
    me, by_l = _lower_ascii(user), _lower_ascii(by)
    by_trimmed, req = by_l.strip(), _lower_ascii(requester.strip())
    me_unprefixed = me[me.rfind(":") + 1 :]
    me_bare = me_unprefixed[me_unprefixed.rfind("#") + 1 :].strip()
    rules = {
        MSG_SERVICE_ACCOUNT: not (decides and is_sa),
        MSG_YOU: not decides or by_l == me,
        MSG_FOUR_EYES: not decides or not (_same_cel(by_trimmed, req) or _same_cel(me_bare, req)),
        MSG_FINISH: not finishes or is_sa,
        MSG_DECIDED_BY: decides or is_sa or by == old_by,
    }
    return next((msg for msg, ok in rules.items() if not ok), None)


PROXY = "system:serviceaccount:data:orders-db-proxy"
OPERATOR = "system:serviceaccount:pgwarden:pgwarden-operator"
ALICE, BOB = "alice@example.com", "bob@example.com"
AGENT = "system:serviceaccount:agents:reporter"

# (user, requester, old state, new state, old decidedBy, new decidedBy) -> refusal or None
CASES: list[tuple[tuple[str, str, str | None, str | None, str | None, str | None], str | None]] = [
    # a person decides another's request
    ((BOB, ALICE, "Pending", "Approved", None, BOB), None),
    ((BOB, ALICE, None, "Denied", None, BOB), None),  # absent status reads Pending
    ((BOB, AGENT, "Pending", "Approved", None, BOB), None),  # agents' requests too
    (("Bob@Example.com", ALICE, "Pending", "Approved", None, BOB), None),  # case
    (("oidc:bob@example.com", ALICE, "Pending", "Approved", None, "oidc:bob@example.com"), None),
    # decidedBy is the user making the request
    ((BOB, ALICE, "Pending", "Approved", None, "carol@example.com"), MSG_YOU),
    ((BOB, ALICE, "Pending", "Approved", None, None), MSG_YOU),
    ((BOB, ALICE, "Pending", "Approved", None, "bob"), MSG_YOU),  # no local-part leniency
    ((BOB, ALICE, "Pending", "Approved", None, " bob@example.com"), MSG_YOU),
    (("oidc:bob@example.com", ALICE, "Pending", "Approved", None, BOB), MSG_YOU),
    # four eyes: like same_person, and through an authenticator's prefix
    ((ALICE, ALICE, "Pending", "Approved", None, ALICE), MSG_FOUR_EYES),
    ((ALICE, ALICE, "Pending", "Denied", None, ALICE), MSG_FOUR_EYES),
    (("Alice@Example.COM", ALICE, "Pending", "Approved", None, "alice@example.com"), MSG_FOUR_EYES),
    (("alice", ALICE, "Pending", "Approved", None, "alice"), MSG_FOUR_EYES),  # local part
    ((ALICE, "alice", "Pending", "Approved", None, ALICE), MSG_FOUR_EYES),
    ((ALICE, " Alice@example.com ", "Pending", "Approved", None, ALICE), MSG_FOUR_EYES),
    (
        ("oidc:alice@example.com", ALICE, "Pending", "Approved", None, "oidc:alice@example.com"),
        MSG_FOUR_EYES,
    ),
    (
        (
            "https://idp.example.com#alice@example.com",
            ALICE,
            "Pending",
            "Approved",
            None,
            "https://idp.example.com#alice@example.com",
        ),
        MSG_FOUR_EYES,
    ),
    (("alice@other.org", ALICE, "Pending", "Approved", None, "alice@other.org"), None),
    # service accounts never approve or deny (not even another agent's request)
    ((PROXY, ALICE, "Pending", "Approved", None, PROXY), MSG_SERVICE_ACCOUNT),
    ((OPERATOR, ALICE, "Pending", "Denied", None, OPERATOR), MSG_SERVICE_ACCOUNT),
    ((AGENT, ALICE, "Pending", "Approved", None, AGENT), MSG_SERVICE_ACCOUNT),
    # ... but finish: the proxy (Expired, Executed keeping decidedBy), the operator (Expired,
    # decidedBy cleared)
    ((PROXY, ALICE, "Pending", "Expired", None, None), None),
    ((PROXY, ALICE, "Approved", "Executed", BOB, BOB), None),
    ((OPERATOR, ALICE, "Pending", "Expired", None, None), None),
    ((OPERATOR, ALICE, "Pending", "Expired", "stale", None), None),
    # people do not finish
    ((BOB, ALICE, "Pending", "Expired", None, None), MSG_FINISH),
    ((BOB, ALICE, "Approved", "Executed", BOB, BOB), MSG_FINISH),
    # nobody rewrites who decided; other writes pass
    ((BOB, ALICE, "Approved", "Approved", "carol@example.com", BOB), MSG_DECIDED_BY),
    ((ALICE, ALICE, "Denied", "Denied", BOB, None), MSG_DECIDED_BY),
    ((BOB, ALICE, "Approved", "Approved", BOB, BOB), None),  # e.g. a comment
    ((ALICE, ALICE, "Pending", "Pending", None, None), None),
]


@pytest.mark.parametrize(("case", "refusal"), CASES)
def test_rules_on_a_table_of_cases(
    case: tuple[str, str, str | None, str | None, str | None, str | None], refusal: str | None
) -> None:
    assert mirror(*case) == refusal


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (ALICE, ALICE),
        ("Alice@Example.com", ALICE),
        ("alice", ALICE),
        (ALICE, "alice"),
        (" alice ", "ALICE"),
        (ALICE, BOB),
        ("alice@a.org", "alice@b.org"),
        ("alice", "bob"),
        (AGENT, "reporter"),
        ("", ALICE),
    ],
)
def test_four_eyes_agrees_with_the_proxys_same_person(a: str, b: str) -> None:
    # ASCII identities without an authenticator prefix: the policy refuses exactly when the
    # proxy would (the prefix rule only adds refusals; non-ASCII case is the proxy's alone)
    refused = mirror(a, b, "Pending", "Approved", None, a) == MSG_FOUR_EYES
    assert refused == same_person(a, b)


def test_the_policy_carries_exactly_these_rules() -> None:
    spec = POLICY["spec"]
    assert {v["name"]: v["expression"] for v in spec["variables"]} == CEL_VARIABLES
    assert [v["name"] for v in spec["variables"]] == list(CEL_VARIABLES)  # order: dependencies
    assert {v["message"]: v["expression"] for v in spec["validations"]} == CEL_VALIDATIONS
    assert [v["message"] for v in spec["validations"]] == list(CEL_VALIDATIONS)
    assert {v["reason"] for v in spec["validations"]} == {"Forbidden"}


def test_the_rules_reference_the_right_fields() -> None:
    cel = " ".join(CEL_VARIABLES.values()) + " ".join(CEL_VALIDATIONS.values())
    for ref in (
        "request.userInfo.username",
        "object.status.state",
        "oldObject.status.state",
        "object.status.decidedBy",
        "oldObject.status.decidedBy",
        "object.spec.requester.username",
        "lowerAscii()",
    ):
        assert ref in cel
    # every variable used is defined before its use
    names = list(CEL_VARIABLES)
    for i, expr in enumerate(CEL_VARIABLES.values()):
        assert set(re.findall(r"variables\.(\w+)", expr)) <= set(names[:i])
    for expr in CEL_VALIDATIONS.values():
        assert set(re.findall(r"variables\.(\w+)", expr)) <= set(names)


# ------------------------------------------------------------------ manifests
@pytest.mark.parametrize("which", MANIFESTS)
def test_manifests_validate_against_the_kubernetes_schema(which: str) -> None:
    kubernetes_validate.validate(MANIFESTS[which], K8S_VERSION, strict=True)


def test_a_broken_policy_does_not_validate() -> None:
    broken: dict[str, Any] = yaml.safe_load(yaml.safe_dump(POLICY))
    broken["spec"]["validations"][0]["rule"] = broken["spec"]["validations"][0].pop("expression")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_matches_updates_of_requests_and_their_status_only() -> None:
    spec = POLICY["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == ["pgwarden.io"]
    assert rule["operations"] == ["UPDATE"]  # CREATE: status is dropped, oldObject is null
    assert rule["resources"] == ["approvalrequests", "approvalrequests/status"]


def test_binding_denies_with_the_policy() -> None:
    assert BINDING["spec"] == {"policyName": "pgwarden-four-eyes", "validationActions": ["Deny"]}
    assert admission.four_eyes_binding("x")["spec"]["policyName"] == "x"
    assert admission.four_eyes_policy("x")["metadata"]["name"] == "x"


def test_approver_cluster_role_is_rbacs() -> None:
    assert admission.approver_cluster_role is rbac.approver_cluster_role


# ------------------------------------------------------------------ chart
def test_chart_templates_are_fresh() -> None:
    for name, text in admission.render_chart().items():
        path = CHART / name
        assert path.read_text(encoding="utf-8") == text, (
            f"{path} is stale: run `python -m pgwarden_operator.admission`"
        )


def _without_helm(text: str) -> list[Any]:
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("{{")]
    return [d for d in yaml.safe_load_all("\n".join(lines)) if d is not None]


def test_chart_templates_hold_the_manifests() -> None:
    four_eyes = (CHART / "templates" / "four-eyes.yaml").read_text(encoding="utf-8")
    lines = four_eyes.splitlines()
    assert lines[0].startswith("# generated by `python -m pgwarden_operator.admission`")
    assert lines[1] == "{{- if .Values.fourEyes.enabled }}"
    assert lines[-1] == "{{- end }}"
    assert sum("{{" in ln for ln in lines) == 2  # nothing else for Helm to interpret
    assert _without_helm(four_eyes) == [POLICY, BINDING]
    approver = (CHART / "templates" / "approver-clusterrole.yaml").read_text(encoding="utf-8")
    assert "{{" not in approver
    assert _without_helm(approver) == [rbac.approver_cluster_role()]


def test_values_enable_four_eyes() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values["fourEyes"] == {"enabled": True}


def test_main_writes_the_generated_files(tmp_path: Path) -> None:
    assert admission.main(["--chart", str(tmp_path / "c")]) == 0
    files = admission.render_chart()
    assert {f"templates/{n}" for n in admission.render_templates()} < files.keys()
    assert "values.schema.json" in files
    for name, text in files.items():
        assert (tmp_path / "c" / name).read_text(encoding="utf-8") == text
