"""FP8 GEMM in Triton: out = (a @ b) * scale_a * scale_b (+ bias), scales in the epilogue.

a (M, K) and b (K, N) are float8_e4m3fn or float8_e5m2 (mixed allowed, e.g. e5m2 gradients times
e4m3 weights); the dot runs on fp8 operands with an fp32 accumulator (Hopper: FP8 ``wgmma``,
twice the bf16 tensor-core rate; sm_89: FP8 ``mma``). Scales are fp32, indexed through strides
that are 0 along the dims where they do not vary (:func:`scale_layout`):

- tensorwise / rowwise (a: one per row) / colwise (b: one per column): constant along K, applied
  once in the fp32 epilogue ``acc * sa[m] * sb[n] + bias[n]``;
- blockwise along K (a: (1, 128) or (128, 128) blocks, b: (128, 1) or (128, 128) blocks, the
  DeepSeek-V3 recipe): ``SCALE_K``; every K tile's fp32 partial product is scaled by its block's
  scales and added to the accumulator (BLOCK_K divides 128, so a tile never straddles two blocks).

Then one rounding to out's dtype.

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
from tokenforge.kernels.matmul_tiles import dot_acc, grouped_tile, k_loop

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_BLOCK = 128  # blockwise scales cover 128 elements along K (and 128 rows/cols for 2-D blocks)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ALIGN = 16


@triton.jit
def _fp8_gemm_kernel(
    A, B, SA, SB, BIAS, OUT,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
    stride_sam, stride_sak, stride_sbk, stride_sbn,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, SCALE_K: tl.constexpr,
    SA_GROUP_M: tl.constexpr, SB_GROUP_N: tl.constexpr,
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
    # Scale of row m of a / column n of b: SA[m // SA_GROUP_M, kb], SB[kb, n // SB_GROUP_N], kb the
    # 128-wide K block (stride 0 for scales that do not vary along K; group 1 with stride 0 for a
    # scalar).
    sa_ptrs = SA + (rm_safe // SA_GROUP_M) * stride_sam
    sb_ptrs = SB + (rn_safe // SB_GROUP_N) * stride_sbn

    if SCALE_K:
        # Blockwise along K: every K tile lies inside one 128-wide scale block (BLOCK_K divides
        # 128), so its fp32 partial product is scaled and added, as DeepSeek-V3 promotes the
        # tensor-core partial sums to fp32 per 128 elements of K.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
            kb = (k * BLOCK_K) // 128
            part = dot_acc(a, b, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, False)
            # A 128-row/column scale group holds the whole tile (BLOCK divides 128): one scalar,
            # not a vector spread over the accumulator's layout (32 registers a thread at n128).
            if SA_GROUP_M % BLOCK_M == 0:
                part = part * tl.load(SA + (pid_m.to(tl.int64) * BLOCK_M // SA_GROUP_M) * stride_sam + kb * stride_sak)
            else:
                part = part * tl.load(sa_ptrs + kb * stride_sak)[:, None]
            if SB_GROUP_N % BLOCK_N == 0:
                part = part * tl.load(SB + (pid_n.to(tl.int64) * BLOCK_N // SB_GROUP_N) * stride_sbn + kb * stride_sbk)
            else:
                part = part * tl.load(sb_ptrs + kb * stride_sbk)[None, :]
            acc += part
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        out = acc
    else:
        acc = k_loop(a_ptrs, b_ptrs, K, BLOCK_K * stride_ak, BLOCK_K * stride_bk, BLOCK_M, BLOCK_N, BLOCK_K,
                     UPCAST, False)
        out = acc * tl.load(sa_ptrs)[:, None] * tl.load(sb_ptrs)[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + rn_safe).to(tl.float32)[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(OUT + rm[:, None] * stride_om + rn[None, :] * stride_on, out.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration: the compile gate compiles every config gemm_config can return.
# ---------------------------------------------------------------------------------------------

# 128x128x128 (8 warps, 4 stages: 128 KB of shared memory; 128x256 spills on sm_90) for large
# problems; 64x128x128 for small M or N so more tiles fill the SMs. K-tiles of 128 fp8 bytes = one
# 128-byte swizzle row. Blockwise with b scales that vary along N and K ((128, 1) blocks, the
# weight-gradient GEMM): a per-column scale vector spread over the n128 accumulator costs 32
# registers a thread and 128x128 spills (320 B), so large problems take 128x64 (200 registers).
LARGE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
LARGE_COL_SCALES = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
SMALL = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
INTERPRETER = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)


def gemm_config(M: int, N: int, K: int, col_scales_vary_k: bool = False) -> dict:
    """Tiles for an (M, K) x (K, N) problem; ``col_scales_vary_k``: b's scales vary along both K
    and N (SCALE_K with SB_GROUP_N == 1)."""
    if INTERPRETED:
        return dict(INTERPRETER)
    if M >= 2048 and N >= 2048:
        return dict(LARGE_COL_SCALES if col_scales_vary_k else LARGE)
    return dict(SMALL)


def all_configs() -> list[tuple[str, dict]]:
    """Every (kernel, tiles + scale-mode constexprs) the launcher can pick: per config, the
    epilogue-scaled modes and the blockwise (SCALE_K) modes it serves."""
    out = []
    groups = [(gm, gn) for gm in (1, SCALE_BLOCK) for gn in (1, SCALE_BLOCK)]
    for cfg in (LARGE, SMALL, LARGE_COL_SCALES):
        for gm, gn in groups:
            for scale_k in (False, True):
                if cfg is LARGE_COL_SCALES and not (scale_k and gn == 1):
                    continue  # taken only for blockwise b scales that vary along N and K
                if cfg is LARGE and scale_k and gn == 1:
                    continue  # those go to LARGE_COL_SCALES
                out.append(("_fp8_gemm_kernel", dict(cfg, SCALE_K=scale_k, SA_GROUP_M=gm, SB_GROUP_N=gn)))
    return out


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


def scale_layout(scale: torch.Tensor, outer: int, k: int, k_first: bool) -> tuple[int, int, int, bool]:
    """How the kernel indexes an operand's scale: (stride along the operand's outer dim (M of a,
    N of b), stride along the 128-wide K blocks, outer rows per scale (1 or 128), whether it
    varies along K). Shapes (validated by tokenforge.fp8.scaled_mm), for a (outer=M, K-blocks kb):
    () | (M, 1) | (M, kb) | (cdiv(M, 128), kb); for b the same transposed (k_first=True)."""
    if scale.numel() == 1:
        return 0, 0, 1, False
    s = scale if not k_first else scale.t()  # now (outer groups, K groups)
    groups_outer, groups_k = s.shape
    group = 1 if groups_outer == outer else SCALE_BLOCK
    varies_k = groups_k > 1
    return (s.stride(0) if groups_outer > 1 else 0), (s.stride(1) if varies_k else 0), group, varies_k


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(M, N) in out_dtype = (a @ b) * scale_a * scale_b + bias; scale_a () | (M, 1) | (M, kb) |
    (cdiv(M, 128), kb), scale_b () | (1, N) | (kb, N) | (kb, cdiv(N, 128)) fp32 with kb =
    cdiv(K, 128) (see :func:`scale_layout`); bias (N,) or None."""
    M, K = a.shape
    N = b.shape[1]
    a, b = k_major(a, b)
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    sam, sak, group_m, a_varies_k = scale_layout(scale_a, M, K, k_first=False)
    sbn, sbk, group_n, b_varies_k = scale_layout(scale_b, N, K, k_first=True)
    scale_k = a_varies_k or b_varies_k
    cfg = gemm_config(M, N, K, col_scales_vary_k=scale_k and group_n == 1)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    with launch_device(a.device):
        _fp8_gemm_kernel[grid](
            a, b, scale_a, scale_b, bias if bias is not None else scale_a, out,
            M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            sam, sak, sbk, sbn,
            HAS_BIAS=bias is not None, UPCAST=False, SCALE_K=scale_k,
            SA_GROUP_M=group_m, SB_GROUP_N=group_n, **cfg,
        )
    return out
