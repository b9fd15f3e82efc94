#!/usr/bin/env bash
# bench/peers/run_peer_tests.sh -- run a peer library's own test suite against tokenforge's ops.
#
#   bash bench/peers/run_peer_tests.sh liger      LIGER_CHECKOUT      [pytest args...]
#   bash bench/peers/run_peer_tests.sh flash_attn FLASH_ATTN_CHECKOUT [pytest args...]
#
# CHECKOUT is a source checkout of Liger-Kernel or flash-attention (bench/fetch_peers.sh --sources
# puts both under .peers/). Their tests run unchanged, with their references and tolerances; only
# the functions under test are tokenforge's:
#   liger:      liger_shim.py replaces liger_kernel.ops.Liger*Function (rms_norm, fused add+rms_norm,
#               rope, swiglu, geglu, cross_entropy, fused linear cross_entropy, fused MoE).
#   flash_attn: flash_attn_shim/ is a `flash_attn` package whose functions are tokenforge.ops.attention*;
#               the checkout's bert_padding.py is copied beside it. The suite is huge: PEER_SAMPLE=N
#               (default 200; 0 = all) runs a random N cases, PEER_SEED picks which; PEER_SAMPLE_PER_TEST=N
#               instead keeps N random cases of every test function; PEER_MAX_SEQLEN=L
#               drops cases longer than L tokens first (default 256 without a GPU, else no limit).
# Without a GPU, Triton runs under its interpreter (slow: minutes per hundred small cases) and
# flash_attn's test file is copied with its device "cuda" rewritten to "cpu".
# Options tokenforge does not have are reported as skips "not in tokenforge's API".
# PEER_BASELINE=1 (liger): the same tests with Liger's own kernels, into liger-baseline.{xml,log};
# then `python bench/peers/compare_junit.py liger.xml liger-baseline.xml` lists what fails only with ours.
# Results: a JUnit XML and the pytest log in PEER_OUT (default bench/results/latest/peers/).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
die() { echo "run_peer_tests: $*" >&2; exit 2; }
[ $# -ge 2 ] || die "usage: run_peer_tests.sh liger|flash_attn CHECKOUT [pytest args...]"
PEER="$1"; CHECKOUT="$(cd "$2" 2>/dev/null && pwd)" || die "no such checkout: $2"; shift 2
PY="${PYTHON:-python}"
OUT_DIR="${PEER_OUT:-$ROOT/bench/results/latest/peers}"
mkdir -p "$OUT_DIR"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
  GPU=0
else
  GPU=1
fi
export PYTHONPATH="$ROOT/pysrc${PYTHONPATH:+:$PYTHONPATH}"

case "$PEER" in
  liger)
    [ -d "$CHECKOUT/test/transformers" ] && [ -d "$CHECKOUT/src/liger_kernel" ] \
      || die "$CHECKOUT is not a Liger-Kernel checkout (needs src/liger_kernel and test/transformers)"
    tests=()
    for name in rms_norm fused_add_rms_norm rope swiglu geglu cross_entropy fused_linear_cross_entropy fused_moe; do
      [ -f "$CHECKOUT/test/transformers/test_$name.py" ] && tests+=("test/transformers/test_$name.py")
    done
    [ $# -gt 0 ] && tests=()  # explicit pytest args choose the tests
    # Liger's own pytest settings, never ours (a checkout under this repo would find our pyproject).
    config=(-c "$CHECKOUT/pyproject.toml")
    if [ ! -f "$CHECKOUT/pyproject.toml" ]; then : >"$OUT_DIR/empty.ini"; config=(-c "$OUT_DIR/empty.ini"); fi
    plugins=(-p liger_on_cpu -p liger_shim) name=liger
    if [ "${PEER_BASELINE:-0}" = 1 ]; then plugins=(-p liger_on_cpu) name=liger-baseline; fi
    cd "$CHECKOUT"
    PYTHONPATH="$CHECKOUT/src:$CHECKOUT:$HERE:$PYTHONPATH" "$PY" -m pytest "${plugins[@]}" -p no:cacheprovider -q -rfs \
      "${config[@]}" --rootdir="$CHECKOUT" \
      --junitxml="$OUT_DIR/$name.xml" "${tests[@]}" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    ;;
  flash_attn)
    [ -f "$CHECKOUT/tests/test_flash_attn.py" ] && [ -f "$CHECKOUT/flash_attn/bert_padding.py" ] \
      || die "$CHECKOUT is not a flash-attention checkout (needs tests/test_flash_attn.py and flash_attn/bert_padding.py)"
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    cp -r "$HERE/flash_attn_shim/flash_attn" "$WORK/flash_attn"
    cp "$CHECKOUT/flash_attn/bert_padding.py" "$WORK/flash_attn/bert_padding.py"
    cp "$HERE/conftest_flash_attn.py" "$WORK/conftest.py"
    : >"$WORK/pytest.ini"  # the rootdir's settings: pytest's defaults
    if [ "$GPU" = 1 ]; then
      cp "$CHECKOUT/tests/test_flash_attn.py" "$WORK/test_flash_attn.py"
    else
      sed -e 's/device *= *"cuda"/device = "cpu"/' -e "s/device *= *'cuda'/device = 'cpu'/" \
        "$CHECKOUT/tests/test_flash_attn.py" > "$WORK/test_flash_attn.py"
    fi
    export PEER_SAMPLE="${PEER_SAMPLE:-200}"
    [ "$GPU" = 1 ] || export PEER_MAX_SEQLEN="${PEER_MAX_SEQLEN:-256}"
    select=()
    # race_condition / deterministic: 250 / 50 repeats of one case, looking for GPU races and
    # nondeterminism the interpreter cannot have; under it, an hour or more each
    [ "$GPU" = 1 ] || select=(-k "not race_condition and not deterministic")
    [ $# -gt 0 ] && select=()
    files=(test_flash_attn.py)  # node ids (test_flash_attn.py::...) among the args name the cases instead
    for arg in "$@"; do [[ "$arg" == test_flash_attn.py::* ]] && files=(); done
    cd "$WORK"
    PYTHONPATH="$WORK:$HERE:$PYTHONPATH" "$PY" -m pytest -p no:cacheprovider -q -rfs -c "$WORK/pytest.ini" --rootdir="$WORK" \
      --junitxml="$OUT_DIR/flash_attn.xml" "${files[@]}" "${select[@]}" "$@" 2>&1 | tee "$OUT_DIR/flash_attn.log"
    ;;
  *) die "unknown peer '$PEER' (liger or flash_attn)" ;;
esac
