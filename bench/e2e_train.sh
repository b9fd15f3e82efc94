#!/usr/bin/env bash
# bench/e2e_train.sh -- the end-to-end benchmark: `tokenforge train --compare` on the embedded
# stdlib corpus, then the cost table from the measured MFUs. Step "e2e" of bench/gpu_check.sh.
#
#   bash bench/e2e_train.sh                       # GPU: 125m @ 2048 (eager, kernels, compile, kernels+muon), then 1b if time is left
#   OUT=dir E2E_FIRST=125m:2048:8 E2E_SECOND=1b:4096:4 E2E_DEADLINE_S=110 bash bench/e2e_train.sh
#
# PRESET:SEQ_LEN:BATCH specs. The first preset's compare JSON is $OUT/e2e.json, written by train
# itself after EACH variant (so a run cut mid-way keeps the variants that finished; "complete"
# says whether all did). The second preset (E2E_SECOND, eager vs kernels) runs only if at least
# E2E_SECOND_MIN_S (default 70) of E2E_DEADLINE_S are left, and lands in e2e.json's "others".
# Without a GPU: the tiny preset, a few steps, plumbing only (figures meaningless).
# Figures are recorded, never asserted.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PY:-${PYTHON:-python3}}"
OUT="${OUT:-$ROOT/bench/results/latest}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tf_e2e.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
T0=$SECONDS
DEADLINE="${E2E_DEADLINE_S:-100000}"

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  FIRST="${E2E_FIRST:-125m:2048:8}"
  SECOND="${E2E_SECOND-1b:4096:4}"
  STEPS="${E2E_STEPS:-15}"
  WARM="${E2E_TIMING_WARMUP:-5}"
  VARIANTS="${E2E_VARIANTS:-eager,kernels,compile,kernels+muon}"
  unset TRITON_INTERPRET
else
  echo "# e2e: no GPU: tiny preset on the CPU, plumbing only"
  FIRST="${E2E_FIRST:-tiny:128:8}"
  SECOND="${E2E_SECOND-}"
  STEPS="${E2E_STEPS:-4}"
  WARM="${E2E_TIMING_WARMUP:-2}"
  VARIANTS="${E2E_VARIANTS:-eager,kernels}"
fi

compare() {  # compare SPEC VARIANTS JSON
  local preset seq batch
  IFS=: read -r preset seq batch <<<"$1"
  echo
  echo "=== e2e: $preset preset, seq $seq, batch $batch, $STEPS steps per variant (first $WARM untimed): $2"
  "$PY" -m tokenforge.train --compare --preset "$preset" --seq-len "$seq" --batch-size "$batch" \
    --max-steps "$STEPS" --timing-warmup "$WARM" --eval-every 0 --eval-iters 1 --progress plain \
    --log-every 5 --variants "$2" --json "$3"
}

rc=0
compare "$FIRST" "$VARIANTS" "$OUT/e2e.json" || { rc=1; echo "e2e: ${FIRST%%:*} FAILED"; }

left=$(( DEADLINE - (SECONDS - T0) ))
if [[ -n "$SECOND" && -s "$OUT/e2e.json" ]]; then
  if (( left >= ${E2E_SECOND_MIN_S:-70} )); then
    if compare "$SECOND" "eager,kernels" "$WORK/second.json"; then
      "$PY" -c '
import json, sys
first, second = sys.argv[1:]
d = json.load(open(first))
d.setdefault("others", []).append(json.load(open(second)))
json.dump(d, open(first + ".tmp", "w"), indent=2)
' "$OUT/e2e.json" "$WORK/second.json" && mv "$OUT/e2e.json.tmp" "$OUT/e2e.json" || rc=1
    else
      rc=1; echo "e2e: ${SECOND%%:*} FAILED"
    fi
  else
    echo "e2e: ${SECOND%%:*} not run: ${left}s left of the ${DEADLINE}s cap (needs ${E2E_SECOND_MIN_S:-70}s)"
  fi
fi

if [[ -s "$OUT/e2e.json" ]]; then
  echo
  echo "=== cost: seed table from the measured MFUs in $OUT/e2e.json"
  "$PY" -m tokenforge.cost --seed-table --from-results "$OUT/e2e.json" || rc=1
fi
exit $rc
