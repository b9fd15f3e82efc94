#!/usr/bin/env bash
# bench/e2e_train.sh -- the end-to-end benchmark: `tokenforge train --compare` (kernels off, torch.compile,
# kernels on, fp8 where supported) on the embedded stdlib corpus, then the cost table from the
# measured MFUs.
#
#   bash bench/e2e_train.sh                           # GPU: 125m @ seq 2048, then 1b @ seq 4096
#   OUT=dir E2E_PRESETS="125m:2048:8" bash bench/e2e_train.sh
#   E2E_STEPS=20 E2E_VARIANTS=eager,kernels bash bench/e2e_train.sh
#
# E2E_PRESETS is a space-separated list of PRESET:SEQ_LEN:BATCH. Without a GPU it runs the tiny
# preset briefly (plumbing only: no MFU, figures meaningless). Writes ONE file, $OUT/e2e.json: the
# compare JSON of the last preset run (what `tokenforge cost --from-results` reads) with the other
# presets' compare JSONs under "others"; the tables and the cost table go to stdout.
# Figures are recorded, never asserted (goals in issue 8: 1b bf16 seq 4096 MFU >= 55% kernels on,
# >= 1.4x eager and >= 1.15x torch.compile tokens/s; fp8 >= 1.7x eager).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PY:-${PYTHON:-python3}}"
OUT="${OUT:-$ROOT/bench/results/latest}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tf_e2e.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

EXTRA=()
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PRESETS="${E2E_PRESETS:-125m:2048:8 1b:4096:4}"
  STEPS="${E2E_STEPS:-15}"
  WARM="${E2E_TIMING_WARMUP:-5}"
  unset TRITON_INTERPRET
else
  echo "# e2e: no GPU: tiny preset on CPU, plumbing only (eager and kernels; compile takes ~1 min on CPU)"
  PRESETS="${E2E_PRESETS:-tiny:128:8}"
  STEPS="${E2E_STEPS:-6}"
  WARM="${E2E_TIMING_WARMUP:-2}"
  E2E_VARIANTS="${E2E_VARIANTS:-eager,kernels}"
fi
[[ -n "${E2E_VARIANTS:-}" ]] && EXTRA=(--variants "$E2E_VARIANTS")

rc=0
runs=()
for spec in $PRESETS; do
  IFS=: read -r preset seq batch <<<"$spec"
  echo
  echo "=== e2e: $preset preset, seq $seq, batch $batch, $STEPS steps per variant (first $WARM untimed)"
  if "$PY" -m tokenforge.train --compare --preset "$preset" --seq-len "$seq" --batch-size "$batch" \
      --max-steps "$STEPS" --timing-warmup "$WARM" --eval-every 0 --eval-iters 1 --progress plain \
      --log-every 5 --json "$WORK/e2e_${preset}_${seq}.json" "${EXTRA[@]+"${EXTRA[@]}"}"; then
    runs+=("$WORK/e2e_${preset}_${seq}.json")
  else
    rc=1
    echo "e2e: $preset FAILED"
  fi
done

if (( ${#runs[@]} )); then
  "$PY" -c '
import json, sys
*others, last, out = sys.argv[1:]
merged = json.load(open(last))
merged["others"] = [json.load(open(p)) for p in others]
json.dump(merged, open(out, "w"), indent=2)
print("wrote", out)
' "${runs[@]}" "$OUT/e2e.json" || rc=1
  echo
  echo "=== cost: seed table from the measured MFUs in $OUT/e2e.json"
  "$PY" -m tokenforge.cost --seed-table --from-results "$OUT/e2e.json" || rc=1
fi
exit $rc
