"""Run by tests/test_dtensor.py::test_hf_model_sharded_then_patched_matches_unpatched under torchrun (2
gloo ranks): a Hugging Face Llama sharded the ways training scripts shard it, patched by tokenforge in
training mode, against the same model unpatched:

    tp          ``from_pretrained(tp_plan="auto")``: Hugging Face's tensor parallelism (projections and
                the vocab-sharded lm_head as DTensors, activations local); every rank sees the whole
                batch, and the fused loss runs vocab-parallel (each rank its lm_head rows). The patched model's loss and every gradient (sharded ones whole) against the
                unpatched TP model's.
    fsdp        FSDP2 ``fully_shard`` on every decoder layer and the root; each rank takes half the
                batch. Every gradient against one process's unpatched model on the whole batch
                (FSDP2 averages the ranks' gradients).
    fsdp-head   the same with lm_head sharded as a unit of its own: its weight exists whole only
                inside its own forward, which the fused loss head must go through.

    torchrun --nproc_per_node 2 tests/hf_tp_worker.py MODE MODEL_DIR OUT.json
"""
import os
import sys

import torch
import torch.distributed as dist

os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AutoModelForCausalLM  # noqa: E402

import tokenforge  # noqa: E402
from tokenforge.dtensor import is_dtensor  # noqa: E402
from tokenforge.testing import rel_error  # noqa: E402
from torchrun import write_per_rank  # noqa: E402

MODE, MODEL, OUT = sys.argv[1], sys.argv[2], sys.argv[3]


def loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: (p.grad.full_tensor() if is_dtensor(p.grad) else p.grad).detach().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def load(**kwargs):
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, **kwargs).train()


def main():
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    if MODE == "tp":
        model = load(tp_plan="auto")
        ref_loss, ref_grads = loss_and_grads(model, ids, labels)
        report = tokenforge.patch(model)
        loss, grads = loss_and_grads(model, ids, labels)
    else:
        dist.init_process_group("gloo")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        whole = load()
        # FSDP2 averages the ranks' gradients: the reference is the mean of the ranks' mean losses.
        halves = [whole(input_ids=ids[r * 2:(r + 1) * 2], labels=labels[r * 2:(r + 1) * 2]).loss for r in range(2)]
        ref_loss = halves[dist.get_rank()].detach()
        (sum(halves) / 2).backward()
        ref_grads = {n: p.grad.clone() for n, p in whole.named_parameters()}
        model = load()
        report = tokenforge.patch(model)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        if MODE == "fsdp-head":
            fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        rank = dist.get_rank()
        loss, grads = loss_and_grads(model, ids[rank * 2:(rank + 1) * 2], labels[rank * 2:(rank + 1) * 2])
    sharded = sum(is_dtensor(p) for p in model.parameters())
    result = {"sharded_params": sharded, "patched": len(report.patched), "loss": rel_error(loss, ref_loss),
              "grads_missing": sorted(set(ref_grads) ^ set(grads)),
              "grad": max(rel_error(grads[n], ref_grads[n]) for n in ref_grads),
              "worst": max(ref_grads, key=lambda n: rel_error(grads[n], ref_grads[n])),
              "vocab_parallel_loss": any("vocab_parallel_linear_cross_entropy" in p for p in report.patched)}
    write_per_rank(result, OUT)


if __name__ == "__main__":
    main()
