"""Vocab-parallel fused linear + cross-entropy: the loss of ``hidden @ weight.T + bias`` when the
LM head's weight is split by vocab rows across the ranks of a tensor-parallel group and ``hidden``
is the same on every rank (Megatron-LM's vocab-parallel cross-entropy, fused with the head matmul).

Each rank computes only its slice of the logits, one token chunk at a time, and never the whole
(tokens, vocab) logits nor the whole weight:

    logits_r = hidden[c] @ weight_r.T (+ bias_r)     (chunk, V_r): this rank's vocab slice
    stats_r  = max, sum exp(x - max), sum x, x[t] if t is here      kernel pass 1 (4, chunk) fp32
    all_gather(stats) -> every rank: lse, x[t], sum x, the loss      one small collective per chunk
    logits_r <- d loss / d logits_r                                  kernel pass 2, in place
    grad_hidden[c]  = dlogits_r @ weight_r          a partial sum: all-reduced once after the loop
    grad_weight_r  += dlogits_r.T @ hidden[c]       fp32 accumulator, this rank's rows only

so a rank does 1/TP of the head's FLOPs and holds one (chunk, V_r) buffer, where gathering the
weight (what :func:`tokenforge.ops.linear_cross_entropy` needs: ``weight.full_tensor()``) moves V x H
elements to every rank and repeats the whole head on each, and where the unfused head all-gathers
(tokens, V) logits. Communication per call: ``4 * N * TP`` fp32 stats and one all-reduce of grad
hidden (N x H). Every rank combines the gathered stats in the same order, so all ranks hold the
same loss, bit for bit.

Path of a call: :func:`vocab_parallel_linear_cross_entropy` validates, finds the slice and the
group -> :class:`VocabParallelLinearCrossEntropyFunction` -> the custom op
``tokenforge::vocab_parallel_linear_cross_entropy_fwd`` (the group travels by name) ->
:func:`chunked_forward` -> ``tokenforge.kernels.cross_entropy.vocab_shard_stats`` /
``vocab_shard_grad_`` (or the same math in torch: ``backend='torch'``).

Semantics are :func:`tokenforge.ops.linear_cross_entropy`'s for ignore_index, reduction,
label_smoothing, z_loss, softcap and token_scaling; the logging extras (z-loss, accuracy, predicted
tokens) and class weights are not offered here (pass the gathered weight to linear_cross_entropy
for those). As there, gradients are computed in the forward for 'mean'/'sum'; 'none' reruns the
loop in backward with per-token scales.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import backends
from tokenforge.dtensor import is_dtensor
from tokenforge.ops.cross_entropy import _check_targets_in_range, n_valid_of, reduce_loss
from tokenforge.ops.cross_entropy import _triton_supports as _ce_triton_supports
from tokenforge.ops.linear_cross_entropy import (_check_inputs, accumulate_dtype, computed_grads,
                                                 default_chunk_size, grad_buffers, head_backward_, head_chunks,
                                                 head_context, linear_cross_entropy_reference,
                                                 save_forward_grads, saved_grads_times)

OP = "vocab_parallel_linear_cross_entropy"

backends.register_op(OP, cuda_preference=("triton",),
                     supports={"triton": _ce_triton_supports, "torch": lambda hidden: None},
                     example_inputs=lambda device, dtype: (torch.empty(4, 64, device=device, dtype=dtype),))


# ---------------------------------------------------------------------------------------------
# One rank's vocab slice: pass 1 (stats), the combine across ranks, pass 2 (gradient)
# ---------------------------------------------------------------------------------------------


def _shard_x(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    x = logits.to(accumulate_dtype(logits.dtype))
    return softcap * torch.tanh(x / softcap) if softcap else x


def _shard_stats_torch(logits, target, vocab_start, ignore_index, softcap):
    """tokenforge.kernels.cross_entropy.vocab_shard_stats in torch."""
    rows, V_local = logits.shape
    x = _shard_x(logits, softcap)
    m = x.max(dim=1).values if V_local else x.new_full((rows,), float("-inf"))
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    d = torch.exp(x - m_safe[:, None]).sum(1)
    local_t = target - vocab_start
    here = (local_t >= 0) & (local_t < V_local)
    x_t = x.gather(1, torch.where(here, local_t, 0)[:, None])[:, 0] if V_local else torch.zeros_like(m)
    ignored = target == ignore_index
    stats = torch.stack([torch.where(ignored, 0.0, m), torch.where(ignored, 1.0, d), torch.where(ignored, 0.0, x.sum(1)),
                         torch.where(ignored | ~here, 0.0, x_t)])
    return stats.to(accumulate_dtype(logits.dtype) if logits.dtype == torch.float64 else torch.float32)


def _shard_grad_torch_(logits, target, coefs, vocab_start, ignore_index, softcap):
    """tokenforge.kernels.cross_entropy.vocab_shard_grad_ in torch (in place over logits)."""
    rows, V_local = logits.shape
    if rows == 0 or V_local == 0:
        return
    x = logits.to(accumulate_dtype(logits.dtype))
    c = torch.tanh(x / softcap) if softcap else None
    if softcap:
        x = softcap * c
    lse, p_coef, t_coef, smooth = (coefs[i].to(x.dtype)[:, None] for i in range(4))
    g = torch.exp(x - lse) * p_coef - smooth
    cols = torch.arange(V_local, device=logits.device) + vocab_start
    g = g - (cols[None, :] == target[:, None]) * t_coef
    if softcap:
        g = g * (1.0 - c * c)
    logits.copy_(torch.where((target == ignore_index)[:, None], torch.zeros_like(g), g))


def _combine(stats_all: torch.Tensor, target, V: int, ignore_index, label_smoothing, z_loss, token_scaling):
    """Every rank's (4, rows) stats, stacked (TP, 4, rows) in rank order -> (loss rows, lse, the
    per-row gradient factor before the mean/row scale: p_t with token scaling, else 1)."""
    m, d, sx, xt = stats_all.unbind(1)
    M = m.max(0).values
    M_safe = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    lse = M_safe + torch.log((d * torch.exp(m - M_safe)).sum(0))
    sx, xt = sx.sum(0), xt.sum(0)
    eps = label_smoothing
    ce = lse - (1.0 - eps) * xt - eps / V * sx
    zl = z_loss * lse * lse
    factor = torch.exp(xt - lse) if token_scaling else torch.ones_like(lse)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    nan = torch.full_like(lse, float("nan"))
    loss = torch.where(valid, torch.where(in_range, (ce + zl) * factor, nan), 0.0)
    factor = torch.where(valid, torch.where(in_range, factor, nan), 0.0)
    return loss, torch.where(valid, lse, 0.0), factor


def _gather_stats(stats: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world == 1:
        return stats[None]
    # Concatenated along dim 0 (the layout every backend takes, gloo included), then split by rank.
    out = stats.new_empty((world * stats.shape[0],) + tuple(stats.shape[1:]))
    dist.all_gather_into_tensor(out, stats.contiguous(), group=group)
    return out.view((world,) + tuple(stats.shape))


def chunked_forward(hidden, weight, target, bias, row_scale, vocab_start: int, V: int, group, ignore_index,
                    label_smoothing, z_loss, softcap, token_scaling, mean, chunk_size, need_grad_hidden,
                    need_grad_weight, backend):
    """(loss (N,), n_valid, grad_hidden, grad_weight, grad_bias) for hidden (N, H) contiguous, the
    same on every rank, and this rank's rows ``weight`` (V_r, H) = rows [vocab_start, vocab_start +
    V_r) of a V-row head. Gradients of sum(loss * row_scale) / (n_valid if mean else 1): grad_hidden
    whole (all-reduced over the group), grad_weight / grad_bias fp32 for this rank's rows."""
    import torch.distributed as dist

    N, _ = hidden.shape
    n_valid = n_valid_of(target, ignore_index)
    acc = accumulate_dtype(hidden.dtype)
    loss = torch.empty((N,), dtype=acc, device=hidden.device)
    compute_grad = need_grad_hidden or need_grad_weight
    grad_hidden, grad_weight, grad_bias = grad_buffers(hidden, weight, bias, need_grad_hidden, need_grad_weight)
    if backend == "triton":
        from tokenforge.kernels import cross_entropy as kernels_ce
    for start, end, h, logits in head_chunks(hidden, weight, bias, chunk_size):
        t = target[start:end]
        if backend == "triton":
            stats = kernels_ce.vocab_shard_stats(logits, t, vocab_start, ignore_index=ignore_index, softcap=softcap)
        else:
            stats = _shard_stats_torch(logits, t, vocab_start, ignore_index, softcap)
        rows_loss, lse, factor = _combine(_gather_stats(stats, group).to(acc), t, V, ignore_index,
                                          label_smoothing, z_loss, token_scaling)
        loss[start:end] = rows_loss
        if not compute_grad:
            continue
        scale = factor
        if row_scale is not None:
            scale = scale * row_scale[start:end]
        if mean:
            scale = scale / n_valid
        coefs = torch.stack([lse, scale * (1.0 + 2.0 * z_loss * lse), (1.0 - label_smoothing) * scale,
                             label_smoothing / V * scale])
        if backend == "triton":
            kernels_ce.vocab_shard_grad_(logits, t, coefs.float(), vocab_start, ignore_index=ignore_index,
                                         softcap=softcap)
        else:
            _shard_grad_torch_(logits, t, coefs, vocab_start, ignore_index, softcap)
        # From here on ``logits`` holds this slice's dlogits.
        head_backward_(logits, h, weight, grad_hidden[start:end] if grad_hidden is not None else None,
                       grad_weight, grad_bias)
    if grad_hidden is not None and dist.get_world_size(group) > 1:
        # Each rank's product covers its vocab slice only: grad hidden is their sum. Summed in fp32
        # for low-precision hidden, so the result does not depend on how the vocab is split.
        total = grad_hidden.to(acc)
        dist.all_reduce(total, group=group)
        grad_hidden.copy_(total)
    return loss, n_valid, grad_hidden, grad_weight, grad_bias


def _group_of(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


@torch.library.custom_op("tokenforge::vocab_parallel_linear_cross_entropy_fwd", mutates_args=())
def vocab_parallel_linear_cross_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor], vocab_start: int, vocab_size: int, group_name: str, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float, token_scaling: bool, mean: bool, chunk_size: int,
    need_grad_hidden: bool, need_grad_weight: bool, validate: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss fp32 (N,), n_valid fp32 (), grad_hidden, grad_weight fp32 (V_r, H), grad_bias fp32
    (V_r,)); what is not computed comes back as an empty tensor. Collective over ``group_name``."""
    if validate:
        _check_targets_in_range(target, vocab_size, ignore_index)
    outs = chunked_forward(hidden, weight, target, bias, row_scale, vocab_start, vocab_size, _group_of(group_name),
                           ignore_index, label_smoothing, z_loss, softcap, token_scaling, mean, chunk_size,
                           need_grad_hidden, need_grad_weight, backend)
    acc = accumulate_dtype(hidden.dtype)
    dtypes = (acc, torch.float32, hidden.dtype, acc, acc)
    return tuple(o if o is not None else hidden.new_empty((0,), dtype=dt) for o, dt in zip(outs, dtypes))


@vocab_parallel_linear_cross_entropy_fwd.register_fake
def _(hidden, weight, target, bias, row_scale, vocab_start, vocab_size, group_name, ignore_index, label_smoothing,
      z_loss, softcap, token_scaling, mean, chunk_size, need_grad_hidden, need_grad_weight, validate, backend):
    acc = accumulate_dtype(hidden.dtype)
    gh = hidden.new_empty(hidden.shape) if need_grad_hidden else hidden.new_empty((0,))
    gw = hidden.new_empty(weight.shape, dtype=acc) if need_grad_weight else hidden.new_empty((0,), dtype=acc)
    gb = hidden.new_empty((weight.shape[0],), dtype=acc) if need_grad_weight and bias is not None \
        else hidden.new_empty((0,), dtype=acc)
    return hidden.new_empty((hidden.shape[0],), dtype=acc), hidden.new_empty((), dtype=torch.float32), gh, gw, gb


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """As LinearCrossEntropyFunction: 'mean'/'sum' compute the gradients in the forward and rescale
    them in backward; 'none' reruns the loop in backward with per-token scales (collectives again,
    on every rank, as every rank runs backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, vocab_start, vocab_size, group_name, ignore_index, reduction,
                label_smoothing, z_loss, softcap, token_scaling, chunk_size, validate, backend):
        h2, t, w = head_context(ctx, hidden, weight, target, bias, reduction)
        ctx.opts = (vocab_start, vocab_size, group_name, ignore_index, float(label_smoothing), float(z_loss),
                    float(softcap), bool(token_scaling), chunk_size, backend)
        eager = reduction != "none"
        loss, n_valid, gh, gw, gb = torch.ops.tokenforge.vocab_parallel_linear_cross_entropy_fwd(
            h2, w, t, bias, None, vocab_start, vocab_size, group_name, ignore_index, float(label_smoothing),
            float(z_loss), float(softcap), bool(token_scaling), reduction == "mean", chunk_size,
            eager and ctx.need_hidden, eager and ctx.need_weight, validate, backend)
        out = reduce_loss(loss, n_valid, reduction)
        if reduction == "none":
            out = out.reshape(target.shape)
            ctx.save_for_backward(h2, w, t, bias)
        else:
            save_forward_grads(ctx, gh, gw, gb)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        vocab_start, vocab_size, group_name, ignore_index, eps, z_loss, softcap, token_scaling, chunk_size, backend \
            = ctx.opts
        if ctx.reduction == "none":
            h2, w, t, bias = ctx.saved_tensors
            row_scale = grad_output.reshape(-1).to(accumulate_dtype(h2.dtype)).contiguous()
            *_, gh, gw, gb = torch.ops.tokenforge.vocab_parallel_linear_cross_entropy_fwd(
                h2, w, t, bias, row_scale, vocab_start, vocab_size, group_name, ignore_index, eps, z_loss, softcap,
                token_scaling, False, chunk_size, ctx.need_hidden, ctx.need_weight, False, backend)
            grad_hidden, grad_weight, grad_bias = computed_grads(ctx, gh, gw, gb)
        else:
            grad_hidden, grad_weight, grad_bias = saved_grads_times(ctx, grad_output, *ctx.saved_tensors)
        return (grad_hidden, grad_weight, None, grad_bias) + (None,) * 12


# ---------------------------------------------------------------------------------------------
# Which slice this rank holds
# ---------------------------------------------------------------------------------------------


def _dtensor_slice(name: str, weight) -> tuple[int, int, int]:
    """(vocab_start, V, the mesh dim) of a DTensor weight sharded by rows over one mesh dim (Replicate
    on the others), with DTensor's own split (torch.chunk's: ceil(V / TP) rows per rank, the last
    ones shorter or empty)."""
    from torch.distributed.tensor import Replicate, Shard

    placements = weight.placements
    dims = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 0]
    others_ok = all(isinstance(p, Replicate) for i, p in enumerate(placements) if i not in dims)
    if len(dims) != 1 or not others_ok:
        raise ValueError(f"{name}: the weight must be a DTensor sharded by vocab rows (Shard(0)) on one mesh dim and "
                         f"replicated on the others, got placements {tuple(placements)}; redistribute it, or call "
                         "tokenforge.ops.linear_cross_entropy with weight.full_tensor()")
    mesh, dim = weight.device_mesh, dims[0]
    V, world, rank = weight.shape[0], mesh.size(dim), mesh.get_local_rank(dim)
    rows = -(-V // world)
    start = min(V, rank * rows)
    if weight.to_local().shape[0] != min(V, start + rows) - start:
        raise ValueError(f"{name}: rank {rank}'s weight shard has {weight.to_local().shape[0]} rows, not the "
                         f"{min(V, start + rows) - start} of an even row split of {V}; redistribute the weight")
    return start, V, dim


def _local_slice(weight: torch.Tensor, group) -> tuple[int, int]:
    """(vocab_start, V) for plain per-rank shards in rank order: one all-gather of the row counts."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    counts = [0] * world
    dist.all_gather_object(counts, int(weight.shape[0]), group=group)
    rank = dist.get_rank(group)
    return sum(counts[:rank]), sum(counts)


def _local(name: str, what: str, t, mesh=None, tp_dim=None):
    """A plain tensor as is; a DTensor -> the whole tensor on this rank (autograd-aware). Replicate
    on every mesh dim: its local tensor. On the weight's ``mesh``, any placement on the
    tensor-parallel dim ``tp_dim`` (sequence parallelism shards the tokens there) is gathered first,
    an all-gather as DTensor's own redistribute; the other dims must be Replicate, since gathering
    over them would mix other ranks' batches into this group's loss."""
    if t is None or not is_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate

    others = [p for i, p in enumerate(t.placements) if t.device_mesh != mesh or i != tp_dim]
    if not all(isinstance(p, Replicate) for p in others):
        where = "on every mesh dim but the weight's vocab-sharded one" if mesh is not None else "on every mesh dim"
        raise ValueError(f"{name}: {what} must be the same on every rank of the tensor-parallel group: a plain tensor "
                         f"or a DTensor that is Replicate {where}, got placements {tuple(t.placements)} on "
                         f"{t.device_mesh}; gather it first, e.g. {what}.redistribute(placements=[Replicate()] * "
                         "mesh.ndim)")
    if not all(isinstance(p, Replicate) for p in t.placements):
        t = t.redistribute(placements=[Replicate()] * t.device_mesh.ndim)
    return t.to_local()


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    group=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    token_scaling: bool = False,
    chunk_size: Optional[int] = None,
    validate: Optional[bool] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """cross_entropy(hidden (..., H) @ weight.T + bias, target) for a vocab-parallel LM head, without
    the logits and without gathering the weight. Call it on every rank of the tensor-parallel group
    with the same ``hidden`` and ``target``; every rank gets the same loss, ``hidden``'s gradient
    whole and the gradient of its own weight rows.

    ``weight``: a DTensor sharded by rows (``Shard(0)``, e.g. Hugging Face's ``tp_plan`` lm_head;
    on a mesh of more dims, Replicate on the others): its group and slice come from it, ``group``
    must be None. Or this rank's plain (V_r, H) rows, the ranks of ``group`` holding consecutive
    slices in rank order (Megatron's layout; sizes may differ; one small all-gather finds the
    offsets). ``bias`` (V,) sharded the same way, or None. ``hidden`` / ``target``: plain tensors or
    Replicate DTensors; with a DTensor weight also DTensors on its mesh sharded (by tokens, sequence
    parallelism) on its vocab-sharded dim, gathered here (hidden's gradient comes back sharded
    the same way). Options as :func:`tokenforge.ops.linear_cross_entropy` (no class weights
    or logging extras here)."""
    import torch.distributed as dist

    name = OP
    if is_dtensor(weight):
        if group is not None:
            raise ValueError(f"{name}: weight is a DTensor, which names its group; leave group=None")
        vocab_start, V, tp_dim = _dtensor_slice(name, weight)
        mesh = weight.device_mesh
        group = mesh.get_group(tp_dim)
        weight = weight.to_local()
        if bias is not None:
            if not is_dtensor(bias):
                raise TypeError(f"{name}: with a DTensor weight the bias must be a DTensor sharded the same way")
            if tuple(bias.shape) != (V,) or _dtensor_slice(name, bias)[0] != vocab_start:
                raise ValueError(f"{name}: bias must be a (V,) = ({V},) DTensor sharded like the weight, got "
                                 f"shape {tuple(bias.shape)} with placements {tuple(bias.placements)}")
            bias = bias.to_local()
    else:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{name}: torch.distributed is not initialized; call init_process_group first, or use "
                               "tokenforge.ops.linear_cross_entropy for a head that is not split across ranks")
        if is_dtensor(bias):
            raise TypeError(f"{name}: bias is a DTensor but weight is not; pass both as this rank's plain shards")
        if group is None:
            group = dist.group.WORLD
        vocab_start, V = _local_slice(weight, group)
        mesh = tp_dim = None
    hidden, target = _local(name, "hidden", hidden, mesh, tp_dim), _local(name, "target", target, mesh, tp_dim)
    _check_inputs(hidden, weight if weight.shape[0] else weight.new_empty((1, weight.shape[1])), target,
                  None, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
                             or bias.dtype != hidden.dtype or bias.device != hidden.device):
        raise ValueError(f"{name}: bias must be this rank's ({weight.shape[0]},) slice in hidden's dtype "
                         f"({hidden.dtype}) and device, got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if not isinstance(token_scaling, bool):
        raise TypeError(f"{name}: token_scaling must be a bool, got {token_scaling!r}")
    N = hidden.numel() // hidden.shape[-1]
    if N == 0:
        return linear_cross_entropy_reference(hidden, weight, target, bias, ignore_index, reduction,
                                              label_smoothing, z_loss, softcap, token_scaling=token_scaling)
    chosen = backends.choose(OP, hidden, backend=backend)
    if chunk_size is None:
        chunk_size = default_chunk_size(N, hidden.shape[-1], max(1, weight.shape[0]))
    if validate is None:
        validate = hidden.device.type == "cpu"
    return VocabParallelLinearCrossEntropyFunction.apply(
        hidden, weight, target, bias, int(vocab_start), int(V), group.group_name, ignore_index, reduction,
        float(label_smoothing), float(z_loss), float(softcap), token_scaling, int(min(chunk_size, N)),
        bool(validate), chosen)
