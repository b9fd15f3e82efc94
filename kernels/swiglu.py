"""Gated MLP activations in Triton, forward and backward, elementwise over (rows, n) tiles:
``y = act(gate) * up`` with act one of (the ACTIVATION constexpr):

    "silu"       SwiGLU (LLaMA):  act(g) = g * s,  s = sigmoid(g)
    "gelu_tanh"  GeGLU (Gemma):   act(g) = g/2 * (1 + tanh(c * (g + 0.044715 g^3))),  c = sqrt(2/pi)
    "gelu"       GeGLU, exact:    act(g) = g/2 * (1 + erf(g / sqrt(2)))

math in fp32, written as eager PyTorch's GPU kernels write it (the same operations in the same
order, and on a GPU libdevice's expf / tanhf / erff, the CUDA math library's functions they call),
and rounded where eager ``act(gate) * up`` rounds: act(g) to the inputs' dtype, then the product.
So in bf16/fp16 y is what the unfused code stores (up to fp32 contraction choices of the two
compilers), and a patched model's MLP matches the unpatched one; fp32 inputs see no rounding in
between. Backward, recomputing act from gate (nothing but gate and up is saved), with eager's
roundings too: dup = dy * act(g) (act as rounded in the forward), dgate = rnd(dy * up) * act'(g):

    silu'(g)      = s * (1 + g * (1 - s))
    gelu_tanh'(g) = (1 + t) / 2 + g/2 * (1 - t^2) * c * (1 + 3 * 0.044715 g^2),  t the tanh above
    gelu'(g)      = (1 + erf(g / sqrt(2))) / 2 + g * exp(-g^2 / 2) / sqrt(2 pi)

gate and up are separate (rows, n) pointers with their own row strides and a column stride of 1
(COL_STRIDE), so the same kernels serve two separate tensors and the two halves of a packed (rows,
2n) gate/up projection output (two views of one buffer, no copies); likewise dgate/dup may be the two
halves of one packed gradient buffer. With COL_STRIDE 2 they are the even and odd columns of one
interleaved [g0, u0, g1, u1, ...] buffer (GPT-OSS's layout), again without copies.

Clamped forms, for MoE experts trained with them (CLAMP, a runtime ``limit``): gate clamped from
above and up to [-limit, limit] before the activation, their gradients zero where clamped (torch's
clamp backward: where the input lies within the bounds, ends included):

    "silu" + CLAMP   DeepSeek-V4 / GLM-5-Next / HY-V4:  silu(min(g, L)) * clamp(u, -L, L)
    "gpt_oss"        GPT-OSS / MiniMax-M3 (always clamped, a runtime ``alpha``):
                     gc = min(g, L);  glu = gc * sigmoid(alpha * gc);  y = (clamp(u, -L, L) + 1) * glu

"gpt_oss" rounds after each of eager's five operations (gc * alpha, sigmoid, gc * s, u + 1, the
product), its backward after each of autograd's steps in reverse, as eager bf16 code rounds them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton.language.extra import libdevice

from tokenforge.kernels import INTERPRETED, launch_device
from tokenforge.kernels.fp8_quantize import EMIT_BLOCK, emission_buffers, emit_fp8_tile

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
# Forms with the clamp and their own formula (module docstring): (ACTIVATION, CLAMP) pairs beyond the
# plain activations, and the column strides the packed layouts use.
CLAMPED_FORMS = (("silu", True), ("gpt_oss", True))
COL_STRIDES = (1, 2)

# Elements per program: 1024 with 4 warps is 8 per thread, i.e. one 16-byte load per operand for
# bf16 (two for fp32); narrow rows are packed BLOCK_M to a program so it still moves 1024.
TILE = 1024
NUM_WARPS = 4
# Rowwise fp8 emission needs whole rows in one program: up to this many columns (an FFN width).
EMIT_ROW_MAX_N = 16384


# GELU's constants below are written as eager PyTorch's kernels hold them in fp32: sqrt(2/pi)
# 0.7978845608028654, 0.044715, 3 * 0.044715 multiplied in fp32 = 0.13414499163627625 (not the
# decimal 0.134145), 1/sqrt(2) 0.7071067811865476, 1/sqrt(2 pi) 0.3989422804014327. Literals, not
# tl.constexpr globals: the interpreter wraps constexpr * tensor into a constexpr that tl.exp refuses.


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    # libdevice's expf, tanhf, erff are the CUDA math library's, which eager PyTorch's GPU kernels
    # call: the same fp32 values, so the roundings after them agree too. Triton's interpreter has
    # no libdevice (LIBDEVICE is False there).
    if LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _tanh(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.tanh(x)
    else:
        # exp overflows to inf for large x (t -> 1) and underflows to 0 for very negative x (t -> -1).
        return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * x))


@triton.jit
def _erf(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.erf(x)
    else:
        return tl.math.erf(x)


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr, LIBDEVICE: tl.constexpr):
    """act(g) in fp32, each written as eager PyTorch's GPU kernel writes it (same operations, same
    order), so its fp32 value is theirs."""
    if ACTIVATION == "silu":
        # exp(-g) overflows to inf for very negative g: silu becomes -0.0, its limit.
        return g / (1.0 + _exp(-g, LIBDEVICE))
    elif ACTIVATION == "gelu_tanh":
        return 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * (g * g * g)), LIBDEVICE))
    else:
        return g * 0.5 * (1.0 + _erf(g * 0.7071067811865476, LIBDEVICE))


@triton.jit
def _activation_and_grad(g, dact, ACTIVATION: tl.constexpr, LIBDEVICE: tl.constexpr):
    """(act(g), dact * act'(g)) in fp32: act as :func:`_activation` computes it, the gradient in the
    order of eager PyTorch's backward kernels; one transcendental shared by the two."""
    if ACTIVATION == "silu":
        denom = 1.0 + _exp(-g, LIBDEVICE)
        s = 1.0 / denom
        return g / denom, dact * s * (1.0 + g * (1.0 - s))
    elif ACTIVATION == "gelu_tanh":
        g_sq = g * g
        t = _tanh(0.7978845608028654 * (g + 0.044715 * (g_sq * g)), LIBDEVICE)
        left_slope = 0.5 * (1.0 + t)
        right_slope = (0.5 * g) * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 0.13414499163627625 * g_sq))
        return 0.5 * g * (1.0 + t), dact * (left_slope + right_slope)
    else:
        e = _erf(g * 0.7071067811865476, LIBDEVICE)
        cdf = 0.5 * (1.0 + e)
        pdf = _exp(-0.5 * g * g, LIBDEVICE) * 0.3989422804014327
        return g * 0.5 * (1.0 + e), dact * (cdf + g * pdf)


@triton.jit
def _clamp_inputs(g, u, limit):
    """min(g, limit) and clamp(u, -limit, limit), NaN kept NaN as torch.clamp keeps it."""
    g = tl.minimum(g, limit, propagate_nan=tl.PropagateNan.ALL)
    u = tl.minimum(tl.maximum(u, -limit, propagate_nan=tl.PropagateNan.ALL), limit, propagate_nan=tl.PropagateNan.ALL)
    return g, u


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x rounded to the tensors' dtype and back to fp32: where eager stores an intermediate."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _gpt_oss_forward(g, u, alpha, DTYPE: tl.constexpr, LIBDEVICE: tl.constexpr):
    """(u + 1) * (g * sigmoid(alpha * g)) of clamped g, u: eager's five operations, each rounded
    (sigmoid as torch's kernel writes it, 1 / (1 + exp(-x)))."""
    s = _round(1.0 / (1.0 + _exp(-_round(g * alpha, DTYPE), LIBDEVICE)), DTYPE)
    glu = _round(g * s, DTYPE)
    return _round(u + 1.0, DTYPE) * glu


@triton.jit
def _gpt_oss_backward(dy, g, u, alpha, DTYPE: tl.constexpr, LIBDEVICE: tl.constexpr):
    """(dgate, dup) of :func:`_gpt_oss_forward` for clamped g, u (the clamp's mask is the caller's),
    in autograd's order with its roundings: d(up + 1) = dy * glu; d glu = dy * (up + 1); through
    glu = g * s to g and s; sigmoid's backward d s * (1 - s) * s; times alpha; the two paths into g
    summed."""
    s = _round(1.0 / (1.0 + _exp(-_round(g * alpha, DTYPE), LIBDEVICE)), DTYPE)
    glu = _round(g * s, DTYPE)
    du = dy * glu
    dglu = _round(dy * _round(u + 1.0, DTYPE), DTYPE)
    dg_direct = _round(dglu * s, DTYPE)
    ds = _round(dglu * g, DTYPE)
    dga = _round(ds * (1.0 - s) * s, DTYPE)
    return dg_direct + _round(dga * alpha, DTYPE), du


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y, DATA, SCALE,
    rows, n, stride_g, stride_u, stride_y, stride_scale, limit, alpha,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACTIVATION: tl.constexpr, LIBDEVICE: tl.constexpr = True,
    EMIT_FP8: tl.constexpr = False, GROUP: tl.constexpr = 1, FP8_MAX: tl.constexpr = 448.0,
    MBITS: tl.constexpr = 3, BIAS: tl.constexpr = 7, POW2: tl.constexpr = False, SOFT_CAST: tl.constexpr = False,
    CLAMP: tl.constexpr = False, COL_STRIDE: tl.constexpr = 1,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_N
    col = col0 + tl.arange(0, BLOCK_N)
    mask = (row < rows)[:, None] & (col < n)[None, :]
    g = tl.load(G + row[:, None] * stride_g + col[None, :] * COL_STRIDE, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row[:, None] * stride_u + col[None, :] * COL_STRIDE, mask=mask, other=0.0).to(tl.float32)
    if CLAMP:
        g, u = _clamp_inputs(g, u, limit)
    if ACTIVATION == "gpt_oss":
        y_out = _gpt_oss_forward(g, u, alpha, Y.dtype.element_ty, LIBDEVICE).to(Y.dtype.element_ty)
    else:
        act = _activation(g, ACTIVATION, LIBDEVICE).to(Y.dtype.element_ty).to(tl.float32)  # eager rounds act(g)
        y_out = (act * u).to(Y.dtype.element_ty)
    tl.store(Y + row[:, None] * stride_y + col[None, :], y_out, mask=mask)
    if EMIT_FP8:  # y quantized for the down projection's Float8Linear, from the values just stored
        emit_fp8_tile(y_out.to(tl.float32), row, row < rows, col0, n, DATA, SCALE, n, stride_scale,
                      FP8_MAX, MBITS, BIAS, POW2, SOFT_CAST, BLOCK_M, BLOCK_N, GROUP)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU,
    rows, n, stride_dy, stride_g, stride_u, stride_dg, stride_du, limit, alpha,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACTIVATION: tl.constexpr, LIBDEVICE: tl.constexpr = True,
    CLAMP: tl.constexpr = False, COL_STRIDE: tl.constexpr = 1,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (row < rows)[:, None] & (col < n)[None, :]
    dy = tl.load(DY + row[:, None] * stride_dy + col[None, :], mask=mask, other=0.0).to(tl.float32)
    g_in = tl.load(G + row[:, None] * stride_g + col[None, :] * COL_STRIDE, mask=mask, other=0.0).to(tl.float32)
    u_in = tl.load(U + row[:, None] * stride_u + col[None, :] * COL_STRIDE, mask=mask, other=0.0).to(tl.float32)
    g, u = g_in, u_in
    if CLAMP:
        g, u = _clamp_inputs(g_in, u_in, limit)
    if ACTIVATION == "gpt_oss":
        dg, du = _gpt_oss_backward(dy, g, u, alpha, DG.dtype.element_ty, LIBDEVICE)
    else:
        # Eager's roundings: the forward's rounded act(g); d act = dy * up rounded to the dtype.
        dact = (dy * u).to(DG.dtype.element_ty).to(tl.float32)
        act, dg = _activation_and_grad(g, dact, ACTIVATION, LIBDEVICE)
        act = act.to(DU.dtype.element_ty).to(tl.float32)
        du = dy * act
    if CLAMP:  # torch's clamp backward: the gradient flows where the input lies within the bounds
        dg = tl.where(g_in <= limit, dg, 0.0)
        du = tl.where((u_in >= -limit) & (u_in <= limit), du, 0.0)
    tl.store(DG + row[:, None] * stride_dg + col[None, :] * COL_STRIDE, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row[:, None] * stride_du + col[None, :] * COL_STRIDE, du.to(DU.dtype.element_ty), mask=mask)


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
                out.append((name, dict(tile_config(block_n), ACTIVATION=activation, LIBDEVICE=True)))
            for (activation, clamp), col_stride in ((f, c) for f in CLAMPED_FORMS for c in COL_STRIDES):
                out.append((name, dict(tile_config(block_n), ACTIVATION=activation, LIBDEVICE=True, CLAMP=clamp,
                                       COL_STRIDE=col_stride)))
        block_n *= 2
    # With fp8 emission (swiglu_forward_fp8, silu): blockwise on every tile, rowwise on whole rows up
    # to EMIT_ROW_MAX_N; the gate sets the fp8 format.
    n = 16
    while n <= EMIT_ROW_MAX_N:
        for blockwise in (False, True) if n <= TILE else (False,):  # wider blockwise tiles are TILE's
            out.append(("_swiglu_fwd_kernel", dict(emit_config(n, blockwise), ACTIVATION="silu", LIBDEVICE=True,
                                                   EMIT_FP8=True)))
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



def _form(activation: str, limit: float | None, alpha: float, *views: torch.Tensor) -> tuple[tuple, dict]:
    """The runtime (limit, alpha) and the form's constexprs for gate/up (and dgate/dup) views of one
    column stride (1, or 2: the halves of an interleaved buffer)."""
    col_stride = views[0].stride(1) if views[0].shape[1] > 1 else 1
    if col_stride not in COL_STRIDES or any(v.shape[1] > 1 and v.stride(1) != col_stride for v in views):
        raise ValueError(f"swiglu kernels: gate/up views need one column stride in {COL_STRIDES}, got "
                         f"{[v.stride() for v in views]}")
    clamp = limit is not None
    if activation == "gpt_oss" and not clamp:
        raise ValueError("swiglu kernels: the gpt_oss form takes a limit")
    return (float(limit) if clamp else 0.0, float(alpha)), dict(CLAMP=clamp, COL_STRIDE=col_stride)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None,
                   activation: str = "silu", limit: float | None = None, alpha: float = 1.0) -> torch.Tensor:
    """act(gate) * up (act one of ACTIVATIONS), or a clamped form (``limit``; activation "gpt_oss"
    with ``alpha``: the module docstring), for gate, up (rows, n) with column stride 1 (or both 2);
    into ``out`` (rows, n) or a new contiguous tensor in gate's dtype."""
    rows, n = gate.shape
    y = torch.empty((rows, n), dtype=gate.dtype, device=gate.device) if out is None else out
    cfg = tile_config(n)
    scalars, form = _form(activation, limit, alpha, gate, up)
    with launch_device(gate):
        _swiglu_fwd_kernel[_grid(rows, n, cfg)](
            gate, up, y, y, y, rows, n, gate.stride(0), up.stride(0), y.stride(0), 0, *scalars, **cfg,
            ACTIVATION=activation, LIBDEVICE=not INTERPRETED, **form,
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
            0.0, 1.0, **cfg, ACTIVATION=activation, LIBDEVICE=not INTERPRETED, EMIT_FP8=True, **fmt,
        )
    return y, data, scale


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    dgate: torch.Tensor, dup: torch.Tensor, activation: str = "silu",
                    limit: float | None = None, alpha: float = 1.0) -> None:
    """Write dgate and dup (rows, n views with the column stride of gate and up, e.g. the two halves
    of one packed gradient) for dy (rows, n, unit column stride), gate, up (rows, n)."""
    rows, n = gate.shape
    cfg = tile_config(n)
    scalars, form = _form(activation, limit, alpha, gate, up, dgate, dup)
    with launch_device(gate):
        _swiglu_bwd_kernel[_grid(rows, n, cfg)](
            dy, gate, up, dgate, dup, rows, n,
            dy.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0), *scalars, **cfg,
            ACTIVATION=activation, LIBDEVICE=not INTERPRETED, **form,
        )
