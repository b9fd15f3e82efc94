"""Expert parallelism: the token exchange around the expert GEMMs when the experts of an MoE layer
are sharded over a process group (rank r of P holds experts [r * E/P, (r + 1) * E/P)).

    xs, offs, order, counts = moe_permute(x, experts, E)       this rank's rows, by global expert
    local, plan = ep_dispatch(xs, counts, group)                 rows for my experts, from every rank,
                                                                 grouped by local expert; plan.offs
    ys_local = experts(local, plan.offs)                         the grouped GEMMs on my experts
    ys = ep_combine(ys_local, plan)                              each row back to the rank it came from
    y = moe_unpermute(ys, order, weights)

Rows sorted by global expert are already grouped by destination rank (the experts of rank r are
contiguous), so one ``all_to_all_single`` sends them; the per-expert counts go first (one
all-to-all of E integers) because the split sizes must be known on the host: the one host sync of
the layer, as in every all-to-all MoE. Received rows arrive as (source rank, local expert) blocks
and are regrouped to (local expert, source rank), the order the grouped GEMM needs; the combine
undoes both steps. The exchanges are differentiable (:class:`_AllToAll`): the backward sends the
gradients the opposite way, so expert weights get the gradient of the sum of
every rank's loss. Works on any backend with all-to-all (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """What :func:`ep_combine` needs to send the expert outputs back."""

    group: object
    send_splits: list      # rows this rank sent to each rank
    recv_splits: list      # rows this rank received from each rank
    regroup: torch.Tensor  # received row i of the grouped order came from received row regroup[i]
    offs: torch.Tensor     # (E/P,) int32 cumulative row ends per local expert, for grouped_mm
    counts: torch.Tensor   # (P, E/P) int64: rows from each source rank for each local expert


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its backward sends the gradients back the other way
    (our own: torch.distributed.nn.functional's is deprecated in newer torch)."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        import torch.distributed as dist

        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits,
                               group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def ep_world(group) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def ep_dispatch(xs: torch.Tensor, counts: torch.Tensor, group) -> tuple[torch.Tensor, DispatchPlan]:
    """(rows for this rank's experts grouped by local expert, plan). ``xs`` (rows, D) sorted by
    global expert with ``counts`` (E,) rows per expert (moe_permute's outputs); E divisible by the
    group size."""
    import torch.distributed as dist

    _, world = ep_world(group)
    E = counts.numel()
    if E % world:
        raise ValueError(f"expert parallelism: {E} experts do not split evenly over {world} ranks; "
                         "use an expert count divisible by the group size")
    local = E // world
    counts = counts.to(torch.int64)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)  # [source rank, my local expert]
    received = received.view(world, local)
    sizes = torch.stack([counts.view(world, local).sum(1), received.sum(1)]).cpu()  # the host sync
    send_splits, recv_splits = sizes[0].tolist(), sizes[1].tolist()
    rows = _AllToAll.apply(xs, send_splits, recv_splits, group)
    # Regroup (source, expert) blocks into (expert, source) order, stably (rows keep their order).
    block = torch.repeat_interleave(torch.arange(world * local, device=xs.device), received.reshape(-1))
    key = (block % local) * world + block // local
    regroup = torch.sort(key, stable=True).indices
    offs = received.sum(0).cumsum(0).to(torch.int32)
    plan = DispatchPlan(group, send_splits, recv_splits, regroup, offs, received)
    return rows.index_select(0, regroup), plan


def ep_combine(ys_local: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The expert outputs (in :func:`ep_dispatch`'s grouped order) back on the ranks their rows came
    from, in those ranks' global-expert order (what moe_unpermute takes)."""
    from tokenforge.ops.moe_routing import inverse_permutation

    back = ys_local.index_select(0, inverse_permutation(plan.regroup))
    return _AllToAll.apply(back, plan.recv_splits, plan.send_splits, plan.group)
