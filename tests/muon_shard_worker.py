"""Run by tests/test_muon.py::test_fsdp_shards_match_one_process under torchrun (2 gloo ranks on
127.0.0.1): Muon on FSDP2-style DTensor params (Shard(0)), each matrix orthogonalised whole by its
owner rank, must end bit-identical to the same params stepped whole in one process; the AdamW
group (a vector, an embedding-like matrix) steps on its shards alongside.

    torchrun --nproc_per_node 2 tests/muon_shard_worker.py BACKEND OUT.pt
"""

import os
import sys

import torch
import torch.distributed as dist

BACKEND, OUT = sys.argv[1], sys.argv[2]
if BACKEND == "triton":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Shard, distribute_tensor  # noqa: E402

from tokenforge.optim import Muon  # noqa: E402

# Odd row counts: uneven and empty shards; two matrices of one shape (batched together whole,
# owned by different ranks when sharded); a bf16 matrix (fp32 master and momentum).
MUON_SHAPES = [(37, 16), (16, 37), (5, 3), (1, 7), (37, 16)]
ADAMW_SHAPES = [(7,), (9, 4)]
STEPS = 3


def full_params():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(*s, generator=g) for s in MUON_SHAPES + ADAMW_SHAPES]
    params[3] = params[3].to(torch.bfloat16)
    return params


def full_grad(step, i, like):
    g = torch.Generator().manual_seed(1000 * step + i)
    return (torch.randn(*like.shape, generator=g) * 1e-2).to(like.dtype)


def run(params, make_grad):
    n = len(MUON_SHAPES)
    opt = Muon([{"params": params[:n]}, {"params": params[n:], "use_muon": False}], lr=0.02, weight_decay=0.01,
               adjust_lr_fn="match_rms_adamw", backend=BACKEND)
    for step in range(STEPS):
        for i, p in enumerate(params):
            p.grad = make_grad(step, i, p)
        opt.step()


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    whole = [torch.nn.Parameter(p.clone()) for p in full_params()]
    run(whole, full_grad)
    sharded = [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [Shard(0)])) for p in full_params()]
    run(sharded, lambda s, i, p: distribute_tensor(full_grad(s, i, p.full_tensor()), mesh, [Shard(0)]))
    gathered = [p.full_tensor() for p in sharded]
    result = [bool(torch.equal(a.detach(), b.detach())) for a, b in zip(whole, gathered)]
    moved = [bool(not torch.equal(a.detach(), b)) for a, b in zip(whole, full_params())]
    if rank == 0:
        torch.save({"equal": result, "moved": moved}, OUT)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
