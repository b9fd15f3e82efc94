"""Attention microbenchmarks (pytest-benchmark): forward and forward+backward vs SDPA's flash,
efficient and cuDNN backends and flash_attn (when installed), bf16, seqlen 1k-16k, head_dim 64/128,
causal and not. Records TFLOP/s (flash_attn convention), the fraction of a bf16 matmul measured in
the same run, peak memory, and speedups over the baselines. Tiny on CPU (proves the code runs).

    pytest bench/test_bench_attention.py --benchmark-json=bench.json
    pytest bench/test_bench_attention.py -m headline      # fwd bf16 d128 causal 16k only
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

import attention_cases as ac  # noqa: E402
import bandwidth as bw  # noqa: E402

DEVICE = bw.bench_device()


def _params():
    for case in ac.cases(DEVICE):
        for backend in ac.backends_for(DEVICE):
            marks = [pytest.mark.headline] if case.headline else []
            yield pytest.param(case, backend, id=f"{case.id}-{backend}", marks=marks)


@pytest.mark.parametrize("case,backend", list(_params()))
def test_attention(benchmark, bench_recorder, request, case, backend):
    benchmark.group = f"attention {case.id}"
    try:
        prep = ac.prepare(case, backend, DEVICE)
    except ac.BackendUnavailable as exc:
        bench_recorder.skip(request.node.nodeid, str(exc))
        pytest.skip(f"unavailable: {exc}")
    quick = bool(getattr(benchmark, "disabled", False))
    stats = bw.time_fn(prep.fn, DEVICE, **({"warmup_ms": 0.0, "rep_ms": 0.0} if quick else {}))
    rec = ac.make_record(prep, stats, ac.matmul_tflops(DEVICE))
    if quick:
        rec["timer"] += " [quick: --benchmark-disable]"
    bench_recorder.record(benchmark, rec, baselines=ac.BASELINES)
    rounds = 3 if DEVICE.type != "cuda" else int(max(3, min(20, 200.0 / max(rec["median_ms"], 1e-3))))
    benchmark.pedantic(bw.synchronized(prep.fn, DEVICE), rounds=rounds, iterations=1, warmup_rounds=1)
    if not prep.correct:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in prep.rel_err.items())
        pytest.fail(f"{backend} computed a wrong result for {case.id}: {errs} (tolerance {prep.tol:.0e})")
