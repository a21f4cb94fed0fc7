#!/usr/bin/env bash
# What the deploy/ checks run besides Python packages: kubectl (its kustomize renders the overlays). Installed with
# apt where it is missing (the kubectl package, else Debian's kubernetes-client); nothing else is changed.
set -euo pipefail
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends kubectl >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends kubectl >/dev/null 2>&1; } \
    || apt-get install -y -q --no-install-recommends kubernetes-client >/dev/null
command -v kubectl >/dev/null 2>&1 || { echo "deploy/test-tools.sh: kubectl could not be installed" >&2; exit 1; }
