"""Gated MLP activations in Triton, forward and backward, elementwise over (rows, n) tiles:
``y = act(gate) * up`` with act one of (the ACTIVATION constexpr):

    "silu"       SwiGLU (LLaMA):  act(g) = g * s,  s = sigmoid(g)
    "gelu_tanh"  GeGLU (Gemma):   act(g) = g/2 * (1 + tanh(c * (g + 0.044715 g^3))),  c = sqrt(2/pi)
    "gelu"       GeGLU, exact:    act(g) = g/2 * (1 + erf(g / sqrt(2)))

math in fp32, y stored in the inputs' dtype. Backward, recomputing act and act' from gate (nothing
but gate and up is saved): dup = dy * act(g), dgate = dy * up * act'(g), with

    silu'(g)      = s * (1 + g * (1 - s))
    gelu_tanh'(g) = (1 + t) / 2 + g/2 * (1 - t^2) * c * (1 + 3 * 0.044715 g^2),  t the tanh above
    gelu'(g)      = (1 + erf(g / sqrt(2))) / 2 + g * exp(-g^2 / 2) / sqrt(2 pi)

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
from tokenforge.kernels.fp8_quantize import EMIT_BLOCK, emission_buffers, emit_fp8_tile

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")

# Elements per program: 1024 with 4 warps is 8 per thread, i.e. one 16-byte load per operand for
# bf16 (two for fp32); narrow rows are packed BLOCK_M to a program so it still moves 1024.
TILE = 1024
NUM_WARPS = 4
# Rowwise fp8 emission needs whole rows in one program: up to this many columns (an FFN width).
EMIT_ROW_MAX_N = 16384


@triton.jit
def _activation_and_slope(g, ACTIVATION: tl.constexpr, WANT_SLOPE: tl.constexpr):
    """act(g) and, when WANT_SLOPE, act'(g), in fp32 (the slope is 0.0 otherwise)."""
    if ACTIVATION == "silu":
        # exp(-g) overflows to inf for very negative g: s becomes 0 and silu 0, its limit.
        s = 1.0 / (1.0 + tl.exp(-g))
        act = g * s
        slope = s * (1.0 + g * (1.0 - s)) if WANT_SLOPE else 0.0
    elif ACTIVATION == "gelu_tanh":
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        # tanh(z) = 1 - 2 / (1 + exp(2z)): exp overflows to inf for large z (t -> 1) and underflows
        # to 0 for very negative z (t -> -1), both the limits; no tanh in every Triton's tl.math.
        t = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * z))
        act = 0.5 * g * (1.0 + t)
        slope = (0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
                 if WANT_SLOPE else 0.0)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        act = g * cdf
        slope = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327 if WANT_SLOPE else 0.0
    return act, slope


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y, DATA, SCALE,
    rows, n, stride_g, stride_u, stride_y, stride_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACTIVATION: tl.constexpr,
    EMIT_FP8: tl.constexpr = False, GROUP: tl.constexpr = 1, FP8_MAX: tl.constexpr = 448.0,
    MBITS: tl.constexpr = 3, BIAS: tl.constexpr = 7, POW2: tl.constexpr = False, SOFT_CAST: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_N
    col = col0 + tl.arange(0, BLOCK_N)
    mask = (row < rows)[:, None] & (col < n)[None, :]
    g = tl.load(G + row[:, None] * stride_g + col[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row[:, None] * stride_u + col[None, :], mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation_and_slope(g, ACTIVATION, False)
    y_out = (act * u).to(Y.dtype.element_ty)
    tl.store(Y + row[:, None] * stride_y + col[None, :], y_out, mask=mask)
    if EMIT_FP8:  # y quantized for the down projection's Float8Linear, from the values just stored
        emit_fp8_tile(y_out.to(tl.float32), row, row < rows, col0, n, DATA, SCALE, n, stride_scale,
                      FP8_MAX, MBITS, BIAS, POW2, SOFT_CAST, BLOCK_M, BLOCK_N, GROUP)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU,
    rows, n, stride_dy, stride_g, stride_u, stride_dg, stride_du,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACTIVATION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (row < rows)[:, None] & (col < n)[None, :]
    dy = tl.load(DY + row[:, None] * stride_dy + col[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row[:, None] * stride_g + col[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row[:, None] * stride_u + col[None, :], mask=mask, other=0.0).to(tl.float32)
    act, slope = _activation_and_slope(g, ACTIVATION, True)
    tl.store(DG + row[:, None] * stride_dg + col[None, :], (dy * u * slope).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row[:, None] * stride_du + col[None, :], (dy * act).to(DU.dtype.element_ty), mask=mask)


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
            for activation in ACTIVATIONS:
                out.append((name, dict(tile_config(block_n), ACTIVATION=activation)))
        block_n *= 2
    # With fp8 emission (swiglu_forward_fp8, silu): blockwise on every tile, rowwise on whole rows up
    # to EMIT_ROW_MAX_N; the gate sets the fp8 format.
    n = 16
    while n <= EMIT_ROW_MAX_N:
        for blockwise in (False, True) if n <= TILE else (False,):  # wider blockwise tiles are TILE's
            out.append(("_swiglu_fwd_kernel", dict(emit_config(n, blockwise), ACTIVATION="silu", EMIT_FP8=True)))
        n *= 2
    return out


def emit_rows_config(n: int) -> dict:
    """The forward's tile when it emits rowwise fp8 for rows longer than TILE: one whole row a program."""
    block_n = max(16, triton.next_power_of_2(n))
    return dict(BLOCK_M=1, BLOCK_N=block_n, num_warps=min(16, max(NUM_WARPS, block_n // 256)))


def emit_config(n: int, blockwise: bool) -> dict:
    """Tile and GROUP of a forward that emits fp8: the plain tile where it holds whole rows (rowwise)
    or whole (1, 128) blocks (blockwise: BLOCK_N >= 128 or the row is one short block)."""
    cfg = tile_config(n) if blockwise or n <= TILE else emit_rows_config(n)
    return dict(cfg, GROUP=min(EMIT_BLOCK, cfg["BLOCK_N"]) if blockwise else cfg["BLOCK_N"])


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



def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None,
                   activation: str = "silu") -> torch.Tensor:
    """act(gate) * up (act one of ACTIVATIONS) for gate, up (rows, n) with unit column stride; into
    ``out`` (rows, n) or a new contiguous tensor in gate's dtype."""
    rows, n = gate.shape
    y = torch.empty((rows, n), dtype=gate.dtype, device=gate.device) if out is None else out
    cfg = tile_config(n)
    with launch_device(gate):
        _swiglu_fwd_kernel[_grid(rows, n, cfg)](
            gate, up, y, y, y, rows, n, gate.stride(0), up.stride(0), y.stride(0), 0, **cfg, ACTIVATION=activation,
        )
    return y


def swiglu_forward_fp8(gate: torch.Tensor, up: torch.Tensor, activation: str, fp8_dtype: torch.dtype,
                       blockwise: bool, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, data, scale): :func:`swiglu_forward` plus y quantized in the same pass, rowwise (scale
    (rows, 1); n <= EMIT_ROW_MAX_N) or in (1, 128) blocks (scale (rows, cdiv(n, 128))),
    bit-identical to quantizing the stored y."""
    rows, n = gate.shape
    if not blockwise and n > EMIT_ROW_MAX_N:
        raise ValueError(f"swiglu_forward_fp8: rowwise emission holds whole rows, n={n} > {EMIT_ROW_MAX_N}")
    y = torch.empty((rows, n), dtype=gate.dtype, device=gate.device)
    data, scale, data_arg, fmt = emission_buffers(rows, n, fp8_dtype, blockwise, power_of_two, gate.device)
    cfg = emit_config(n, blockwise)
    with launch_device(gate):
        _swiglu_fwd_kernel[_grid(rows, n, cfg)](
            gate, up, y, data_arg, scale, rows, n, gate.stride(0), up.stride(0), y.stride(0), scale.stride(0),
            **cfg, ACTIVATION=activation, EMIT_FP8=True, **fmt,
        )
    return y, data, scale


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    dgate: torch.Tensor, dup: torch.Tensor, activation: str = "silu") -> None:
    """Write dgate and dup (rows, n views with unit column stride, e.g. the two halves of one
    packed gradient) for dy, gate, up (rows, n)."""
    rows, n = gate.shape
    cfg = tile_config(n)
    with launch_device(gate):
        _swiglu_bwd_kernel[_grid(rows, n, cfg)](
            dy, gate, up, dgate, dup, rows, n,
            dy.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0), **cfg,
            ACTIVATION=activation,
        )
