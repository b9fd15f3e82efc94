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

Two kernels, both on K-major operands only (a row-major, b column-major, as ``torch._scaled_mm``
wants, as FP8 wgmma reads shared memory, and as Float8Linear's forward produces): :func:`k_major`
copies any other layout first (the dgrad GEMM's N-major b, the weight-gradient GEMM's M-major a
and N-major b), because an N-major b tile spills 182 B of registers on sm_90 under triton 3.6
and loads slower everywhere; one fp8 copy costs far less.

- ``_fp8_gemm_tma_kernel`` (sm_90, and the interpreter): persistent, about one program per SM
  walking the output tiles; a and b^T come in through TMA tensor descriptors (the copy engine
  zero-fills the edges: no masks, no address math in the K loop), 128x256x128 tiles, 3 stages.
- ``_fp8_gemm_kernel`` (sm_89, or a base address / row stride TMA cannot take): one program per
  tile, pointer loads pipelined by cp.async.

Tiles are grouped along M (``GROUP_M``) so a wave of programs reuses b tiles in L2.

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
def _k_block_scaled(part, SA, SB, sa_ptrs, sb_ptrs, pid_m, pid_n, kb, stride_sam, stride_sak, stride_sbk,
                    stride_sbn, SA_GROUP_M: tl.constexpr, SB_GROUP_N: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One K tile's fp32 partial product times its 128-wide K block's scales (SCALE_K)."""
    # A 128-row/column scale group holds the whole tile (BLOCK divides 128): one scalar, not a
    # vector spread over the accumulator's layout (32 registers a thread at n128).
    if SA_GROUP_M % BLOCK_M == 0:
        part = part * tl.load(SA + (pid_m.to(tl.int64) * BLOCK_M // SA_GROUP_M) * stride_sam + kb * stride_sak)
    else:
        part = part * tl.load(sa_ptrs + kb * stride_sak)[:, None]
    if SB_GROUP_N % BLOCK_N == 0:
        part = part * tl.load(SB + (pid_n.to(tl.int64) * BLOCK_N // SB_GROUP_N) * stride_sbn + kb * stride_sbk)
    else:
        part = part * tl.load(sb_ptrs + kb * stride_sbk)[None, :]
    return part


@triton.jit
def _scale_ptrs(SA, SB, pid_m, pid_n, M, N, stride_sam, stride_sbn, SA_GROUP_M: tl.constexpr,
                SB_GROUP_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers to the scales of a tile's rows of a and columns of b: SA[m // SA_GROUP_M, 0] and
    SB[0, n // SB_GROUP_N] (add kb * stride for the 128-wide K block kb). 32-bit: a scale tensor
    is small; rows/cols past M/N read row/col 0 (masked at the store)."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.where(rm < M, rm, 0)
    rn = tl.where(rn < N, rn, 0)
    return SA + (rm // SA_GROUP_M) * stride_sam, SB + (rn // SB_GROUP_N) * stride_sbn


@triton.jit
def _epilogue(acc, SA, SB, BIAS, OUT, pid_m, pid_n, M, N, stride_om, stride_on, stride_sam, stride_sbn,
              HAS_BIAS: tl.constexpr, SCALE_K: tl.constexpr, SA_GROUP_M: tl.constexpr, SB_GROUP_N: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 ``acc * sa[m] * sb[n] + bias[n]`` (the scales already applied in the K loop when
    SCALE_K), one rounding to out's dtype, rows/cols past M/N masked. Index vectors are made here,
    after the K loop: 64-bit column vectors in the accumulator's layout (32 columns a thread at
    n128) live across the loop spilled 100+ B on sm_90. Row offsets are 64-bit (row * stride_om
    passes 2^31 in a large output)."""
    out = acc
    if not SCALE_K:
        sa_ptrs, sb_ptrs = _scale_ptrs(SA, SB, pid_m, pid_n, M, N, stride_sam, stride_sbn, SA_GROUP_M, SB_GROUP_N,
                                       BLOCK_M, BLOCK_N)
        out = acc * tl.load(sa_ptrs)[:, None] * tl.load(sb_ptrs)[None, :]
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rows_left = M - pid_m * BLOCK_M
    cols_left = N - pid_n * BLOCK_N
    if HAS_BIAS:
        out += tl.load(BIAS + pid_n * BLOCK_N + tl.where(rn < cols_left, rn, 0)).to(tl.float32)[None, :]
    base = OUT + (pid_m.to(tl.int64) * BLOCK_M) * stride_om + (pid_n.to(tl.int64) * BLOCK_N) * stride_on
    mask = (rm < rows_left)[:, None] & (rn < cols_left)[None, :]
    tl.store(base + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on, out.to(OUT.dtype.element_ty),
             mask=mask)


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
    if SCALE_K:
        # Blockwise along K: every K tile lies inside one 128-wide scale block (BLOCK_K divides
        # 128), so its fp32 partial product is scaled and added, as DeepSeek-V3 promotes the
        # tensor-core partial sums to fp32 per 128 elements of K.
        sa_ptrs, sb_ptrs = _scale_ptrs(SA, SB, pid_m, pid_n, M, N, stride_sam, stride_sbn, SA_GROUP_M, SB_GROUP_N,
                                       BLOCK_M, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
            part = dot_acc(a, b, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, False)
            acc += _k_block_scaled(part, SA, SB, sa_ptrs, sb_ptrs, pid_m, pid_n, (k * BLOCK_K) // 128,
                                   stride_sam, stride_sak, stride_sbk, stride_sbn, SA_GROUP_M, SB_GROUP_N,
                                   BLOCK_M, BLOCK_N)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    else:
        acc = k_loop(a_ptrs, b_ptrs, K, BLOCK_K * stride_ak, BLOCK_K * stride_bk, BLOCK_M, BLOCK_N, BLOCK_K,
                     UPCAST, False)
    _epilogue(acc, SA, SB, BIAS, OUT, pid_m, pid_n, M, N, stride_om, stride_on, stride_sam, stride_sbn,
              HAS_BIAS, SCALE_K, SA_GROUP_M, SB_GROUP_N, BLOCK_M, BLOCK_N)


@triton.jit
def _fp8_gemm_tma_kernel(
    A, B, SA, SB, BIAS, OUT,
    M, N, K,
    stride_om, stride_on,
    stride_sam, stride_sak, stride_sbk, stride_sbn,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, SCALE_K: tl.constexpr,
    SA_GROUP_M: tl.constexpr, SB_GROUP_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Persistent: about one program per SM walks the output tiles pid, pid + programs, ... in the
    # grouped order (a wave shares B tiles in L2). A is a tensor descriptor over a (M, K) in
    # [BLOCK_M, BLOCK_K] boxes, B one over b^T (N, K) in [BLOCK_N, BLOCK_K] boxes (b K-major, the
    # layout FP8 wgmma reads); the copy engine loads them (cp.async.bulk.tensor on sm_90) and
    # zero-fills past M, N and the K tail, so the loop has no masks and no address math.
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if SCALE_K:
            sa_ptrs, sb_ptrs = _scale_ptrs(SA, SB, pid_m, pid_n, M, N, stride_sam, stride_sbn, SA_GROUP_M,
                                           SB_GROUP_N, BLOCK_M, BLOCK_N)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = A.load([pid_m * BLOCK_M, k * BLOCK_K])
            b = tl.trans(B.load([pid_n * BLOCK_N, k * BLOCK_K]))
            if SCALE_K:
                part = dot_acc(a, b, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, False)
                acc += _k_block_scaled(part, SA, SB, sa_ptrs, sb_ptrs, pid_m, pid_n, (k * BLOCK_K) // 128,
                                       stride_sam, stride_sak, stride_sbk, stride_sbn, SA_GROUP_M, SB_GROUP_N,
                                       BLOCK_M, BLOCK_N)
            else:
                acc = dot_acc(a, b, acc, UPCAST, False)
        _epilogue(acc, SA, SB, BIAS, OUT, pid_m, pid_n, M, N, stride_om, stride_on, stride_sam, stride_sbn,
                  HAS_BIAS, SCALE_K, SA_GROUP_M, SB_GROUP_N, BLOCK_M, BLOCK_N)


# ---------------------------------------------------------------------------------------------
# Launch configuration: the compile gate compiles every config gemm_config can return.
# ---------------------------------------------------------------------------------------------

# Pointer-load kernel (sm_89, or operands TMA cannot take): 128x128x128 (8 warps, 4 stages: 128 KB
# of shared memory; 128x256 spills) for large problems; 64x128x128 for small M or N so more tiles
# fill the SMs. K-tiles of 128 fp8 bytes = one 128-byte swizzle row. Blockwise with b scales that
# vary along N and K ((128, 1) blocks, the weight-gradient GEMM): a per-column scale vector spread
# over the n128 accumulator costs 32 registers a thread and 128x128 spills (320 B), so large
# problems take 128x64 (200 registers).
LARGE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
LARGE_COL_SCALES = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
SMALL = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
INTERPRETER = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
# Persistent TMA kernel (sm_90): 128x256x128, 3 stages (48 KB a stage, 147 KB; 4 stages spill
# 24-72 B: 255 registers hold the 128-register accumulator and the pipeline); blockwise along K
# keeps a second (partial) accumulator, so 128x128 (4 stages, 131 KB, no spills in every scale mode).
TMA_LARGE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
TMA_BLOCKWISE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
INTERPRETER_PROGRAMS = 3  # persistent programs under the interpreter: each walks several tiles


def gemm_config(M: int, N: int, K: int, col_scales_vary_k: bool = False) -> dict:
    """Pointer-kernel tiles for an (M, K) x (K, N) problem; ``col_scales_vary_k``: b's scales
    vary along both K and N (SCALE_K with SB_GROUP_N == 1)."""
    if INTERPRETED:
        return dict(INTERPRETER)
    if M >= 2048 and N >= 2048:
        return dict(LARGE_COL_SCALES if col_scales_vary_k else LARGE)
    return dict(SMALL)


def tma_config(M: int, N: int, K: int, scale_k: bool) -> dict:
    """Persistent TMA kernel tiles; ``scale_k``: blockwise scales along K."""
    if INTERPRETED:
        return dict(INTERPRETER)
    if M >= 2048 and N >= 2048:
        return dict(TMA_BLOCKWISE if scale_k else TMA_LARGE)
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
    for cfg, scale_k in ((TMA_LARGE, False), (TMA_BLOCKWISE, True), (SMALL, False), (SMALL, True)):
        for gm, gn in groups:
            out.append(("_fp8_gemm_tma_kernel", dict(cfg, SCALE_K=scale_k, SA_GROUP_M=gm, SB_GROUP_N=gn)))
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
    common = dict(HAS_BIAS=bias is not None, UPCAST=False, SCALE_K=scale_k, SA_GROUP_M=group_m, SB_GROUP_N=group_n)
    bias_arg = bias if bias is not None else scale_a
    if use_tma(a, b):
        from triton.tools.tensor_descriptor import TensorDescriptor

        cfg = tma_config(M, N, K, scale_k)
        tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
        a_desc = TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
        b_desc = TensorDescriptor.from_tensor(b.t(), [cfg["BLOCK_N"], cfg["BLOCK_K"]])  # (N, K), K unit-stride
        with launch_device(a.device):
            _fp8_gemm_tma_kernel[(_programs(a.device, tiles),)](
                a_desc, b_desc, scale_a, scale_b, bias_arg, out, M, N, K, out.stride(0), out.stride(1),
                sam, sak, sbk, sbn, **common, **cfg,
            )
        return out
    cfg = gemm_config(M, N, K, col_scales_vary_k=scale_k and group_n == 1)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    with launch_device(a.device):
        _fp8_gemm_kernel[grid](
            a, b, scale_a, scale_b, bias_arg, out,
            M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            sam, sak, sbk, sbn, **common, **cfg,
        )
    return out


def use_tma(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the persistent TMA kernel takes these K-major operands: an sm_90+ GPU (or the
    interpreter, which runs tensor descriptors too) and TMA's 16-byte rule for the base addresses
    and the row strides (a's rows, b's columns)."""
    if not INTERPRETED and (a.device.type != "cuda" or torch.cuda.get_device_capability(a.device) < (9, 0)):
        return False
    return tma_operands_ok(a, b)


def tma_operands_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """TMA's rules for K-major fp8 a (M, K) and b (K, N): 16-byte aligned bases and row strides
    (a's rows, b's columns), and K > 0."""
    return (a.shape[1] > 0 and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
            and a.stride(0) % 16 == 0 and b.stride(1) % 16 == 0)


def _programs(device: torch.device, tiles: int) -> int:
    if INTERPRETED:
        return max(1, min(INTERPRETER_PROGRAMS, tiles))
    return max(1, min(torch.cuda.get_device_properties(device).multi_processor_count, tiles))
