#!/usr/bin/env bash
# The learner's GPU checks, as one prepared run on a lent GPU machine whose python3 holds a CUDA build of torch:
# the graphed update against the eager one (tests/learner/test_graphs.py, which skip without a GPU), the frames on
# the device, and `bench updates` in its GPU mode (updates/s of shared and separate, fp32 and bf16, against SB3's
# TD3 in the same run, with a profile of each). The packages that machine lacks travel as wheels:
#   bash bench/gpu_check.sh wheels    (here: into .whl/, for Python 3.12 on x86-64, the versions of .venv)
#   bash bench/gpu_check.sh           (there, with .whl carried; what it prints also lands in $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = wheels ]; then
    names=()
    for p in pydantic pydantic-core annotated-types typing-inspection pyzmq gymnasium farama-notifications \
             stable-baselines3; do
        names+=("$p==$(.venv/bin/python -m pip show "$p" | awk '/^Version/{print $2}')")
    done
    rm -rf .whl && mkdir .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${names[@]}"
    ls .whl
    exit 0
fi
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$out/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/learner/test_graphs.py tests/learner/test_frames.py \
    tests/learner/test_td3.py 2>&1 | tee "$out/tests.log"
timeout 300 python3 -m bench updates --out "$out" 2>&1 | tee "$out/bench.log"
