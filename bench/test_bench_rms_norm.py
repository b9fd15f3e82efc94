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
import rms_norm_cases as rc  # noqa: E402

DEVICE = bw.bench_device()


def _params():
    for case in rc.cases(DEVICE):
        for backend in rc.backends_for(DEVICE):
            marks = [pytest.mark.headline] if case.headline else []
            yield pytest.param(case, backend, id=f"{case.id}-{backend}", marks=marks)


def _rounds(median_ms: float) -> int:
    """Rounds of pytest-benchmark's wall-clock timer: about 50 ms worth, 5..50 (3..20 on CPU)."""
    lo, hi = (5, 50) if DEVICE.type == "cuda" else (3, 20)
    if not median_ms or median_ms <= 0:
        return lo
    return int(max(lo, min(hi, 50.0 / median_ms)))


@pytest.mark.parametrize("case,backend", list(_params()))
def test_rms_norm(benchmark, bench_recorder, request, case, backend):
    benchmark.group = f"rms_norm {case.id}"
    try:
        prep = rc.prepare(case, backend, DEVICE)
    except rc.BackendUnavailable as exc:
        bench_recorder.skip(request.node.nodeid, str(exc))
        pytest.skip(f"unavailable: {exc}")
    # Under --benchmark-disable (`make test`) the benchmarks only have to run: a quick timing.
    quick = bool(getattr(benchmark, "disabled", False))
    rec = rc.measure(prep, bench_recorder.copy_gbps, {"warmup_ms": 0.0, "rep_ms": 0.0} if quick else None)
    if quick:
        rec["timer"] += " [quick: --benchmark-disable]"
    bench_recorder.record(benchmark, rec)
    benchmark.pedantic(bw.synchronized(prep.fn, DEVICE), rounds=_rounds(rec["median_ms"]),
                       iterations=1, warmup_rounds=1)
    if not prep.correct:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in prep.rel_err.items())
        pytest.fail(f"{backend} computed a wrong result for {case.id}: relative error {errs} "
                    f"(tolerance {prep.tol:.0e}); its timing is recorded but means nothing")


if __name__ == "__main__":
    import rms_norm_demo

    raise SystemExit(rms_norm_demo.main())
