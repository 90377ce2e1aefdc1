"""The image's recipe, checked statically: no Docker engine runs here, so the Dockerfile is read,
not built (tests/e2e/ builds it where Docker exists).

What is checked: multi-stage, the final stage runs as the operator's non-root uid, has no
HEALTHCHECK, compilers or package caches, carries the OCI labels, and installs exactly the
wheels of requirements.lock (hash-checked); the lock pins every runtime dependency of
pyproject.toml with hashes and nothing of the test extra.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pgwarden_operator.builders import PROXY_UID

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
# the platforms the lock serves (scripts/lock): CPython 3.11 on Linux
TARGET = {"python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux"}
OCI_LABELS = {
    f"org.opencontainers.image.{k}"
    for k in ("title", "description", "licenses", "source", "version", "revision")
}


# ---------------------------------------------------------------------------------- parsing
@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args_of(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def parse(text: str) -> tuple[list[tuple[str, str]], list[Stage]]:
    """(instructions before the first FROM, the stages), continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    head: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), " ".join(args.split())
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append((instruction, args))
        else:
            head.append((instruction, args))
    return head, stages


HEAD, STAGES = parse(DOCKERFILE.read_text())
FINAL = STAGES[-1]
BUILD = STAGES[0]


def key_values(stage: Stage, instruction: str) -> dict[str, str]:
    """The KEY=VALUE pairs of a stage's LABEL or ENV instructions."""
    found: dict[str, str] = {}
    for args in stage.args_of(instruction):
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            found[key] = value
    return found


# ---------------------------------------------------------------------------------- Dockerfile
def test_multi_stage_on_a_slim_python_base_pinned_by_tag() -> None:
    assert len(STAGES) >= 2
    assert BUILD.name == "build"
    default_base = dict(a.split("=", 1) for i, a in HEAD if i == "ARG" and "=" in a)
    for stage in STAGES:
        base = stage.base
        if base.startswith("${"):
            base = default_base[base[2:-1]]
        image, _, tag = base.partition(":")
        assert image == "python", base
        assert tag.startswith("3.11"), base  # a version tag, never latest
        assert "-slim" in tag, base
    # the final stage starts from the base image, not from the build stage
    assert FINAL.base not in {s.name for s in STAGES}


def test_final_stage_runs_as_the_operators_non_root_uid() -> None:
    users = FINAL.args_of("USER")
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), "a numeric uid: runAsNonRoot can verify it without /etc/passwd"
    assert int(uid) != 0
    assert int(uid) == PROXY_UID  # what the operator's Deployments set as runAsUser
    assert not gid or int(gid) != 0


def test_no_healthcheck_kubernetes_probes_instead() -> None:
    assert all(not s.args_of("HEALTHCHECK") for s in STAGES)


def test_oci_labels() -> None:
    found = key_values(FINAL, "LABEL")
    assert found.keys() >= OCI_LABELS
    assert found["org.opencontainers.image.title"] == "pgwarden"
    assert found["org.opencontainers.image.licenses"] == "Apache-2.0"
    build_args = {a.split("=", 1)[0] for a in FINAL.args_of("ARG")}
    for key, arg in (("version", "VERSION"), ("revision", "REVISION"), ("source", "SOURCE")):
        assert found[f"org.opencontainers.image.{key}"] == f"${{{arg}}}"
        assert arg in build_args


def test_dependencies_come_hash_checked_from_the_lock() -> None:
    runs = " && ".join(BUILD.args_of("RUN"))
    locked = [r for r in BUILD.args_of("RUN") if "-r requirements.lock" in r]
    assert locked, "the build stage does not install from requirements.lock"
    for command in locked:
        assert "--require-hashes" in command
        assert "--no-deps" in command  # the lock is complete: nothing unpinned comes in
        assert "--only-binary=:all:" in command  # wheels only: no compiler needed
    # pgwarden itself: no dependency resolution of its own
    project = [r for r in BUILD.args_of("RUN") if re.search(r"\s\.(\s|$)", r)]
    assert project
    assert all("--no-deps" in r for r in project)
    # the runtime environment is installed offline, from those wheels only
    assert "--no-index" in runs
    assert "requirements.lock" in " ".join(BUILD.args_of("COPY"))


def test_final_stage_has_no_build_tools_caches_or_wheels() -> None:
    text = " ".join(a for _, a in FINAL.instructions)
    for word in ("apt-get install", "gcc", "build-essential", "/wheels", "pip install", "apk"):
        assert word not in text, word
    copies = FINAL.args_of("COPY")
    assert copies == ["--from=build /opt/pgwarden /opt/pgwarden"]
    # the base image's pip goes and nothing leaves a cache behind
    assert any("pip uninstall" in r and "rm -rf /root/.cache" in r for r in FINAL.args_of("RUN"))
    assert key_values(BUILD, "ENV")["PIP_NO_CACHE_DIR"] == "1"


def test_entrypoint_and_python_environment() -> None:
    assert FINAL.args_of("ENTRYPOINT") == ['["pgwarden"]']
    variables = key_values(FINAL, "ENV")
    assert variables["PYTHONDONTWRITEBYTECODE"] == "1"
    assert variables["PYTHONUNBUFFERED"] == "1"
    assert variables["PATH"].startswith("/opt/pgwarden/bin:")


def test_what_the_build_copies_exists_and_is_in_the_context() -> None:
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # an allowlist: everything else stays out of the context
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for args in BUILD.args_of("COPY"):
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is not in .dockerignore's allowlist"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
def test_hadolint_is_clean() -> None:
    out = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------- the lock
def locked_pins() -> dict[str, tuple[str, list[str]]]:
    """name (normalized) -> (version, sha256 hashes) of requirements.lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for raw in LOCK.read_text().splitlines():
        line = raw.strip().rstrip("\\").strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            assert current is not None, raw
            algorithm, _, digest = line.removeprefix("--hash=").partition(":")
            assert algorithm == "sha256", raw
            assert re.fullmatch(r"[0-9a-f]{64}", digest), raw
            pins[current][1].append(digest)
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier  # exactly one `==` pin per line
        assert spec.operator == "==", raw
        current = canonicalize_name(requirement.name)
        assert current not in pins, f"{current} pinned twice"
        pins[current] = (spec.version, [])
    return pins


def project() -> dict[str, object]:
    data: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return data


def runtime_requirements() -> list[Requirement]:
    found = [Requirement(r) for r in project()["dependencies"]]  # type: ignore[attr-defined]
    return [r for r in found if r.marker is None or r.marker.evaluate(TARGET)]


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    pins = locked_pins()
    assert pins
    for name, (version, hashes) in pins.items():
        assert hashes, f"{name}=={version} has no hash"
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is in pyproject.toml but not in the lock: run scripts/lock"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name}=={version} does not satisfy pyproject.toml's {requirement}: run scripts/lock"
        )


def test_lock_holds_nothing_of_the_test_extra() -> None:
    runtime = {canonicalize_name(r.name) for r in runtime_requirements()}
    extras: dict[str, list[str]] = project()["optional-dependencies"]  # type: ignore[assignment]
    test_only = {canonicalize_name(Requirement(r).name) for r in extras["test"]} - runtime
    assert test_only
    assert not test_only & locked_pins().keys()
    assert "pgwarden" not in locked_pins()  # the project installs itself, with --no-deps


def test_lock_serves_the_image_platforms() -> None:
    header = LOCK.read_text().splitlines()[:2]
    assert header[1].strip("# ") == "scripts/lock"  # how to regenerate it
    script = (ROOT / "scripts" / "lock").read_text()
    assert "--generate-hashes" in script
    assert all(arch in script for arch in ("x86_64", "aarch64"))
    assert (ROOT / "scripts" / "lock").stat().st_mode & 0o111
    # markers left in the lock would make it differ between platforms
    for raw in LOCK.read_text().splitlines():
        if "==" in raw and ";" in raw:
            assert Marker(raw.split(";", 1)[1].strip(" \\")).evaluate(TARGET), raw
