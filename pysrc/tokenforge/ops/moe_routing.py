"""Mixture-of-experts routing and token permutation, without a host sync.

- :func:`moe_route`: top-k experts per token from router logits, over softmax or sigmoid scores;
  an optional per-expert ``bias`` that steers *selection only* (DeepSeek-V3's auxiliary-loss-free
  balancing: the combine weights stay the unbiased scores); optional group-limited routing (experts
  in ``n_groups`` groups, a token only picks experts from its best ``topk_groups`` groups, a group
  scored by the sum of its best two scores); weights renormalised over the chosen k when
  ``normalize``, times ``scaling``.
- :func:`moe_permute`: token rows copied into expert order (a stable sort of the flattened
  (token, slot) expert ids), with ``offs`` (cumulative rows per expert, int32: what
  :func:`tokenforge.ops.grouped_mm` takes) and the per-expert ``counts``, built with a scatter-add,
  not ``bincount``/``unique`` (those sync with the host on CUDA).
- :func:`moe_unpermute`: the inverse, with the weighted combine over each token's k slots (fp32).
- :func:`load_balancing_loss`: the Switch-Transformer auxiliary loss E * sum_e f_e * P_e (f_e the
  fraction of routed slots on expert e, P_e the mean normalised score of e).

All are differentiable where it means something (x through the permutation, the router through the
combine weights and the auxiliary loss) and are torch ops: sorts, gathers and scatters that run as
one kernel each; the FLOPs are in the expert GEMMs.
"""

from __future__ import annotations

from typing import Optional

import torch

SCORES = ("softmax", "sigmoid")


def _check_route(logits, top_k, score, bias, n_groups, topk_groups) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError("moe_route: logits must be a floating-point (tokens, experts) tensor, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    experts = logits.shape[1]
    if score not in SCORES:
        raise ValueError(f"moe_route: score must be one of {SCORES}, got {score!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ValueError(f"moe_route: top_k must be an int in [1, experts={experts}], got {top_k!r}")
    if bias is not None and (bias.dim() != 1 or bias.numel() != experts):
        raise ValueError(f"moe_route: bias must have one entry per expert ({experts}), got shape {tuple(bias.shape)}")
    if n_groups < 1 or experts % n_groups:
        raise ValueError(f"moe_route: n_groups ({n_groups}) must divide the number of experts ({experts})")
    if not 1 <= topk_groups <= n_groups:
        raise ValueError(f"moe_route: topk_groups must be in [1, n_groups={n_groups}], got {topk_groups}")
    if n_groups > 1 and top_k > topk_groups * (experts // n_groups):
        raise ValueError(f"moe_route: top_k ({top_k}) exceeds the experts of the {topk_groups} groups a token may use "
                         f"({topk_groups * (experts // n_groups)})")


def moe_route(logits: torch.Tensor, top_k: int, *, score: str = "softmax", bias: Optional[torch.Tensor] = None,
              n_groups: int = 1, topk_groups: int = 1, normalize: bool = True,
              scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (T, k) fp32, experts (T, k) int64, scores (T, E) fp32) for router logits (T, E)."""
    _check_route(logits, top_k, score, bias, n_groups, topk_groups)
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scores = torch.softmax(logits.to(compute), dim=-1) if score == "softmax" else torch.sigmoid(logits.to(compute))
    select = scores.detach() if bias is None else scores.detach() + bias.to(compute)
    tokens, n_exp = scores.shape
    if n_groups > 1:
        grouped = select.view(tokens, n_groups, n_exp // n_groups)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(
            1, group_score.topk(topk_groups, dim=-1).indices, True)
        select = grouped.masked_fill(~keep[..., None], float("-inf")).view(tokens, n_exp)
    experts = select.topk(top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return weights * scaling, experts, scores


def moe_permute(x: torch.Tensor, experts: torch.Tensor, num_experts: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_sorted (T*k, D), offs (E,) int32, order (T*k,), counts (E,) int64) for x (T, D) and
    experts (T, k): x_sorted[i] = x[order[i] // k], grouped by expert in ascending order."""
    if x.dim() != 2 or experts.dim() != 2 or experts.shape[0] != x.shape[0]:
        raise ValueError(f"moe_permute: x must be (tokens, dim) and experts (tokens, k), got {tuple(x.shape)} and "
                         f"{tuple(experts.shape)}")
    k = experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    return x.index_select(0, order // k), offs, order, counts


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inverse[order[i]] = i (on the device, no sync)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def moe_unpermute(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(T, D): out[t] = sum_j weights[t, j] * y of slot (t, j), y_sorted in moe_permute's order;
    the sum in fp32 (float64 for float64), returned in y_sorted's dtype."""
    tokens, k = weights.shape
    inverse = inverse_permutation(order)
    compute = torch.float64 if y_sorted.dtype == torch.float64 else torch.float32
    slots = y_sorted.index_select(0, inverse).view(tokens, k, -1).to(compute)
    return (slots * weights.to(compute)[..., None]).sum(1).to(y_sorted.dtype)


def load_balancing_loss(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e: f_e = counts[e] / sum(counts) (no gradient), P_e = mean over tokens of
    e's score normalised per token (softmax scores already are). 1 when perfectly balanced."""
    probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
    frac = counts.to(probs.dtype) / counts.sum().clamp_min(1).to(probs.dtype)
    return scores.shape[1] * (frac * probs.mean(0)).sum()
