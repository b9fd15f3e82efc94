"""Token permutation of a mixture-of-experts layer in Triton: each token's row copied to its k
slots in expert order, and back with the weighted combine over the k slots.

``inverse`` (T*k,) gives the row in expert order of each (token t, slot j), flattened token-major
(entry t*k + j; :func:`tokenforge.ops.moe_routing.inverse_permutation` of moe_permute's order). Two
kernels, one program per token, each walking the row in BLOCK_D-wide chunks with the token's k slots
as the other axis of a (KP, BLOCK_D) tile (KP = k rounded up to a power of two):

    _moe_scatter_kernel   dst[inverse[t*k + j]] = w[t, j] * src[t]        (no W: moe_permute's forward)
                          dw[t, j] = <src[t], y[inverse[t*k + j]]>         (WANT_DW: moe_unpermute's
                                                                            backward, src = dOut)
    _moe_combine_kernel   out[t] = sum_j w[t, j] * src[inverse[t*k + j]]   (moe_unpermute's forward;
                                                                            no W: moe_permute's backward)

src[t] is read once per chunk for all k slots. Products and sums are fp32 (float64 for float64
rows), rounded once to the output's dtype; a copy without weights moves the bits unchanged. Every
output row is written by one program and every sum runs in a fixed order, so the results are
bitwise reproducible (autograd of index_select would add moe_permute's gradient with atomics).
Row offsets are int64 (T*k rows of a wide model pass 2^31 elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Elements of the (KP, BLOCK_D) tile a program holds: with 4 warps, 16 per thread for each tensor
# in flight (about 32 bytes of bf16 per load), whatever k is.
TILE = 2048
NUM_WARPS = 4
MAX_K = 64  # KP tiles beyond this would leave BLOCK_D too narrow to move a row efficiently


@triton.jit
def _token_slots(INVERSE, W, t, k, KP: tl.constexpr, HAS_W: tl.constexpr, F64: tl.constexpr):
    """Token t's slots: (slot index, slot < k, each slot's row in expert order (int64), its weight
    in the compute dtype (1.0 without W))."""
    slot = tl.arange(0, KP)
    slot_ok = slot < k
    rows = tl.load(INVERSE + t * k + slot, mask=slot_ok, other=0).to(tl.int64)
    if HAS_W:
        w = tl.load(W + t * k + slot, mask=slot_ok, other=0.0)
    else:
        w = tl.full([KP], 1.0, tl.float32)
    w = w.to(tl.float64) if F64 else w.to(tl.float32)
    return slot, slot_ok, rows, w


@triton.jit
def _moe_scatter_kernel(
    SRC, INVERSE, W, DST, Y, DW,
    k, D, stride_src, stride_dst, stride_y,
    KP: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr, WANT_DW: tl.constexpr, F64: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot, slot_ok, rows, w = _token_slots(INVERSE, W, t, k, KP, HAS_W, F64)
    if WANT_DW:
        dot = tl.zeros([KP, BLOCK_D], dtype=tl.float64 if F64 else tl.float32)
    cols0 = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + cols0
        col_ok = cols < D
        mask = slot_ok[:, None] & col_ok[None, :]
        x = tl.load(SRC + t * stride_src + cols, mask=col_ok, other=0.0)
        if HAS_W or WANT_DW:
            x = x.to(tl.float64) if F64 else x.to(tl.float32)
        if HAS_W:
            val = x[None, :] * w[:, None]
        else:
            val = tl.broadcast_to(x[None, :], (KP, BLOCK_D))
        tl.store(DST + rows[:, None] * stride_dst + cols[None, :], val.to(DST.dtype.element_ty), mask=mask)
        if WANT_DW:
            y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
            dot += x[None, :] * (y.to(tl.float64) if F64 else y.to(tl.float32))
    if WANT_DW:
        tl.store(DW + t * k + slot, tl.sum(dot, 1).to(DW.dtype.element_ty), mask=slot_ok)


@triton.jit
def _moe_combine_kernel(
    SRC, INVERSE, W, OUT,
    k, D, stride_src, stride_out,
    KP: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr, F64: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot, slot_ok, rows, w = _token_slots(INVERSE, W, t, k, KP, HAS_W, F64)
    cols0 = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + cols0
        col_ok = cols < D
        src = tl.load(SRC + rows[:, None] * stride_src + cols[None, :], mask=slot_ok[:, None] & col_ok[None, :],
                      other=0.0)
        src = src.to(tl.float64) if F64 else src.to(tl.float32)
        if HAS_W:
            src = src * w[:, None]
        tl.store(OUT + t * stride_out + cols, tl.sum(src, 0).to(OUT.dtype.element_ty), mask=col_ok)


def slots_block(k: int) -> int:
    """KP: the k slots of a token rounded up to a power of two (the tile's first axis)."""
    return triton.next_power_of_2(max(1, k))


def tile_config(k: int, d: int) -> dict:
    """KP, BLOCK_D and num_warps for k slots of rows d wide: KP * BLOCK_D <= TILE, BLOCK_D >= 32."""
    kp = slots_block(k)
    block_d = max(32, min(TILE // kp, triton.next_power_of_2(max(1, d))))
    return dict(KP=kp, BLOCK_D=block_d, num_warps=NUM_WARPS)


def all_configs() -> list[tuple[str, dict]]:
    """Every (kernel name, constexpr + num_warps config) the launchers below can pick (bf16 rows;
    the compile gate builds each)."""
    out = []
    k = 1
    while k <= MAX_K:
        for d in (32, 4096):
            cfg = tile_config(k, d)
            for has_w, want_dw in ((False, False), (True, True)):
                out.append(("_moe_scatter_kernel", dict(cfg, HAS_W=has_w, WANT_DW=want_dw, F64=False)))
            for has_w in (False, True):
                out.append(("_moe_combine_kernel", dict(cfg, HAS_W=has_w, F64=False)))
        k *= 2
    return out


def supports(src: torch.Tensor, k: int) -> str | None:
    """None when these kernels can permute rows of ``src`` to k slots each, else why not."""
    if src.dtype not in SUPPORTED_DTYPES:
        return (f"the Triton permutation kernels take float32/float16/bfloat16/float64 rows, got {src.dtype}; "
                "use backend='torch'")
    if k > MAX_K:
        return f"top-k {k} > {MAX_K} slots per token is not supported by the Triton permutation kernels; use backend='torch'"
    return None


def moe_scatter(src: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None, k: int) -> torch.Tensor:
    """dst (T*k, D) in src's dtype: dst[inverse[t*k + j]] = weights[t, j] * src[t] (src (T, D) with
    unit column stride; weights (T, k) contiguous, or None for a plain copy)."""
    tokens, d = src.shape
    dst = torch.empty((tokens * k, d), dtype=src.dtype, device=src.device)
    if tokens == 0 or d == 0:
        return dst
    cfg = tile_config(k, d)
    with launch_device(src):
        _moe_scatter_kernel[(tokens,)](
            src, inverse, inverse if weights is None else weights, dst, dst, dst, k, d, src.stride(0), dst.stride(0), 0,
            **cfg, HAS_W=weights is not None, WANT_DW=False, F64=src.dtype == torch.float64,
        )
    return dst


def moe_scatter_backward(dout: torch.Tensor, y_sorted: torch.Tensor, inverse: torch.Tensor,
                         weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy_sorted (T*k, D) in y_sorted's dtype, dweights (T, k) in weights' dtype) of
    out = combine(y_sorted, weights): dy_sorted[inverse[t*k + j]] = weights[t, j] * dout[t] and
    dweights[t, j] = <dout[t], y_sorted[inverse[t*k + j]]>."""
    tokens, k = weights.shape
    d = y_sorted.shape[1]
    dy = torch.empty((tokens * k, d), dtype=y_sorted.dtype, device=y_sorted.device)
    dw = torch.zeros((tokens, k), dtype=weights.dtype, device=weights.device)
    if tokens == 0 or d == 0:
        return dy, dw
    cfg = tile_config(k, d)
    with launch_device(dout):
        _moe_scatter_kernel[(tokens,)](
            dout, inverse, weights, dy, y_sorted, dw, k, d, dout.stride(0), dy.stride(0), y_sorted.stride(0),
            **cfg, HAS_W=True, WANT_DW=True, F64=y_sorted.dtype == torch.float64,
        )
    return dy, dw


def moe_combine(src: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None, tokens: int) -> torch.Tensor:
    """out (tokens, D) in src's dtype: out[t] = sum_j weights[t, j] * src[inverse[t*k + j]] (src
    (tokens*k, D) with unit column stride; weights None: a plain sum)."""
    d = src.shape[1]
    k = src.shape[0] // tokens if tokens else 1
    out = torch.empty((tokens, d), dtype=src.dtype, device=src.device)
    if tokens == 0 or d == 0:
        return out
    cfg = tile_config(k, d)
    with launch_device(src):
        _moe_combine_kernel[(tokens,)](
            src, inverse, inverse if weights is None else weights, out, k, d, src.stride(0), out.stride(0),
            **cfg, HAS_W=weights is not None, F64=src.dtype == torch.float64,
        )
    return out
