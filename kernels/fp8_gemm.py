"""FP8 GEMM in Triton: out = (a @ b) * scale_a * scale_b (+ bias), scales in the epilogue.

a (M, K) and b (K, N) are float8_e4m3fn or float8_e5m2 (mixed allowed, e.g. e5m2 gradients times
e4m3 weights); the dot runs on fp8 operands with an fp32 accumulator (Hopper: FP8 ``wgmma``,
twice the bf16 tensor-core rate; sm_89: FP8 ``mma``). scale_a is a scalar or one fp32 per row of
a, scale_b a scalar or one per column of b, passed as a pointer plus a stride that is 0 for a
scalar. The epilogue is fp32: ``acc * sa[m] * sb[n] + bias[n]``, then one rounding to out's dtype.

The kernel runs on K-major operands only (a row-major, b column-major, as ``torch._scaled_mm``
wants and as Float8Linear's forward produces): :func:`k_major` copies any other layout first (the
weight-gradient GEMM's M-major a / N-major b), because the N-major b tile spills 182 B of
registers on sm_90 under triton 3.6 and loads slower everywhere; one fp8 copy costs far less. Tiles are grouped along M (``GROUP_M``) so
a wave of programs reuses b tiles in L2.

Triton's interpreter runs fp8 ``tl.dot`` exactly (it decodes to fp32); it misreads fp8 inf/nan
bit patterns as large finite values, which quantized data never holds unless its scale is
already inf/nan (tokenforge.fp8.quantize), so CPU results stay meaningful.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import INTERPRETED, launch_device
from tokenforge.kernels.matmul_tiles import grouped_tile, k_loop

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ALIGN = 16


@triton.jit
def _fp8_gemm_kernel(
    A, B, SA, SB, BIAS, OUT,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
    stride_sa, stride_sb,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Clamp out-of-range rows/cols to valid addresses (their results are masked at the store), so
    # the main loop needs masks only along K.
    rm_safe = tl.where(rm < M, rm, 0)
    rn_safe = tl.where(rn < N, rn, 0)
    a_ptrs = A + rm_safe[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + rn_safe[None, :] * stride_bn

    acc = k_loop(a_ptrs, b_ptrs, K, BLOCK_K * stride_ak, BLOCK_K * stride_bk, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, False)

    sa = tl.load(SA + rm_safe * stride_sa)
    sb = tl.load(SB + rn_safe * stride_sb)
    out = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + rn_safe).to(tl.float32)[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(OUT + rm[:, None] * stride_om + rn[None, :] * stride_on, out.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration: the compile gate compiles every config gemm_config can return.
# ---------------------------------------------------------------------------------------------

# 128x128x128 (8 warps, 4 stages: 128 KB of shared memory; 128x256 spills on sm_90) for large
# problems; 64x128x128 for small M or N so more tiles fill the SMs. K-tiles of 128 fp8 bytes = one 128-byte swizzle row.
LARGE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
SMALL = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
INTERPRETER = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)


def gemm_config(M: int, N: int, K: int) -> dict:
    if INTERPRETED:
        return dict(INTERPRETER)
    if M >= 2048 and N >= 2048:
        return dict(LARGE)
    return dict(SMALL)


def all_configs() -> list[tuple[str, dict]]:
    return [("_fp8_gemm_kernel", dict(LARGE)), ("_fp8_gemm_kernel", dict(SMALL))]


# ---------------------------------------------------------------------------------------------
# Launcher: inputs validated by tokenforge.fp8.scaled_mm.
# ---------------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def _capability_ok(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < (8, 9):
        return (f"GPU {torch.cuda.get_device_name(device_index)} is sm_{major}{minor} and has no FP8 tensor cores "
                "(sm_89+); tokenforge.fp8.scaled_mm falls back to the dequantize-then-matmul emulation "
                "(backend='torch')")
    return ""


def supports(a: torch.Tensor, b: torch.Tensor) -> str | None:
    if a.dtype not in FP8_DTYPES or b.dtype not in FP8_DTYPES:
        return f"operands must be float8_e4m3fn/float8_e5m2, got {a.dtype} and {b.dtype}"
    if a.device.type == "cuda" and not INTERPRETED:
        index = a.device.index if a.device.index is not None else torch.cuda.current_device()
        return _capability_ok(index) or None
    return None


def k_major(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a (M, K) with unit stride along K and b (K, N) with unit stride along K: the only layout
    the kernel is compiled for (copies whatever is not already so)."""
    if a.stride(1) != 1 and a.shape[1] > 1:
        a = a.contiguous()
    if b.stride(0) != 1 and b.shape[0] > 1:
        b = b.t().contiguous().t()
    return a, b


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(M, N) in out_dtype = (a @ b) * scale_a * scale_b + bias; scale_a () or (M, 1), scale_b ()
    or (1, N), fp32 contiguous; bias (N,) or None."""
    M, K = a.shape
    N = b.shape[1]
    a, b = k_major(a, b)
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    cfg = gemm_config(M, N, K)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    stride_sa = 0 if scale_a.numel() == 1 else 1
    stride_sb = 0 if scale_b.numel() == 1 else 1
    with launch_device(a.device):
        _fp8_gemm_kernel[grid](
            a, b, scale_a, scale_b, bias if bias is not None else scale_a, out,
            M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            stride_sa, stride_sb,
            HAS_BIAS=bias is not None, UPCAST=False, **cfg,
        )
    return out
