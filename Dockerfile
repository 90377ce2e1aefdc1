# One image for the operator and the proxy: entrypoint `pgwarden` (`pgwarden operator`,
# `pgwarden proxy --config ...`, `pgwarden sessions ...`).
#
#   docker build -t pgwarden:dev \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Reproducible from requirements.lock (scripts/lock): every dependency is a wheel whose sha256
# the lock names, so a rebuild installs the same bytes. The base image is pinned by tag; to pin
# its exact bytes too, add the digest that `docker buildx imagetools inspect python:3.11-slim-bookworm`
# prints, e.g. --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>.
# The image builds for linux/amd64 and linux/arm64 (the lock holds the wheels of both).
# No HEALTHCHECK: Kubernetes probes /healthz and /readyz (the operator's Deployment does).
# The development machines and CI have no Docker engine, so nothing builds this file there:
# tests/unit/test_image.py checks it statically, and scripts/e2e (tests/e2e/) builds it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src

# The dependencies first, in their own layer: a source change does not download them again.
# --require-hashes: a file whose sha256 the lock does not name is refused; --no-deps: the lock is
# complete, so nothing unpinned comes in; --only-binary: wheels only, no compiler needed.
COPY requirements.lock ./
RUN pip wheel --require-hashes --no-deps --only-binary=:all: \
        --wheel-dir /wheels -r requirements.lock

# pgwarden itself, without dependencies (they are the locked wheels above). Its build backend
# (setuptools, from pyproject.toml's build-system) runs here only and is not in the image; so
# does the C compiler for its extensions (setup.py: the row walks, the fast path, the log line).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY pgwarden ./pgwarden
COPY proxy ./proxy
COPY operator ./operator
RUN pip wheel --no-deps --wheel-dir /wheels .

# A virtualenv without pip, installed offline from exactly those wheels; the final stage copies
# it whole, so no wheel, cache or installer layer reaches the image.
# The C extensions are optional in setup.py (Python code stands in); the image must have them.
RUN python -m venv --without-pip /opt/pgwarden \
    && pip --python /opt/pgwarden/bin/python install --no-index --no-deps /wheels/*.whl \
    && /opt/pgwarden/bin/python -c "import pgwarden_proxy.wire._rowwalk, pgwarden_proxy.wire._fastpath" \
    && /opt/pgwarden/bin/python -c "import pgwarden_proxy._eventline"

# ---------------------------------------------------------------------------------- final
FROM ${PYTHON_IMAGE}
# No org.opencontainers.image.created: a build date would make every rebuild differ.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/pgwarden/pgwarden
LABEL org.opencontainers.image.title="pgwarden" \
      org.opencontainers.image.description="Access gateway for PostgreSQL: OIDC login, guardrails, masking, approvals and recorded sessions; operator and proxy" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

# Nothing installs at run time: the base image's own pip, setuptools and wheel go (less to
# patch, less for an intruder). The application's virtualenv never had them.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
    && rm -rf /root/.cache

# The uid the operator's Deployments run as (runAsUser 10001, pgwarden_operator/builders.py).
RUN groupadd --system --gid 10001 pgwarden \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pgwarden

COPY --from=build /opt/pgwarden /opt/pgwarden
ENV PATH=/opt/pgwarden/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
ENTRYPOINT ["pgwarden"]
CMD ["--help"]
