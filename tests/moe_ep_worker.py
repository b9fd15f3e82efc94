"""Run by tests/test_moe.py::test_expert_parallel_matches_one_process under torchrun (2 or 4 gloo
ranks on 127.0.0.1): an MoE layer with its experts sharded over the group (MoE.shard_experts),
each rank routing its own tokens, must give the outputs, the router / shared-expert gradients and
each rank's slice of the expert gradients that one process computes on all ranks' tokens with
every expert (the loss: the sum of the ranks' losses), and keep the selection bias equal.

    torchrun --nproc_per_node P tests/moe_ep_worker.py BACKEND OUT.json
"""

import os
import sys

import torch
import torch.distributed as dist

BACKEND, OUT = sys.argv[1], sys.argv[2]
if BACKEND == "triton":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tokenforge.nn import MoE  # noqa: E402
from tokenforge.testing import rel_error  # noqa: E402
from torchrun import write_per_rank  # noqa: E402

E, K, D, H = 8, 2, 16, 24


# float64 on the torch backend (the loop over experts); the Triton kernels take fp32.
DTYPE = torch.float64 if BACKEND == "torch" else torch.float32


def make_layer():
    torch.manual_seed(0)
    return MoE(D, H, E, K, num_shared_experts=1, bias_update_rate=0.01, backend=BACKEND).to(DTYPE)


def tokens(rank):
    g = torch.Generator().manual_seed(10 + rank)
    # Uneven token counts per rank (and so per expert and per exchange); rank 0 sends 5 tokens.
    return (torch.randn(5 + 3 * rank, D, generator=g, dtype=torch.float64) * (1 + rank)).to(DTYPE)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    whole = make_layer()
    # One forward over every rank's tokens: the selection bias moves once, by the total load, as the
    # sharded layer's does (by the group's summed load).
    sizes = [tokens(r).shape[0] for r in range(world)]
    x_all = torch.cat([tokens(r) for r in range(world)]).requires_grad_()
    y_all = whole(x_all)
    y_all.square().sum().backward()
    ref = y_all.detach().split(sizes)
    ref_dx = x_all.grad.split(sizes)

    layer = make_layer().shard_experts(dist.group.WORLD)
    x = tokens(rank).requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    # Router and shared expert: replicated, each rank's gradient is its own tokens' part: sum them.
    for p in [layer.router.weight, *layer.shared_experts.parameters()]:
        dist.all_reduce(p.grad)
    n = E // world
    errors = {
        "out": rel_error(y, ref[rank]),
        "dx": rel_error(x.grad, ref_dx[rank]),
        "router": rel_error(layer.router.weight.grad, whole.router.weight.grad),
        "shared": max(rel_error(a.grad, b.grad) for a, b in zip(layer.shared_experts.parameters(),
                                                                whole.shared_experts.parameters())),
        "w_gate_up": rel_error(layer.w_gate_up.grad, whole.w_gate_up.grad[rank * n:(rank + 1) * n]),
        "w_down": rel_error(layer.w_down.grad, whole.w_down.grad[rank * n:(rank + 1) * n]),
        "local_shape": list(layer.w_gate_up.shape),
    }
    biases = [torch.empty_like(layer.expert_bias) for _ in range(world)]
    dist.all_gather(biases, layer.expert_bias)
    errors["bias_equal"] = all(torch.equal(b, whole.expert_bias) for b in biases) and bool(whole.expert_bias.any())
    write_per_rank(errors, OUT)


if __name__ == "__main__":
    main()
