#!/usr/bin/env bash
# Build the image `rlstack/fakecarla:test` (the fake CARLA server of the tests) without any registry:
# a Debian rootfs with Python and msgpack made by mmdebstrap, then the server's package on top.
# Usage: deploy/fakecarla-image.sh [TAG]. The rootfs is cached under $RLSTACK_IMAGE_CACHE.
set -euo pipefail
TAG=${1:-rlstack/fakecarla:test}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${RLSTACK_IMAGE_CACHE:-/tmp/rlstack-image-cache}
MIRROR=${RLSTACK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$CACHE"
if ! command -v mmdebstrap >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >/dev/null; }
fi
if [ ! -s "$CACHE/rootfs.tar" ]; then
    mmdebstrap --quiet --variant=extract --include=python3-minimal,python3.11,python3-msgpack \
        bookworm "$CACHE/rootfs.part.tar" "$MIRROR" </dev/null
    mv "$CACHE/rootfs.part.tar" "$CACHE/rootfs.tar"
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
ln "$CACHE/rootfs.tar" "$ctx/rootfs.tar" 2>/dev/null || cp "$CACHE/rootfs.tar" "$ctx/rootfs.tar"
mkdir -p "$ctx/app"
cp -r "$ROOT/harness/fakecarla" "$ctx/app/fakecarla"
find "$ctx/app" -name __pycache__ -prune -exec rm -rf {} +
cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
ADD rootfs.tar /
COPY app /opt/fakecarla
WORKDIR /opt/fakecarla
ENV PYTHONUNBUFFERED=1
CMD ["python3", "-m", "fakecarla"]
DOCKERFILE
DOCKER_BUILDKIT=0 docker build -q -t "$TAG" "$ctx" >/dev/null
echo "built $TAG"
