#!/usr/bin/env bash
# A GPU host of the fleet: Ray with the resource carla_host (one host agent is placed here), joined to the head at
# HEAD:PORT with the cluster's token (RAY_AUTH_TOKEN_PATH, default /etc/rlstack/ray-token, copied from the head).
# Its CARLA servers are containers on this host's Docker engine; its secret key at the config's cluster.host_key,
# or at RLSTACK_HOST_KEY where this machine's key lives elsewhere (set it in the unit's /etc/rlstack/ray.env).
# Usage: deploy/ray/start-worker.sh HEAD:PORT [more `ray start` arguments]
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 HEAD:PORT [ray start arguments]" >&2
    exit 2
fi
head="$1"
shift
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-/etc/rlstack/ray-token}"
if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    echo "$0: no Ray token at $RAY_AUTH_TOKEN_PATH: copy the head's there (0600)" >&2
    exit 2
fi
exec ray start --address "$head" --resources '{"carla_host": 1}' --num-cpus "${RAY_NUM_CPUS:-2}" --block "$@"
