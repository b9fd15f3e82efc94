#!/usr/bin/env bash
# bench/fetch_peers.sh -- download the peers' wheels (liger-kernel, torchao) for the GPU machine
# (Python 3.12, manylinux x86_64) into .whl/ (git-ignored), ahead of a lease: the GPU machine is
# offline. Name .whl in the device tool's `carry`; bench/gpu_check.sh installs them with
# `pip install --no-index --no-deps --target` and uses them as baselines when they import.
# Versions: override with LIGER_SPEC / TORCHAO_SPEC (torchao must match the GPU machine's torch 2.11).
# --sources also clones Liger-Kernel's and flash-attention's sources (their test suites) into .peers/
# (git-ignored) for bench/peers/run_peer_tests.sh; carry .peers too to run them on the GPU machine.
# PEER_GIT_BASE replaces https://github.com (a local mirror: PEER_GIT_BASE/<owner>/<name>).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${1:-}" = "--sources" ]; then
  mkdir -p .peers
  # Only what the runner reads, so .peers stays small enough to carry (a few MB).
  clone_sparse() {  # repo, then the paths to check out
    local repo="$1" dir=".peers/${1#*/}"; shift
    [ -d "$dir" ] && return 0
    git clone --quiet --depth 1 --filter=blob:none --no-checkout "${PEER_GIT_BASE:-https://github.com}/$repo" "$dir" \
      && git -C "$dir" sparse-checkout set --no-cone "$@" && git -C "$dir" checkout --quiet \
      || echo "fetch_peers: could not clone $repo"
  }
  clone_sparse linkedin/Liger-Kernel /pyproject.toml /src/ "/test/*.py" /test/transformers/
  clone_sparse Dao-AILab/flash-attention /tests/test_flash_attn.py /flash_attn/bert_padding.py
  du -sh .peers
fi
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
