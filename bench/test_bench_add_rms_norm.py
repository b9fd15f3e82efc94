"""add_rms_norm microbenchmarks (pytest-benchmark): forward and forward+backward against eager PyTorch,
torch.compile.

    pytest bench/test_bench_add_rms_norm.py --benchmark-json=bench.json
    pytest bench/test_bench_add_rms_norm.py -m headline       # 16384x4096 bf16 fwd+bwd only

Bytes are the minimum traffic (bench/swiglu_cases.py), reported as GB/s and as a fraction of the
copy bandwidth measured in the same run. CPU runs use a tiny shape and only prove the code runs.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

import bandwidth as bw  # noqa: E402
import swiglu_cases as sc  # noqa: E402

DEVICE = bw.bench_device()
OP = "add_rms_norm"


def _params():
    for case in sc.cases(OP, DEVICE):
        for backend in sc.backends_for(DEVICE):
            marks = [pytest.mark.headline] if case.headline else []
            yield pytest.param(case, backend, id=f"{case.id}-{backend}", marks=marks)


@pytest.mark.parametrize("case,backend", list(_params()))
def test_add_rms_norm(benchmark, bench_recorder, request, case, backend):
    sc.run_benchmark(benchmark, bench_recorder, request, case, backend, DEVICE)
