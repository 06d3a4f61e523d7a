# notifier: multi-stage build, runs `notifier serve` as a non-root user.
# No Docker engine on the dev machine or in CI: tests/test_deploy.py lints this file and runs
# its commands as plain processes.
# Dependencies come from requirements.lock (exact versions, sha256-checked), as in scripts/.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
RUN python -m venv /opt/notifier
COPY requirements.lock ./
RUN /opt/notifier/bin/python -m pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY notifier ./notifier
COPY templates ./templates
COPY locales ./locales
COPY policies ./policies
RUN /opt/notifier/bin/python -m pip install --no-cache-dir --no-deps --no-build-isolation .

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 notifier \
    && useradd --system --create-home --uid 10001 --gid 10001 notifier
COPY --from=build /opt/notifier /opt/notifier
ENV PATH=/opt/notifier/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NOTIFIER_HOST=0.0.0.0 \
    NOTIFIER_PORT=8080 \
    NOTIFIER_OUTBOX_DIR=/data/outbox
RUN mkdir -p /data/outbox && chown -R notifier /data
USER 10001:10001
# Compile the default templates into the user's cache (~/.cache/notifier/templates): every
# container then starts without compiling them (notifier/render/compiled.py).
RUN notifier check
WORKDIR /data
EXPOSE 8080
# The API answers its health check on the port it listens on (NOTIFIER_PORT).
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('NOTIFIER_PORT', '8080'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status != 200)"]
# Embedded mode on 0.0.0.0 refuses to start without NOTIFIER_API_KEYS (the development key
# is public): run with -e NOTIFIER_API_KEYS=... or NOTIFIER_REDIS_URL and keys, as compose does.
CMD ["notifier", "serve"]
