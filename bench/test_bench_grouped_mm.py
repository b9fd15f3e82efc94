"""Grouped-GEMM microbenchmarks (pytest-benchmark): tokenforge's Triton MoE grouped GEMM vs the
per-expert loop and torch._grouped_mm, forward and forward+backward, on Mixtral- and
DeepSeek-V3-shaped expert loads (bench/grouped_mm_cases.py). Tiny on CPU. Never asserts a speed.

    pytest bench/test_bench_grouped_mm.py --benchmark-json=grouped_mm.json
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

import bandwidth as bw  # noqa: E402
import grouped_mm_cases as gc  # noqa: E402
import harness  # noqa: E402

DEVICE = bw.bench_device()


@pytest.mark.parametrize("case,backend", list(harness.bench_params(gc.cases(DEVICE), gc.BACKENDS)))
def test_grouped_mm(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op=gc.OP, case=case, backend=backend, device=DEVICE,
                          prepare=gc.prepare, make_record=gc.make_record, baselines=gc.BASELINES)
