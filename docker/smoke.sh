#!/usr/bin/env bash
# The image, proven on a real Docker engine: build it, serve a demo gallery from it, search, fetch an
# image, retrain through the admin API inside the container, and check the container's health.
#
#     make docker-smoke            (or: bash docker/smoke.sh, from the repository root, as root)
#
# Idempotent: it installs docker.io/debootstrap, starts an engine and builds the local base image only
# when they are missing (docker/engine.sh), and reuses Docker's layer cache. The first run downloads
# about 4 GB of torch/CUDA wheels from PyPI; later runs rebuild only the layers whose sources changed.
# Containers run with --network host and listen on 127.0.0.1 only. They are removed on exit.
# Timings and the image size are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
source docker/engine.sh

IMAGE=${IMAGE:-safe-retrieval:smoke}
PORT=${SMOKE_PORT:-18765}
WORK="$SMOKE_DIR/work"
NAME=sr-smoke-api
TOKEN=smoke-admin-token
APP_UID=10001
T0=$(date +%s)
declare -A took

run_cli() {  # the image's own CLI, as its unprivileged user, on the smoke's work directory
    docker run --rm --network host -v "$WORK/data:/data" -v "$WORK/state:/state" -v "$WORK/indexes:/indexes" \
        "$IMAGE" "$@"
}

cleanup() {
    docker rm -f "$NAME" >/dev/null 2>&1 || true
}
trap cleanup EXIT

fail() {
    log "FAILED: $*"
    if docker container inspect "$NAME" >/dev/null 2>&1; then
        log "last lines of the api container's log:"; docker logs --tail 40 "$NAME" >&2 || true
    fi
    exit 1
}

step() { local name=$1; shift; local t=$(date +%s); "$@"; took[$name]=$(( $(date +%s) - t )); }

# ---- engine, base image, image
setup() { ensure_packages; ensure_engine; ensure_base_image; }
step setup setup
build() {
    log "building $IMAGE (classic builder, host network: pip reaches PyPI as this host does)"
    DOCKER_BUILDKIT=0 docker build --network host -f docker/Dockerfile -t "$IMAGE" . >"$SMOKE_DIR/build.log" 2>&1 \
        || { tail -30 "$SMOKE_DIR/build.log" >&2; fail "docker build (log: $SMOKE_DIR/build.log)"; }
    docker image prune -f >/dev/null  # the wheel stage's untagged image
}
step build build

# ---- what the image holds
check_image() {
    local user
    user=$(docker run --rm --entrypoint id "$IMAGE" -u)
    [ "$user" = "$APP_UID" ] || fail "the image runs as uid $user, not the unprivileged app user"
    docker run --rm --entrypoint sh "$IMAGE" -c 'for t in gcc cc g++ make; do command -v $t && exit 1; done; exit 0' \
        >/dev/null || fail "the image holds build tools"
    docker run --rm --entrypoint sh "$IMAGE" -c 'test ! -e /src && test ! -e /tmp/wheels' \
        || fail "the image holds the source tree or the wheel"
    docker image inspect "$IMAGE" --format '{{json .Config.Healthcheck.Test}}' | grep -q readyz \
        || fail "the image's HEALTHCHECK does not ask /readyz"
    # a start-up mistake is one line and a non-zero exit, not a traceback
    local out rc=0
    out=$(docker run --rm --network host -e SAFE_RETRIEVAL_PORT=99999 "$IMAGE" 2>&1) || rc=$?
    [ "$rc" -ne 0 ] && [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] && [[ $out == "error: bad setting"*PORT* ]] \
        || fail "a bad setting gave (exit $rc): $out"
}
step image check_image

# ---- a demo gallery made by the image's own CLI: synthetic data, a tiny model, an index
prepare() {
    rm -rf "$WORK"
    mkdir -p "$WORK/data" "$WORK/state/models" "$WORK/indexes"
    chown -R "$APP_UID:$APP_UID" "$WORK"
    run_cli data synth --out /data/visu --n 100 --image-size 64 >/dev/null
    run_cli model init --out /state/models/base --arch tiny --seed 0 >/dev/null
    run_cli index build --model /state/models/base --name gallery --visu /data/visu --split test --captions-as-text \
        --media-root /data --workers 0 --device cpu --no-progress >/dev/null
    chmod -R a-w "$WORK/data"  # served read-only, as compose mounts it
}
step prepare prepare

# ---- the API container
http() { curl -sS --max-time 60 "$@"; }
serve() {
    cleanup
    docker run -d --name "$NAME" --network host \
        -v "$WORK/data:/data:ro" -v "$WORK/state:/state" -v "$WORK/indexes:/indexes" \
        -e SAFE_RETRIEVAL_HOST=127.0.0.1 -e SAFE_RETRIEVAL_PORT="$PORT" \
        -e SAFE_RETRIEVAL_MODEL=/state/models/base -e SAFE_RETRIEVAL_INDEX=gallery \
        -e SAFE_RETRIEVAL_ADMIN_TOKEN="$TOKEN" -e SAFE_RETRIEVAL_TORCH_THREADS=2 \
        "$IMAGE" >/dev/null
    for _ in $(seq 180); do
        [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || fail "the api container exited"
        http -o /dev/null -f "http://127.0.0.1:$PORT/readyz" 2>/dev/null && return
        sleep 1
    done
    fail "/readyz did not answer 200 within 180 s"
}
step serve serve

check_api() {
    local base="http://127.0.0.1:$PORT" results id
    http -f "$base/" | grep -qi "<html" || fail "/ does not serve the page"
    results=$(http -f -X POST "$base/v1/search" -H 'Content-Type: application/json' \
        -d '{"text": "a photo of a cat", "k": 5}') || fail "search"
    id=$(printf '%s' "$results" | python3 -c 'import json, sys
hits = [r for r in json.load(sys.stdin)["results"] if r["kind"] == "image"]
print(hits[0]["id"] if hits else "")')
    [ -n "$id" ] || fail "the search found no image: $results"
    http -f -o "$SMOKE_DIR/media.bin" -w '%{content_type}\n' "$base/v1/media/$id" | grep -q '^image/' \
        || fail "/v1/media/$id is not an image"
    log "search answered; /v1/media/$id served $(stat -c %s "$SMOKE_DIR/media.bin") bytes"
}
step api check_api

retrain() {  # through the admin API: the job trains, reindexes and swaps inside the container
    local base="http://127.0.0.1:$PORT" job id state before after
    before=$(http -f "$base/readyz" | python3 -c 'import json, sys; print(json.load(sys.stdin)["index"]["generation"])')
    job=$(http -f -X POST "$base/v1/admin/retrain" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
        -d '{"method": "hysac", "data": "/data/visu", "epochs": 1, "max_steps": 3, "batch_size": 16,
             "source": {"visu": "/data/visu", "split": "test", "captions": true, "media_root": "/data"}}') \
        || fail "POST /v1/admin/retrain"
    id=$(printf '%s' "$job" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
    for _ in $(seq 600); do
        state=$(http -f "$base/v1/admin/jobs/$id" -H "Authorization: Bearer $TOKEN" \
            | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])')
        case $state in
            succeeded) break ;;
            failed|cancelled) http "$base/v1/admin/jobs/$id" -H "Authorization: Bearer $TOKEN" >&2; fail "retrain job $state" ;;
        esac
        sleep 1
    done
    [ "$state" = succeeded ] || fail "the retrain job did not finish in 600 s (state $state)"
    after=$(http -f "$base/readyz" | python3 -c 'import json, sys; print(json.load(sys.stdin)["index"]["generation"])')
    [ "$after" != "$before" ] || fail "the retrain job succeeded but the served generation is still $before"
    log "retrain job $id succeeded; serving generation $after (was $before)"
}
step retrain retrain

healthy() {
    for _ in $(seq 120); do
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$NAME")" = healthy ] && return
        sleep 1
    done
    fail "the container's HEALTHCHECK never reported healthy"
}
step health healthy

size=$(docker image inspect "$IMAGE" --format '{{.Size}}')
log "PASSED in $(( $(date +%s) - T0 )) s: setup ${took[setup]} s, build ${took[build]} s, image checks ${took[image]} s," \
    "demo gallery ${took[prepare]} s, start to ready ${took[serve]} s, search+media ${took[api]} s," \
    "retrain job ${took[retrain]} s, healthy ${took[health]} s; image $IMAGE $(( size / 1000000 )) MB"
