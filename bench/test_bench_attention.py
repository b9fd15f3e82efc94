"""Attention microbenchmarks (pytest-benchmark): forward and forward+backward vs SDPA's flash,
efficient and cuDNN backends and flash_attn (when installed), bf16, seqlen 1k-16k, head_dim 64/128,
causal and not, and one attention-dropout case (0.1; each library draws its own mask, so only
tokenforge's result is checked, against the reference with its mask). Records TFLOP/s (flash_attn convention), the fraction of a bf16 matmul measured in
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
import harness  # noqa: E402

DEVICE = bw.bench_device()


def _rounds(median_ms: float) -> int:
    """Attention calls are long on the GPU: about 200 ms of pytest-benchmark rounds, 3..20; 3 on CPU."""
    return harness.rounds_for(median_ms, DEVICE, target_ms=200.0, gpu_range=(3, 20), cpu_range=(3, 3))


@pytest.mark.parametrize("case,backend", list(harness.bench_params(ac.cases(DEVICE), ac.backends_for(DEVICE))))
def test_attention(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op=ac.OP, case=case, backend=backend, device=DEVICE,
                          prepare=ac.prepare, baselines=ac.BASELINES, rounds=_rounds,
                          make_record=lambda prep, stats: ac.make_record(prep, stats, bw.matmul_tflops(DEVICE)))
