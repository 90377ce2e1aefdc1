"""Offline checks of Kubernetes manifests kept as YAML files (examples/, tests/e2e/manifests/):
pgwarden.io objects against the pydantic models and the CRD schemas in crds/, built-in kinds
against the Kubernetes API schemas (kubernetes-validate)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import yaml
from pydantic import ValidationError

from pgwarden.api.resources import API_VERSION, SCHEMAS
from tests.unit.test_crds import as_json_schema

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "crds"
# the oldest Kubernetes the project supports (ValidatingAdmissionPolicy GA: 1.30) is checked
# in tests/unit/test_admission.py; manifests use 1.31 like the rest of the suite
K8S_VERSION = "1.31"

Obj = dict[str, Any]


def load(path: Path) -> list[Obj]:
    """The YAML documents of a file (empty documents dropped)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def is_pgwarden(obj: Obj) -> bool:
    return obj.get("apiVersion") == API_VERSION


@functools.cache
def _crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    """The openAPIV3Schema of the CRD file in crds/ (what the API server enforces)."""
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in load(path):
            if crd["spec"]["names"]["kind"] == kind:
                (version,) = crd["spec"]["versions"]
                schema = as_json_schema(version["schema"]["openAPIV3Schema"])
                return jsonschema.Draft202012Validator(
                    schema, format_checker=jsonschema.FormatChecker()
                )
    raise KeyError(f"no CRD for kind {kind} in {CRD_DIR}")


def crd_errors(obj: Obj) -> list[str]:
    """What the CRD schema refuses in a pgwarden.io object (pruned fields count as errors)."""
    validator = _crd_validator(obj["kind"])
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]


def model_errors(obj: Obj) -> list[str]:
    """What the pydantic models (the operator's and the proxy's view) refuse."""
    spec_model, status_model = SCHEMAS[obj["kind"]]
    errors: list[str] = []
    for part, model in (("spec", spec_model), ("status", status_model)):
        if part == "status" and part not in obj:
            continue
        try:
            model.model_validate(obj.get(part) or {})
        except ValidationError as e:
            errors += [f"{part}: {err['loc']}: {err['msg']}" for err in e.errors()]
    return errors


def validate(obj: Obj) -> None:
    """Raise AssertionError (pgwarden.io kinds) or kubernetes_validate.ValidationError."""
    if is_pgwarden(obj):
        name = f"{obj['kind']} {obj.get('metadata', {}).get('name')}"
        assert crd_errors(obj) == [], f"{name}: refused by the CRD schema"
        assert model_errors(obj) == [], f"{name}: refused by the model"
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
