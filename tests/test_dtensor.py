"""DTensor inputs (tokenforge.dtensor): rms_norm, add_rms_norm, swiglu, geglu, swiglu_packed and rope
on the placements tensor and sequence parallelism give them (sharded rows, a sharded hidden or last
dim, heads, Partial and Replicate inputs, DTensor and plain parameters), on 2 gloo ranks, against the
same op on the whole tensors: output, output placements and every gradient."""
import json

import pytest
import torch

from tokenforge.dtensor import any_dtensor

CASES = ["rms_norm-shard-last", "rms_norm-shard-rows", "rms_norm-plain-weight", "rms_norm-gemma-llama-cast",
         "add_rms_norm-residual-replicated", "add_rms_norm-partial-x", "swiglu-shard-hidden", "swiglu-up-replicated",
         "swiglu-up-plain", "swiglu-partial-gate", "swiglu-multipliers", "geglu-shard-rows",
         "swiglu_packed-shard-last", "rope-shard-heads", "rope-shard-seq", "rms_norm-dtensor-weight-only",
         "attention-refuses-dtensor"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sharded_inputs_match_whole_tensors(tmp_path, backend):
    from torchrun import run_worker

    out = tmp_path / "dtensor.json"
    run_worker("dtensor_worker.py", backend, str(out), nproc=2, timeout=300)
    per_rank = json.loads(out.read_text())
    tol = 1e-12 if backend == "torch" else 1e-5
    for rank, cases in enumerate(per_rank):
        assert sorted(cases) == sorted(CASES), (rank, sorted(cases))
        for case, result in cases.items():
            for key, value in result.items():
                if key.startswith("placement"):
                    assert value is True, (rank, case, key, "output placements")
                else:
                    assert value <= tol, (rank, case, key, value)


def test_plain_tensors_take_no_detour():
    x = torch.randn(2, 3)
    assert not any_dtensor(x, None, x)
