"""SwiGLU microbenchmarks (pytest-benchmark): ``y = silu(gate) * up``, forward and forward+backward,
against eager PyTorch, torch.compile and Liger-Kernel's LigerSiLUMulFunction (when importable); and
GPT-OSS's clamped GLU on its interleaved packed gate/up (``test_gpt_oss_glu``), against GPT-OSS's
eager code and torch.compile of it.

    pytest bench/test_bench_swiglu.py --benchmark-json=bench.json
    pytest bench/test_bench_swiglu.py -m headline       # 16384x14336 bf16 fwd+bwd only

Minimum bytes: 3 tensors of rows x n forward, 8 forward+backward (swiglu_cases.swiglu_bytes), reported
as GB/s and as a fraction of the copy bandwidth measured in the same run; the test body is
harness.run_benchmark. CPU runs use a tiny shape and only prove the code runs.
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
OP = "swiglu"


@pytest.mark.parametrize("case,backend", list(harness.bench_params(sc.cases(OP, DEVICE), sc.backends_for(DEVICE))))
def test_swiglu(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op=OP, case=case, backend=backend, device=DEVICE,
                          prepare=sc.prepare, baselines=sc.BASELINES,
                          make_record=lambda prep, stats: sc.make_record(prep, stats, bench_recorder.copy_gbps))


@pytest.mark.parametrize("case,backend", list(harness.bench_params(sc.cases("gpt_oss_glu", DEVICE),
                                                                    [b for b in sc.backends_for(DEVICE) if b != "liger"])))
def test_gpt_oss_glu(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op="gpt_oss_glu", case=case, backend=backend,
                          device=DEVICE, prepare=sc.prepare, baselines=sc.BASELINES,
                          make_record=lambda prep, stats: sc.make_record(prep, stats, bench_recorder.copy_gbps))
