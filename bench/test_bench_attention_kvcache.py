"""KV-cache attention microbenchmarks (pytest-benchmark): one decoding step (append one key/value
per sequence, attend over the cache) of Llama-3-8B's attention, 16 sequences, dense 4k and 16k and
paged caches, against a static-cache SDPA decoder and flash_attn_with_kvcache (when installed).
Memory-bound: records GB/s over the live keys and values and the fraction of the copy bandwidth.

    pytest bench/test_bench_attention_kvcache.py --benchmark-json=bench.json
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

import attention_kvcache_cases as kc  # noqa: E402
import bandwidth as bw  # noqa: E402
import harness  # noqa: E402

DEVICE = bw.bench_device()


@pytest.mark.parametrize("case,backend", list(harness.bench_params(kc.cases(DEVICE), kc.backends_for(DEVICE))))
def test_attention_kvcache(benchmark, bench_recorder, request, case, backend):
    harness.run_benchmark(benchmark, bench_recorder, request, op=kc.OP, case=case, backend=backend, device=DEVICE,
                          prepare=kc.prepare, baselines=kc.BASELINES,
                          make_record=lambda prep, stats: kc.make_record(prep, stats, bench_recorder.copy_gbps))


def test_kvcache_bytes_formula():
    """The floor reads each sequence's live keys and values once: cached ones plus the new one."""
    case = kc.Case("decode", 4, 64, 4, 2, 32)
    lengths = case.lengths("cpu").tolist()
    assert lengths == sorted(lengths) and lengths[0] == 32 and lengths[-1] == 62
    assert case.bytes() == 2 * (sum(lengths) + 4) * 2 * 32 * 2
    paged = kc._paged(kc.torch.arange(2 * 8 * 1 * 1.0).view(2, 8, 1, 1), kc.torch.tensor([[3, 0], [1, 2]]), 4)
    assert paged[3].flatten().tolist() == [0, 1, 2, 3] and paged[2].flatten().tolist() == [12, 13, 14, 15]
