#!/usr/bin/env bash
# A Docker engine and a local `python:3.11-slim` stand-in on a host that cannot pull from a registry.
# Sourced by docker/smoke.sh; every step is idempotent (it does nothing when its result is already there).
#
# The engine has no network of its own (--bridge=none, no iptables/NAT): containers run with
# `--network host`, so all their traffic stays on this host's interfaces and loopback, and a build
# reaches PyPI the way this host does. No bridge network, no private-range address is ever created.
set -euo pipefail

SMOKE_DIR=${SMOKE_DIR:-$(pwd)/runs/docker}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
mkdir -p "$SMOKE_DIR"

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

ensure_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

ensure_engine() {
    if docker info >/dev/null 2>&1; then return; fi
    log "starting dockerd (no bridge, no iptables; log: $SMOKE_DIR/dockerd.log)"
    # setsid: the engine outlives this script, so the next run (and the image cache) reuse it
    setsid dockerd --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
        >"$SMOKE_DIR/dockerd.log" 2>&1 < /dev/null &
    echo $! > "$SMOKE_DIR/dockerd.pid"
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return
        sleep 1
    done
    log "dockerd did not start; its log:"; tail -20 "$SMOKE_DIR/dockerd.log" >&2
    return 1
}

# python:3.11-slim stand-in: Debian bookworm (its python3 is 3.11) with a venv first on PATH, so
# `python` and `pip` mean what they mean in the official image, and pip trusting this host's CA bundle
# (the host's pip is configured the same way in /etc/pip.conf).
ensure_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
    local rootfs="$SMOKE_DIR/rootfs"
    if [ ! -x "$rootfs/opt/venv/bin/python" ]; then
        rm -rf "$rootfs"
        log "debootstrap bookworm (minbase) into $rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "$DEBIAN_MIRROR" >"$SMOKE_DIR/debootstrap.log" 2>&1
        cp "$HOST_CA" "$rootfs/usr/local/share/ca-certificates/host-bundle.crt"
        cp "$HOST_CA" "$rootfs/etc/ssl/certs/ca-certificates.crt"
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ntimeout = 180\n' > "$rootfs/etc/pip.conf"
        chroot "$rootfs" /usr/bin/python3 -m venv /opt/venv
        chroot "$rootfs" apt-get clean
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    fi
    log "importing $rootfs as $BASE_IMAGE"
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' \
        - "$BASE_IMAGE" >/dev/null
}
