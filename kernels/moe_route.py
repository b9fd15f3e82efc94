"""Mixture-of-experts routing in Triton: router logits (T, E) -> top-k experts per token and their
combine weights, in one pass over each token's row; and its backward.

Forward, per token (a program holds BLOCK_T tokens x BLOCK_E experts, the whole row):

    s      = softmax(logits) or sigmoid(logits)                     (fp32; float64 for float64)
    sel    = s + bias                                                (bias steers selection only)
    groups (N_GROUPS > 1): a group's score is the sum of its best two sel; experts outside the
           token's best topk_groups groups get sel = -inf
    e_j    = the k largest sel, largest first (ties: the lower expert id), k argmax passes
    w_j    = s[e_j] (/ sum_j s[e_j] when NORMALIZE) * scaling

Backward, per token, from dw (T, k) and the scores' own gradient ds_in (T, E; e.g. of the
load-balancing loss), with r_j = s[e_j] and S = sum_j r_j:

    dr_j   = scaling / S * (dw_j - sum_i dw_i * r_i / S)   (NORMALIZE; else scaling * dw_j)
    ds     = ds_in + dr scattered to the chosen experts
    dlogit = s * (ds - sum_e s * ds)  (softmax)  or  s * (1 - s) * ds  (sigmoid)

s is recomputed from the logits (nothing (T, E) is saved but the logits the router already holds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_EXPERTS = 4096
MAX_TOP_K = 64
MAX_GROUPS = 64
# Elements of the (BLOCK_T, BLOCK_E) tile a program holds: 16 per thread on 4 warps.
TILE = 2048
NUM_WARPS = 4


@triton.jit
def _row_scores(LOGITS, stride_l, tok, tok_ok, col, E, SIGMOID: tl.constexpr, F64: tl.constexpr):
    """(scores (BLOCK_T, BLOCK_E) in the compute dtype, 0 past E; the valid-column mask)."""
    col_ok = col < E
    mask = tok_ok[:, None] & col_ok[None, :]
    x = tl.load(LOGITS + tok[:, None] * stride_l + col[None, :], mask=mask, other=float("-inf"))
    x = x.to(tl.float64) if F64 else x.to(tl.float32)
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-x))
    else:
        x = tl.where(col_ok[None, :], x, float("-inf"))
        m = tl.max(x, 1)
        m = tl.where(m == float("-inf"), 0.0, m)  # rows past T: all -inf
        p = tl.exp(x - m[:, None])
        s = p / tl.maximum(tl.sum(p, 1), 1e-30)[:, None]
    return tl.where(mask, s, 0.0), col_ok


@triton.jit
def _moe_route_fwd_kernel(
    LOGITS, BIAS, W, IDX, SCORES,
    T, E, top_k, group_size, topk_groups, scaling, stride_l, stride_s,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, KP: tl.constexpr, N_GROUPS: tl.constexpr, NGP: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, F64: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < T
    col = tl.arange(0, BLOCK_E)
    s, col_ok = _row_scores(LOGITS, stride_l, tok, tok_ok, col, E, SIGMOID, F64)
    tl.store(SCORES + tok[:, None] * stride_s + col[None, :], s.to(SCORES.dtype.element_ty),
             mask=tok_ok[:, None] & col_ok[None, :])
    sel = s
    if HAS_BIAS:
        bias = tl.load(BIAS + col, mask=col_ok, other=0.0)
        sel = sel + (bias.to(tl.float64) if F64 else bias.to(tl.float32))[None, :]
    sel = tl.where(col_ok[None, :], sel, float("-inf"))
    if N_GROUPS > 1:
        # Group scores (BLOCK_T, NGP): the best two sel of each group (the best one for size 1).
        gcol = tl.arange(0, NGP)
        gscore = tl.full([BLOCK_T, NGP], float("-inf"), sel.dtype)
        for g in tl.static_range(N_GROUPS):
            in_g = (col // group_size) == g
            vals = tl.where(in_g[None, :], sel, float("-inf"))
            best = tl.max(vals, 1)
            first = tl.min(tl.where(vals == best[:, None], col[None, :], BLOCK_E), 1)
            second = tl.max(tl.where(col[None, :] == first[:, None], float("-inf"), vals), 1)
            total = tl.where(group_size > 1, best + second, best)
            gscore = tl.where(gcol[None, :] == g, total[:, None], gscore)
        # Keep the topk_groups best groups (ties: the lower group id); the rest of the row goes to -inf.
        keep = tl.zeros([BLOCK_T, NGP], tl.int32)
        for _ in range(topk_groups):
            best = tl.max(gscore, 1)
            pick = tl.min(tl.where(gscore == best[:, None], gcol[None, :], NGP), 1)
            keep = tl.where(gcol[None, :] == pick[:, None], 1, keep)
            gscore = tl.where(gcol[None, :] == pick[:, None], float("-inf"), gscore)
        allowed = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
        for g in tl.static_range(N_GROUPS):
            keep_g = tl.sum(tl.where(gcol[None, :] == g, keep, 0), 1)
            allowed = tl.where(((col // group_size) == g)[None, :] & (keep_g[:, None] > 0), 1, allowed)
        sel = tl.where(allowed > 0, sel, float("-inf"))
    # k argmax passes, largest first.
    kcol = tl.arange(0, KP)
    w = tl.zeros([BLOCK_T, KP], s.dtype)
    idx = tl.zeros([BLOCK_T, KP], tl.int64)
    for j in range(top_k):
        best = tl.max(sel, 1)
        # A row of NaN logits matches nothing: clamp, so the id stays a valid expert (a NaN weight
        # then carries the NaN on, as the torch backend's would).
        pick = tl.minimum(tl.min(tl.where(sel == best[:, None], col[None, :], BLOCK_E), 1), E - 1)
        hit = col[None, :] == pick[:, None]
        r = tl.sum(tl.where(hit, s, 0.0), 1)
        w = tl.where(kcol[None, :] == j, r[:, None], w)
        idx = tl.where(kcol[None, :] == j, pick.to(tl.int64)[:, None], idx)
        sel = tl.where(hit, float("-inf"), sel)
    if NORMALIZE:
        w = w / tl.maximum(tl.sum(w, 1), 1e-20)[:, None]
    w = w * scaling
    out_mask = tok_ok[:, None] & (kcol < top_k)[None, :]
    tl.store(W + tok[:, None] * top_k + kcol[None, :], w.to(W.dtype.element_ty), mask=out_mask)
    tl.store(IDX + tok[:, None] * top_k + kcol[None, :], idx, mask=out_mask)


@triton.jit
def _moe_route_bwd_kernel(
    LOGITS, DW, IDX, DSCORES, DLOGITS,
    T, E, top_k, scaling, stride_l, stride_ds, stride_dl,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, KP: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_DSCORES: tl.constexpr, NORMALIZE: tl.constexpr, F64: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < T
    col = tl.arange(0, BLOCK_E)
    s, col_ok = _row_scores(LOGITS, stride_l, tok, tok_ok, col, E, SIGMOID, F64)
    mask = tok_ok[:, None] & col_ok[None, :]
    if HAS_DSCORES:
        ds = tl.load(DSCORES + tok[:, None] * stride_ds + col[None, :], mask=mask, other=0.0)
        ds = ds.to(tl.float64) if F64 else ds.to(tl.float32)
    else:
        ds = tl.zeros([BLOCK_T, BLOCK_E], s.dtype)
    kcol = tl.arange(0, KP)
    kmask = tok_ok[:, None] & (kcol < top_k)[None, :]
    dw = tl.load(DW + tok[:, None] * top_k + kcol[None, :], mask=kmask, other=0.0)
    dw = dw.to(tl.float64) if F64 else dw.to(tl.float32)
    idx = tl.load(IDX + tok[:, None] * top_k + kcol[None, :], mask=kmask, other=-1)
    if NORMALIZE:
        r = tl.zeros([BLOCK_T, KP], s.dtype)  # the chosen raw scores s[e_j], from the recomputed s
        for j in range(top_k):
            pick = tl.sum(tl.where(kcol[None, :] == j, idx, 0), 1)
            r_j = tl.sum(tl.where(col[None, :] == pick[:, None], s, 0.0), 1)
            r = tl.where(kcol[None, :] == j, r_j[:, None], r)
        r_sum = tl.maximum(tl.sum(r, 1), 1e-20)
        dr = scaling / r_sum[:, None] * (dw - (tl.sum(dw * r, 1) / r_sum)[:, None])
    else:
        dr = dw * scaling
    for j in range(top_k):
        pick = tl.sum(tl.where(kcol[None, :] == j, idx, 0), 1)
        dr_j = tl.sum(tl.where(kcol[None, :] == j, dr, 0.0), 1)
        ds += tl.where(col[None, :] == pick[:, None], dr_j[:, None], 0.0)
    if SIGMOID:
        dl = s * (1.0 - s) * ds
    else:
        dl = s * (ds - tl.sum(s * ds, 1)[:, None])
    tl.store(DLOGITS + tok[:, None] * stride_dl + col[None, :], dl.to(DLOGITS.dtype.element_ty), mask=mask)


def tile_config(experts: int, top_k: int) -> dict:
    """BLOCK_T x BLOCK_E (the whole row of experts), KP (top_k rounded up to a power of two), num_warps."""
    block_e = max(16, triton.next_power_of_2(experts))
    return dict(BLOCK_T=max(1, TILE // block_e), BLOCK_E=block_e, KP=triton.next_power_of_2(top_k),
                num_warps=NUM_WARPS if block_e <= TILE else 8)


def group_config(n_groups: int) -> dict:
    """The forward's group constexprs: N_GROUPS (unrolled loops over the groups) and NGP (rounded up)."""
    return dict(N_GROUPS=n_groups, NGP=triton.next_power_of_2(max(1, n_groups)))


def all_configs() -> list[tuple[str, dict]]:
    """(kernel name, constexpr + num_warps config) the launchers pick at typical sizes: Mixtral (8
    experts, top-2), Qwen3-MoE (128, top-8), DeepSeek-V3 (256, top-8, 8 groups keep 4), Kimi K2 (384,
    top-8), and the largest row the kernels take (the compile gate builds each)."""
    out = []
    for experts, top_k, n_groups in ((8, 2, 1), (128, 8, 1), (256, 8, 8), (384, 8, 1), (MAX_EXPERTS, 8, 1)):
        cfg = tile_config(experts, top_k)
        for sigmoid in (False, True):
            out.append(("_moe_route_fwd_kernel", dict(cfg, **group_config(n_groups), SIGMOID=sigmoid, HAS_BIAS=True,
                                                      NORMALIZE=True, F64=False)))
            out.append(("_moe_route_bwd_kernel", dict(cfg, SIGMOID=sigmoid, HAS_DSCORES=True, NORMALIZE=True,
                                                      F64=False)))
    return out


def supports(logits: torch.Tensor, top_k: int, n_groups: int) -> str | None:
    """None when these kernels can route ``logits`` (T, E), else why not."""
    if logits.dtype not in SUPPORTED_DTYPES:
        return f"the Triton router takes float32/float16/bfloat16/float64 logits, got {logits.dtype}; use backend='torch'"
    if logits.shape[1] > MAX_EXPERTS:
        return f"{logits.shape[1]} experts > {MAX_EXPERTS} (one row per program) for the Triton router; use backend='torch'"
    if top_k > MAX_TOP_K or n_groups > MAX_GROUPS:
        return (f"top_k {top_k} (max {MAX_TOP_K}) or n_groups {n_groups} (max {MAX_GROUPS}) is beyond the Triton "
                "router; use backend='torch'")
    return None


def moe_route_forward(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, sigmoid: bool, n_groups: int,
                      topk_groups: int, normalize: bool, scaling: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (T, k), experts (T, k) int64, scores (T, E)) for logits (T, E) with unit column
    stride; weights and scores fp32 (float64 for float64 logits)."""
    tokens, experts = logits.shape
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    w = torch.empty((tokens, top_k), dtype=compute, device=logits.device)
    idx = torch.empty((tokens, top_k), dtype=torch.int64, device=logits.device)
    scores = torch.empty((tokens, experts), dtype=compute, device=logits.device)
    if tokens == 0:
        return w, idx, scores
    cfg = tile_config(experts, top_k)
    with launch_device(logits):
        _moe_route_fwd_kernel[(triton.cdiv(tokens, cfg["BLOCK_T"]),)](
            logits, logits if bias is None else bias, w, idx, scores,
            tokens, experts, top_k, experts // n_groups, topk_groups, float(scaling), logits.stride(0), scores.stride(0),
            **cfg, **group_config(n_groups), SIGMOID=sigmoid, HAS_BIAS=bias is not None, NORMALIZE=normalize,
            F64=compute == torch.float64,
        )
    return w, idx, scores


def moe_route_backward(logits: torch.Tensor, dw: torch.Tensor, idx: torch.Tensor,
                       dscores: torch.Tensor | None, sigmoid: bool, normalize: bool, scaling: float) -> torch.Tensor:
    """dlogits (T, E) in logits' dtype (see the module docstring); dw, idx contiguous (T, k),
    dscores (T, E) with unit column stride or None."""
    tokens, experts = logits.shape
    top_k = idx.shape[1]
    dlogits = torch.empty((tokens, experts), dtype=logits.dtype, device=logits.device)
    if tokens == 0:
        return dlogits
    cfg = tile_config(experts, top_k)
    with launch_device(logits):
        _moe_route_bwd_kernel[(triton.cdiv(tokens, cfg["BLOCK_T"]),)](
            logits, dw, idx, logits if dscores is None else dscores, dlogits,
            tokens, experts, top_k, float(scaling), logits.stride(0), 0 if dscores is None else dscores.stride(0),
            dlogits.stride(0), **cfg, SIGMOID=sigmoid, HAS_DSCORES=dscores is not None, NORMALIZE=normalize,
            F64=logits.dtype == torch.float64,
        )
    return dlogits
