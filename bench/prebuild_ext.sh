#!/usr/bin/env bash
# bench/prebuild_ext.sh -- build tokenforge._C here, ahead of a GPU lease, for the GPU machine's
# Python (3.12) and architecture (sm_90a), into .prebuilt/ (git-ignored). The extension links no
# libtorch and the CUDA runtime statically, so it travels: name .prebuilt in the device tool's
# `carry`, and bench/gpu_check.sh installs it instead of spending lease time on nvcc (it falls
# back to building there if the prebuilt one does not load).
#
#   bash bench/prebuild_ext.sh                  # PY312=/path/to/python3.12 TOKENFORGE_CUDA_ARCHS=90a
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PY312:-}" ]]; then
  # the first python3.12 that runs: PATH (a pyenv shim may not), then pyenv's versions
  for cand in "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if [[ -n "$cand" && -x "$cand" ]] && "$cand" --version >/dev/null 2>&1; then PY312="$cand"; break; fi
  done
fi
if [[ -z "${PY312:-}" ]]; then
  echo "prebuild_ext: no python3.12 here (set PY312=...); the GPU machine's Python is 3.12" >&2
  exit 2
fi
command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]] || { echo "prebuild_ext: no nvcc here" >&2; exit 2; }
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tf_prebuild.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
"$PY312" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet "setuptools>=64" wheel "pybind11>=2.10" "ninja>=1.10"
# The CUTLASS headers of csrc/*_sm90.cu (the sm_90a FP8 GEMM): headers only, no Python deps.
"$WORK/venv/bin/python" -m pip install --quiet --no-deps "${CUTLASS_SPEC:-nvidia-cutlass==4.2.0.0}"
TOKENFORGE_CUDA_ARCHS="${TOKENFORGE_CUDA_ARCHS:-90a}" TOKENFORGE_BUILD_EXT=1 \
  "$WORK/venv/bin/python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/wheel" .
mkdir -p .prebuilt
rm -f .prebuilt/_C*.so .prebuilt/_build_info.json
"$WORK/venv/bin/python" - "$WORK/wheel" .prebuilt <<'PYEOF'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("tokenforge/_C") or n == "tokenforge/_build_info.json"]
    if not any(n.endswith(".so") for n in names):
        sys.exit(f"prebuild_ext: the wheel has no tokenforge/_C*.so: {names}")
    import json
    info = json.loads(z.read("tokenforge/_build_info.json"))
    if not info.get("cutlass_include"):
        sys.exit(f"prebuild_ext: built without the CUTLASS sm_90a kernels: {info.get('cutlass')}")
    for n in names:
        with open(os.path.join(sys.argv[2], os.path.basename(n)), "wb") as f:
            f.write(z.read(n))
print("prebuild_ext: wrote", ", ".join(sorted(os.listdir(sys.argv[2]))))
PYEOF
ls -la .prebuilt
