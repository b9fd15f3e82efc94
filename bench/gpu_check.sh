#!/usr/bin/env bash
# bench/gpu_check.sh -- the one script run on the GPU machine (an H200; see shared/GPU.md).
#
#   bash bench/gpu_check.sh                     # on the GPU machine, from anywhere
#   OUT=/some/dir bash bench/gpu_check.sh       # results go to $OUT (default bench/results/latest/)
#   TOKENFORGE_GPU_CHECK_DRY=1 PYTHON=.venv/bin/python bash bench/gpu_check.sh   # CPU dry run
#
# Steps, most important figures first, each under its own `timeout` and all under one overall
# budget (TOKENFORGE_GPU_CHECK_BUDGET_S, default 440 s; with the kill grace, under 8 minutes):
#   a  env       nvidia-smi, versions, `python3 -m tokenforge info` (+ --json)   -> env.txt, info.json
#   b  build     the CUDA extension for sm_90a: pip install --no-build-isolation --no-deps -e .
#   c1 headline  RMSNorm fwd+bwd 16384x4096 bf16, every backend (pytest -m headline), then a first report
#   d  tests     python3 -m pytest tests -k cuda on CUDA (TRITON_INTERPRET unset) -> tests.xml
#   c3 e2e       tokenforge train --compare, 125m and 1b presets (bench/e2e_train.sh)  -> e2e.json
#   c2 bench     the rest of bench/ (pytest -m "not headline")
#   e  report    results.json, results.md, results.png (bench/report.py)
#   f  the step table, then the short summary table, printed LAST.
# A failed or timed-out step does not stop the rest; the script says which failed and exits
# non-zero if any did. Output under $OUT stays flat and small (the device tool returns 8 files):
#   log.txt env.txt info.json results.json results.md results.png e2e.json tests.xml
#
# Dry run (no GPU, or TOKENFORGE_GPU_CHECK_DRY=1): same plumbing on the CPU with tiny shapes; the
# build step only checks that tokenforge imports (TOKENFORGE_GPU_CHECK_BUILD=1 builds anyway) and
# the test step only collects (TOKENFORGE_GPU_CHECK_TESTS=full runs them).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="${OUT:-$ROOT/bench/results/latest}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
export OUT ROOT

# The whole run goes to $OUT/log.txt: re-run this script once under tee (the outer shell waits for
# both, so nothing printed last is lost).
if [[ -z "${_TF_GPU_CHECK_TEED:-}" ]]; then
  export _TF_GPU_CHECK_TEED=1
  bash "${BASH_SOURCE[0]}" "$@" 2>&1 | tee "$OUT/log.txt"
  exit "${PIPESTATUS[0]}"
fi

PY="${PYTHON:-python3}"
[[ "$PY" == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute: steps may cd
export PY
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
unset TOKENFORGE_BACKEND  # never let a forced backend leak into the comparisons
BUDGET="${TOKENFORGE_GPU_CHECK_BUDGET_S:-440}"
START=$SECONDS
TMPD="$(mktemp -d "${TMPDIR:-/tmp}/tf_gpu_check.XXXXXX")"
export TMPD

echo "# tokenforge gpu_check  $(date -u +%Y-%m-%dT%H:%M:%SZ)  host $(hostname)  budget ${BUDGET}s"
echo "# root $ROOT  OUT $OUT  python $PY"

DRY="${TOKENFORGE_GPU_CHECK_DRY:-auto}"
if [[ "$DRY" == auto ]]; then
  if timeout -k 5 90 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    DRY=0
  else
    DRY=1
  fi
fi
export DRY
if [[ "$DRY" == 1 ]]; then
  echo "# DRY RUN: no usable GPU (or TOKENFORGE_GPU_CHECK_DRY=1). CPU path, tiny shapes: every figure"
  echo "# below is NOT meaningful for performance; this run only proves the script's plumbing."
else
  unset TRITON_INTERPRET  # real kernels on the GPU, never the interpreter
fi

# ---------------------------------------------------------------------------------------------
# Step runner: run_step NAME MAX_SECONDS RESERVE_SECONDS COMMAND...
# MAX and RESERVE are for the default 440 s budget and scale with TOKENFORGE_GPU_CHECK_BUDGET_S.
# The step gets min(MAX, time left - RESERVE), where RESERVE keeps time for the steps after it;
# under 10 s (scaled) it is skipped (and counted as failed). Overruns get SIGINT (pytest then
# still writes its JSON), then SIGKILL 20 s later.
# ---------------------------------------------------------------------------------------------
STEP_NAMES=()
STEP_STATUS=()
STEP_SECS=()

record() { STEP_NAMES+=("$1"); STEP_STATUS+=("$2"); STEP_SECS+=("$3"); }

run_step() {
  local name=$1 max=$(( $2 * BUDGET / 440 )) reserve=$(( $3 * BUDGET / 440 ))
  local min_t=$(( 10 * BUDGET / 440 ))
  (( min_t < 2 )) && min_t=2
  shift 3
  local left=$(( BUDGET - (SECONDS - START) - reserve ))
  local t=$max
  (( left < t )) && t=$left
  if (( t < min_t )); then
    echo
    echo "=== [$name] SKIPPED: no time left (${left}s after reserving ${reserve}s for later steps)"
    record "$name" "SKIPPED (no time left)" 0
    return 1
  fi
  echo
  echo "=== [$name] start, budget ${t}s (elapsed $(( SECONDS - START ))s of ${BUDGET}s)"
  local t0=$SECONDS rc status
  timeout -s INT -k 20 "$t" "$@"
  rc=$?
  local dt=$(( SECONDS - t0 ))
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMEOUT (budget ${t}s)" ;;
    *) status="FAILED (rc=$rc)" ;;
  esac
  echo "=== [$name] $status in ${dt}s"
  record "$name" "$status" "$dt"
  return "$rc"
}

# pick BASE: BASE.json if pytest-benchmark wrote it, else the JSON-lines side file (a run cut short).
pick() { if [[ -s "$1.json" ]]; then echo "$1.json"; else echo "$1.jsonl"; fi; }
export -f pick

# ---------------------------------------------------------------------------------------------
# Steps (functions run under `timeout bash -c NAME`, so they are exported)
# ---------------------------------------------------------------------------------------------

step_env() {
  local rc=0
  {
    echo "## nvidia-smi"
    if command -v nvidia-smi >/dev/null; then
      timeout 20 nvidia-smi || echo "nvidia-smi failed (rc=$?)"
      timeout 20 nvidia-smi --query-gpu=name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,memory.used,memory.total --format=csv || true
    else
      echo "nvidia-smi: not found"
    fi
    echo "## nvcc"
    if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
    echo "## python"
    "$PY" - <<'EOF'
import platform, sys
print("python", sys.version.split()[0], platform.platform())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device {p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
except Exception as e:
    print("torch: import failed:", e)
for mod in ("triton", "pytest_benchmark", "matplotlib", "pybind11", "ninja"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "missing:", type(e).__name__)
EOF
    echo "## tokenforge info"
  } 2>&1 | tee "$OUT/env.txt"
  "$PY" -m tokenforge info 2>&1 | tee -a "$OUT/env.txt" || rc=1
  "$PY" -m tokenforge info --json >"$OUT/info.json" 2>>"$OUT/env.txt" || { rc=1; echo "tokenforge info --json failed"; }
  [[ -s "$OUT/info.json" ]] || rm -f "$OUT/info.json"
  return $rc
}

step_build() {
  local cmd=(env TOKENFORGE_CUDA_ARCHS=90a TOKENFORGE_BUILD_EXT=1 MAX_JOBS="${MAX_JOBS:-16}"
             "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .)
  if [[ "$DRY" == 1 && "${TOKENFORGE_GPU_CHECK_BUILD:-0}" != 1 ]]; then
    echo "dry run: not building (would run: ${cmd[*]})"
    "$PY" -c "import tokenforge, sys; print('tokenforge', tokenforge.__version__, 'imports from', tokenforge.__file__)"
    return $?
  fi
  local t0=$SECONDS rc
  "${cmd[@]}"
  rc=$?
  echo "build: pip install -e . for sm_90a took $(( SECONDS - t0 ))s (rc=$rc)"
  if (( rc != 0 )); then
    echo "WARNING: editable install failed; trying a plain (non-editable) install so the rest can run"
    env TOKENFORGE_CUDA_ARCHS=90a TOKENFORGE_BUILD_EXT=1 MAX_JOBS="${MAX_JOBS:-16}" \
      "$PY" -m pip install --no-build-isolation --no-deps --no-index . && rc=3
    echo "build: total $(( SECONDS - t0 ))s"
  fi
  echo "## tokenforge info after the build" | tee -a "$OUT/env.txt"
  "$PY" -m tokenforge info 2>&1 | tee -a "$OUT/env.txt"
  "$PY" -m tokenforge info --json >"$OUT/info.json" 2>/dev/null || true
  [[ -s "$OUT/info.json" ]] || rm -f "$OUT/info.json"
  return $rc
}

bench_pytest() {  # bench_pytest NAME MARKEXPR
  rm -f "$TMPD/$1.json" "$TMPD/$1.jsonl"
  TOKENFORGE_BENCH_JSONL="$TMPD/$1.jsonl" "$PY" -m pytest bench -m "$2" -q -p no:cacheprovider -rs \
    --benchmark-json="$TMPD/$1.json" --benchmark-columns=median,min,max,rounds --benchmark-sort=name
}

step_headline() {
  bench_pytest headline "headline"
  local rc=$?
  echo "--- first report (headline only)"
  "$PY" bench/report.py "$(pick "$TMPD/headline")" --out-dir "$OUT" --no-plot || true
  return $rc
}

step_bench() { bench_pytest rest "not headline"; }

step_tests() {
  if [[ ! -d tests ]]; then echo "no tests/ folder"; return 1; fi
  if [[ "$DRY" == 1 && "${TOKENFORGE_GPU_CHECK_TESTS:-collect}" != full ]]; then
    echo "dry run: collecting the test suite only (TOKENFORGE_GPU_CHECK_TESTS=full runs it)"
    "$PY" -m pytest tests -qq -p no:cacheprovider --co
    return $?
  fi
  # The CUDA cases only (-k cuda): CI already runs every CPU case under the interpreter and the
  # compile gate. No -x: on a first GPU run, see every failure rather than the first; --maxfail
  # keeps a systematic break from eating the budget. The JUnit XML keeps the per-test outcome.
  env -u TRITON_INTERPRET "$PY" -m pytest tests -k cuda -m "not compile_gate" -q -p no:cacheprovider -rfEs \
    --maxfail=30 --durations=15 --junitxml="$OUT/tests.xml"
}

step_report() {
  "$PY" bench/report.py "$(pick "$TMPD/headline")" "$(pick "$TMPD/rest")" --out-dir "$OUT" \
    --summary-out "$TMPD/summary.txt"
  local rc=$?
  if (( rc != 0 )); then
    echo "report failed (rc=$rc); copying the raw benchmark files into \$OUT instead"
    for f in "$TMPD"/headline.json "$TMPD"/rest.json "$TMPD"/headline.jsonl "$TMPD"/rest.jsonl; do
      [[ -s "$f" ]] && cp "$f" "$OUT/raw_$(basename "$f")"
    done
  fi
  return $rc
}

step_e2e() { OUT="$OUT" PY="$PY" bash "$ROOT/bench/e2e_train.sh"; }

export -f step_env step_build bench_pytest step_headline step_bench step_tests step_report step_e2e

# MAX seconds and RESERVE (seconds kept for the steps after) of each step.
run_step "a env"        45 400 bash -c step_env
run_step "b build"     200 210 bash -c step_build
run_step "c1 headline" 120 150 bash -c step_headline
run_step "d tests"     150  90 bash -c step_tests
run_step "c3 e2e"      120  60 bash -c step_e2e
run_step "c2 bench"    120  30 bash -c step_bench
run_step "e report"     60   0 bash -c step_report

# ---------------------------------------------------------------------------------------------
# f: the step table, then the summary table last.
# ---------------------------------------------------------------------------------------------
echo
echo "=== steps (total $(( SECONDS - START ))s of ${BUDGET}s budget$([[ "$DRY" == 1 ]] && echo ', DRY RUN on CPU'))"
FAILED=()
for i in "${!STEP_NAMES[@]}"; do
  printf '  %-12s %-28s %4ss\n' "${STEP_NAMES[$i]}" "${STEP_STATUS[$i]}" "${STEP_SECS[$i]}"
  [[ "${STEP_STATUS[$i]}" == ok ]] || FAILED+=("${STEP_NAMES[$i]}")
done
echo "  files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if (( ${#FAILED[@]} )); then
  echo "FAILED STEPS: ${FAILED[*]}"
else
  echo "all steps ok"
fi
echo
echo "=== summary (best tokenforge backend per case; full table in results.md)"
if [[ -s "$TMPD/summary.txt" ]]; then
  cat "$TMPD/summary.txt"
else
  timeout -k 5 15 "$PY" bench/report.py "$(pick "$TMPD/headline")" "$(pick "$TMPD/rest")" --summary-only 2>&1 \
    || echo "(no summary: no benchmark results)"
fi
rm -rf "$TMPD"
(( ${#FAILED[@]} == 0 ))
