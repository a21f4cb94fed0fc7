#!/usr/bin/env bash
# Build the worker image of deploy/docker/Dockerfile without any registry, as CI does (`make deploy-check`):
# a Debian base with Python made by mmdebstrap and imported (cached under $RLSTACK_IMAGE_CACHE), the image's
# packages from a wheelhouse fetched from the package index into build/wheels, then an offline build.
# Usage: deploy/worker-image.sh [TAG] (default rlstack-worker:test)
set -euo pipefail
TAG=${1:-rlstack-worker:test}
BASE=rlstack/python-base:test
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${RLSTACK_IMAGE_CACHE:-/tmp/rlstack-image-cache}
MIRROR=${RLSTACK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY=${PY:-$ROOT/.venv/bin/python}
mkdir -p "$CACHE"
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    if ! command -v mmdebstrap >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >/dev/null; }
    fi
    if [ ! -s "$CACHE/python-base.tar" ]; then
        mmdebstrap --quiet --variant=minbase --include=python3.11,python3.11-venv,python3-pip,ca-certificates \
            bookworm "$CACHE/python-base.part.tar" "$MIRROR" </dev/null
        mv "$CACHE/python-base.part.tar" "$CACHE/python-base.tar"
    fi
    docker import "$CACHE/python-base.tar" "$BASE" >/dev/null
fi
mkdir -p "$ROOT/build/wheels"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "$PY" -m pip download -q -d "$ROOT/build/wheels" "$ROOT[supervisor,worker,carla,fleet]" setuptools wheel \
        >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    echo "deploy/worker-image.sh: the wheelhouse could not be fetched" >&2
    exit 1
fi
cd "$ROOT"
if ! DOCKER_BUILDKIT=0 docker build -q -f deploy/docker/Dockerfile --target worker --build-arg BASE="$BASE" \
        --build-arg WHEELS=build/wheels -t "$TAG" . >"$log" 2>&1; then
    cat "$log" >&2
    echo "deploy/worker-image.sh: building $TAG failed" >&2
    exit 1
fi
echo "built $TAG"
