"""SwiGLU in Triton, forward and backward, elementwise over (rows, n) tiles.

    s  = sigmoid(gate)                  (fp32)
    y  = gate * s * up                  (stored in the inputs' dtype)

Backward, recomputing s from gate (nothing but gate and up is saved):

    dup   = dy * gate * s
    dgate = dy * up * s * (1 + gate * (1 - s))

gate and up are separate (rows, n) pointers with their own row strides and unit column stride, so
the same kernels serve two separate tensors and the two halves of a packed (rows, 2n) gate/up
projection output (two views of one buffer, no copies); likewise dgate/dup may be the two halves of
one packed gradient buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device

# Elements per program: 1024 with 4 warps is 8 per thread, i.e. one 16-byte load per operand for
# bf16 (two for fp32); narrow rows are packed BLOCK_M to a program so it still moves 1024.
TILE = 1024
NUM_WARPS = 4


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y,
    rows, n, stride_g, stride_u, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (row < rows)[:, None] & (col < n)[None, :]
    g = tl.load(G + row[:, None] * stride_g + col[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row[:, None] * stride_u + col[None, :], mask=mask, other=0.0).to(tl.float32)
    # exp(-g) overflows to inf for very negative g: s becomes 0 and silu 0, its limit.
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(Y + row[:, None] * stride_y + col[None, :], (g * s * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU,
    rows, n, stride_dy, stride_g, stride_u, stride_dg, stride_du,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (row < rows)[:, None] & (col < n)[None, :]
    dy = tl.load(DY + row[:, None] * stride_dy + col[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row[:, None] * stride_g + col[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row[:, None] * stride_u + col[None, :], mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    silu = g * s
    du = dy * silu
    # d silu / d g = s + g * s * (1 - s) = s * (1 + g * (1 - s))
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(DG + row[:, None] * stride_dg + col[None, :], dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row[:, None] * stride_du + col[None, :], du.to(DU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration (the compile gate compiles every config all_configs() lists).
# ---------------------------------------------------------------------------------------------


def tile_config(n: int) -> dict:
    """BLOCK_M/BLOCK_N/num_warps for rows of length n: BLOCK_M * BLOCK_N == TILE."""
    block_n = min(TILE, max(16, triton.next_power_of_2(n)))
    return dict(BLOCK_M=TILE // block_n, BLOCK_N=block_n, num_warps=NUM_WARPS)


def all_configs() -> list[tuple[str, dict]]:
    """Every (kernel name, constexpr + num_warps config) the launchers below can pick."""
    out = []
    block_n = 16
    while block_n <= TILE:
        for name in ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"):
            out.append((name, tile_config(block_n)))
        block_n *= 2
    return out


def _grid(rows: int, n: int, cfg: dict) -> tuple[int, int]:
    return (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))


# ---------------------------------------------------------------------------------------------
# Launchers: 2-D views with unit column stride, already validated by tokenforge.ops.swiglu.
# ---------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Column chunks run on grid axis 1, which CUDA caps at 65535.
MAX_N = 65535 * TILE


def supports(gate: torch.Tensor, up: torch.Tensor) -> str | None:
    """None when these kernels can run on (gate, up), else why not (the backend rules aside)."""
    if gate.dtype not in SUPPORTED_DTYPES:
        return f"dtype {gate.dtype} is not one of float32/float16/bfloat16 for the triton kernels; use backend='torch'"
    if gate.dim() > 0 and gate.shape[-1] > MAX_N:
        return f"last dim {gate.shape[-1]} > {MAX_N} is not supported by the triton kernels; use backend='torch'"
    return None



def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for gate, up (rows, n) with unit column stride; into ``out`` (rows, n) or a
    new contiguous tensor in gate's dtype."""
    rows, n = gate.shape
    y = torch.empty((rows, n), dtype=gate.dtype, device=gate.device) if out is None else out
    cfg = tile_config(n)
    with launch_device(gate):
        _swiglu_fwd_kernel[_grid(rows, n, cfg)](
            gate, up, y, rows, n, gate.stride(0), up.stride(0), y.stride(0), **cfg,
        )
    return y


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    dgate: torch.Tensor, dup: torch.Tensor) -> None:
    """Write dgate and dup (rows, n views with unit column stride, e.g. the two halves of one
    packed gradient) for dy, gate, up (rows, n)."""
    rows, n = gate.shape
    cfg = tile_config(n)
    with launch_device(gate):
        _swiglu_bwd_kernel[_grid(rows, n, cfg)](
            dy, gate, up, dgate, dup, rows, n,
            dy.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0), **cfg,
        )
