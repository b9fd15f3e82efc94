"""RoPE microbenchmarks (pytest-benchmark): forward and forward+backward of q and k together.

    pytest bench/test_bench_rope.py --benchmark-json=bench.json    # all cases
    pytest bench/test_bench_rope.py -m headline                     # fwd+bwd LLaMA-8B bf16 only

Headline: batch 4, seq 4096, 32 q heads, 8 kv heads, head_dim 128, bf16 (tiny shapes on CPU),
against eager PyTorch, torch.compile of the same reference and Liger-Kernel's
``liger_rotary_pos_emb`` when it is installed (skipped as "unavailable" otherwise). Bytes moved:
q, k, cos, sin read once and q_out, k_out written once per pass (rope_cases.rope_bytes); the
figures to quote are ``extra_info["median_ms"]`` and ``extra_info["gbps"]`` (CUDA events, L2
flushed). A wrong result fails the test after its timing is recorded. Benchmarks never assert a
speed.
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
import rope_cases as rc  # noqa: E402

DEVICE = bw.bench_device()


@pytest.mark.parametrize("case,backend", list(harness.bench_params(rc.cases(DEVICE), rc.backends_for(DEVICE))))
def test_rope(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op=rc.OP, case=case, backend=backend, device=DEVICE,
                          prepare=rc.prepare, baselines=rc.BASELINES,
                          make_record=lambda prep, stats: rc.make_record(prep, stats, bench_recorder.copy_gbps))


def test_rope_bytes_formula():
    """The floor counts q, k, cos, sin read once and q_out, k_out written once (bf16 LLaMA-8B)."""
    b, s, hq, hk, d = rc.HEADLINE_SHAPE
    assert rc.rope_bytes(b, s, hq, hk, d, 2) == 2 * b * s * (hq + hk) * d * 2 + 2 * s * d * 2
    fwd = rc.Case("fwd", b, s, hq, hk, d, rc.torch.bfloat16)
    assert rc.Case("fwd_bwd", b, s, hq, hk, d, rc.torch.bfloat16).bytes() == 2 * fwd.bytes()
