"""MoE layer microbenchmarks (pytest-benchmark): a Hugging Face Qwen3-MoE sparse block, forward and
forward+backward, as transformers runs it (its expert loop, its grouped path) and patched by
tokenforge (grouped GEMMs; fp8 experts) (bench/moe_cases.py). Tiny on CPU. Never asserts a speed.

    pytest bench/test_bench_moe.py --benchmark-json=moe.json
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
import moe_cases as mc  # noqa: E402

DEVICE = bw.bench_device()


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # interpreter e5m2 casts
@pytest.mark.parametrize("case,backend", list(harness.bench_params(mc.cases(DEVICE), mc.BACKENDS)))
def test_moe_layer(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op=mc.OP, case=case, backend=backend, device=DEVICE,
                          prepare=mc.prepare, make_record=mc.make_record, baselines=mc.BASELINES)
