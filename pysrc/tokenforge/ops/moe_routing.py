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
combine weights and the auxiliary loss). On the Triton backend (``backend="torch"`` for the plain
PyTorch ops) the router is one kernel per direction (tokenforge.kernels.moe_route: scores,
selection bias, groups, k argmax passes and the weights in one pass over each token's row; the
backward recomputes the scores from the logits), and the rows move on tokenforge.kernels.moe_permute:
the permutation writes each token's row to its k slots, and the combine reads each slot's row once
and writes only the (T, D) result, where the torch backend materialises the gathered and weighted
(T, k, D) copies in fp32 (about 8x the traffic at bf16); both gradients are sums in a fixed order, no
atomics. The sort and the counts are torch ops on (T*k,) integers.

Path of a call: :func:`moe_route` / :func:`moe_permute` / :func:`moe_unpermute` validate and pick a
backend -> :class:`MoERouteFunction` / :class:`MoEPermuteFunction` / :class:`MoEUnpermuteFunction` ->
the custom ops ``tokenforge::moe_route_fwd`` / ``_bwd``, ``moe_scatter`` / ``moe_combine`` /
``moe_combine_bwd`` -> ``tokenforge.kernels.moe_route`` / ``tokenforge.kernels.moe_permute``.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import backends
from tokenforge.ops.layout import rows_view

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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for every input dtype but float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_or_torch(op: str, first: torch.Tensor, *args, backend: Optional[str]) -> str:
    """The backend of a call: a kernel only where it can run these inputs; no tokens take the torch ops."""
    if first.numel() == 0:
        return "torch"
    return backends.choose(op, first, *args, backend=backend)


def moe_route_reference(logits: torch.Tensor, top_k: int, *, score: str = "softmax",
                        bias: Optional[torch.Tensor] = None, n_groups: int = 1, topk_groups: int = 1,
                        normalize: bool = True, scaling: float = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch :func:`moe_route` (the torch backend), differentiated by autograd."""
    compute = _compute_dtype(logits.dtype)
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


def moe_route(logits: torch.Tensor, top_k: int, *, score: str = "softmax", bias: Optional[torch.Tensor] = None,
              n_groups: int = 1, topk_groups: int = 1, normalize: bool = True,
              scaling: float = 1.0, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (T, k) fp32, experts (T, k) int64, scores (T, E) fp32) for router logits (T, E);
    float64 logits give float64 weights and scores. Experts come largest selection score first.
    The Triton kernel (``backend`` forces triton or torch) does the scores, the selection and the
    weights in one pass over each token's row, and its backward recomputes the scores from the
    logits (nothing (T, E) is saved)."""
    _check_route(logits, top_k, score, bias, n_groups, topk_groups)
    kw = dict(score=score, bias=bias, n_groups=n_groups, topk_groups=topk_groups, normalize=normalize,
              scaling=scaling)
    name = _kernel_or_torch(OP_ROUTE, logits, top_k, n_groups, backend=backend)
    if name == "torch":
        return moe_route_reference(logits, top_k, **kw)
    return MoERouteFunction.apply(logits, None if bias is None else bias.detach(), top_k, score == "sigmoid",
                                  n_groups, topk_groups, normalize, float(scaling), name)


def moe_permute(x: torch.Tensor, experts: torch.Tensor, num_experts: int, *, backend: Optional[str] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_sorted (T*k, D), offs (E,) int32, order (T*k,), counts (E,) int64) for x (T, D) and
    experts (T, k): x_sorted[i] = x[order[i] // k], grouped by expert in ascending order. The rows
    move on the Triton kernel (``backend`` forces triton or torch): its gradient sums each token's k
    rows in a fixed order (the torch backend's index_select adds them with atomics on CUDA)."""
    if not isinstance(x, torch.Tensor) or not isinstance(experts, torch.Tensor) or x.dim() != 2 or experts.dim() != 2 \
            or experts.shape[0] != x.shape[0]:
        raise ValueError(f"moe_permute: x must be (tokens, dim) and experts (tokens, k), got {tuple(getattr(x, 'shape', ()))} "
                         f"and {tuple(getattr(experts, 'shape', ()))}")
    if experts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"moe_permute: experts must be int32 or int64 expert ids, got {experts.dtype}")
    k = experts.shape[1]
    flat = experts.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    name = _kernel_or_torch(OP_PERMUTE, x, k, backend=backend)
    if name == "torch":
        return x.index_select(0, order // k), offs, order, counts
    return MoEPermuteFunction.apply(x, inverse_permutation(order), k, name), offs, order, counts


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inverse[order[i]] = i (on the device, no sync)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def moe_unpermute_reference(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch :func:`moe_unpermute` (the torch backend): gather, weight, sum over the slots."""
    tokens, k = weights.shape
    inverse = inverse_permutation(order)
    compute = _compute_dtype(y_sorted.dtype)
    slots = y_sorted.index_select(0, inverse).view(tokens, k, y_sorted.shape[1]).to(compute)
    return (slots * weights.to(compute)[..., None]).sum(1).to(y_sorted.dtype)


def moe_unpermute(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """(T, D): out[t] = sum_j weights[t, j] * y of slot (t, j), y_sorted (T*k, D) in moe_permute's
    order; the products and the sum in fp32 (float64 for float64), returned in y_sorted's dtype. The
    Triton kernel (``backend`` forces triton or torch) reads each slot's row once and writes only
    the (T, D) result; the torch backend materialises the gathered, weighted (T, k, D) copies."""
    if not isinstance(weights, torch.Tensor) or weights.dim() != 2 or not weights.is_floating_point():
        raise ValueError(f"moe_unpermute: weights must be a floating-point (tokens, k) tensor, got "
                         f"{getattr(weights, 'shape', type(weights).__name__)}")
    tokens, k = weights.shape
    if not isinstance(y_sorted, torch.Tensor) or y_sorted.dim() != 2 or y_sorted.shape[0] != tokens * k:
        raise ValueError(f"moe_unpermute: y_sorted must be (tokens * k, dim) = ({tokens * k}, dim) for weights "
                         f"{tuple(weights.shape)}, got {tuple(getattr(y_sorted, 'shape', ()))}")
    if order.shape != (tokens * k,):
        raise ValueError(f"moe_unpermute: order must be moe_permute's (tokens * k,) = ({tokens * k},), got "
                         f"{tuple(order.shape)}")
    if not y_sorted.is_floating_point():
        raise TypeError(f"moe_unpermute: y_sorted must be floating point, got {y_sorted.dtype}")
    name = _kernel_or_torch(OP_UNPERMUTE, y_sorted, k, backend=backend)
    if name == "torch":
        return moe_unpermute_reference(y_sorted, order, weights)
    return MoEUnpermuteFunction.apply(y_sorted, inverse_permutation(order), weights, name)


# ---------------------------------------------------------------------------------------------
# Backends, custom ops and autograd of the routing (tokenforge.kernels.moe_route).
# ---------------------------------------------------------------------------------------------

def _triton_supports(launchers: backends.Launchers):
    """supports(first tensor, *args) of a Triton launcher module: the device rules, then the module's own."""
    def check(first: torch.Tensor, *args) -> Optional[str]:
        reason = backends.triton_unsupported_reason(first.device)
        return reason if reason is not None else launchers["triton"].supports(first, *args)
    return check


OP_ROUTE = "moe_route"
ROUTE_LAUNCHERS = backends.Launchers(OP_ROUTE, triton="tokenforge.kernels.moe_route")
backends.register_op(OP_ROUTE, cuda_preference=("triton",),
                     supports={"triton": _triton_supports(ROUTE_LAUNCHERS), "torch": lambda logits, top_k, n_groups: None},
                     example_inputs=lambda device, dtype: (torch.empty(4, 8, device=device, dtype=dtype), 2, 1))


@torch.library.custom_op("tokenforge::moe_route_fwd", mutates_args=())
def moe_route_fwd(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, sigmoid: bool, n_groups: int,
                  topk_groups: int, normalize: bool, scaling: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ROUTE_LAUNCHERS[backend].moe_route_forward(logits, bias, top_k, sigmoid, n_groups, topk_groups,
                                                      normalize, scaling)


@moe_route_fwd.register_fake
def _(logits, bias, top_k, sigmoid, n_groups, topk_groups, normalize, scaling, backend):
    compute = _compute_dtype(logits.dtype)
    tokens = logits.shape[0]
    return (logits.new_empty((tokens, top_k), dtype=compute), logits.new_empty((tokens, top_k), dtype=torch.int64),
            logits.new_empty(logits.shape, dtype=compute))


@torch.library.custom_op("tokenforge::moe_route_bwd", mutates_args=())
def moe_route_bwd(logits: torch.Tensor, dweights: torch.Tensor, experts: torch.Tensor,
                  dscores: Optional[torch.Tensor], sigmoid: bool, normalize: bool, scaling: float,
                  backend: str) -> torch.Tensor:
    return ROUTE_LAUNCHERS[backend].moe_route_backward(logits, dweights, experts, dscores, sigmoid, normalize, scaling)


@moe_route_bwd.register_fake
def _(logits, dweights, experts, dscores, sigmoid, normalize, scaling, backend):
    return logits.new_empty(logits.shape)


class MoERouteFunction(torch.autograd.Function):
    """logits -> (weights, experts, scores); the gradients of weights and scores flow back into the
    logits (the bias only steers selection; experts are indices)."""

    @staticmethod
    def forward(ctx, logits, bias, top_k, sigmoid, n_groups, topk_groups, normalize, scaling, backend):
        l2 = rows_view(logits)
        weights, experts, scores = torch.ops.tokenforge.moe_route_fwd(l2, bias, top_k, sigmoid, n_groups,
                                                                      topk_groups, normalize, scaling, backend)
        ctx.save_for_backward(l2, experts)
        ctx.sigmoid, ctx.normalize, ctx.scaling, ctx.backend = sigmoid, normalize, scaling, backend
        ctx.mark_non_differentiable(experts)
        ctx.set_materialize_grads(False)  # an unused scores output adds nothing: no (T, E) zeros
        return weights, experts, scores

    @staticmethod
    def backward(ctx, dweights, _dexperts, dscores):
        l2, experts = ctx.saved_tensors
        if dweights is None:
            dweights = torch.zeros(experts.shape, dtype=_compute_dtype(l2.dtype), device=l2.device)
        if dscores is not None:
            dscores = rows_view(dscores)
        dlogits = torch.ops.tokenforge.moe_route_bwd(l2, dweights.contiguous(), experts, dscores, ctx.sigmoid,
                                                     ctx.normalize, ctx.scaling, ctx.backend)
        return dlogits, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Backends, custom ops and autograd of the permutation (tokenforge.kernels.moe_permute).
# ---------------------------------------------------------------------------------------------

OP_PERMUTE = "moe_permute"
OP_UNPERMUTE = "moe_unpermute"
LAUNCHERS = backends.Launchers(OP_PERMUTE, triton="tokenforge.kernels.moe_permute")
for _op in (OP_PERMUTE, OP_UNPERMUTE):
    backends.register_op(_op, cuda_preference=("triton",),
                         supports={"triton": _triton_supports(LAUNCHERS), "torch": lambda rows, k: None},
                         example_inputs=lambda device, dtype: (torch.empty(4, 64, device=device, dtype=dtype), 2))


@torch.library.custom_op("tokenforge::moe_scatter", mutates_args=())
def moe_scatter(src: torch.Tensor, inverse: torch.Tensor, weights: Optional[torch.Tensor], k: int,
                backend: str) -> torch.Tensor:
    return LAUNCHERS[backend].moe_scatter(src, inverse, weights, k)


@moe_scatter.register_fake
def _(src, inverse, weights, k, backend):
    return src.new_empty((src.shape[0] * k, src.shape[1]))


@torch.library.custom_op("tokenforge::moe_combine", mutates_args=())
def moe_combine(src: torch.Tensor, inverse: torch.Tensor, weights: Optional[torch.Tensor], tokens: int,
                backend: str) -> torch.Tensor:
    return LAUNCHERS[backend].moe_combine(src, inverse, weights, tokens)


@moe_combine.register_fake
def _(src, inverse, weights, tokens, backend):
    return src.new_empty((tokens, src.shape[1]))


@torch.library.custom_op("tokenforge::moe_combine_bwd", mutates_args=())
def moe_combine_bwd(dout: torch.Tensor, y_sorted: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return LAUNCHERS[backend].moe_scatter_backward(dout, y_sorted, inverse, weights)


@moe_combine_bwd.register_fake
def _(dout, y_sorted, inverse, weights, backend):
    return y_sorted.new_empty(y_sorted.shape), weights.new_empty(weights.shape)


class MoEPermuteFunction(torch.autograd.Function):
    """x (T, D) -> its rows in expert order (T*k, D); backward sums each token's k rows."""

    @staticmethod
    def forward(ctx, x, inverse, k, backend):
        ctx.save_for_backward(inverse)
        ctx.backend, ctx.tokens = backend, x.shape[0]
        return torch.ops.tokenforge.moe_scatter(rows_view(x), inverse, None, k, backend)

    @staticmethod
    def backward(ctx, dxs):
        (inverse,) = ctx.saved_tensors
        return torch.ops.tokenforge.moe_combine(rows_view(dxs), inverse, None, ctx.tokens, ctx.backend), None, None, None


class MoEUnpermuteFunction(torch.autograd.Function):
    """y_sorted (T*k, D), weights (T, k) -> the weighted combine (T, D); backward scatters
    weights * dOut back to the k rows and dots dOut with them for the weights' gradient."""

    @staticmethod
    def forward(ctx, y_sorted, inverse, weights, backend):
        y2, w = rows_view(y_sorted), weights.contiguous()
        ctx.save_for_backward(y2, inverse, w)
        ctx.backend = backend
        return torch.ops.tokenforge.moe_combine(y2, inverse, w, w.shape[0], backend)

    @staticmethod
    def backward(ctx, dout):
        y2, inverse, w = ctx.saved_tensors
        dout = rows_view(dout.to(y2.dtype))
        if not ctx.needs_input_grad[2]:  # no dot products to take
            return torch.ops.tokenforge.moe_scatter(dout, inverse, w, w.shape[1], ctx.backend), None, None, None
        dy, dw = torch.ops.tokenforge.moe_combine_bwd(dout, y2, inverse, w, ctx.backend)
        return dy, None, dw, None


def load_balancing_loss(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e: f_e = counts[e] / sum(counts) (no gradient), P_e = mean over tokens of
    e's score normalised per token (softmax scores already are). 1 when perfectly balanced."""
    probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
    frac = counts.to(probs.dtype) / counts.sum().clamp_min(1).to(probs.dtype)
    return scores.shape[1] * (frac * probs.mean(0)).sum()
