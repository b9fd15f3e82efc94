"""RMSNorm microbenchmarks (pytest-benchmark): forward and forward+backward, every backend.

    pytest bench/test_bench_rms_norm.py --benchmark-json=bench.json     # all cases
    pytest bench -m headline                                            # fwd+bwd 16384x4096 bf16 only
    python bench/test_bench_rms_norm.py                                 # plain-script table (the demo)

Each test: fresh random inputs; one call (compiles, loads) checked against a float64 reference;
then the median time from bandwidth.time_fn (CUDA events, L2 flushed before each call, after
warm-up; perf_counter on CPU), stored with bytes, GB/s, fraction of the copy bandwidth and
speedups over the baselines in ``benchmark.extra_info``. pytest-benchmark's own statistics are
wall-clock times of the call followed by a device synchronize (``benchmark.pedantic``); the GPU
figures to quote are ``extra_info["median_ms"]`` and ``extra_info["gbps"]``.

A backend that cannot run here (no extension built, no GPU, no interpreter) is skipped with
"unavailable: <reason>". A wrong result fails the test after its timing is recorded (so the report
can show it, flagged). Benchmarks never assert a speed.
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
import rms_norm_cases as rc  # noqa: E402

DEVICE = bw.bench_device()


@pytest.mark.parametrize("case,backend", list(harness.bench_params(rc.cases(DEVICE), rc.backends_for(DEVICE))))
def test_rms_norm(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op=rc.OP, case=case, backend=backend, device=DEVICE,
                          prepare=rc.prepare, baselines=rc.BASELINES,
                          make_record=lambda prep, stats: rc.make_record(prep, stats, bench_recorder.copy_gbps))


if __name__ == "__main__":
    import rms_norm_demo

    raise SystemExit(rms_norm_demo.main())
