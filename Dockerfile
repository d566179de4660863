# Production image for a GPU host. torch==2.13.0 from PyPI is the CUDA build on linux/x86_64
# (the NVIDIA runtime libraries come as pip dependencies), so the base needs no CUDA toolkit;
# the host needs the NVIDIA driver and container toolkit (`docker run --gpus all`).
# BASE: any Debian bookworm with python3 and its venv module. Where no registry is reachable,
# `make docker-smoke` builds one from Debian's packages with debootstrap and passes it here.
ARG BASE=python:3.11.7-slim-bookworm
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_DISABLED=true \
    HF_HOME=/models \
    DPO_DATA_DIR=/data/jobs \
    DPO_ARTIFACTS_DIR=/data/artifacts \
    DPO_PREFERENCES_DIR=/data/preferences \
    DPO_LOG_FORMAT=json \
    HOST=0.0.0.0 \
    PORT=8000 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# Dependencies first, in a virtual environment (Debian's own python3 refuses pip installs into the
# system); this layer is rebuilt only when the pins change. torch from its pin, unhashed (the
# build differs by machine; PIP_FIND_LINKS may offer a local wheel), then the hashed lock.
# EXTRA_CA_CERTS (PEM text): a TLS-intercepting proxy's CA, trusted by pip for this build only.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG PIP_FIND_LINKS=""
ARG EXTRA_CA_CERTS=""
COPY requirements.txt requirements.lock ./
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        printf '%s\n' "$EXTRA_CA_CERTS" | cat /etc/ssl/certs/ca-certificates.crt - > /tmp/build-ca.pem \
        && export PIP_CERT=/tmp/build-ca.pem; \
    fi \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir "$(grep -oE '^torch==[0-9.]+' requirements.txt)" \
    && pip install --no-cache-dir --require-hashes -r requirements.lock \
    && rm -f /tmp/build-ca.pem

# A non-root user owning the code (the tiny model cache lives in /app/.cache) and the data volume.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin dpo \
    && mkdir -p /data /models \
    && chown dpo:dpo /data /models /app
COPY --chown=dpo:dpo . .
USER 10001:10001

# /data: job store, working directories, artifacts (local backend). /models: the HuggingFace cache
# (HF_HOME), its own volume so models download once and survive image upgrades; on a host without
# internet, fill it with `make docker-preload MODEL=<hub id>` elsewhere and run with HF_HUB_OFFLINE=1.
# Secrets are never baked in: DPO_WEBHOOK_SECRET and Firebase credentials come from the environment.
VOLUME ["/data", "/models"]
EXPOSE 8000

# PORT (and HOST) from the environment, as Cloud Run and others set it; 8000 by default.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; h = os.environ['HOST']; h = '127.0.0.1' if h in ('0.0.0.0', '::') else h; sys.exit(0 if urllib.request.urlopen(f\"http://{h}:{os.environ['PORT']}/health\", timeout=4).status == 200 else 1)"]

CMD ["sh", "-c", "exec uvicorn webhook_handler:app --host \"$HOST\" --port \"$PORT\""]
