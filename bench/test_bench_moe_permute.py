"""MoE token permutation microbenchmarks (pytest-benchmark): ``moe_permute`` and ``moe_unpermute``
(the weighted combine), forward and forward+backward, the Triton kernels against tokenforge's torch
backend eager and under torch.compile (bench/moe_permute_cases.py). Tiny on CPU. Never asserts a speed.

    pytest bench/test_bench_moe_permute.py --benchmark-json=moe_permute.json
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

import bandwidth as bw  # noqa: E402
import harness  # noqa: E402
import moe_permute_cases as pc  # noqa: E402

DEVICE = bw.bench_device()


@pytest.mark.parametrize("case,backend", [p for op in pc.OPS for p in harness.bench_params(pc.cases(op, DEVICE), pc.BACKENDS)])
def test_moe_permute(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op=case.op, case=case, backend=backend, device=DEVICE,
                          prepare=pc.prepare, baselines=pc.BASELINES,
                          make_record=lambda prep, stats: pc.make_record(prep, stats, bench_recorder.copy_gbps))
