"""Grouped matmul for mixture-of-experts: ``grouped_mm(a, b, offs)``, torch._grouped_mm's MoE case.

    a (T, K) tokens sorted by expert, b (E, K, N) expert weights, offs (E,) int32 cumulative row
    ends (expert e owns rows offs[e-1] <= r < offs[e], offs[-1] == T; experts may own no rows)
    out (T, N): out[r] = a[r] @ b[e(r)]

Forward and backward (dA = dOut_e @ b[e]^T, the same grouped kernel on b transposed by strides;
dB[e] = a_e^T @ dOut_e, a grouped reduction that writes zeros for an empty expert).

Path of a call: :func:`grouped_mm` validates and picks a backend -> :class:`GroupedMMFunction`
-> the custom ops ``tokenforge::grouped_mm`` / ``tokenforge::grouped_mm_wgrad`` ->
``tokenforge.kernels.grouped_mm`` (Triton: persistent over (expert, tile) work items, the schedule
built on the device, so no host sync) or ``tokenforge.cuda.grouped_mm`` (``backend="cuda"``: the
CUTLASS sm_90a ptr-array kernel in csrc/grouped_mm_sm90.cu, bf16, its schedule also built on the
device). The ``torch`` backend is :func:`grouped_mm_reference`, a
loop over experts (it reads offs on the host).

Checking offs (non-decreasing, from 0 to T) needs its values on the host: one sync, done by default
(``check_offs=True``) and skipped under torch.compile or with ``check_offs=False`` (what
tokenforge.nn.MoE passes: it builds offs with a cumsum). With an unchecked, invalid offs the Triton
kernels neither crash nor read out of bounds (row tiles clamp to their expert), but rows not
covered by any expert are left unwritten: garbage in, garbage out, never a fault.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import backends

OP = "grouped_mm"
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
REFERENCE_DTYPES = SUPPORTED_DTYPES + (torch.float64,)


def grouped_mm_reference(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The loop over experts: out[s:e] = a[s:e] @ b[i] in a's dtype (fp32 accumulation for the
    low-precision dtypes, as the kernels); differentiable by torch autograd; float64 is the oracle."""
    ends = [int(x) for x in offs.tolist()]
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    parts, start = [], 0
    for e, end in enumerate(ends):
        if end > start:
            parts.append((a[start:end].to(compute) @ b[e].to(compute)).to(a.dtype))
        start = max(start, end)
    if start < a.shape[0]:  # only reachable with check_offs=False; zeros rather than stale memory
        parts.append(a.new_zeros((a.shape[0] - start, b.shape[2])))
    if not parts:
        return a.new_zeros((a.shape[0], b.shape[2])) + 0 * (a.sum() + b.sum())
    return torch.cat(parts)


def check_inputs(a, b, offs, check_offs: bool) -> None:
    """The grouped GEMM's argument checks (types, shapes, dtypes, devices; the offs values when
    ``check_offs``), shared with tokenforge.fp8.grouped_mm_float8: a clear error or nothing."""
    for name, t in (("a", a), ("b", b), ("offs", offs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"grouped_mm: {name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dim() != 2:
        raise ValueError(f"grouped_mm: a must be 2-D (tokens, K) sorted by expert, got shape {tuple(a.shape)}")
    if b.dim() != 3:
        raise ValueError(f"grouped_mm: b must be 3-D (experts, K, N), got shape {tuple(b.shape)}")
    if offs.dim() != 1 or offs.numel() != b.shape[0]:
        raise ValueError(f"grouped_mm: offs must be 1-D with one entry per expert ({b.shape[0]}), got shape "
                         f"{tuple(offs.shape)}")
    if offs.dtype != torch.int32:
        raise TypeError(f"grouped_mm: offs must be int32 (as torch._grouped_mm), got {offs.dtype}; pass "
                        "offs.to(torch.int32)")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"grouped_mm: a's K ({a.shape[1]}) must equal b's K ({b.shape[1]}): b is (experts, K, N)")
    if a.dtype != b.dtype:
        raise TypeError(f"grouped_mm: a and b must share a dtype, got {a.dtype} and {b.dtype}")
    if a.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"grouped_mm: dtype must be one of {', '.join(map(str, REFERENCE_DTYPES))}, got {a.dtype}")
    if not (a.device == b.device == offs.device):
        raise ValueError(f"grouped_mm: a, b and offs must be on one device, got {a.device}, {b.device}, {offs.device}")
    if offs.numel() == 0 and a.shape[0] != 0:
        raise ValueError(f"grouped_mm: {a.shape[0]} token rows but no experts (b has shape {tuple(b.shape)})")
    if check_offs:
        _check_offs_on_host(offs, a.shape[0], "grouped_mm")


def _check_offs_on_host(offs: torch.Tensor, tokens: int, where: str) -> None:
    """offs non-decreasing from >= 0 to ``tokens`` (one sync; skipped under torch.compile)."""
    if not offs.numel() or torch.compiler.is_compiling():
        return
    host = offs.cpu()
    if int(host[0]) < 0 or bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{where}: offs must be non-decreasing cumulative row ends starting at >= 0, got "
                         f"{host.tolist()[:16]}{' ...' if host.numel() > 16 else ''}; build it as "
                         "torch.cumsum(tokens_per_expert, 0).to(torch.int32)")
    if int(host[-1]) != tokens:
        raise ValueError(f"{where}: offs[-1] ({int(host[-1])}) must equal the number of token rows "
                         f"({tokens}): every row belongs to one expert")


def _triton_supports(a, b) -> Optional[str]:
    reason = backends.triton_unsupported_reason(a.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import grouped_mm as kgm

    return kgm.supports(a, b)


def _cuda_supports(a, b) -> Optional[str]:
    from tokenforge.cuda import grouped_mm as cgm

    return cgm.supports(a, b)


backends.register_op(
    # Triton first until the H200 benchmark ranks the CUTLASS kernel against it (bench/results).
    OP, cuda_preference=("triton", "cuda"),
    supports={"triton": _triton_supports, "cuda": _cuda_supports, "torch": lambda a, b: None},
    example_inputs=lambda device, dtype: (torch.empty(8, 16, device=device, dtype=dtype),
                                          torch.empty(2, 16, 16, device=device, dtype=dtype)),
)

# The custom ops below call their backend's launcher through this table (no dispatch in between).
LAUNCHERS = backends.Launchers(OP, triton="tokenforge.kernels.grouped_mm", cuda="tokenforge.cuda.grouped_mm")


@torch.library.custom_op("tokenforge::grouped_mm", mutates_args=())
def grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    out = torch.empty((a.shape[0], b.shape[2]), dtype=a.dtype, device=a.device)
    return LAUNCHERS[backend].grouped_mm_forward(a, b, offs, out)


@grouped_mm_op.register_fake
def _(a, b, offs, backend):
    return a.new_empty((a.shape[0], b.shape[2]))


@torch.library.custom_op("tokenforge::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad_op(a: torch.Tensor, dout: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    db = torch.empty((offs.shape[0], a.shape[1], dout.shape[1]), dtype=a.dtype, device=a.device)
    return LAUNCHERS[backend].grouped_mm_wgrad(a, dout, offs, db)


@grouped_mm_wgrad_op.register_fake
def _(a, dout, offs, backend):
    return a.new_empty((offs.shape[0], a.shape[1], dout.shape[1]))


class GroupedMMFunction(torch.autograd.Function):
    """Autograd for the kernel backends: saves a, b and offs; dA is the grouped kernel on b^T (a
    strided view, no copy), dB the grouped reduction."""

    @staticmethod
    def forward(ctx, a, b, offs, backend):
        ctx.save_for_backward(a, b, offs)
        ctx.backend = backend
        return torch.ops.tokenforge.grouped_mm(a, b, offs, backend)

    @staticmethod
    def backward(ctx, dout):
        a, b, offs = ctx.saved_tensors
        dout = dout.to(a.dtype)
        da = db = None
        if ctx.needs_input_grad[0]:
            da = torch.ops.tokenforge.grouped_mm(dout, b.transpose(1, 2), offs, ctx.backend)
        if ctx.needs_input_grad[1]:
            db = torch.ops.tokenforge.grouped_mm_wgrad(a, dout, offs, ctx.backend)
        return da, db, None, None


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, check_offs: bool = True,
               backend: Optional[str] = None) -> torch.Tensor:
    """(T, N) = per-expert ``a[rows of e] @ b[e]`` for a (T, K) sorted by expert, b (E, K, N), offs
    (E,) int32 cumulative row ends; bf16/fp16/fp32 (float64 on the torch backend), any strides.
    ``check_offs``: validate offs on the host (one sync; see the module docstring). ``backend``:
    triton, cuda (CUTLASS, sm_90a, bf16), torch or None (choose)."""
    check_inputs(a, b, offs, check_offs)
    name = backends.choose(OP, a, b, backend=backend)
    if name == "torch" or a.shape[0] == 0 or b.shape[2] == 0:
        return grouped_mm_reference(a, b, offs)
    if a.shape[1] == 0:  # K = 0: a sum over nothing
        return a.new_zeros((a.shape[0], b.shape[2])) + 0 * (a.sum() + b.sum())
    return GroupedMMFunction.apply(a, b, offs, name)


# ---------------------------------------------------------------------------------------------
# FP8: a grouped GEMM on quantized operands (fp32 scales); tokenforge.fp8.grouped_mm_float8 trains with it
# ---------------------------------------------------------------------------------------------

OP_FP8 = "grouped_mm_fp8"


SCALE_BLOCK = 128  # blockwise fp8: scales per 128 of K (a's 1x128 blocks) and per 128x128 block of b[e]


def _blockwise(scale_b: torch.Tensor, n: int) -> bool:
    """Blockwise scales (b's (E, cdiv(K, 128), N / 128)) rather than per column ((E, N) or (E, 1, N))."""
    return scale_b.dim() == 3 and scale_b.shape[2] != n


def _expand_blocks(scale: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Block scales repeated SCALE_BLOCK times along ``dim`` and cut to ``size``."""
    return scale.repeat_interleave(SCALE_BLOCK, dim=dim).narrow(dim, 0, size)


def grouped_mm_fp8_reference(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, scale_a: torch.Tensor,
                             scale_b: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The loop over experts on the dequantized operands, fp32 (float64 scales give the float64
    oracle); rowwise / per-column or blockwise scales as :func:`grouped_mm_fp8` takes them."""
    compute = torch.float64 if scale_a.dtype == torch.float64 else torch.float32
    K, N = a.shape[1], b.shape[2]
    if _blockwise(scale_b, N):
        a_deq = a.to(compute) * _expand_blocks(scale_a.to(compute), K, 1)
        b_deq = b.to(compute) * _expand_blocks(_expand_blocks(scale_b.to(compute), K, 1), N, 2)
    else:
        a_deq = a.to(compute) * scale_a.reshape(-1, 1).to(compute)
        b_deq = b.to(compute) * scale_b.reshape(b.shape[0], 1, N).to(compute)
    return grouped_mm_reference(a_deq, b_deq, offs).to(out_dtype)


def _check_fp8(a, b, offs, scale_a, scale_b, out_dtype, check_offs: bool) -> None:
    from tokenforge.kernels.grouped_mm import FP8_DTYPES

    for name, t in (("a", a), ("b", b), ("scale_a", scale_a), ("scale_b", scale_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"grouped_mm_fp8: {name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dtype not in FP8_DTYPES or b.dtype not in FP8_DTYPES:
        raise TypeError(f"grouped_mm_fp8: a and b must be float8_e4m3fn/float8_e5m2, got {a.dtype} and {b.dtype}; "
                        "quantize tokens rowwise and each expert's weight colwise with tokenforge.fp8.quantize")
    if a.dim() != 2 or b.dim() != 3:
        raise ValueError(f"grouped_mm_fp8: a must be (tokens, K) and b (experts, K, N), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    T, K = a.shape
    E, _, N = b.shape
    kb, nb = -(-K // SCALE_BLOCK), N // SCALE_BLOCK
    if tuple(scale_b.shape) in ((E, N), (E, 1, N)):
        if tuple(scale_a.shape) not in ((T,), (T, 1)):
            raise ValueError(f"grouped_mm_fp8: scale_a must be ({T},) or ({T}, 1): one scale per token row (or "
                             f"({T}, {kb}) with blockwise scale_b), got {tuple(scale_a.shape)}")
    elif N % SCALE_BLOCK == 0 and tuple(scale_b.shape) == (E, kb, nb):
        if tuple(scale_a.shape) != (T, kb):
            raise ValueError(f"grouped_mm_fp8: with blockwise scale_b, scale_a must be ({T}, {kb}): one scale per "
                             f"token and 128 of K (1x128 blocks), got {tuple(scale_a.shape)}")
    else:
        raise ValueError(f"grouped_mm_fp8: scale_b must be ({E}, {N}) or ({E}, 1, {N}): one scale per expert and "
                         f"output column (each b[e] quantized colwise), or ({E}, {kb}, N / 128) per 128x128 block of "
                         f"b[e] with N a multiple of 128; got {tuple(scale_b.shape)}")
    if scale_a.dtype != torch.float32 or scale_b.dtype != torch.float32:
        raise TypeError(f"grouped_mm_fp8: scales must be float32, got {scale_a.dtype} and {scale_b.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"grouped_mm_fp8: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    bad = [f"{n}={v}" for n, v in (("K", K), ("N", N)) if v % 16]
    if bad:
        raise ValueError(f"grouped_mm_fp8: K and N must be multiples of 16 (FP8 tensor cores), got {', '.join(bad)}")
    if b.shape[1] != K:
        raise ValueError(f"grouped_mm_fp8: a's K ({K}) must equal b's K ({b.shape[1]}): b is (experts, K, N)")
    if offs.dim() != 1 or offs.numel() != E or offs.dtype != torch.int32:
        raise ValueError(f"grouped_mm_fp8: offs must be int32 of shape ({E},) (cumulative row ends), got "
                         f"{offs.dtype} {tuple(offs.shape)}")
    devices = {t.device for t in (a, b, offs, scale_a, scale_b)}
    if len(devices) != 1:
        raise ValueError(f"grouped_mm_fp8: all inputs must be on one device, got {sorted(map(str, devices))}")
    if check_offs:
        _check_offs_on_host(offs, T, "grouped_mm_fp8")


def _triton_fp8_supports(a, b) -> Optional[str]:
    reason = backends.triton_unsupported_reason(a.device)
    if reason is not None:
        return reason
    if a.device.type == "cuda" and torch.cuda.get_device_capability(a.device) < (8, 9):
        return "FP8 tensor cores need sm_89+"
    return None


backends.register_op(
    OP_FP8, cuda_preference=("triton",),
    supports={"triton": _triton_fp8_supports, "torch": lambda a, b: None},
    example_inputs=lambda device, dtype: (torch.empty(16, 16, device=device, dtype=torch.float8_e4m3fn),
                                          torch.empty(2, 16, 16, device=device, dtype=torch.float8_e4m3fn)),
)


@torch.library.custom_op("tokenforge::grouped_mm_fp8", mutates_args=())
def grouped_mm_fp8_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, scale_a: torch.Tensor,
                      scale_b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    from tokenforge.kernels import grouped_mm as kernel

    out = torch.empty((a.shape[0], b.shape[2]), dtype=out_dtype, device=a.device)
    if _blockwise(scale_b, b.shape[2]):  # the kernel reads both by strides
        return kernel.grouped_mm_fp8_forward(a, b, offs, scale_a, scale_b, out)
    return kernel.grouped_mm_fp8_forward(a, b, offs, scale_a.reshape(-1).contiguous(),
                                         scale_b.reshape(b.shape[0], b.shape[2]).contiguous(), out)


@grouped_mm_fp8_op.register_fake
def _(a, b, offs, scale_a, scale_b, out_dtype):
    return a.new_empty((a.shape[0], b.shape[2]), dtype=out_dtype)


def grouped_mm_fp8(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, scale_a: torch.Tensor,
                   scale_b: torch.Tensor, *, out_dtype: torch.dtype = torch.bfloat16, check_offs: bool = True,
                   backend: Optional[str] = None) -> torch.Tensor:
    """(T, N) = per-expert ``(a[rows of e] @ b[e]) * scale_a[rows] * scale_b[e]`` for fp8 a (T, K)
    sorted by expert with rowwise scales (T,) / (T, 1), fp8 b (E, K, N) with per-expert column
    scales (E, N) / (E, 1, N) (each b[e] quantized colwise), offs as for :func:`grouped_mm`; K, N
    multiples of 16. Blockwise (DeepSeek-V3): scale_a (T, cdiv(K, 128)) per token and 128 of K,
    scale_b (E, cdiv(K, 128), N / 128) per 128x128 block of b[e] (N a multiple of 128); each K
    tile's fp32 partial product is scaled as it is added. No autograd (fp8 inputs have no
    gradient): training in fp8 goes through :func:`tokenforge.fp8.grouped_mm_float8`, which
    quantizes bf16 operands and calls this for its forward and dA GEMMs. ``backend``: triton (FP8 wgmma on sm_90, the persistent
    grouped kernel; the interpreter on CPU) or torch (the dequantized loop)."""
    _check_fp8(a, b, offs, scale_a, scale_b, out_dtype, check_offs)
    name = backends.choose(OP_FP8, a, b, backend=backend)
    if name == "torch" or a.shape[0] == 0:
        return grouped_mm_fp8_reference(a, b, offs, scale_a, scale_b, out_dtype)
    return torch.ops.tokenforge.grouped_mm_fp8(a, b, offs, scale_a, scale_b, out_dtype)


def grouped_mm_fp8_wgrad_reference(a_t: torch.Tensor, dout_t: torch.Tensor, offs: torch.Tensor, scale_a: torch.Tensor,
                                   scale_d: torch.Tensor, out_dtype: torch.dtype, token_block: int = 0) -> torch.Tensor:
    """dB[e] = (a_t[:, rows of e] dequantized by scale_a[e]) @ (dout_t[:, rows of e] by scale_d[e])^T,
    fp32 (float64 scales give the float64 oracle); with ``token_block`` the scales change every
    that many of the expert's tokens (the rows of tokenforge.fp8.quantize_expert_cols_reference).
    Zeros for an empty expert."""
    from tokenforge.kernels.fp8_quantize import token_block_row_on_host

    compute = torch.float64 if scale_a.dtype == torch.float64 else torch.float32
    experts = offs.shape[0]
    db = torch.zeros((experts, a_t.shape[0], dout_t.shape[0]), dtype=compute, device=a_t.device)
    start = 0
    for e, end in enumerate(int(v) for v in offs.tolist()):
        end = max(end, start)
        step = token_block or max(end - start, 1)
        for b0 in range(start, end, step):
            b_end = min(b0 + step, end)
            row = token_block_row_on_host(e, start, b0) if token_block else e
            a_e = a_t[:, b0:b_end].to(compute) * scale_a[row].to(compute)[:, None]
            d_e = dout_t[:, b0:b_end].to(compute) * scale_d[row].to(compute)[:, None]
            db[e] += a_e @ d_e.t()
        start = end
    return db.to(out_dtype)


@torch.library.custom_op("tokenforge::grouped_mm_fp8_wgrad", mutates_args=())
def grouped_mm_fp8_wgrad_op(a_t: torch.Tensor, dout_t: torch.Tensor, offs: torch.Tensor, scale_a: torch.Tensor,
                            scale_d: torch.Tensor, out_dtype: torch.dtype, backend: str,
                            token_block: int = 0) -> torch.Tensor:
    """The fp8 weight gradient of a grouped GEMM: token-major fp8 a_t (K, T) and dout_t (N, T), each
    expert's tokens scaled per row (scale_a (E, K), scale_d (E, N) fp32; with ``token_block`` per
    that many of its tokens: (E + cdiv(T, token_block), K) and (.., N)) -> (E, K, N) in out_dtype."""
    if backend != "triton":
        return grouped_mm_fp8_wgrad_reference(a_t, dout_t, offs, scale_a, scale_d, out_dtype, token_block)
    from tokenforge.kernels import grouped_mm as kernel

    db = torch.empty((offs.shape[0], a_t.shape[0], dout_t.shape[0]), dtype=out_dtype, device=a_t.device)
    return kernel.grouped_mm_fp8_wgrad(a_t, dout_t, offs, scale_a.contiguous(), scale_d.contiguous(), db, token_block)


@grouped_mm_fp8_wgrad_op.register_fake
def _(a_t, dout_t, offs, scale_a, scale_d, out_dtype, backend, token_block=0):
    return a_t.new_empty((offs.shape[0], a_t.shape[0], dout_t.shape[0]), dtype=out_dtype)
