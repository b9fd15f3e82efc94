"""Run by tests/test_adamw.py::test_stochastic_rounding_is_shard_invariant under torchrun (2 gloo
ranks on 127.0.0.1): bf16 params with stochastic rounding stepped as FSDP2-style DTensor shards
(Shard(0)) must end bit-identical to the same params stepped whole in one process.

    torchrun --nproc_per_node 2 tests/sr_shard_worker.py BACKEND OUT.pt
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

from tokenforge.optim import AdamW, Lion  # noqa: E402

SHAPES = [(37, 16), (5, 3), (64, 129), (1, 7)]  # odd row counts: uneven (and empty) shards
STEPS = 3


def full_params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).to(torch.bfloat16) for s in SHAPES]


def full_grad(step, i):
    g = torch.Generator().manual_seed(1000 * step + i)
    return torch.randn(*SHAPES[i], generator=g) * 1e-2


def run(opt_cls, params, make_grad):
    opt = opt_cls(params, lr=3e-3, weight_decay=0.01, bf16_stochastic_rounding=True, seed=1234, backend=BACKEND)
    for step in range(STEPS):
        for i, p in enumerate(params):
            p.grad = make_grad(step, i)
        opt.step()


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    for opt_cls in (AdamW, Lion):
        whole = [torch.nn.Parameter(p.clone()) for p in full_params()]
        run(opt_cls, whole, lambda s, i: full_grad(s, i).to(torch.bfloat16))
        sharded = [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [Shard(0)])) for p in full_params()]
        run(opt_cls, sharded,
            lambda s, i: distribute_tensor(full_grad(s, i).to(torch.bfloat16), mesh, [Shard(0)]))
        gathered = [p.full_tensor() for p in sharded]
        results[opt_cls.__name__] = [bool(torch.equal(a.detach(), b.detach())) for a, b in zip(whole, gathered)]
    if rank == 0:
        torch.save(results, OUT)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
