"""RMSNorm in Triton, forward and backward.

    rstd = 1 / sqrt(mean(x**2) + eps)          (fp32, one per row, saved for backward)
    y    = x * rstd * w                        (stored in x's dtype)

Backward, with xhat = x * rstd and g = dy * w:

    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum over rows of dy * xhat

All arithmetic is fp32 whatever the storage dtype.

Two kernel shapes:

- Row kernels (n up to ``FWD_MAX_ROW_N`` / ``BWD_MAX_ROW_N``): a program holds whole rows in
  registers, so x and dy are read from memory exactly once. Short rows are packed several to a
  program (BLOCK_M rows) so each program still moves a few thousand elements. The backward is
  persistent: a fixed grid of programs strides over the rows, and each keeps its share of dw in
  registers the whole time, so dw costs one small fp32 [programs, n] buffer plus a sum, not an
  atomic add per element.
- Chunked kernels (longer rows): the row no longer fits in registers, so it is walked in chunks.
  The backward then first computes mean(g * xhat) per row, and a second kernel tiles the columns,
  which costs one extra read of x and dy; it only runs for rows longer than any hidden size in use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device
from tokenforge.kernels.fp8_quantize import EMIT_BLOCK, emission_buffers, emit_fp8_tile

# Largest rows kept entirely in registers. Checked against ptxas register/spill reports for sm_80
# and sm_90 by tests/test_compile_gate.py: the backward holds ~4 fp32 values per element
# (x, dy, w, dw), so it spills earlier than the forward.
FWD_MAX_ROW_N = 16384
BWD_MAX_ROW_N = 8192
# Rowwise fp8 emission (rms_norm_forward_fp8) holds the row's fp8 copy and scale as well: up to
# this width (16384 spills 4 B under triton 3.6 on sm_90); (1, 128) blocks go to FWD_MAX_ROW_N.
EMIT_ROW_MAX_N = 8192
# Columns per step of the chunked kernels.
CHUNK_N = 4096
CHUNK_WARPS = 8
# The chunked kernels work for any n; this bound only keeps the claim to what is tested.
MAX_N = 1 << 20


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_rows_kernel(
    X, W, Y, RSTD, DATA, SCALE,
    rows, n, stride_x, stride_y, stride_scale, eps,
    HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EMIT_FP8: tl.constexpr = False, GROUP: tl.constexpr = 1, FP8_MAX: tl.constexpr = 448.0,
    MBITS: tl.constexpr = 3, BIAS: tl.constexpr = 7, POW2: tl.constexpr = False, SOFT_CAST: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_N)
    row_ok = row < rows
    mask = row_ok[:, None] & (col < n)[None, :]

    x = tl.load(X + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n + eps)
    tl.store(RSTD + row, rstd, mask=row_ok)

    y = x * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + col, mask=col < n, other=0.0).to(tl.float32)
        y = y * w[None, :]
    y_out = y.to(Y.dtype.element_ty)
    tl.store(Y + row[:, None] * stride_y + col[None, :], y_out, mask=mask)
    if EMIT_FP8:  # y quantized for the next Float8Linear, from the values just stored
        emit_fp8_tile(y_out.to(tl.float32), row, row_ok, 0, n, DATA, SCALE, n, stride_scale,
                      FP8_MAX, MBITS, BIAS, POW2, SOFT_CAST, BLOCK_M, BLOCK_N, GROUP)


@triton.jit
def _rms_norm_fwd_chunked_kernel(
    X, W, Y, RSTD,
    n, stride_x, stride_y, eps,
    HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y

    # Pass 1: sum of squares, accumulated per lane and reduced once at the end.
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        x = tl.load(x_row + col, mask=col < n, other=0.0).to(tl.float32)
        acc += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n + eps)
    tl.store(RSTD + row, rstd)

    # Pass 2: normalise (the second read of the row mostly hits L2).
    for start in range(0, n, BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        x = tl.load(x_row + col, mask=col < n, other=0.0).to(tl.float32)
        y = x * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + col, mask=col < n, other=0.0).to(tl.float32)
        tl.store(y_row + col, y.to(Y.dtype.element_ty), mask=col < n)


@triton.jit
def _rms_norm_bwd_rows_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    rows, n, stride_dy, stride_x, stride_dx,
    HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
        x = tl.load(X + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row[:, None] * stride_dy + col[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row_ok, other=0.0)

        xhat = x * rstd[:, None]
        g = dy
        if HAS_WEIGHT:
            g = dy * w[None, :]
            dw += tl.sum(dy * xhat, axis=0)
        c = tl.sum(g * xhat, axis=1) / n
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + row[:, None] * stride_dx + col[None, :], dx.to(DX.dtype.element_ty), mask=mask)

    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n + col, dw, mask=col_ok)


@triton.jit
def _rms_norm_bwd_row_dot_kernel(
    DY, X, W, RSTD, C,
    n, stride_dy, stride_x,
    HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # C[row] = mean(g * xhat) = rstd * sum(dy * w * x) / n, for the chunked backward.
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        x = tl.load(X + row * stride_x + col, mask=col < n, other=0.0).to(tl.float32)
        g = tl.load(DY + row * stride_dy + col, mask=col < n, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g = g * tl.load(W + col, mask=col < n, other=0.0).to(tl.float32)
        acc += g * x
    rstd = tl.load(RSTD + row)
    tl.store(C + row, tl.sum(acc, axis=0) * rstd / n)


@triton.jit
def _rms_norm_bwd_chunked_kernel(
    DY, X, W, RSTD, C, DX, DW_PARTIAL,
    rows, n, stride_dy, stride_x, stride_dx,
    HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
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
        x = tl.load(X + row * stride_x + col, mask=col_ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + col, mask=col_ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        c = tl.load(C + row)
        xhat = x * rstd
        g = dy
        if HAS_WEIGHT:
            g = dy * w
            dw += dy * xhat
        tl.store(DX + row * stride_dx + col, ((g - xhat * c) * rstd).to(DX.dtype.element_ty), mask=col_ok)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n + col, dw, mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launch configuration. The compile gate (tests/test_compile_gate.py) compiles every config these
# functions can return, so keep them the single source of truth.
# ---------------------------------------------------------------------------------------------


def row_block_n(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def fwd_rows_config(n: int) -> dict:
    """BLOCK_M/BLOCK_N/num_warps of the forward row kernel for rows of length n."""
    block_n = row_block_n(n)
    # Pack short rows so a program moves >= 2048 elements; 16 bytes per thread per load for bf16.
    block_m = max(1, min(64, 2048 // block_n))
    num_warps = min(16, max(1, block_m * block_n // 512))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)


def bwd_rows_config(n: int) -> dict:
    """BLOCK_M/BLOCK_N/num_warps of the backward row kernel: fewer elements per thread than the
    forward because x, dy, w and dw are all live at once."""
    block_n = row_block_n(n)
    block_m = max(1, min(32, 1024 // block_n))
    num_warps = min(16, max(2, block_m * block_n // 128))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)


def all_configs() -> list[tuple[str, dict]]:
    """Every (kernel name, constexpr + num_warps config) the launchers below can pick."""
    out = []
    block_n = 16
    while block_n <= FWD_MAX_ROW_N:
        out.append(("_rms_norm_fwd_rows_kernel", fwd_rows_config(block_n)))
        for blockwise in emission_modes(block_n):  # with fp8 emission (rms_norm_forward_fp8); the gate sets the format
            out.append(("_rms_norm_fwd_rows_kernel", dict(fwd_rows_config(block_n), EMIT_FP8=True,
                                                          GROUP=emission_group(block_n, blockwise))))
        if block_n <= BWD_MAX_ROW_N:
            out.append(("_rms_norm_bwd_rows_kernel", bwd_rows_config(block_n)))
        block_n *= 2
    chunked = dict(BLOCK_N=CHUNK_N, num_warps=CHUNK_WARPS)
    for name in ("_rms_norm_fwd_chunked_kernel", "_rms_norm_bwd_row_dot_kernel", "_rms_norm_bwd_chunked_kernel"):
        out.append((name, dict(chunked)))
    return out


def _persistent_programs(device: torch.device, work_items: int) -> int:
    """Grid size of the persistent backward: enough programs to fill the GPU a few times over."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(work_items, 4 * sms))
    # The interpreter runs programs one after another; a few exercise the striding logic.
    return max(1, min(work_items, 4))


# ---------------------------------------------------------------------------------------------
# Launchers: 2-D inputs with unit column stride, already validated by tokenforge.ops.rms_norm.
# ---------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(x: torch.Tensor, weight) -> str | None:
    """None when these kernels can run on (x, weight), else why not (the backend rules aside)."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"x dtype {x.dtype} is not one of float32/float16/bfloat16 for the triton kernels; use backend='torch'"
    if weight is not None and weight.dtype not in SUPPORTED_DTYPES:
        return f"weight dtype {weight.dtype} is not one of float32/float16/bfloat16 for the triton kernels"
    if x.shape[-1] > MAX_N:
        return f"last dim {x.shape[-1]} > {MAX_N} is not supported by the triton kernels; use backend='torch'"
    return None


def can_emit_fp8(n: int, blockwise: bool) -> bool:
    """Whether the row kernel emits fp8 for rows of length n (rms_norm and add_rms_norm)."""
    return n <= (FWD_MAX_ROW_N if blockwise else EMIT_ROW_MAX_N)


def emission_modes(block_n: int) -> tuple[bool, ...]:
    """The emissions (blockwise or not) the row kernel runs at this BLOCK_N."""
    return tuple(b for b in (False, True) if can_emit_fp8(block_n, b))


def emission_group(block_n: int, blockwise: bool) -> int:
    """Columns per scale of a row kernel's fp8 emission: the whole (padded) row, or 128 (the whole
    row when it is shorter: its one (1, 128) block)."""
    return min(EMIT_BLOCK, block_n) if blockwise else block_n


def rms_norm_forward_fp8(x: torch.Tensor, weight: torch.Tensor | None, eps: float, fp8_dtype: torch.dtype,
                         blockwise: bool, power_of_two: bool) -> tuple[torch.Tensor, ...]:
    """(y, rstd, data, scale): :func:`rms_norm_forward` plus y quantized in the same pass, rowwise
    (scale (rows, 1)) or in (1, 128) blocks (scale (rows, cdiv(n, 128))), bit-identical to
    quantizing the stored y. Row kernel only: n <= FWD_MAX_ROW_N."""
    rows, n = x.shape
    if not can_emit_fp8(n, blockwise):
        raise ValueError(f"rms_norm_forward_fp8: rows of {n} are too long to emit fp8 {'blocks' if blockwise else 'rowwise'}")
    data, scale, data_arg, fmt = emission_buffers(rows, n, fp8_dtype, blockwise, power_of_two, x.device)
    y, rstd = rms_norm_forward(x, weight, eps, _emit=(data_arg, scale, blockwise, fmt))
    return y, rstd, data, scale


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                     _emit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for x (rows, n) with unit column stride; y contiguous in x.dtype, rstd fp32 (rows,)."""
    rows, n = x.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    w = weight if weight is not None else x  # never read when HAS_WEIGHT is False
    with launch_device(x.device):
        if n <= FWD_MAX_ROW_N:
            cfg = fwd_rows_config(n)
            grid = (triton.cdiv(rows, cfg["BLOCK_M"]),)
            data, scale, emit = (y, rstd, {}) if _emit is None else (
                _emit[0], _emit[1], dict(EMIT_FP8=True, GROUP=emission_group(cfg["BLOCK_N"], _emit[2]), **_emit[3]))
            _rms_norm_fwd_rows_kernel[grid](
                x, w, y, rstd, data, scale, rows, n, x.stride(0), y.stride(0), scale.stride(0) if _emit else 0, eps,
                HAS_WEIGHT=weight is not None, **cfg, **emit,
            )
        else:
            _rms_norm_fwd_chunked_kernel[(rows,)](
                x, w, y, rstd, n, x.stride(0), y.stride(0), eps,
                HAS_WEIGHT=weight is not None, BLOCK_N=CHUNK_N, num_warps=CHUNK_WARPS,
            )
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dw) for dy, x (rows, n) with unit column stride; dx in x.dtype, dw in weight.dtype."""
    rows, n = x.shape
    dx = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    has_weight = weight is not None
    w = weight if has_weight else x
    with launch_device(x.device):
        if n <= BWD_MAX_ROW_N:
            cfg = bwd_rows_config(n)
            programs = _persistent_programs(x.device, triton.cdiv(rows, cfg["BLOCK_M"]))
            partial = torch.empty((programs, n) if has_weight else (1,), dtype=torch.float32, device=x.device)
            _rms_norm_bwd_rows_kernel[(programs,)](
                dy, x, w, rstd, dx, partial, rows, n, dy.stride(0), x.stride(0), dx.stride(0),
                HAS_WEIGHT=has_weight, **cfg,
            )
        else:
            c = torch.empty((rows,), dtype=torch.float32, device=x.device)
            _rms_norm_bwd_row_dot_kernel[(rows,)](
                dy, x, w, rstd, c, n, dy.stride(0), x.stride(0),
                HAS_WEIGHT=has_weight, BLOCK_N=CHUNK_N, num_warps=CHUNK_WARPS,
            )
            chunks = triton.cdiv(n, CHUNK_N)
            programs = _persistent_programs(x.device, rows)
            if x.is_cuda:  # the column chunks already multiply the grid
                programs = max(1, min(rows, triton.cdiv(programs, chunks)))
            partial = torch.empty((programs, n) if has_weight else (1,), dtype=torch.float32, device=x.device)
            _rms_norm_bwd_chunked_kernel[(chunks, programs)](
                dy, x, w, rstd, c, dx, partial, rows, n, dy.stride(0), x.stride(0), dx.stride(0),
                HAS_WEIGHT=has_weight, BLOCK_N=CHUNK_N, num_warps=CHUNK_WARPS,
            )
    dw = partial.sum(0).to(weight.dtype) if has_weight else None
    return dx, dw

