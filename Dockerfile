# kontod in a container: the same `/opt/kontod/bin/kontod run` as deploy/systemd/kontod.service,
# as a user without rights, on a PostgreSQL of its own (compose.yaml) or Konto's.
#
#   docker build -t kontod .
#   docker run --stop-timeout 45 -e KONTOD_DATABASE_URL=postgresql://… -p 127.0.0.1:8435:8435 kontod
#
# Other `kontod` commands run in the same image: `docker run --rm kontod runs daily-snapshots`.
# Not built or run on the machine this was written on (its sandbox refuses a container runtime);
# tests/integration/test_containers.py checks what can be checked without one.

ARG PYTHON_VERSION=3.12

# Build: kontod's wheel and the wheels of what it needs, nothing of the dev extra.
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kontod ./kontod
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Run: a slim Python, kontod in /opt/kontod as the unit expects it, no compiler, no pip in its venv.
FROM python:${PYTHON_VERSION}-slim
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/kontod --create-home \
        --shell /usr/sbin/nologin kontod
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/kontod \
    && pip --python /opt/kontod/bin/python install --no-cache-dir --no-index \
        --find-links=/wheels /wheels/kontod-*.whl

# Settings as in deploy/systemd/kontod.env.example; the database URL comes from the environment
# or, better, a file in $CREDENTIALS_DIRECTORY (compose.yaml mounts it as a secret). Inside the
# container kontod listens on every address: publish the port on the host's loopback only.
ENV PATH=/opt/kontod/bin:$PATH \
    KONTOD_LISTEN=0.0.0.0:8435 \
    KONTOD_STATE_DIR=/var/lib/kontod \
    KONTOD_LOG_FORMAT=json \
    PYTHONFAULTHANDLER=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/kontod
EXPOSE 8435

# kontod stops in order on SIGTERM within KONTOD_SHUTDOWN_TIMEOUT (25 s): give the container
# longer than that (`docker run --stop-timeout 45`, compose's stop_grace_period).
STOPSIGNAL SIGTERM
# /health answers 200 while the database does. Docker only marks the container unhealthy; unlike
# the unit's watchdog, nothing restarts a hung kontod unless the orchestrator acts on it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=3m --retries=3 \
    CMD ["/opt/kontod/bin/python", "-c", "import os, urllib.request; port = os.environ.get('KONTOD_LISTEN', ':8435').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4)"]

ENTRYPOINT ["/opt/kontod/bin/kontod"]
CMD ["run"]
