"""RoPE microbenchmarks (pytest-benchmark): forward and forward+backward of q and k together.

    pytest bench/test_bench_rope.py --benchmark-json=bench.json    # all cases
    pytest bench/test_bench_rope.py -m headline                     # fwd+bwd LLaMA-8B bf16 only

Headline: batch 4, seq 4096, 32 q heads, 8 kv heads, head_dim 128, bf16 (tiny shapes on CPU),
against eager PyTorch, torch.compile of the same reference and Liger-Kernel's
``liger_rotary_pos_emb`` when it is installed (skipped as "unavailable" otherwise). Bytes moved:
q, k, cos, sin read once and q_out, k_out written once per pass (rope_cases.rope_bytes); the
figures to quote are ``extra_info["median_ms"]`` and ``extra_info["gbps"]`` (CUDA events, L2
flushed). A wrong result fails the test after its timing is recorded. Benchmarks never assert a
speed.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

import bandwidth as bw  # noqa: E402
import rope_cases as rc  # noqa: E402

DEVICE = bw.bench_device()


def _params():
    for case in rc.cases(DEVICE):
        for backend in rc.backends_for(DEVICE):
            marks = [pytest.mark.headline] if case.headline else []
            yield pytest.param(case, backend, id=f"{case.id}-{backend}", marks=marks)


def _rounds(median_ms: float) -> int:
    lo, hi = (5, 50) if DEVICE.type == "cuda" else (3, 20)
    if not median_ms or median_ms <= 0:
        return lo
    return int(max(lo, min(hi, 50.0 / median_ms)))


@pytest.mark.parametrize("case,backend", list(_params()))
def test_rope(benchmark, bench_recorder, request, case, backend):
    benchmark.group = f"rope {case.id}"
    try:
        prep = rc.prepare(case, backend, DEVICE)
    except rc.BackendUnavailable as exc:
        bench_recorder.skip(request.node.nodeid, str(exc))
        pytest.skip(f"unavailable: {exc}")
    quick = bool(getattr(benchmark, "disabled", False))
    rec = rc.measure(prep, bench_recorder.copy_gbps, {"warmup_ms": 0.0, "rep_ms": 0.0} if quick else None)
    if quick:
        rec["timer"] += " [quick: --benchmark-disable]"
    bench_recorder.record(benchmark, rec, baselines=rc.BASELINES)
    benchmark.pedantic(bw.synchronized(prep.fn, DEVICE), rounds=_rounds(rec["median_ms"]),
                       iterations=1, warmup_rounds=1)
    if not prep.correct:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in prep.rel_err.items())
        pytest.fail(f"{backend} computed a wrong result for {case.id}: relative error {errs} "
                    f"(tolerance {prep.tol:.0e}); its timing is recorded but means nothing")


def test_rope_bytes_formula():
    """The floor counts q, k, cos, sin read once and q_out, k_out written once (bf16 LLaMA-8B)."""
    b, s, hq, hk, d = rc.HEADLINE_SHAPE
    assert rc.rope_bytes(b, s, hq, hk, d, 2) == 2 * b * s * (hq + hk) * d * 2 + 2 * s * d * 2
    fwd = rc.Case("fwd", b, s, hq, hk, d, rc.torch.bfloat16)
    assert rc.Case("fwd_bwd", b, s, hq, hk, d, rc.torch.bfloat16).bytes() == 2 * fwd.bytes()
