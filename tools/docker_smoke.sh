#!/usr/bin/env bash
# The production image end to end: build it, run it with the local backends and a generated
# secret, wait for its health check, send the toy trigger, see the job succeed, remove the
# container.  Usage: tools/docker_smoke.sh IMAGE:TAG LABEL
#
# It works on a machine with no image registry and no Docker engine running, as long as Debian's
# docker.io and debootstrap are installed (root):
# - no engine answers: it starts dockerd with the flags a sandbox needs (no iptables, no bridge,
#   the vfs storage driver) under $SMOKE_DOCKER_ROOT, and stops it at the end;
# - the base image: SMOKE_BASE if set (e.g. python:3.11-slim-bookworm where Docker Hub is
#   reachable); else a Debian bookworm root built from Debian's packages with debootstrap and
#   imported as dpo-base:bookworm (once);
# - the build and the container use the host's network (no bridge here); the container listens
#   on a free loopback port (PORT, HOST);
# - SMOKE_WHEELS: a folder of wheels pip may take first (default /opt/wheels where it exists:
#   the CPU torch wheel on this machine, instead of PyPI's several-GB CUDA build);
# - SMOKE_CA_CERTS: CA files pip must trust in the build (default: the host's own extra CAs in
#   /usr/local/share/ca-certificates, such as a TLS-intercepting proxy's).
set -euo pipefail
image=${1:-dpo-microservice:latest}
label=${2:-org.dpo-microservice.project=dpo-microservice}
cd "$(dirname "$0")/.."
state=${SMOKE_DOCKER_ROOT:-/tmp/dpo-docker}
pids=()
cleanup() {
    [ -n "${name:-}" ] && docker rm -f "$name" >/dev/null 2>&1 || true
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || {
        echo "docker-smoke: no Docker engine answers and dockerd is not installed (apt-get install docker.io)" >&2
        exit 1
    }
    mkdir -p "$state"
    echo "docker-smoke: starting dockerd (log: $state/dockerd.log)"
    dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs \
        --data-root "$state/data" --exec-root "$state/exec" --pidfile "$state/dockerd.pid" \
        >"$state/dockerd.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "docker-smoke: dockerd did not start:" >&2; tail -20 "$state/dockerd.log" >&2; exit 1; }
fi

base=${SMOKE_BASE:-}
if [ -z "$base" ]; then
    base=dpo-base:bookworm
    if ! docker image inspect "$base" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || { echo "docker-smoke: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
        root="$state/rootfs"
        rm -rf "$root"
        echo "docker-smoke: building a Debian bookworm base with debootstrap (a few minutes)"
        debootstrap --variant=minbase --include=python3,python3-venv,passwd,ca-certificates \
            bookworm "$root" http://deb.debian.org/debian >"$state/debootstrap.log" 2>&1 \
            || { tail -20 "$state/debootstrap.log" >&2; exit 1; }
        tar -C "$root" -c . | docker import - "$base" >/dev/null
        rm -rf "$root"
    fi
fi

find_links=()
wheels=${SMOKE_WHEELS:-/opt/wheels}
if [ -d "$wheels" ]; then  # served on loopback: the build (host network) reaches it
    wport=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server --bind 127.0.0.1 --directory "$wheels" "$wport" >/dev/null 2>&1 &
    pids+=($!)
    find_links=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$wport/")
fi

# a TLS-intercepting proxy's CA (this sandbox has one) for pip inside the build
ca_files=(${SMOKE_CA_CERTS:-/usr/local/share/ca-certificates/*.crt})
extra_ca=()
if [ -e "${ca_files[0]}" ]; then
    extra_ca=(--build-arg "EXTRA_CA_CERTS=$(cat "${ca_files[@]}")")
fi

docker build --network host --label "$label" --build-arg "BASE=$base" "${find_links[@]}" "${extra_ca[@]}" -t "$image" .

secret=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
name="dpo-smoke-$$"
docker run -d --network host --label "$label" --name "$name" \
    -e HOST=127.0.0.1 -e PORT="$port" -e DPO_WEBHOOK_SECRET="$secret" "$image" >/dev/null
echo "docker-smoke: waiting for the container's health check..."
status=starting
for _ in $(seq 1 60); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$name")
    [ "$status" = healthy ] && break
    [ "$(docker inspect -f '{{.State.Running}}' "$name")" = true ] || {
        echo "docker-smoke: the container exited:"; docker logs "$name" 2>&1 | tail -40; exit 1
    }
    sleep 5
done
[ "$status" = healthy ] || { echo "docker-smoke: container not healthy: $status"; docker logs "$name" | tail -40; exit 1; }
DPO_WEBHOOK_SECRET="$secret" .venv/bin/python tools/trigger.py --url "http://127.0.0.1:$port" --community smoke --toy --timeout 900
echo "docker-smoke: OK (image $image on $base)"
