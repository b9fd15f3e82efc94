"""Cross-entropy in Triton: the loss and its gradient w.r.t. the logits in one forward kernel.

Per row (one token) with target t, label smoothing eps, z-loss weight z and V classes:

    x    = softcap * tanh(logits / softcap)      (only when softcap > 0; Gemma 2)
    lse  = logsumexp(x)                          (online over vocab blocks: running max m, sum d)
    loss = lse - (1 - eps) * x[t] - eps / V * sum(x) + z * lse**2
    dx_j = softmax(x)_j * (1 + 2 z lse) - eps / V - (1 - eps) [j == t]
    dlogits_j = scale * dx_j * sech(logits_j / softcap)**2   (the softcap factor only with softcap)

``scale`` is 1 / (number of non-ignored targets) for reduction 'mean' (read from a device scalar,
so no host sync), times an optional per-row factor (the upstream gradient of reduction 'none' in
the fused linear cross-entropy). All arithmetic is fp32 whatever the logits' dtype.

Class weights w (torch's ``weight=``), with W = sum_j w_j: the cross-entropy part becomes

    ce   = (1 - eps) * w[t] * (lse - x[t]) + eps / V * (W * lse - sum_j w_j x_j)
    dx_j = softmax(x)_j * ((1 - eps) w[t] + eps W / V) * ce_scale + softmax(x)_j * 2 z lse * z_scale
           - ((1 - eps) w[t] [j == t] + eps / V * w_j) * ce_scale

where 'mean' divides the cross-entropy part by the sum of w[t] over non-ignored tokens (torch's
rule) and the z-loss part by their number (it is not a class loss); unweighted, both are the count
and the formulas above reduce to the ones before. With ``SPLIT_Z`` the per-row z-loss term goes to
its own output (for ``return_z_loss`` and for the two denominators) and LOSS holds the rest. With
``HAS_PRED`` each row's predicted token is stored: the first argmax of the logits as given (before
the softcap, which only adds ties), -1 for an ignored row; token accuracy is derived from it.
With ``TOKEN_SCALING`` the row's loss, z-loss and gradient are multiplied by p_t = softmax(x)[t],
held constant (no gradient through it): Liger-Kernel's ``use_token_scaling``, the per-token
weighting of dynamic fine-tuning.

Pass 1 reads the row once (max, sum of exponentials, sum of x); pass 2 reads it again (mostly from
L2) and writes the gradient, so the backward never touches the logits: autograd only rescales the
saved gradient by grad_output (:func:`scale_rows_`). The gradient may be written over the logits
themselves (``dlogits=logits``): each element is read before it is overwritten by the same program.

Ignored rows (target == ignore_index) get loss 0 and a zero gradient row without reading the
logits. A target outside [0, V) that is not ignore_index makes the row's loss and gradient NaN
(checking on the host would need a device sync; ``tokenforge.ops.cross_entropy(validate=True)``
raises instead), so a bad label can never pass as a plausible number.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device
from tokenforge.kernels.activations import tanh

# Vocab columns per step. 8192 fp32 values over 16 warps are 16 per thread: no spills on sm_80 or
# sm_90 (tests/test_cross_entropy.py compile gate), and a 128k vocab takes 16 steps per pass.
MAX_BLOCK_V = 4096
SCALE_BLOCK = 4096
SCALE_WARPS = 8
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sech2(y):
    # 1 - tanh(y)**2 without the cancellation of 1 - t*t where |tanh(y)| is close to 1.
    e = tl.exp(-2.0 * tl.abs(y))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _dlogits_block(l_row, col, mask, lse, p_coef, smooth, target_col, t_coef, softcap, HAS_SOFTCAP: tl.constexpr):
    # One block of a row's gradient, fp32: exp(x - lse) * p_coef - smooth - [col == target] * t_coef,
    # x softcapped and the softcap's derivative applied when HAS_SOFTCAP (smooth: a scalar or per column).
    x = tl.load(l_row + col, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        y = x / softcap
        x = softcap * tanh(y)
    g = tl.exp(x - lse) * p_coef - smooth
    g = tl.where(col == target_col, g - t_coef, g)
    if HAS_SOFTCAP:
        g = g * _sech2(y)
    return g


@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS, TARGET, LOSS, DLOGITS, N_VALID, ROW_SCALE, CLASS_WEIGHT, W_VALID, Z_ROWS, PRED_ROWS,
    V, stride_l, stride_d, ignore_index, label_smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, MEAN: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SPLIT_Z: tl.constexpr, HAS_PRED: tl.constexpr,
    TOKEN_SCALING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    l_row = LOGITS + row * stride_l
    d_row = DLOGITS + row * stride_d
    target = tl.load(TARGET + row)

    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        if SPLIT_Z:
            tl.store(Z_ROWS + row, 0.0)
        if HAS_PRED:
            tl.store(PRED_ROWS + row, -1)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                col = start + tl.arange(0, BLOCK_V)
                tl.store(d_row + col, tl.zeros([BLOCK_V], dtype=DLOGITS.dtype.element_ty), mask=col < V)
    else:
        in_range = (target >= 0) & (target < V)
        safe_target = tl.where(in_range, target, 0)

        # Pass 1: online logsumexp, the sum of x (label smoothing), with class weights their sum and
        # the weighted sum of x, and the first argmax of the raw logits (the predicted token).
        m = -float("inf")
        d = 0.0
        s = 0.0
        sw = 0.0
        swx = 0.0
        best = -float("inf")
        best_col = 0  # torch.argmax's answer for a row of -inf
        for start in range(0, V, BLOCK_V):
            col = start + tl.arange(0, BLOCK_V)
            mask = col < V
            x = tl.load(l_row + col, mask=mask, other=-float("inf")).to(tl.float32)
            if HAS_PRED:
                blk_best = tl.max(x, axis=0)
                blk_col = tl.min(tl.where(mask & (x == blk_best), col, V), axis=0)
                best_col = tl.where(blk_best > best, blk_col, best_col)  # strict: earlier ties win
                best = tl.maximum(best, blk_best)
            if HAS_SOFTCAP:
                x = tl.where(mask, softcap * tanh(x / softcap), -float("inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            xz = tl.where(mask, x, 0.0)
            s += tl.sum(xz, axis=0)
            if HAS_WEIGHT:
                w = tl.load(CLASS_WEIGHT + col, mask=mask, other=0.0)
                sw += tl.sum(w, axis=0)
                swx += tl.sum(w * xz, axis=0)
            m = m_new
        lse = m + tl.log(d)

        x_t = tl.load(l_row + safe_target).to(tl.float32)
        if HAS_SOFTCAP:
            x_t = softcap * tanh(x_t / softcap)
        w_t = 1.0
        if HAS_WEIGHT:
            w_t = tl.load(CLASS_WEIGHT + safe_target)
            ce = (1.0 - label_smoothing) * w_t * (lse - x_t) + label_smoothing / V * (sw * lse - swx)
        else:
            ce = lse - (1.0 - label_smoothing) * x_t - label_smoothing / V * s
        zl = z_loss * lse * lse
        p_t = 1.0
        if TOKEN_SCALING:
            p_t = tl.exp(x_t - lse)
            ce = ce * p_t
            zl = zl * p_t
        nan = float("nan")
        if SPLIT_Z:
            tl.store(LOSS + row, tl.where(in_range, ce, nan))
            tl.store(Z_ROWS + row, tl.where(in_range, zl, nan))
        else:
            tl.store(LOSS + row, tl.where(in_range, ce + zl, nan))
        if HAS_PRED:
            tl.store(PRED_ROWS + row, best_col.to(tl.int64))

        if COMPUTE_GRAD:
            scale = tl.where(in_range, p_t, nan)
            if HAS_ROW_SCALE:
                scale = scale * tl.load(ROW_SCALE + row).to(tl.float32)
            ce_scale = scale
            z_scale = scale
            if MEAN:
                z_scale = scale / tl.load(N_VALID)
                if HAS_WEIGHT:
                    ce_scale = scale / tl.load(W_VALID)
                else:
                    ce_scale = z_scale
            # d/dx_j = p_j * p_coef - [j == t] * t_coef - smooth * w_j (w_j = 1 unweighted)
            if HAS_WEIGHT:
                p_coef = ((1.0 - label_smoothing) * w_t + label_smoothing * sw / V) * ce_scale \
                    + 2.0 * z_loss * lse * z_scale
            else:
                p_coef = ce_scale + 2.0 * z_loss * lse * z_scale
            t_coef = (1.0 - label_smoothing) * w_t * ce_scale
            smooth = label_smoothing / V * ce_scale
            # Pass 2: the gradient (reads x again before the same program overwrites it).
            for start in range(0, V, BLOCK_V):
                col = start + tl.arange(0, BLOCK_V)
                mask = col < V
                if HAS_WEIGHT:
                    g = _dlogits_block(l_row, col, mask, lse, p_coef,
                                       smooth * tl.load(CLASS_WEIGHT + col, mask=mask, other=0.0), safe_target,
                                       t_coef, softcap, HAS_SOFTCAP)
                else:
                    g = _dlogits_block(l_row, col, mask, lse, p_coef, smooth, safe_target, t_coef, softcap,
                                       HAS_SOFTCAP)
                tl.store(d_row + col, g.to(DLOGITS.dtype.element_ty), mask=mask)


@triton.jit
def _vocab_shard_stats_kernel(
    LOGITS, TARGET, STATS, V_local, vocab_start, stride_l, stride_s, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Pass 1 of the kernel above on one rank's slice of the vocab (tensor parallelism): per row the
    # slice's running max m, sum of exp(x - m), sum of x, and x at the target when this slice holds
    # it (else 0). STATS is (4, rows) fp32; the ranks' rows are combined by the caller. An ignored
    # row reads nothing and stores m = 0, sum 1 (a finite log-sum-exp the caller masks out).
    row = tl.program_id(0).to(tl.int64)
    l_row = LOGITS + row * stride_l
    target = tl.load(TARGET + row)
    if target == ignore_index:
        tl.store(STATS + row, 0.0)
        tl.store(STATS + stride_s + row, 1.0)
        tl.store(STATS + 2 * stride_s + row, 0.0)
        tl.store(STATS + 3 * stride_s + row, 0.0)
    else:
        m = -float("inf")
        d = 0.0
        s = 0.0
        for start in range(0, V_local, BLOCK_V):
            col = start + tl.arange(0, BLOCK_V)
            mask = col < V_local
            x = tl.load(l_row + col, mask=mask, other=-float("inf")).to(tl.float32)
            if HAS_SOFTCAP:
                x = tl.where(mask, softcap * tanh(x / softcap), -float("inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # An empty slice so far (m_new = -inf) adds nothing, and exp(-inf - -inf) would be nan.
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            s += tl.sum(tl.where(mask, x, 0.0), axis=0)
            m = m_new
        local_t = target - vocab_start
        here = (local_t >= 0) & (local_t < V_local)
        x_t = tl.load(l_row + tl.where(here, local_t, 0), mask=here, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x_t = softcap * tanh(x_t / softcap)
        tl.store(STATS + row, m)
        tl.store(STATS + stride_s + row, d)
        tl.store(STATS + 2 * stride_s + row, s)
        tl.store(STATS + 3 * stride_s + row, tl.where(here, x_t, 0.0))


@triton.jit
def _vocab_shard_grad_kernel(
    LOGITS, TARGET, DLOGITS, COEFS, V_local, vocab_start, stride_l, stride_d, stride_c, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Pass 2 on one rank's slice: d/dx_j = exp(x_j - lse) * p_coef - smooth - [j == t] * t_coef, with
    # the row's global lse and coefficients in COEFS (4, rows) fp32 = (lse, p_coef, t_coef, smooth),
    # computed by the caller from every rank's pass 1. Written over the logits when DLOGITS is LOGITS.
    row = tl.program_id(0).to(tl.int64)
    l_row = LOGITS + row * stride_l
    d_row = DLOGITS + row * stride_d
    target = tl.load(TARGET + row)
    if target == ignore_index:
        for start in range(0, V_local, BLOCK_V):
            col = start + tl.arange(0, BLOCK_V)
            tl.store(d_row + col, tl.zeros([BLOCK_V], dtype=DLOGITS.dtype.element_ty), mask=col < V_local)
    else:
        lse = tl.load(COEFS + row)
        p_coef = tl.load(COEFS + stride_c + row)
        t_coef = tl.load(COEFS + 2 * stride_c + row)
        smooth = tl.load(COEFS + 3 * stride_c + row)
        local_t = target - vocab_start
        for start in range(0, V_local, BLOCK_V):
            col = start + tl.arange(0, BLOCK_V)
            mask = col < V_local
            g = _dlogits_block(l_row, col, mask, lse, p_coef, smooth, local_t, t_coef, softcap, HAS_SOFTCAP)
            tl.store(d_row + col, g.to(DLOGITS.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(D, G, V, stride_d, stride_g, BLOCK: tl.constexpr):
    # D[row, :] *= G[row * stride_g] in fp32, in place (stride_g = 0: one scalar for every row).
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = col < V
    g = tl.load(G + row * stride_g).to(tl.float32)
    d = tl.load(D + row * stride_d + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(D + row * stride_d + col, (d * g).to(D.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration: the compile gate (tests/test_cross_entropy.py) compiles every config.
# ---------------------------------------------------------------------------------------------


def fwd_config(V: int) -> dict:
    """BLOCK_V/num_warps of the forward kernel for a vocab of V classes."""
    block_v = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(V)))
    num_warps = min(16, max(1, block_v // 512))
    return dict(BLOCK_V=block_v, num_warps=num_warps)


def all_configs() -> list[tuple[str, dict]]:
    """Every (kernel name, constexpr + num_warps config) the launchers below can pick."""
    out = []
    block_v = 16
    while block_v <= MAX_BLOCK_V:
        out.append(("_cross_entropy_fwd_kernel", fwd_config(block_v)))
        block_v *= 2
    block_v = 16
    while block_v <= MAX_BLOCK_V:
        cfg = fwd_config(block_v)
        out += [("_vocab_shard_stats_kernel", cfg), ("_vocab_shard_grad_kernel", cfg)]
        block_v *= 2
    out.append(("_scale_rows_kernel", dict(BLOCK=SCALE_BLOCK, num_warps=SCALE_WARPS)))
    return out


# ---------------------------------------------------------------------------------------------
# Launchers: 2-D logits with unit column stride, already validated by tokenforge.ops.
# ---------------------------------------------------------------------------------------------


def supports(logits: torch.Tensor) -> Optional[str]:
    """None when these kernels can run on logits of this dtype, else why not."""
    if logits.dtype not in SUPPORTED_DTYPES:
        return (f"logits dtype {logits.dtype} is not one of float32/float16/bfloat16 for the triton kernels; "
                "use backend='torch'")
    return None


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    n_valid: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
    dlogits: Optional[torch.Tensor] = None,
    compute_grad: bool = True,
    class_weight: Optional[torch.Tensor] = None,
    weight_valid: Optional[torch.Tensor] = None,
    z_rows: Optional[torch.Tensor] = None,
    pred_rows: Optional[torch.Tensor] = None,
    token_scaling: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(loss, dlogits) for logits (rows, V) with unit column stride and int64 target (rows,).

    loss: fp32 (rows,), unreduced (0 for ignored rows). dlogits: the gradient of
    ``sum(loss) / n_valid`` (``n_valid``: fp32 device scalar; None means no division) times
    ``row_scale`` (fp32 (rows,) or None), in logits' dtype, written into ``dlogits`` when given
    (which may be ``logits`` itself), else into a new tensor; None when not ``compute_grad``.

    ``class_weight``: fp32 contiguous (V,) class weights; with ``n_valid``, ``weight_valid`` (fp32
    device scalar, the sum of w[t] over non-ignored rows) divides the cross-entropy part and
    ``n_valid`` the z-loss part. ``z_rows`` (fp32 (rows,)): when given, the z-loss term is written
    there and left out of loss. ``pred_rows`` (int64 (rows,)): each row's first argmax, -1 if ignored.
    ``token_scaling``: each row's loss and gradient times its (constant) target probability."""
    rows, V = logits.shape
    loss = torch.empty((rows,), dtype=torch.float32, device=logits.device)
    if compute_grad and dlogits is None:
        dlogits = torch.empty((rows, V), dtype=logits.dtype, device=logits.device)
    if rows == 0:
        return loss, dlogits if compute_grad else None
    if class_weight is not None and n_valid is not None and weight_valid is None:
        raise ValueError("cross_entropy_forward: class weights with a mean need weight_valid")
    d = dlogits if compute_grad else logits  # never written when COMPUTE_GRAD is False
    # Pointers the constexpr flags leave unread get any tensor of the right device.
    nv = n_valid if n_valid is not None else loss
    rs = row_scale if row_scale is not None else loss
    cw = class_weight if class_weight is not None else loss
    wv = weight_valid if weight_valid is not None else loss
    zr = z_rows if z_rows is not None else loss
    pr = pred_rows if pred_rows is not None else target
    cfg = fwd_config(V)
    with launch_device(logits.device):
        _cross_entropy_fwd_kernel[(rows,)](
            logits, target, loss, d, nv, rs, cw, wv, zr, pr,
            V, logits.stride(0), d.stride(0), int(ignore_index),
            float(label_smoothing), float(z_loss), float(softcap) if softcap else 1.0,
            HAS_SOFTCAP=bool(softcap), MEAN=n_valid is not None, HAS_ROW_SCALE=row_scale is not None,
            COMPUTE_GRAD=compute_grad, HAS_WEIGHT=class_weight is not None, SPLIT_Z=z_rows is not None,
            HAS_PRED=pred_rows is not None, TOKEN_SCALING=bool(token_scaling), **cfg,
        )
    return loss, dlogits if compute_grad else None


def scale_rows_(dlogits: torch.Tensor, grad_output: torch.Tensor) -> None:
    """dlogits (rows, V) *= grad_output (a scalar, or one value per row), in place, fp32 math."""
    rows, V = dlogits.shape
    if rows == 0 or V == 0:
        return
    g = grad_output.reshape(-1)
    stride_g = 0 if g.numel() == 1 else g.stride(0)
    with launch_device(dlogits.device):
        _scale_rows_kernel[(rows, triton.cdiv(V, SCALE_BLOCK))](
            dlogits, g, V, dlogits.stride(0), stride_g, BLOCK=SCALE_BLOCK, num_warps=SCALE_WARPS,
        )


def vocab_shard_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, *, ignore_index: int = -100,
                      softcap: float = 0.0) -> torch.Tensor:
    """fp32 (4, rows): per row of logits (rows, V_local), this rank's slice [vocab_start, vocab_start +
    V_local) of a vocab split across ranks, the slice's (max, sum of exp(x - max), sum of x, x at the
    target or 0 when another slice holds it), x softcapped first when ``softcap``; an ignored row
    gives (0, 1, 0, 0). The caller combines the ranks' stats into each row's log-sum-exp."""
    rows, V_local = logits.shape
    stats = torch.empty((4, rows), dtype=torch.float32, device=logits.device)
    if rows == 0:
        return stats
    with launch_device(logits.device):
        _vocab_shard_stats_kernel[(rows,)](
            logits, target, stats, V_local, int(vocab_start), logits.stride(0), stats.stride(0), int(ignore_index),
            float(softcap) if softcap else 1.0, HAS_SOFTCAP=bool(softcap), **fwd_config(max(1, V_local)),
        )
    return stats


def vocab_shard_grad_(logits: torch.Tensor, target: torch.Tensor, coefs: torch.Tensor, vocab_start: int, *,
                      ignore_index: int = -100, softcap: float = 0.0) -> None:
    """Write over logits (rows, V_local), this rank's vocab slice, the gradient
    exp(x - lse) * p_coef - smooth - [j == target] * t_coef (x softcapped, and the softcap's
    derivative applied, when ``softcap``) from ``coefs`` fp32 (4, rows) = (lse, p_coef, t_coef,
    smooth); ignored rows get zeros."""
    rows, V_local = logits.shape
    if rows == 0 or V_local == 0:
        return
    with launch_device(logits.device):
        _vocab_shard_grad_kernel[(rows,)](
            logits, target, logits, coefs, V_local, int(vocab_start), logits.stride(0), logits.stride(0),
            coefs.stride(0), int(ignore_index), float(softcap) if softcap else 1.0, HAS_SOFTCAP=bool(softcap),
            **fwd_config(V_local),
        )
