"""Residual add + RMSNorm microbenchmarks (pytest-benchmark): ``y, h = add_rms_norm(x, residual, w)``,
forward and forward+backward, tokenforge's triton/torch backends against eager PyTorch and torch.compile
of ``add_rms_norm_reference`` (Liger-Kernel is compared for SwiGLU only, so ``liger`` skips here).

    pytest bench/test_bench_add_rms_norm.py --benchmark-json=bench.json
    pytest bench/test_bench_add_rms_norm.py -m headline       # 16384x4096 bf16 fwd+bwd only

Minimum bytes: read x, residual, w, write y, h and the fp32 rstd (swiglu_cases.add_rms_norm_bytes,
shared with SwiGLU's file); the test body is harness.run_benchmark. CPU shapes only prove the code runs.
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
import swiglu_cases as sc  # noqa: E402

DEVICE = bw.bench_device()
OP = "add_rms_norm"


@pytest.mark.parametrize("case,backend", list(harness.bench_params(sc.cases(OP, DEVICE), sc.backends_for(DEVICE))))
def test_add_rms_norm(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op=OP, case=case, backend=backend, device=DEVICE,
                          prepare=sc.prepare, baselines=sc.BASELINES,
                          make_record=lambda prep, stats: sc.make_record(prep, stats, bench_recorder.copy_gbps))
