# vector-sync: a wheel built and installed into a venv in one stage, only the venv in the image.
#   docker build -t vector-sync .
#   docker run --rm -e DATABASE_URL=... -e OPENAI_API_KEY=... -p 8080:8080 vector-sync
# Any other command: docker run --rm --env-file .env vector-sync status (check, migrate, reconcile, ...).
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon ./daemon
COPY sql ./sql
# Every dependency has a manylinux wheel for x86_64, so this stage needs no compiler either.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/vector-sync \
 && /opt/vector-sync/bin/pip install /wheels/vector_sync-*.whl \
 && /opt/vector-sync/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/vector-sync/bin:$PATH
RUN groupadd --system --gid 10001 vector-sync \
 && useradd --system --uid 10001 --gid vector-sync --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin vector-sync
COPY --from=builder /opt/vector-sync /opt/vector-sync
# Read-only for the daemon: it writes nothing to disk (a .env placed here would be read).
WORKDIR /app
USER 10001:10001
EXPOSE 8080
# Liveness only (/healthz): readiness (/readyz) also depends on the database and the sources.
# PORT (Railway) wins over VECTOR_SYNC_HTTP_PORT, as in the daemon; assumes the default 0.0.0.0 host.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('PORT') or os.environ.get('VECTOR_SYNC_HTTP_PORT') or '8080'; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
# The daemon handles SIGTERM itself: intake stops, batches get VECTOR_SYNC_SHUTDOWN_GRACE (10 s).
# Give `docker stop` more than that: docker stop --time 20.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vector-sync"]
CMD ["run"]
