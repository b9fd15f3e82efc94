"""Residual add + RMSNorm in Triton, forward and backward, in one pass over the rows.

    h     = round_to_residual_dtype(x + residual)      (the new residual stream, stored)
    rstd  = 1 / sqrt(mean(h**2) + eps)                 (fp32 per row, from the *rounded* h)
    y     = h * rstd * w                               (stored in x's dtype)

h is rounded to its storage dtype before it is normalised, exactly as the unfused
``h = x + residual; y = rms_norm(h)`` does, so the fused and unfused paths agree bit for bit up to
the order of the fp32 reduction.

Backward, with dh the upstream gradient of h (None when h was not used) and the RMSNorm backward
of kernels/rms_norm.py (xhat = h * rstd, g = dy * w):

    dh_total = dh + rstd * (g - xhat * mean(g * xhat))     written twice: into dx (x's dtype) and
    dw       = sum over rows of dy * xhat                  dresidual (residual's dtype)

(the rounding of x + residual passes gradients straight through, like autograd's ``.to()``).

The launch configs and width limits are those of kernels/rms_norm.py (its config functions are
reused); the backward row kernel holds one more value per element (dh), so its limit is checked
separately by the compile gate. Rows longer than that take chunked kernels: the forward writes h
in a first pass and reads it back (from L2 mostly) to normalise; the backward reuses rms_norm's
per-row dot kernel on h and then tiles the columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device

from tokenforge.kernels import rms_norm as _rn
from tokenforge.kernels.fp8_quantize import emission_buffers, emit_fp8_tile

FWD_MAX_ROW_N = _rn.FWD_MAX_ROW_N
BWD_MAX_ROW_N = _rn.BWD_MAX_ROW_N
CHUNK_N = _rn.CHUNK_N
CHUNK_WARPS = _rn.CHUNK_WARPS
MAX_N = _rn.MAX_N
fwd_rows_config = _rn.fwd_rows_config
bwd_rows_config = _rn.bwd_rows_config
emission_group = _rn.emission_group
emission_modes = _rn.emission_modes
can_emit_fp8 = _rn.can_emit_fp8


@triton.jit
def _add_rms_norm_fwd_rows_kernel(
    X, R, W, Y, H, RSTD, DATA, SCALE,
    rows, n, stride_x, stride_r, stride_y, stride_h, eps, stride_scale,
    HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EMIT_FP8: tl.constexpr = False, GROUP: tl.constexpr = 1, FP8_MAX: tl.constexpr = 448.0,
    MBITS: tl.constexpr = 3, BIAS: tl.constexpr = 7, POW2: tl.constexpr = False, SOFT_CAST: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_N)
    row_ok = row < rows
    mask = row_ok[:, None] & (col < n)[None, :]

    x = tl.load(X + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row[:, None] * stride_r + col[None, :], mask=mask, other=0.0).to(tl.float32)
    h = (x + r).to(H.dtype.element_ty)  # rounded as stored: the norm sees what the next layer adds to
    tl.store(H + row[:, None] * stride_h + col[None, :], h, mask=mask)
    h = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / n + eps)
    tl.store(RSTD + row, rstd, mask=row_ok)

    y = h * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + col, mask=col < n, other=0.0).to(tl.float32)
        y = y * w[None, :]
    y_out = y.to(Y.dtype.element_ty)
    tl.store(Y + row[:, None] * stride_y + col[None, :], y_out, mask=mask)
    if EMIT_FP8:  # the normed output quantized for the next Float8Linear, from the values just stored
        emit_fp8_tile(y_out.to(tl.float32), row, row_ok, 0, n, DATA, SCALE, n, stride_scale,
                      FP8_MAX, MBITS, BIAS, POW2, SOFT_CAST, BLOCK_M, BLOCK_N, GROUP)


@triton.jit
def _add_rms_norm_fwd_chunked_kernel(
    X, R, W, Y, H, RSTD,
    n, stride_x, stride_r, stride_y, stride_h, eps,
    HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Pass 1: h = x + residual, stored, and its sum of squares.
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        x = tl.load(X + row * stride_x + col, mask=col < n, other=0.0).to(tl.float32)
        r = tl.load(R + row * stride_r + col, mask=col < n, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + col, h, mask=col < n)
        h = h.to(tl.float32)
        acc += h * h
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n + eps)
    tl.store(RSTD + row, rstd)
    # Pass 2: normalise h as stored (a read that mostly hits L2). The barrier makes pass 1's
    # stores visible to every thread of the program, whatever layout the compiler gives each pass.
    tl.debug_barrier()
    for start in range(0, n, BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        y = tl.load(H + row * stride_h + col, mask=col < n, other=0.0).to(tl.float32) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + col, mask=col < n, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + col, y.to(Y.dtype.element_ty), mask=col < n)


@triton.jit
def _add_rms_norm_bwd_rows_kernel(
    DY, DH, H, W, RSTD, DX, DR, DW_PARTIAL,
    rows, n, stride_dy, stride_dh, stride_h, stride_dx, stride_dr,
    HAS_WEIGHT: tl.constexpr, HAS_DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    col = tl.arange(0, BLOCK_N)
    col_ok = col < n
    if HAS_WEIGHT:
        w = tl.load(W + col, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)

    for block in range(pid, tl.cdiv(rows, BLOCK_M), programs):
        row = tl.cast(block, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = row < rows
        mask = row_ok[:, None] & col_ok[None, :]
        h = tl.load(H + row[:, None] * stride_h + col[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row[:, None] * stride_dy + col[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row_ok, other=0.0)

        xhat = h * rstd[:, None]
        g = dy
        if HAS_WEIGHT:
            g = dy * w[None, :]
            dw += tl.sum(dy * xhat, axis=0)
        c = tl.sum(g * xhat, axis=1) / n
        d = (g - xhat * c[:, None]) * rstd[:, None]
        if HAS_DH:
            d += tl.load(DH + row[:, None] * stride_dh + col[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row[:, None] * stride_dx + col[None, :], d.to(DX.dtype.element_ty), mask=mask)
        tl.store(DR + row[:, None] * stride_dr + col[None, :], d.to(DR.dtype.element_ty), mask=mask)

    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n + col, dw, mask=col_ok)


@triton.jit
def _add_rms_norm_bwd_chunked_kernel(
    DY, DH, H, W, RSTD, C, DX, DR, DW_PARTIAL,
    rows, n, stride_dy, stride_dh, stride_h, stride_dx, stride_dr,
    HAS_WEIGHT: tl.constexpr, HAS_DH: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid = (column chunks, programs); program (j, p) owns columns of chunk j for rows p, p+P, ...
    col = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = col < n
    pid = tl.program_id(1)
    programs = tl.num_programs(1)
    if HAS_WEIGHT:
        w = tl.load(W + col, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r in range(pid, rows, programs):
        row = tl.cast(r, tl.int64)
        h = tl.load(H + row * stride_h + col, mask=col_ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + col, mask=col_ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        c = tl.load(C + row)
        xhat = h * rstd
        g = dy
        if HAS_WEIGHT:
            g = dy * w
            dw += dy * xhat
        d = (g - xhat * c) * rstd
        if HAS_DH:
            d += tl.load(DH + row * stride_dh + col, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + col, d.to(DX.dtype.element_ty), mask=col_ok)
        tl.store(DR + row * stride_dr + col, d.to(DR.dtype.element_ty), mask=col_ok)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n + col, dw, mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launch configuration: the compile gate compiles every config all_configs() lists.
# ---------------------------------------------------------------------------------------------


def all_configs() -> list[tuple[str, dict]]:
    """Every (kernel name, constexpr + num_warps config) the launchers below can pick."""
    out = []
    block_n = 16
    while block_n <= FWD_MAX_ROW_N:
        out.append(("_add_rms_norm_fwd_rows_kernel", fwd_rows_config(block_n)))
        for blockwise in emission_modes(block_n):  # with fp8 emission (add_rms_norm_forward_fp8); the gate sets the format
            out.append(("_add_rms_norm_fwd_rows_kernel", dict(fwd_rows_config(block_n), EMIT_FP8=True,
                                                              GROUP=emission_group(block_n, blockwise))))
        if block_n <= BWD_MAX_ROW_N:
            out.append(("_add_rms_norm_bwd_rows_kernel", bwd_rows_config(block_n)))
        block_n *= 2
    chunked = dict(BLOCK_N=CHUNK_N, num_warps=CHUNK_WARPS)
    for name in ("_add_rms_norm_fwd_chunked_kernel", "_add_rms_norm_bwd_chunked_kernel"):
        out.append((name, dict(chunked)))
    return out


# ---------------------------------------------------------------------------------------------
# Launchers: 2-D inputs with unit column stride, already validated by tokenforge.ops.add_rms_norm.
# ---------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(x: torch.Tensor, residual: torch.Tensor, weight) -> str | None:
    """None when these kernels can run on (x, residual, weight), else why not."""
    for name, t in (("x", x), ("residual", residual), ("weight", weight)):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} is not one of float32/float16/bfloat16 for the triton kernels; use backend='torch'"
    if x.shape[-1] > MAX_N:
        return f"last dim {x.shape[-1]} > {MAX_N} is not supported by the triton kernels; use backend='torch'"
    return None



def add_rms_norm_forward_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
                             fp8_dtype: torch.dtype, blockwise: bool, power_of_two: bool) -> tuple[torch.Tensor, ...]:
    """(y, h, rstd, data, scale): :func:`add_rms_norm_forward` plus y quantized in the same pass,
    rowwise or in (1, 128) blocks, bit-identical to quantizing the stored y. n <= FWD_MAX_ROW_N."""
    rows, n = x.shape
    if not can_emit_fp8(n, blockwise):
        raise ValueError(f"add_rms_norm_forward_fp8: rows of {n} are too long to emit fp8 {'blocks' if blockwise else 'rowwise'}")
    data, scale, data_arg, fmt = emission_buffers(rows, n, fp8_dtype, blockwise, power_of_two, x.device)
    y, h, rstd = add_rms_norm_forward(x, residual, weight, eps, _emit=(data_arg, scale, blockwise, fmt))
    return y, h, rstd, data, scale


def add_rms_norm_forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                         eps: float, _emit=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, rstd) for x, residual (rows, n) with unit column stride: y in x's dtype, h = x +
    residual in residual's dtype, rstd fp32 (rows,)."""
    rows, n = x.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    h = torch.empty((rows, n), dtype=residual.dtype, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    w = weight if weight is not None else x  # never read when HAS_WEIGHT is False
    args = (x, residual, w, y, h, rstd)
    strides = (x.stride(0), residual.stride(0), y.stride(0), h.stride(0), eps)
    with launch_device(x):
        if n <= FWD_MAX_ROW_N:
            cfg = fwd_rows_config(n)
            data, scale, emit = (y, rstd, {}) if _emit is None else (
                _emit[0], _emit[1], dict(EMIT_FP8=True, GROUP=emission_group(cfg["BLOCK_N"], _emit[2]), **_emit[3]))
            _add_rms_norm_fwd_rows_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]),)](
                *args, data, scale, rows, n, *strides, scale.stride(0) if _emit else 0,
                HAS_WEIGHT=weight is not None, **cfg, **emit)
        else:
            _add_rms_norm_fwd_chunked_kernel[(rows,)](
                *args, n, *strides, HAS_WEIGHT=weight is not None, BLOCK_N=CHUNK_N, num_warps=CHUNK_WARPS)
    return y, h, rstd


def add_rms_norm_backward(
    dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor | None,
    rstd: torch.Tensor, x_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dresidual, dw): dy (rows, n) the gradient of y, dh that of h (or None), h the saved new
    residual; dx in ``x_dtype``, dresidual in h's dtype, dw in weight's dtype (None without weight)."""
    rows, n = h.shape
    dx = torch.empty((rows, n), dtype=x_dtype, device=h.device)
    dr = torch.empty((rows, n), dtype=h.dtype, device=h.device)
    has_weight, has_dh = weight is not None, dh is not None
    w = weight if has_weight else h
    dh_ = dh if has_dh else h
    flags = dict(HAS_WEIGHT=has_weight, HAS_DH=has_dh)
    strides = (dy.stride(0), dh_.stride(0), h.stride(0), dx.stride(0), dr.stride(0))
    with launch_device(h):
        if n <= BWD_MAX_ROW_N:
            cfg = bwd_rows_config(n)
            programs = _rn._persistent_programs(h.device, triton.cdiv(rows, cfg["BLOCK_M"]))
            partial = torch.empty((programs, n) if has_weight else (1,), dtype=torch.float32, device=h.device)
            _add_rms_norm_bwd_rows_kernel[(programs,)](
                dy, dh_, h, w, rstd, dx, dr, partial, rows, n, *strides, **flags, **cfg)
        else:
            # mean(g * xhat) per row: exactly rms_norm's per-row dot product, with h as its x.
            c = torch.empty((rows,), dtype=torch.float32, device=h.device)
            _rn._rms_norm_bwd_row_dot_kernel[(rows,)](
                dy, h, w, rstd, c, n, dy.stride(0), h.stride(0),
                HAS_WEIGHT=has_weight, BLOCK_N=CHUNK_N, num_warps=CHUNK_WARPS)
            chunks = triton.cdiv(n, CHUNK_N)
            programs = _rn._persistent_programs(h.device, rows)
            if h.is_cuda:  # the column chunks already multiply the grid
                programs = max(1, min(rows, triton.cdiv(programs, chunks)))
            partial = torch.empty((programs, n) if has_weight else (1,), dtype=torch.float32, device=h.device)
            _add_rms_norm_bwd_chunked_kernel[(chunks, programs)](
                dy, dh_, h, w, rstd, c, dx, dr, partial, rows, n, *strides,
                **flags, BLOCK_N=CHUNK_N, num_warps=CHUNK_WARPS)
    dw = partial.sum(0).to(weight.dtype) if has_weight else None
    return dx, dr, dw
