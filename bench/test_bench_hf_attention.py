"""Hugging Face attention microbenchmarks (pytest-benchmark): one Llama-3-8B layer's attention, forward
+ backward, as transformers calls it on a right-padded batch (8 x 4k) and on 16k tokens of packed
documents, and one decoding step of 16 left-padded sequences over a 4k cache: transformers' SDPA with
the dense mask it builds, its flash_attention_2 path (when flash_attn is installed), and what a
tokenforge-patched model runs (for the padded batch also the same kernel behind a gather and a
scatter, which reading in place replaced). Records the useful TFLOP/s (causal within each document),
the fraction of a bf16 matmul measured in the same run, peak memory and the speedups.

    pytest bench/test_bench_hf_attention.py --benchmark-json=bench.json
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
import hf_attention_cases as hc  # noqa: E402

DEVICE = bw.bench_device()
pytest.importorskip("transformers")


@pytest.mark.parametrize("case,backend", [p for case in hc.cases(DEVICE)
                                          for p in harness.bench_params([case], hc.backends_for(DEVICE, case))])
def test_hf_attention(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op=hc.OP, case=case, backend=backend, device=DEVICE,
                          prepare=hc.prepare, baselines=hc.BASELINES,
                          make_record=lambda prep, stats: hc.make_record(prep, stats, bw.matmul_tflops(DEVICE),
                                                                         bench_recorder.copy_gbps))


def test_documents_and_flops():
    """Padded rows spread over [s/4, s]; packed documents fill the row exactly; the FLOPs are the
    causal ones within each document."""
    padded = hc.Case("fwd_bwd", "padded", 4, 64, 4, 2, 32)
    assert padded.documents() == [[16], [32], [48], [64]]
    packed = hc.Case("fwd_bwd", "packed", 1, 64, 4, 2, 32)
    [row] = packed.documents()
    assert sum(row) == 64 and row[:4] == [4, 16, 8, 32]
    assert packed.flops() == 3.5 * sum(2.0 * 4 * 32 * n * n for n in row)
