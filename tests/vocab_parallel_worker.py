"""Run by tests/test_vocab_parallel_cross_entropy.py under torchrun (3 gloo ranks): the vocab-parallel
fused loss on each rank's slice of the head against the float64 loss of the whole head, for every
way a rank can hold its slice (DTensor Shard(0), DTensor on a 2-D mesh, plain shards of uneven
sizes, an empty shard), hidden and labels sharded by tokens (sequence parallelism) and every option; every rank's loss must be the same, bit for bit.

    torchrun --nproc_per_node 3 tests/vocab_parallel_worker.py BACKEND OUT.json
"""

import os
import sys

import torch
import torch.distributed as dist

BACKEND, OUT = sys.argv[1], sys.argv[2]
if BACKEND == "triton":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Replicate, Shard, distribute_tensor  # noqa: E402

from tokenforge.ops import linear_cross_entropy_reference, vocab_parallel_linear_cross_entropy  # noqa: E402
from tokenforge.testing import rel_error  # noqa: E402
from torchrun import write_per_rank  # noqa: E402

DTYPE = torch.float64 if BACKEND == "torch" else torch.float32


def whole(N, H, V, seed, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 3
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (N,), generator=g)
    target[::ignore_every] = -100
    grad_out = torch.randn(N, generator=g, dtype=torch.float64)
    return hidden, weight, bias, target, grad_out


def reference(hidden, weight, bias, target, grad_out, reduction, opts):
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss = linear_cross_entropy_reference(h, w, target, b, reduction=reduction, **opts)
    g = grad_out if reduction == "none" else grad_out[0]
    grads = torch.autograd.grad((loss * g).sum(), (h, w, b))
    return loss.detach(), grads


def run_case(layout, reduction, opts, N=29, H=16, V=53, chunk_size=8, seed=0):
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, weight, bias, target, grad_out = whole(N, H, V, seed)
    ref_loss, (ref_gh, ref_gw, ref_gb) = reference(hidden, weight, bias, target, grad_out, reduction, opts)
    h = hidden.to(DTYPE).requires_grad_()
    tgt = target
    if layout in ("dtensor", "dtensor-2d", "dtensor-sp"):
        mesh = init_device_mesh("cpu", (world,)) if layout != "dtensor-2d" else \
            init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
        pl = [Shard(0)] if layout != "dtensor-2d" else [Replicate(), Shard(0)]
        w = distribute_tensor(weight.to(DTYPE), mesh, pl).requires_grad_()
        b = distribute_tensor(bias.to(DTYPE), mesh, pl).requires_grad_()
        if layout == "dtensor-sp":  # sequence parallelism: hidden and labels sharded by tokens
            h = distribute_tensor(hidden.to(DTYPE), mesh, [Shard(0)]).requires_grad_()
            tgt = distribute_tensor(target, mesh, [Shard(0)])
        rows = -(-V // world)
        lo, hi = min(V, rank * rows), min(V, (rank + 1) * rows)
        group = None
    else:
        sizes = {"plain-uneven": [17, 21, 15], "plain-empty": [30, 0, 23]}[layout]
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]
        w = weight[lo:hi].to(DTYPE).clone().requires_grad_()
        b = bias[lo:hi].to(DTYPE).clone().requires_grad_()
        group = dist.group.WORLD
    loss = vocab_parallel_linear_cross_entropy(h, w, tgt, b, group=group, reduction=reduction,
                                               chunk_size=chunk_size, backend=BACKEND, **opts)
    g = grad_out.to(DTYPE) if reduction == "none" else grad_out[0].to(DTYPE)
    gh, gw, gb = torch.autograd.grad((loss * g).sum(), (h, w, b))
    if layout.startswith("dtensor"):
        assert gw.placements == w.placements, (gw.placements, w.placements)
        gw, gb = gw.to_local(), gb.to_local()
    if layout == "dtensor-sp":
        assert gh.placements == h.placements, (gh.placements, h.placements)
        gh = gh.full_tensor()
    # Every rank must hold the same loss, bit for bit (each combines the gathered stats in rank order).
    losses = [torch.empty_like(loss.detach()) for _ in range(world)]
    dist.all_gather(losses, loss.detach().contiguous())
    same = all(torch.equal(losses[0], x) for x in losses)
    col = (lambda t: t[:, None]) if reduction == "none" else (lambda t: t.reshape(1, 1))
    return {
        "loss": rel_error(col(loss.detach()), col(ref_loss)),
        "grad_hidden": rel_error(gh, ref_gh),
        "grad_weight": rel_error(gw, ref_gw[lo:hi]) if hi > lo else float(gw.numel()),
        "grad_bias": rel_error(gb[:, None], ref_gb[lo:hi, None]) if hi > lo else float(gb.numel()),
        "same_on_every_rank": 0.0 if same else 1.0,
    }


def main():
    dist.init_process_group("gloo")
    results = {}
    option_sets = {
        "plain": {},
        "smooth-z-softcap": dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0),
        "token-scaling": dict(token_scaling=True),
    }
    for layout in ("dtensor", "dtensor-2d", "dtensor-sp", "plain-uneven", "plain-empty"):
        for reduction in ("mean", "sum", "none"):
            for name, opts in option_sets.items():
                if layout != "plain-uneven" and name != "plain" and reduction != "mean":
                    continue  # every option and reduction on one layout; the others: each option with a mean, each reduction plain
                results[f"{layout}/{reduction}/{name}"] = run_case(layout, reduction, opts)
    # One chunk holding every token, and chunks of one token.
    results["plain-uneven/mean/one-chunk"] = run_case("plain-uneven", "mean", {}, chunk_size=64)
    results["plain-uneven/sum/chunk-1"] = run_case("plain-uneven", "sum", {}, chunk_size=1, N=5)
    write_per_rank(results, OUT)


if __name__ == "__main__":
    main()
