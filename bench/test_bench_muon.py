"""Muon microbenchmarks (pytest-benchmark): Newton-Schulz (5 steps, bf16) of tokenforge's Triton
kernels and torch reference vs torch.optim.Muon's iteration, and a whole Muon step vs
torch.optim.Muon, on a 4096^2 matrix and the 125m / 1b presets' hidden matrices (see
bench/muon_cases.py for the FLOP conventions). Tiny on CPU. Never asserts a speed.

    pytest bench/test_bench_muon.py --benchmark-json=muon.json
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
import muon_cases as mc  # noqa: E402

DEVICE = bw.bench_device()


@pytest.mark.parametrize("case,backend", list(harness.bench_params(mc.cases(DEVICE), mc.BACKENDS)))
def test_newton_schulz(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op=mc.OP, case=case, backend=backend, device=DEVICE,
                          prepare=mc.prepare, make_record=mc.make_record, baselines=mc.BASELINES)


@pytest.mark.parametrize("case,backend", list(harness.bench_params(mc.step_cases(DEVICE), mc.STEP_BACKENDS)))
def test_muon_step(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op="muon_step", case=case, backend=backend,
                          device=DEVICE, prepare=mc.prepare_step, baselines=mc.BASELINES,
                          make_record=lambda prep, stats: harness.make_record(prep, stats, op="muon_step"))
