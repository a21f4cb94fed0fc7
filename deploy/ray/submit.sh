#!/usr/bin/env bash
# The run as a Ray job on the head (its output kept by Ray; `ray job logs` / `ray job stop` manage it):
#   deploy/ray/submit.sh [supervisor up arguments], e.g. deploy/ray/submit.sh --config configs/fleet.yaml
# RAY_ADDRESS: the head's dashboard (default http://127.0.0.1:8265: the dashboard is on loopback).
set -euo pipefail
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-/etc/rlstack/ray-token}"
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . -- \
    supervisor up --engine ray --address auto --no-live "$@"
