"""Run by tests/test_dtensor.py::test_hf_tensor_parallel_model_patched_matches_unpatched under torchrun
(2 gloo ranks): a Hugging Face Llama loaded with ``tp_plan="auto"`` (its projections sharded over the
ranks as DTensors, activations local), patched by tokenforge, must give the unpatched tensor-parallel
model's loss and every parameter's gradient (sharded ones compared whole).

    torchrun --nproc_per_node 2 tests/hf_tp_worker.py MODEL_DIR OUT.json
"""
import json
import os
import sys

import torch
import torch.distributed as dist

os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AutoModelForCausalLM  # noqa: E402

import tokenforge  # noqa: E402
from tokenforge.dtensor import is_dtensor  # noqa: E402
from tokenforge.testing import rel_error  # noqa: E402

MODEL, OUT = sys.argv[1], sys.argv[2]


def loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: (p.grad.full_tensor() if is_dtensor(p.grad) else p.grad).detach().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def main():
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    model = AutoModelForCausalLM.from_pretrained(MODEL, tp_plan="auto", dtype=torch.float32).train()
    rank = dist.get_rank()
    sharded = sum(is_dtensor(p) for p in model.parameters())
    ref_loss, ref_grads = loss_and_grads(model, ids, labels)
    report = tokenforge.patch(model)
    loss, grads = loss_and_grads(model, ids, labels)
    tokenforge.unpatch(model)
    result = {"sharded_params": sharded, "patched": len(report.patched), "loss": rel_error(loss, ref_loss),
              "grads_missing": sorted(set(ref_grads) ^ set(grads)),
              "grad": max(rel_error(grads[n], ref_grads[n]) for n in ref_grads)}
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, result)
    if rank == 0:
        with open(OUT, "w") as fh:
            json.dump(per_rank, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
