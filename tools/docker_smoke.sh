#!/usr/bin/env bash
# Build the image, run it with the local backends and a generated secret, wait for the health
# check, send the toy trigger, check the job succeeds, remove the container.
# Usage: tools/docker_smoke.sh IMAGE:TAG LABEL
set -euo pipefail
image=${1:-dpo-microservice:latest}
label=${2:-org.dpo-microservice.project=dpo-microservice}
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
    echo "docker-smoke: no Docker engine is available here (the docker client cannot reach a daemon)." >&2
    exit 1
fi
docker build --label "$label" -t "$image" .
secret=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
name="dpo-smoke-$$"
docker run -d --rm --label "$label" --name "$name" -p "127.0.0.1:$port:8000" -e DPO_WEBHOOK_SECRET="$secret" "$image" >/dev/null
trap 'docker rm -f "$name" >/dev/null 2>&1 || true' EXIT
echo "waiting for the container's health check..."
for _ in $(seq 1 60); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$name" 2>/dev/null || echo missing)
    [ "$status" = healthy ] && break
    [ "$status" = missing ] && { echo "container exited"; exit 1; }
    sleep 5
done
[ "$status" = healthy ] || { echo "container not healthy: $status"; docker logs "$name" | tail -40; exit 1; }
DPO_WEBHOOK_SECRET="$secret" .venv/bin/python tools/trigger.py --url "http://127.0.0.1:$port" --community smoke --toy --timeout 900
echo "docker-smoke: OK"
