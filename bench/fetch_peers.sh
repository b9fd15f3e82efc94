#!/usr/bin/env bash
# bench/fetch_peers.sh -- download the peers' wheels (liger-kernel, torchao) for the GPU machine
# (Python 3.12, manylinux x86_64) into .whl/ (git-ignored), ahead of a lease: the GPU machine is
# offline. Name .whl in the device tool's `carry`; bench/gpu_check.sh installs them with
# `pip install --no-index --no-deps --target` and uses them as baselines when they import.
# Versions: override with LIGER_SPEC / TORCHAO_SPEC (torchao must match the GPU machine's torch 2.11).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p .whl
PY="${PYTHON:-python3}"
for spec in "${LIGER_SPEC:-liger-kernel}" "${TORCHAO_SPEC:-torchao}"; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$spec" \
    || echo "fetch_peers: could not download $spec (the GPU run will say its baseline is unavailable)"
done
ls -la .whl
du -sh .whl
