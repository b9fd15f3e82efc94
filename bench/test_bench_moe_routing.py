"""MoE routing microbenchmarks (pytest-benchmark): ``moe_route`` (the router's top-k), ``moe_permute``
and ``moe_unpermute`` (the weighted combine), forward and forward+backward, the Triton kernels against
tokenforge's torch backend eager and under torch.compile (bench/moe_routing_cases.py). Tiny on CPU.
Never asserts a speed.

    pytest bench/test_bench_moe_routing.py --benchmark-json=moe_routing.json
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
import moe_routing_cases as rc  # noqa: E402

DEVICE = bw.bench_device()


@pytest.mark.parametrize("case,backend", [p for op in rc.OPS for p in harness.bench_params(rc.cases(op, DEVICE), rc.BACKENDS)])
def test_moe_routing(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op=case.op, case=case, backend=backend, device=DEVICE,
                          prepare=rc.prepare, baselines=rc.BASELINES,
                          make_record=lambda prep, stats: rc.make_record(prep, stats, bench_recorder.copy_gbps))
