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


@pytest.mark.parametrize("mode", ["tp", "fsdp", "fsdp-head"])
def test_hf_model_sharded_then_patched_matches_unpatched(tmp_path, mode):
    """Hugging Face's tensor parallelism (tp_plan="auto") and FSDP2 (layers and root, and lm_head as a
    unit of its own, whose weight exists whole only inside its forward) under tokenforge.patch, in
    training mode: the loss and every gradient of the unpatched model (see tests/hf_tp_worker.py)."""
    from torchrun import run_worker
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms away from their init, so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "result.json"
    run_worker("hf_tp_worker.py", mode, str(tmp_path / "model"), str(out), nproc=2, timeout=300)
    for rank, result in enumerate(json.loads(out.read_text())):
        assert result["sharded_params"] >= 14 and result["patched"] >= 4, (rank, result)
        assert not result["grads_missing"], (rank, result)
        assert result["loss"] <= 1e-6 and result["grad"] <= 1e-5, (rank, result)
        assert result["vocab_parallel_loss"] == (mode == "tp"), (rank, result)
