"""AdamW step microbenchmarks: params/s, achieved bandwidth and bytes/param for a LLaMA-1B-like
parameter list (and a 10M one), tokenforge's modes vs torch.optim.AdamW foreach=True and
fused=True measured in the same run (see bench/adamw_cases.py). Tiny lists on CPU (meaningless
timings; they prove the code runs). Never asserts a speed.

    pytest bench/test_bench_adamw.py --benchmark-json=adamw.json
"""

from __future__ import annotations

import gc
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402
import torch  # noqa: E402

import adamw_cases as ac  # noqa: E402
import bandwidth as bw  # noqa: E402

DEVICE = bw.bench_device()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.headline] if c.headline else [])
                                  for c in ac.cases(DEVICE)])
def test_adamw_step(benchmark, bench_recorder, request, case):
    benchmark.group = f"adamw {case.model}"
    try:
        prep = ac.prepare(case, DEVICE)
    except ac.BackendUnavailable as exc:
        bench_recorder.skip(request.node.nodeid, str(exc))
        pytest.skip(f"unavailable: {exc}")
    quick = bool(getattr(benchmark, "disabled", False))
    rec = ac.measure(prep, bench_recorder.copy_gbps, bw.QUICK_TIMER if quick else None)
    if quick:
        rec["timer"] += " [quick: --benchmark-disable]"
    bench_recorder.record(benchmark, rec, baselines=ac.BASELINES)
    benchmark.pedantic(bw.synchronized(prep.fn, DEVICE), rounds=3, iterations=1, warmup_rounds=0)
    correct, rel, tol = prep.correct, prep.rel_err, prep.tol
    del prep
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    if not correct:
        pytest.fail(f"{case.mode} computed a wrong step for {case.model}: relative error {rel:.2e} > {tol:.0e}")
