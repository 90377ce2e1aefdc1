# One image for the proxy and the operator; entrypoint `pgwarden`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pgwarden ./pgwarden
COPY proxy ./proxy
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="pgwarden" \
      org.opencontainers.image.description="Access gateway for PostgreSQL: OIDC login, guardrails, masking, approvals, recorded sessions" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --system --uid 10001 --no-create-home pgwarden
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENTRYPOINT ["pgwarden"]
CMD ["--help"]
