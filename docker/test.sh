#!/usr/bin/env bash
# `make docker-test`: build the server image on a CPU machine and serve from it for real.
#
#   1. a Debian bookworm base image bootstrapped locally (debootstrap + docker import), because
#      no image registry is reachable here and nvidia/cuda cannot be pulled;
#   2. the project's Dockerfile built on it with the CPU torch wheel (BASE_IMAGE, TORCH_SPEC,
#      TORCH_INDEX_URL build args; the default build stays the CUDA one);
#   3. a container run with --network host as the image's non-root user, the weights mounted
#      read-only (a tiny random debug DiT + debug codec: this tests the image, not the music);
#   4. wait for /health, POST /continue, check the WAV, stop the container;
#   5. docker-compose.yml validated (`docker compose config` or `docker-compose config`); it
#      cannot be brought up here, since it reserves an NVIDIA GPU.
#
# Needs root (dockerd, debootstrap) and the package registries. Safe to re-run: the base image
# is built once and reused. Settings: PORT (18731), BASE_IMAGE_TAG, TORCH_WHEEL.
# Exit status: 0 passed; 1 the image or compose file is broken; 2 this machine cannot run the
# test (no docker daemon, no debootstrap, no Debian mirror), with the reason on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${PORT:-18731}"
BASE_TAG="${BASE_IMAGE_TAG:-snac-dit-base:bookworm}"
IMAGE="snac-dit:cpu-test"
NAME="snac-dit-test-$$"
PY="${PY:-.venv/bin/python}"
log() { echo "docker-test: $*" >&2; }

# ---- the compose file: valid, builds this Dockerfile, weights read-only, loopback by default
if docker compose version >/dev/null 2>&1; then compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then compose=(docker-compose)
else log "no docker compose / docker-compose: apt-get install docker-compose"; exit 2; fi
resolved="$(env -u PORT -u BIND "${compose[@]}" -f docker-compose.yml config)" \
    || { log "docker-compose.yml does not validate"; exit 1; }
for want in "context: $PWD" "/app/weights:ro" "127.0.0.1" "driver: nvidia"; do
    grep -qF "$want" <<<"$resolved" || { log "compose config lacks '$want':"; echo "$resolved" >&2; exit 1; }
done
log "docker-compose.yml validates (${compose[*]})"

# ---- the docker daemon
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || { log "no dockerd: apt-get install docker.io"; exit 2; }
    log "starting dockerd"
    (dockerd >/tmp/snac-dit-dockerd.log 2>&1 &)
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { log "dockerd did not start (/tmp/snac-dit-dockerd.log)"; exit 2; }
fi

# ---- the base image
if ! docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { log "no debootstrap: apt-get install debootstrap"; exit 2; }
    root="$(mktemp -d /tmp/snac-dit-rootfs.XXXXXX)"
    log "bootstrapping Debian bookworm into $root (a few minutes)"
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian \
        >/tmp/snac-dit-debootstrap.log 2>&1 \
        || { log "debootstrap failed (no Debian mirror?): /tmp/snac-dit-debootstrap.log"; exit 2; }
    tar -C "$root" -c . | docker import - "$BASE_TAG" >/dev/null
    rm -rf "$root"
fi

# ---- can this machine run a container at all? (if not, that is the machine, not the image)
docker run --rm --network host "$BASE_TAG" true >/tmp/snac-dit-docker-run.log 2>&1 \
    || { log "docker cannot run a container here: /tmp/snac-dit-docker-run.log"; exit 2; }

# ---- this machine's CA bundle (it may hold a TLS-inspecting proxy's CA the registries need)
cp /etc/ssl/certs/ca-certificates.crt docker/certs/host-ca.crt 2>/dev/null || true

# ---- the CPU torch wheel, offered to the build through docker/wheels/
wheel="${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1)}"
spec="torch==2.13.0+cpu"
if [ -n "$wheel" ] && [ -f "$wheel" ]; then
    cp -n "$wheel" docker/wheels/
    index=""                                   # PyPI for everything else
else
    log "no local CPU torch wheel; using the PyTorch CPU index"
    index="https://download.pytorch.org/whl/cpu"
fi

log "building $IMAGE on $BASE_TAG"
docker build --network host -q -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_TAG" --build-arg TORCH_SPEC="$spec" \
    --build-arg TORCH_INDEX_URL="$index" . >/dev/null

# ---- weights: a random debug DiT and codec, world-readable, mounted read-only
weights="$(mktemp -d /tmp/snac-dit-weights.XXXXXX)"
trap 'docker rm -f "$NAME" >/dev/null 2>&1 || true; rm -rf "$weights"' EXIT
"$PY" - "$weights" <<'EOF'
import sys
from pathlib import Path

from model.codec import DEBUG_CODEC_CONFIG, Codec
from model.dit import DiT, DiTConfig
from model.weights import save_pretrained

out = Path(sys.argv[1]) / "demo"
codec = Codec.load(DEBUG_CODEC_CONFIG, seed=0)
codec.save(out / "codec")
save_pretrained(DiT(DiTConfig.from_name("debug", codebook_size=codec.codebook_size)), out / "dit")
EOF
chmod -R a+rX "$weights"

log "running $IMAGE as its non-root user on 127.0.0.1:$PORT"
docker run -d --name "$NAME" --network host -v "$weights:/app/weights:ro" \
    -e HOST=127.0.0.1 -e PORT="$PORT" -e SNAC_DIT_DEVICE=cpu "$IMAGE" >/dev/null
user="$(docker exec "$NAME" id -un)"
[ "$user" = app ] || { log "the container runs as '$user', not 'app'"; exit 1; }

for _ in $(seq 300); do
    if curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
    if [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" != true ]; then
        docker logs "$NAME" >&2; log "the container exited"; exit 1
    fi
    sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null || { docker logs "$NAME" >&2; exit 1; }

"$PY" - "$PORT" <<'EOF'
import io
import sys

import httpx
import numpy as np
import soundfile as sf

t = np.arange(2 * 32000) / 32000
buf = io.BytesIO()
sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 32000, format="WAV")
r = httpx.post(f"http://127.0.0.1:{sys.argv[1]}/continue?steps=1&seed=1",
               files={"audio": ("a.wav", buf.getvalue(), "audio/wav")}, timeout=300)
assert r.status_code == 200, (r.status_code, r.text)
info = sf.info(io.BytesIO(r.content))
assert (info.samplerate, info.channels, info.frames) == (32000, 1, 196608), info
print(f"docker-test: /continue answered {info.frames} samples at {info.samplerate} Hz", file=sys.stderr)
EOF
log "ok: image $IMAGE built, served /health and /continue from a read-only weights mount as user app"
