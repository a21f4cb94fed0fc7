#!/usr/bin/env bash
# Build the images of deploy/docker/Dockerfile without any registry, as CI does (`make deploy-check`): a Debian
# base with Python made by mmdebstrap and imported (cached under $RLSTACK_IMAGE_CACHE), the images' packages from a
# wheelhouse fetched from the package index into build/wheels, then offline builds, tagged rlstack-TARGET:test.
# The learner's torch is the wheel the index gives for torch==2.13.0 here: where that is the CPU build (a machine
# without CUDA wheels), the learner image is built with it; on a GPU host's index it is the CUDA build.
# Usage: deploy/images.sh [TARGET ...] (default: worker learner)
set -euo pipefail
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(worker learner)
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
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# one wheelhouse for both images: the classic builder builds every stage before the target (the learner's build
# runs the worker's stage too, from the same layers)
wants=("$ROOT[supervisor,worker,carla,fleet,learner]" torch==2.13.0 setuptools wheel)
mkdir -p "$ROOT/build/wheels"
if ! "$PY" -m pip download -q -d "$ROOT/build/wheels" "${wants[@]}" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    echo "deploy/images.sh: the wheelhouse could not be fetched" >&2
    exit 1
fi
for target in "${TARGETS[@]}"; do
    case "$target" in
        worker|learner) ;;
        *) echo "deploy/images.sh: no target $target (worker, learner)" >&2; exit 2 ;;
    esac
    tag="rlstack-$target:test"
    if ! (cd "$ROOT" && DOCKER_BUILDKIT=0 docker build -q -f deploy/docker/Dockerfile --target "$target" \
            --build-arg BASE="$BASE" --build-arg WHEELS=build/wheels -t "$tag" .) >"$log" 2>&1; then
        cat "$log" >&2
        echo "deploy/images.sh: building $tag failed" >&2
        exit 1
    fi
    echo "built $tag"
done
