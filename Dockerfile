# Production image for a GPU host. torch==2.13.0 from PyPI is the CUDA build on linux/x86_64
# (the NVIDIA runtime libraries come as pip dependencies), so the base needs no CUDA toolkit;
# the host needs the NVIDIA driver and container toolkit (`docker run --gpus all`).
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_DISABLED=true \
    HF_HOME=/models \
    DPO_DATA_DIR=/data/jobs \
    DPO_ARTIFACTS_DIR=/data/artifacts \
    DPO_PREFERENCES_DIR=/data/preferences \
    DPO_LOG_FORMAT=json

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

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

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

CMD ["uvicorn", "webhook_handler:app", "--host", "0.0.0.0", "--port", "8000"]
