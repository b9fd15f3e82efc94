#!/usr/bin/env bash
# bench/gpu_check.sh -- the one script run on the GPU machine (an H200, ~15 minutes a lease).
#
#   bash bench/gpu_check.sh              # on the GPU machine; results in $OUT (default bench/results/latest/)
#   bash bench/gpu_check.sh --dry-run    # on any CPU machine (CI runs it): same steps, same ids, < 5 min
#
# Built around value per second: every step has a time cap, writes what it measured the moment it
# has it, and a failed or cut step never stops the next. Steps (max seconds at the default 520 s
# budget, TOKENFORGE_GPU_CHECK_BUDGET_S; each gets min(max, time left - what later steps reserve)):
#
#   install   offline pip install -e . without the extension (always leaves a working install),
#             then tokenforge._C: the prebuilt one (bench/prebuild_ext.sh -> .prebuilt/, carried),
#             else a build here with every core, else none; peers from .whl/ (bench/fetch_peers.sh);
#             `tokenforge info --json` -> info.json                                           120
#   tests     the explicit CUDA list bench/gpu_tests.txt, no -x          -> tests.xml          150
#   headline  the explicit benchmark list bench/gpu_headlines.txt        -> bench.jsonl        150
#   e2e       train --compare 125m: eager, kernels, compile (each variant written as it ends);
#             1b eager vs kernels if time is left                         -> e2e.json          110
#   rest      the other benchmarks while time is left                     -> bench.jsonl       rest
#   report    results.md + results.png from bench.jsonl, the step table, the summary LAST      20
#
# $OUT holds at most 8 files, flat: log.txt info.json steps.jsonl tests.xml bench.jsonl e2e.json
# results.md results.png. TOKENFORGE_GPU_CHECK_STEPS=tests,headline runs only the steps named.
# steps.jsonl gets one line per step as it ends (ok / FAILED rc / CUT at
# its cap / SKIPPED), so the outcome of every step survives even if the lease ends mid-run.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or nothing)" >&2; exit 2 ;;
  esac
done
[[ "${TOKENFORGE_GPU_CHECK_DRY:-0}" == 1 ]] && DRY=1

OUT="${OUT:-$ROOT/bench/results/latest}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
export OUT ROOT DRY

# The whole run goes to $OUT/log.txt: the script re-runs itself once under tee.
if [[ -z "${_TF_GPU_CHECK_TEED:-}" ]]; then
  export _TF_GPU_CHECK_TEED=1
  rm -f "$OUT"/log.txt "$OUT"/steps.jsonl "$OUT"/bench.jsonl "$OUT"/tests.xml "$OUT"/e2e.json \
        "$OUT"/info.json "$OUT"/results.md "$OUT"/results.png
  bash "${BASH_SOURCE[0]}" "$@" 2>&1 | tee "$OUT/log.txt"
  exit "${PIPESTATUS[0]}"
fi

PY="${PYTHON:-python3}"
[[ "$PY" == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute: steps may cd
export PY
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
unset TOKENFORGE_BACKEND  # never let a forced backend leak into the comparisons
# One process per step, no torch.distributed: the attention tuner may time candidates on a cache
# miss (training's default only reads the cache), into a cache of this run's own.
export TOKENFORGE_AUTOTUNE=on
TMPD="$(mktemp -d "${TMPDIR:-/tmp}/tf_gpu_check.XXXXXX")"
export TMPD
export TOKENFORGE_TUNE_CACHE="$TMPD/attention-tune.json"
# Peers (liger-kernel, torchao) carried as wheels land here; on the path from the start.
export PEERS_DIR="$TMPD/peers"
export PYTHONPATH="$PEERS_DIR${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$DRY" == 1 ]]; then
  BUDGET="${TOKENFORGE_GPU_CHECK_BUDGET_S:-360}"  # caps scale with it: headline ~100 s here
  export TRITON_INTERPRET=1  # the Triton kernels run (interpreted) at the tiny CPU sizes
else
  BUDGET="${TOKENFORGE_GPU_CHECK_BUDGET_S:-520}"
  unset TRITON_INTERPRET  # real kernels on the GPU, never the interpreter
fi
export BUDGET
START=$SECONDS
echo "# tokenforge gpu_check  $(date -u +%Y-%m-%dT%H:%M:%SZ)  host $(hostname)  budget ${BUDGET}s$([[ $DRY == 1 ]] && echo '  DRY RUN')"
echo "# root $ROOT  OUT $OUT  python $PY"
if [[ "$DRY" == 1 ]]; then
  echo "# DRY RUN on the CPU: the same steps and the same test / benchmark ids (collected as the GPU"
  echo "# would), run where they can run here at tiny sizes. No figure from it means anything."
fi

# ids from a list file: one per line, '#' comments and blank lines dropped.
ids_of() { grep -v '^[[:space:]]*#' "$1" | sed 's/[[:space:]]*$//' | grep -v '^$'; }
export -f ids_of

# ---------------------------------------------------------------------------------------------
# run_step NAME MAX RESERVE FUNCTION: MAX and RESERVE are seconds at the default budget (scaled
# with it); the step gets min(MAX, left - RESERVE). It is stopped with SIGINT at its cap (pytest
# then still writes its XML / JSON), SIGKILL 15 s later. Each outcome goes to steps.jsonl at once.
# ---------------------------------------------------------------------------------------------
STEP_LINES=()
FAILED=()
record() {  # record NAME STATUS SECONDS DETAIL
  STEP_LINES+=("$(printf '  %-9s %-26s %4ss  %s' "$1" "$2" "$3" "$4")")
  [[ "$2" == ok ]] || FAILED+=("$1")
  "$PY" -c 'import json, sys; print(json.dumps(dict(zip(("step", "status", "seconds", "detail"), sys.argv[1:]))))' \
    "$1" "$2" "$3" "$4" >>"$OUT/steps.jsonl" 2>/dev/null \
    || echo "{\"step\": \"$1\", \"status\": \"$2\", \"seconds\": \"$3\"}" >>"$OUT/steps.jsonl"
}

run_step() {
  local name=$1 max=$(( $2 * BUDGET / 520 )) reserve=$(( $3 * BUDGET / 520 )) fn=$4
  if [[ -n "${TOKENFORGE_GPU_CHECK_STEPS:-}" && ",$TOKENFORGE_GPU_CHECK_STEPS," != *",$name,"* ]]; then
    return 0  # not selected (TOKENFORGE_GPU_CHECK_STEPS=install,tests,... runs only those)
  fi
  local left=$(( BUDGET - (SECONDS - START) - reserve ))
  local t=$max
  (( left < t )) && t=$left
  if (( t < 5 )); then
    echo; echo "=== [$name] SKIPPED: ${left}s left after reserving ${reserve}s for later steps"
    record "$name" "SKIPPED (no time left)" 0 ""
    return 1
  fi
  echo; echo "=== [$name] start, cap ${t}s (elapsed $(( SECONDS - START ))s of ${BUDGET}s)"
  local t0=$SECONDS rc status
  STEP_DEADLINE=$t timeout -s INT -k 15 "$t" bash -c "$fn" 2>&1 | tee "$TMPD/$name.log"
  rc=${PIPESTATUS[0]}
  local dt=$(( SECONDS - t0 ))
  case $rc in
    0) status="ok" ;;
    124|137|130) status="CUT at its ${t}s cap" ;;
    *) status="FAILED (rc=$rc)" ;;
  esac
  echo "=== [$name] $status in ${dt}s"
  # detail: the step's last line of output (pytest's "N passed, M failed" line, for instance)
  record "$name" "$status" "$dt" "$(grep -v '^[[:space:]]*$' "$TMPD/$name.log" | tail -n 1 | cut -c1-200)"
  return "$rc"
}

# ---------------------------------------------------------------------------------------------
# Steps (run as `bash -c NAME` under timeout, so they are exported functions)
# ---------------------------------------------------------------------------------------------

step_install() {
  local rc=0
  echo "## machine"
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,memory.used,memory.total --format=csv || true
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -n 1 || echo "nvcc: not found"
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available())" || rc=1

  # Peers carried as wheels (bench/fetch_peers.sh): installed offline, never required.
  if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    if [[ "$DRY" == 1 ]]; then
      echo "peers: dry run, not installing: $(cd "$ROOT/.whl" && ls *.whl | tr '\n' ' ')"
    else
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$PEERS_DIR" "$ROOT"/.whl/*.whl \
        && echo "peers: installed $(cd "$ROOT/.whl" && ls *.whl | tr '\n' ' ')" || echo "peers: install FAILED (benchmarks run without them)"
    fi
  else
    echo "peers: none carried (.whl/ empty): liger-kernel / torchao baselines will say 'unavailable'"
  fi

  if [[ "$DRY" == 1 ]]; then
    echo "dry run: not installing (would run: TOKENFORGE_BUILD_EXT=0 pip install --no-build-isolation --no-deps --no-index -e .)"
    "$PY" -c "import tokenforge; print('tokenforge', tokenforge.__version__, 'from', tokenforge.__file__)" || rc=1
  else
    # 1. Always a working install first: the package without the extension (seconds).
    TOKENFORGE_BUILD_EXT=0 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . || rc=1
    # 2. The extension: prebuilt for this Python and sm_90a if carried, else built here.
    local pyabi so
    pyabi="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
    so="$ROOT/.prebuilt/_C$pyabi"
    if [[ -f "$so" ]]; then
      cp "$so" "$ROOT/pysrc/tokenforge/" && cp "$ROOT/.prebuilt/_build_info.json" "$ROOT/pysrc/tokenforge/" 2>/dev/null
      if "$PY" -c "import tokenforge._C" 2>/dev/null; then
        echo "extension: using the prebuilt $(basename "$so") (archs: $("$PY" -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1])).get("cuda_archs", [])))' "$ROOT/.prebuilt/_build_info.json" 2>/dev/null))"
      else
        echo "extension: the prebuilt $(basename "$so") does not load here; building instead"
        "$PY" -c "import tokenforge._C" 2>&1 | tail -n 2
        rm -f "$ROOT/pysrc/tokenforge/_C$pyabi"
        so=""
      fi
    else
      echo "extension: no prebuilt $(basename "$so") in .prebuilt/ (bench/prebuild_ext.sh makes one); building"
      so=""
    fi
    if [[ -z "$so" ]] && command -v nvcc >/dev/null; then
      local t0=$SECONDS
      if TOKENFORGE_CUDA_ARCHS=90a TOKENFORGE_BUILD_EXT=1 MAX_JOBS="$(nproc)" \
          "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .; then
        echo "extension: built for sm_90a in $(( SECONDS - t0 ))s"
      else
        echo "extension: build FAILED after $(( SECONDS - t0 ))s; reinstalling without it"
        TOKENFORGE_BUILD_EXT=0 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . || true
        rc=1
      fi
    fi
  fi
  "$PY" -m tokenforge info || rc=1
  "$PY" -m tokenforge info --json >"$OUT/info.json" || rc=1
  [[ -s "$OUT/info.json" ]] || rm -f "$OUT/info.json"
  return $rc
}

count_collected() {  # pytest --co output: "path::id" lines (-q) or "path: N" lines (-qq)
  awk '/::/ {n++; next} /: [0-9]+$/ {n += $NF} END {print n + 0}' "$1"
}

step_tests() {
  mapfile -t ids < <(ids_of "$ROOT/bench/gpu_tests.txt")
  echo "${#ids[@]} ids from bench/gpu_tests.txt"
  if [[ "$DRY" == 1 ]]; then
    # Every id must exist (pytest exits 4 on one that does not); then the CPU-runnable ones run.
    "$PY" -m pytest -qq -p no:cacheprovider --co "${ids[@]}" >"$TMPD/tests.co" || { tail -n 20 "$TMPD/tests.co"; return 1; }
    echo "collected: $(count_collected "$TMPD/tests.co") test cases, every id exists"
    # The same command line as on the GPU; here the CUDA cases skip ("no CUDA GPU"), which proves
    # the invocation, not the kernels (CI's interpreter cases do that).
    "$PY" -m pytest -q -p no:cacheprovider -rfE --junitxml="$OUT/tests.xml" "${ids[@]}"
    return $?
  fi
  env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=10 \
    --junitxml="$OUT/tests.xml" "${ids[@]}"
}

bench_ids() {  # bench_ids LISTFILE JSONL [extra pytest args...]
  local list=$1 jsonl=$2
  shift 2
  mapfile -t ids < <(ids_of "$list")
  TOKENFORGE_BENCH_JSONL="$jsonl" "$PY" -m pytest -q -p no:cacheprovider -rfEs \
    --benchmark-columns=median,rounds --benchmark-sort=name "$@" "${ids[@]}"
}
export -f bench_ids

step_headline() {
  if [[ "$DRY" == 1 ]]; then
    mapfile -t ids < <(ids_of "$ROOT/bench/gpu_headlines.txt")
    TOKENFORGE_BENCH_DEVICE=cuda "$PY" -m pytest -qq -p no:cacheprovider --co "${ids[@]}" >"$TMPD/headline.co" \
      || { tail -n 20 "$TMPD/headline.co"; return 1; }
    echo "collected: $(count_collected "$TMPD/headline.co") GPU benchmark ids, every id exists"
    # Here: the same benchmarks at tiny sizes on the CPU (headline cases of each op), on two
    # workers as `make test` runs them (the interpreter is one thread; one process ran out of the
    # step's cap on a 2-core machine).
    TOKENFORGE_BENCH_JSONL="$OUT/bench.jsonl" "$PY" -m pytest -q -p no:cacheprovider -rfEs bench -m headline \
      --benchmark-disable -k "not compile" -n 2 --dist worksteal
    return $?
  fi
  bench_ids "$ROOT/bench/gpu_headlines.txt" "$OUT/bench.jsonl"
}

step_e2e() {
  local left=$STEP_DEADLINE
  if [[ "$DRY" == 1 ]]; then
    # Without the interpreter, as `make demo` runs: on CPU tensors the kernels variant takes the
    # torch references (the interpreted kernels are covered by the suite and the headline step).
    env -u TRITON_INTERPRET E2E_FIRST="tiny:128:8" E2E_STEPS=4 E2E_VARIANTS=eager,kernels E2E_SECOND="" OUT="$OUT" \
      bash "$ROOT/bench/e2e_train.sh"
    return $?
  fi
  E2E_DEADLINE_S="$left" OUT="$OUT" bash "$ROOT/bench/e2e_train.sh"
}

step_rest() {
  if [[ "$DRY" == 1 ]]; then
    echo "dry run: the rest of bench/ is what \`make test\` runs (pytest bench --benchmark-disable); not repeated"
    return 0
  fi
  # Every benchmark not already in the headline list, GPU sizes, until the cap.
  mapfile -t head < <(ids_of "$ROOT/bench/gpu_headlines.txt")
  printf '%s\n' "${head[@]}" >"$TMPD/head.ids"
  "$PY" -m pytest -qq -p no:cacheprovider --co bench | grep '::' | grep -vxF -f "$TMPD/head.ids" >"$TMPD/rest.ids"
  echo "$(wc -l <"$TMPD/rest.ids") more benchmark cases, in file order, until the cap"
  bench_ids "$TMPD/rest.ids" "$OUT/bench.jsonl"
}

step_report() {
  "$PY" "$ROOT/bench/report.py" "$OUT/bench.jsonl" --out-dir "$OUT" --summary-out "$TMPD/summary.txt" --no-json
}

export -f count_collected step_install step_tests step_headline step_e2e step_rest step_report

#        name      max reserve
run_step install   120  330 step_install
run_step tests     150  240 step_tests
run_step headline  150  110 step_headline
run_step e2e       110   25 step_e2e
run_step rest      300   25 step_rest
run_step report     25    0 step_report

echo
echo "=== steps (total $(( SECONDS - START ))s of ${BUDGET}s$([[ "$DRY" == 1 ]] && echo ', DRY RUN on the CPU'))"
printf '%s\n' "${STEP_LINES[@]}"
echo "  files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if (( ${#FAILED[@]} )); then echo "NOT OK: ${FAILED[*]}"; else echo "all steps ok"; fi
echo
echo "=== summary (full table in results.md; raw records in bench.jsonl)"
if [[ -s "$TMPD/summary.txt" ]]; then
  cat "$TMPD/summary.txt"
else
  timeout -k 5 15 "$PY" "$ROOT/bench/report.py" "$OUT/bench.jsonl" --summary-only 2>&1 || echo "(no summary: no benchmark records)"
fi
if [[ -s "$OUT/e2e.json" ]]; then
  "$PY" - "$OUT/e2e.json" <<'EOF' || true
import json, sys
d = json.load(open(sys.argv[1]))
for run in [d] + d.get("others", []):
    print(f"e2e {run.get('preset')} seq {run.get('seq_len')} ({'complete' if run.get('complete', True) else 'cut short'}):")
    for r in run.get("rows", []):
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        print(f"  {r['variant']:<10} {r['tokens_per_s']:>12,.0f} tok/s  MFU {mfu:>6}  vs eager {sp}")
EOF
fi
rm -rf "$TMPD"
(( ${#FAILED[@]} == 0 ))
