#!/usr/bin/env bash
# The fleet's head node: Ray with the resource learner_host (the learner runs here, on the GPU where there is one),
# token authentication on, the dashboard on loopback (RAY_DASHBOARD_HOST to change it), and the health-check
# settings the fleet expects (docs/fleet.md). The token is read from RAY_AUTH_TOKEN_PATH (default
# /etc/rlstack/ray-token); one is made there if it is missing: copy it to every host, 0600.
# Usage: deploy/ray/start-head.sh [more `ray start` arguments]
set -euo pipefail
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-/etc/rlstack/ray-token}"
if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")
fi
# a node is declared dead after health_check_failure_threshold missed checks, period_ms apart (about 15 s here)
export RAY_health_check_period_ms="${RAY_health_check_period_ms:-3000}"
export RAY_health_check_failure_threshold="${RAY_health_check_failure_threshold:-5}"
exec ray start --head --port "${RAY_PORT:-6379}" \
    --dashboard-host "${RAY_DASHBOARD_HOST:-127.0.0.1}" \
    --resources '{"learner_host": 1}' --block "$@"
