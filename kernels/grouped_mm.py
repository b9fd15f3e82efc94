"""Grouped GEMM for mixture-of-experts layers in Triton: out[rows of e] = a[rows of e] @ b[e].

Tokens arrive sorted by expert: a (T, K), b (E, K, N), offs (E,) int32 cumulative row ends
(expert e owns rows [offs[e-1], offs[e]); an expert may own none). Two kernels:

- ``_grouped_mm_kernel`` (forward, and dA = dOut @ b^T with b passed transposed by strides):
  persistent; on sm_90 the tiles come in by TMA (tensor descriptors, b read in either major order,
  so dA too) when the layouts allow (a unit stride, 16-byte alignment), else by pointer loads. A fixed grid of about one program per SM walks the work items (expert, row tile,
  column tile) in order, each program taking every ``num_programs``-th item. The schedule is built
  on the device from offs while walking, so there is no host sync and no per-step launch-size
  change (the launch is CUDA-graph capturable). Row tiles never straddle experts.
- ``_grouped_mm_wgrad_kernel`` (dB[e] = a[rows of e]^T @ dOut[rows of e]): one program per
  (expert, K tile, N tile) on a folded one-axis grid, looping over the expert's rows; an expert
  with no rows writes zeros. With SCALED, the fp8 weight gradient (token-major fp8 operands,
  per-expert scales applied to the fp32 sum).

Each tile's base offset is int64 (T x K passes 2^31 at a million tokens of d7168); offsets inside a
tile are int32 (64-bit per-element offsets spilled on sm_90) unless a stride is so large that one
tile spans 2^31 elements (WIDE). Accumulation is fp32, one rounding to the output dtype. Loads of
rows past an expert's end are clamped to its last row (valid memory) and never stored, so the K
loop needs no row mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import INTERPRETED, launch_device
from tokenforge.kernels.fp8_quantize import token_block_row
from tokenforge.kernels.matmul_tiles import dot_acc, k_loop

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _add_block_scaled(acc, a, b, sa_ptrs, sb_ptr, kt, stride_sak, stride_sbk, BLOCK_K: tl.constexpr,
                      UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + (a @ b) * scale_a[rows, kb] * scale_b[kb] for K tile ``kt``, inside 128-wide block kb
    (BLOCKWISE): the tile's fp32 partial product, scaled, then added."""
    kb = (kt * BLOCK_K) // 128
    part = dot_acc(a, b, tl.zeros(acc.shape, dtype=tl.float32), UPCAST, IEEE)
    return acc + part * tl.load(sa_ptrs + kb * stride_sak)[:, None] * tl.load(sb_ptr + kb * stride_sbk)


@triton.jit
def _grouped_mm_kernel(
    A, B, OFFS, OUT, E, N, K,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr, TMA: tl.constexpr, TRANS_B: tl.constexpr,
    SA=None, SB=None, stride_sbe=0, SCALED: tl.constexpr = False,
    stride_sam=0, stride_sak=0, stride_sbk=0, stride_sbn=0, BLOCKWISE: tl.constexpr = False,
):
    # SCALED: fp8 operands, acc * scale_a[row] * scale_b[e, col] in the epilogue; with BLOCKWISE the
    # scales vary along K in 128-wide blocks (a: SA (T, K/128), one per token row and block; b: SB
    # (E, K/128, N/128), one per 128x128 block of b[e]): every K tile lies in one block (BLOCK_K
    # divides 128) and its fp32 partial product is scaled and added (DeepSeek-V3's promotion), and
    # a column tile in one 128-column block (BLOCK_N divides 128, N a multiple of 128), so b's scale
    # is one scalar a step.
    # TMA: A and B are tensor descriptors (a (T, K) in [BLOCK_M, BLOCK_K] boxes, b (E, K, N) in
    # [1, BLOCK_K, BLOCK_N] boxes), loaded by the copy engine (cp.async.bulk.tensor on sm_90): the
    # box is zero-filled past K, N and T, and a 3-D box never reads another expert's weights; rows
    # of A past the expert's end are the next expert's tokens, computed and never stored.
    # TRANS_B: b is the transpose of the tensor behind B's descriptor ((E, N, K) stored, as for
    # dA = dOut @ b^T, or nn.Linear-style expert weights): [1, BLOCK_N, BLOCK_K] boxes, transposed
    # on chip (wgmma reads either major order from shared memory).
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # The work: sum over experts of row tiles x column tiles, from offs on the device.
    total = 0
    prev = 0
    for i in range(E):
        cur = tl.load(OFFS + i)
        total += tl.cdiv(tl.maximum(cur - prev, 0), BLOCK_M) * tiles_n
        prev = tl.maximum(cur, prev)
    rk = tl.arange(0, BLOCK_K)
    # Walk items pid, pid + n_programs, ...; the expert cursor (e, its rows [start, end), the items
    # before it) only moves forward, a few scalar steps per item.
    e = 0
    start = 0
    end = tl.maximum(tl.load(OFFS), 0)
    before = 0
    items_e = tl.cdiv(end, BLOCK_M) * tiles_n
    for item in range(pid, total, n_programs):
        while item >= before + items_e:
            before += items_e
            e += 1
            start = end
            end = tl.maximum(tl.load(OFFS + e), start)
            items_e = tl.cdiv(end - start, BLOCK_M) * tiles_n
        local = item - before
        row0 = start + (local // tiles_n) * BLOCK_M
        col0 = (local % tiles_n) * BLOCK_N
        if BLOCKWISE:  # the tile's rows' a scales (rows past the expert's end clamped) and b's block column
            sa_ptrs = SA + (tl.cast(row0, tl.int64) + tl.minimum(tl.arange(0, BLOCK_M), end - 1 - row0)) * stride_sam
            sb_ptr = SB + tl.cast(e, tl.int64) * stride_sbe + (col0 // 128) * stride_sbn
        if TMA:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for kt in range(0, tl.cdiv(K, BLOCK_K)):
                a = A.load([row0, kt * BLOCK_K])
                if TRANS_B:
                    b = tl.trans(B.load([e, col0, kt * BLOCK_K]).reshape(BLOCK_N, BLOCK_K))
                else:
                    b = B.load([e, kt * BLOCK_K, col0]).reshape(BLOCK_K, BLOCK_N)
                if BLOCKWISE:
                    acc = _add_block_scaled(acc, a, b, sa_ptrs, sb_ptr, kt, stride_sak, stride_sbk, BLOCK_K,
                                            UPCAST, IEEE)
                else:
                    acc = dot_acc(a, b, acc, UPCAST, IEEE)
        else:
            # 64-bit tile bases, 32-bit offsets inside the tile (64-bit only when WIDE: a stride
            # so large that one tile spans 2^31 elements); rows past the expert's end and columns
            # past N are clamped to the last valid one (loaded, never stored).
            rm = tl.minimum(tl.arange(0, BLOCK_M), end - 1 - row0)
            rn = tl.minimum(tl.arange(0, BLOCK_N), N - 1 - col0)
            if WIDE:
                rm = rm.to(tl.int64)
                rn = rn.to(tl.int64)
            a_ptrs = (A + tl.cast(row0, tl.int64) * stride_am) + rm[:, None] * stride_am + rk[None, :] * stride_ak
            b_ptrs = (B + tl.cast(e, tl.int64) * stride_be + tl.cast(col0, tl.int64) * stride_bn) \
                + rk[:, None] * stride_bk + rn[None, :] * stride_bn
            if BLOCKWISE:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for kt in range(0, tl.cdiv(K, BLOCK_K)):
                    k_left = K - kt * BLOCK_K
                    a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
                    b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
                    acc = _add_block_scaled(acc, a, b, sa_ptrs, sb_ptr, kt, stride_sak, stride_sbk, BLOCK_K,
                                            UPCAST, IEEE)
                    a_ptrs += BLOCK_K * stride_ak
                    b_ptrs += BLOCK_K * stride_bk
            else:
                acc = k_loop(a_ptrs, b_ptrs, K, BLOCK_K * stride_ak, BLOCK_K * stride_bk,
                             BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
        om = tl.arange(0, BLOCK_M)
        on = tl.arange(0, BLOCK_N)
        if WIDE:
            om = om.to(tl.int64)
            on = on.to(tl.int64)
        if SCALED and not BLOCKWISE:  # fp8 operands: acc * scale_a[row] * scale_b[e, col] in fp32, rows/cols clamped
            sa = tl.load(SA + tl.cast(row0, tl.int64) + tl.minimum(om, end - 1 - row0))
            sb = tl.load(SB + tl.cast(e, tl.int64) * stride_sbe + col0 + tl.minimum(on, N - 1 - col0))
            acc = acc * sa[:, None] * sb[None, :]
        o_ptrs = (OUT + tl.cast(row0, tl.int64) * stride_om + tl.cast(col0, tl.int64) * stride_on) \
            + om[:, None] * stride_om + on[None, :] * stride_on
        live = (om[:, None] < end - row0) & (on[None, :] < N - col0)
        tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=live)


@triton.jit
def _grouped_mm_wgrad_kernel(
    A, DOUT, OFFS, DB, N, K,
    stride_am, stride_ak, stride_dm, stride_dn, stride_be, stride_bk, stride_bn,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr,
    SA=None, SB=None, SCALED: tl.constexpr = False, BLOCKWISE: tl.constexpr = False,
):
    # SCALED: fp8 operands with one scale per (expert, K row) in SA (E, K) and per (expert, N
    # column) in SB (E, N), constant along the tokens this GEMM reduces, applied to the fp32 sum.
    # With BLOCKWISE the scales change every 128 of an expert's tokens (counted from its first):
    # SA (G, K) and SB (G, N), block j of expert e in row e + start_e // 128 + j (token_block_row);
    # each step's rows lie in one block (BLOCK_M divides 128), its partial product scaled and added.
    # The fp8 operands come token-major (a^T (K, T) and dOut^T (N, T) stored: stride_am = stride_dm
    # = 1), so both wgmma operands are K-major in shared memory, as FP8 wgmma requires.
    pid = tl.program_id(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_expert = tiles_k * tiles_n
    e = pid // per_expert
    k0 = ((pid % per_expert) // tiles_n) * BLOCK_K
    n0 = (pid % tiles_n) * BLOCK_N
    end = tl.load(OFFS + e)
    start = tl.load(OFFS + e - 1, mask=e > 0, other=0)
    rk = tl.minimum(tl.arange(0, BLOCK_K), K - 1 - k0)
    rn = tl.minimum(tl.arange(0, BLOCK_N), N - 1 - n0)
    rm = tl.arange(0, BLOCK_M)
    if WIDE:
        rk = rk.to(tl.int64)
        rn = rn.to(tl.int64)
        rm = rm.to(tl.int64)
    a_base = A + tl.cast(k0, tl.int64) * stride_ak
    d_base = DOUT + tl.cast(n0, tl.int64) * stride_dn
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        live = rm < end - m0
        a_t = tl.load((a_base + tl.cast(m0, tl.int64) * stride_am) + rm[None, :] * stride_am + rk[:, None] * stride_ak,
                      mask=live[None, :], other=0.0)
        d = tl.load((d_base + tl.cast(m0, tl.int64) * stride_dm) + rm[:, None] * stride_dm + rn[None, :] * stride_dn,
                    mask=live[:, None], other=0.0)
        if BLOCKWISE:
            g = tl.cast(token_block_row(e, start, m0), tl.int64)
            part = dot_acc(a_t, d, tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32), UPCAST, IEEE)
            acc += part * tl.load(SA + g * K + k0 + rk)[:, None] * tl.load(SB + g * N + n0 + rn)[None, :]
        else:
            acc = dot_acc(a_t, d, acc, UPCAST, IEEE)
    ok = tl.arange(0, BLOCK_K)
    on = tl.arange(0, BLOCK_N)
    if WIDE:
        ok = ok.to(tl.int64)
        on = on.to(tl.int64)
    if SCALED and not BLOCKWISE:
        sa = tl.load(SA + tl.cast(e, tl.int64) * K + k0 + tl.minimum(ok, K - 1 - k0))
        sb = tl.load(SB + tl.cast(e, tl.int64) * N + n0 + tl.minimum(on, N - 1 - n0))
        acc = acc * sa[:, None] * sb[None, :]
    db_ptrs = (DB + tl.cast(e, tl.int64) * stride_be + tl.cast(k0, tl.int64) * stride_bk
               + tl.cast(n0, tl.int64) * stride_bn) + ok[:, None] * stride_bk + on[None, :] * stride_bn
    tl.store(db_ptrs, acc.to(DB.dtype.element_ty), mask=(ok[:, None] < K - k0) & (on[None, :] < N - n0))


# ---------------------------------------------------------------------------------------------
# Configurations (the compile gate compiles every one) and launchers
# ---------------------------------------------------------------------------------------------

# GPU: 128 x 128 tiles, K by 32, 8 warps (two warpgroups of wgmma m64n128 on sm_90), 4 stages
# ((128 + 128) x 32 x 2 B x 4 = 64 KB of shared memory); a 64-row variant when experts average
# fewer than 128 rows (decode-sized batches, many experts) so tiles are not mostly padding. K by 64
# spilled: 120 B on sm_80 (128 rows), 412 B on sm_90 under triton 3.6 (64 rows); see the gate.
FORWARD_CONFIGS = {
    "large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4),
    "small": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=4),
}
# fp8 (grouped_mm_fp8_forward): the same tiles with K by 64 (the same bytes a stage as bf16 by 32;
# FP8 wgmma reduces 32 deep), b always K-major (FP8 wgmma reads only that from shared memory).
FP8_FORWARD_CONFIGS = {
    "large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    "small": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
}
INTERPRETER_FP8_FORWARD = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# dB tiles 128 x 128, reducing over rows 32 at a time (64 spilled 48 B on sm_80).
WGRAD_CONFIG = dict(BLOCK_K=128, BLOCK_N=128, BLOCK_M=32, num_warps=8, num_stages=4)
# fp8 dB: 128 x 128 tiles reducing over 64 tokens a step (the bytes of bf16's 32; FP8 wgmma is 32 deep).
FP8_WGRAD_CONFIG = dict(BLOCK_K=128, BLOCK_N=128, BLOCK_M=64, num_warps=8, num_stages=4)
# Blockwise (scales per 128 tokens): each step's partial product is scaled by a vector along K
# and one along N, spread over the accumulator's layout; at 128 x 128 that spilled 376 B on sm_90,
# so 128 x 64 tiles.
FP8_WGRAD_BLOCKWISE_CONFIG = dict(BLOCK_K=128, BLOCK_N=64, BLOCK_M=64, num_warps=8, num_stages=4)
INTERPRETER_FORWARD = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
INTERPRETER_WGRAD = dict(BLOCK_K=32, BLOCK_N=32, BLOCK_M=16, num_warps=4, num_stages=1)
INTERPRETER_PROGRAMS = 3  # a persistent grid smaller than the work, so the walk is exercised


def supports(a: torch.Tensor, b: torch.Tensor) -> str | None:
    if a.dtype not in SUPPORTED_DTYPES:
        return f"the Triton grouped GEMM runs {', '.join(str(d) for d in SUPPORTED_DTYPES)}, got {a.dtype}"
    return None


def _flags(x: torch.Tensor, spans) -> dict:
    """UPCAST: fp32 dots in the interpreter (its bf16/fp16 dot is wrong); IEEE: fp32 without tf32;
    WIDE: some tile spans 2^31 elements ((block, stride) pairs of every tile dimension)."""
    wide = sum((block - 1) * abs(stride) for block, stride in spans) >= 2**31 - 1
    return dict(UPCAST=INTERPRETED and x.dtype != torch.float32, IEEE=x.dtype == torch.float32, WIDE=wide)


def forward_config(tokens: int, experts: int) -> dict:
    if INTERPRETED:
        return dict(INTERPRETER_FORWARD)
    return dict(FORWARD_CONFIGS["small" if tokens < 128 * max(experts, 1) else "large"])


def _programs(device: torch.device, work_bound: int) -> int:
    if INTERPRETED:
        return max(1, min(INTERPRETER_PROGRAMS, work_bound))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(sms, work_bound))


def tma_layout(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """How tensor descriptors can read a and b: "plain" (b's rows unit-stride), "trans_b" (b is a
    transposed view, its K unit-stride: dA's b^T, (E, N, K)-stored weights), or None (pointer
    loads). Needs an sm_90+ GPU (or the interpreter, which runs descriptors too), a unit-stride
    K in a, 16-byte aligned bases and strides (TMA's rules)."""
    if not INTERPRETED and (a.device.type != "cuda" or torch.cuda.get_device_capability(a.device) < (9, 0)):
        return None
    size = a.element_size()
    if a.stride(1) != 1 or a.data_ptr() % 16 or b.data_ptr() % 16 or (a.stride(0) * size) % 16:
        return None
    if b.stride(2) == 1 and (b.stride(0) * size) % 16 == 0 and (b.stride(1) * size) % 16 == 0:
        return "plain"
    if b.stride(1) == 1 and (b.stride(0) * size) % 16 == 0 and (b.stride(2) * size) % 16 == 0:
        return "trans_b"
    return None


def grouped_mm_forward(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (T, N) = a (T, K) @ b[e] per expert's rows; any strides; offs int32 (E,) on a's device."""
    return _launch_forward(a, b, offs, out, forward_config(a.shape[0], b.shape[0]), tma_layout(a, b))


def grouped_mm_fp8_forward(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, scale_a: torch.Tensor,
                           scale_b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (T, N) = (a[rows of e] @ b[e]) * scale_a[rows] * scale_b[e] for fp8 a (T, K) and b (E, K, N),
    scale_a fp32 (T,), scale_b fp32 (E, N) contiguous; or blockwise (a 3-D scale_b; the op passes
    per-column scales as (E, N)): scale_a (T, cdiv(K, 128)) per token and 128-wide K block, scale_b
    (E, cdiv(K, 128), N / 128) per 128x128 block of b[e], any strides, N a multiple of 128
    (validated by tokenforge.ops.grouped_mm_fp8).
    a is made K-major and b K-major ((E, N, K) behind a transposed view), copying what is not."""
    tokens, experts = a.shape[0], b.shape[0]
    if a.stride(1) != 1 or a.data_ptr() % 16 or a.stride(0) % 16:
        a = a.contiguous()
    if b.stride(1) != 1 or b.data_ptr() % 16 or b.stride(2) % 16 or b.stride(0) % 16:
        b = b.transpose(1, 2).contiguous().transpose(1, 2)
    if INTERPRETED:
        cfg = dict(INTERPRETER_FP8_FORWARD)
    else:
        cfg = dict(FP8_FORWARD_CONFIGS["small" if tokens < 128 * max(experts, 1) else "large"])
    layout = "trans_b" if tma_layout(a, b) == "trans_b" else None  # else pointer loads, b K-major all the same
    if scale_b.dim() == 3:
        scales = dict(SA=scale_a, SB=scale_b, stride_sam=scale_a.stride(0), stride_sak=scale_a.stride(1),
                      stride_sbe=scale_b.stride(0), stride_sbk=scale_b.stride(1), stride_sbn=scale_b.stride(2),
                      SCALED=True, BLOCKWISE=True)
    else:
        scales = dict(SA=scale_a, SB=scale_b, stride_sbe=scale_b.stride(0), SCALED=True)
    return _launch_forward(a, b, offs, out, cfg, layout, trans_b=True, scales=scales)


def _launch_forward(a, b, offs, out, cfg: dict, layout, trans_b: bool = False, scales=None) -> torch.Tensor:
    """_grouped_mm_kernel on a persistent grid, through tensor descriptors when ``layout`` says
    how (see :func:`tma_layout`), else pointer loads; ``scales`` the fp8 epilogue's arguments."""
    tokens, k = a.shape
    experts, _, n = b.shape
    # Upper bound on work items without reading offs: every expert adds at most one partial tile.
    bound = (triton.cdiv(tokens, cfg["BLOCK_M"]) + experts) * triton.cdiv(n, cfg["BLOCK_N"])
    grid = (_programs(a.device, bound),)
    a_arg, b_arg = a, b
    if layout is not None:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_arg = TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
        if layout == "plain":
            b_arg = TensorDescriptor.from_tensor(b, [1, cfg["BLOCK_K"], cfg["BLOCK_N"]])
        else:  # the (E, N, K) tensor behind the view
            b_arg = TensorDescriptor.from_tensor(b.transpose(1, 2), [1, cfg["BLOCK_N"], cfg["BLOCK_K"]])
    with launch_device(a.device):
        _grouped_mm_kernel[grid](
            a_arg, b_arg, offs, out, experts, n, k,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1),
            **_flags(a, [(cfg["BLOCK_M"], a.stride(0)), (cfg["BLOCK_K"], a.stride(1)), (cfg["BLOCK_K"], b.stride(1)),
                         (cfg["BLOCK_N"], b.stride(2)), (cfg["BLOCK_M"], out.stride(0)), (cfg["BLOCK_N"], out.stride(1))]),
            TMA=layout is not None, TRANS_B=trans_b or layout == "trans_b", **(scales or {}), **cfg)
    return out


def grouped_mm_wgrad(a: torch.Tensor, dout: torch.Tensor, offs: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """db (E, K, N) = a[rows of e]^T @ dout[rows of e] for every expert (zeros for an empty one)."""
    return _launch_wgrad(a, dout, offs, db, dict(INTERPRETER_WGRAD) if INTERPRETED else dict(WGRAD_CONFIG))


def grouped_mm_fp8_wgrad(a_t: torch.Tensor, dout_t: torch.Tensor, offs: torch.Tensor, scale_a: torch.Tensor,
                         scale_d: torch.Tensor, db: torch.Tensor, token_block: int = 0) -> torch.Tensor:
    """db (E, K, N) = (a_t[:, rows of e] @ dout_t[:, rows of e]^T) * scale_a[e][:, None] * scale_d[e]
    for token-major fp8 a_t (K, T) and dout_t (N, T) (each expert's tokens quantized per row of
    a_t / dout_t: :func:`tokenforge.kernels.fp8_quantize.quantize_expert_cols`), fp32 scales
    (E, K) and (E, N) contiguous; with ``token_block`` (128) the scales are per block of 128 of an
    expert's tokens, (G, K) and (G, N) (fp8_quantize.token_block_row). Zeros for an empty expert."""
    if INTERPRETED:
        cfg = dict(INTERPRETER_WGRAD)
    else:
        cfg = dict(FP8_WGRAD_BLOCKWISE_CONFIG if token_block else FP8_WGRAD_CONFIG)
    return _launch_wgrad(a_t.t(), dout_t.t(), offs, db, cfg,
                         dict(SA=scale_a, SB=scale_d, SCALED=True, BLOCKWISE=token_block > 0))


def _launch_wgrad(a, dout, offs, db, cfg: dict, scales=None) -> torch.Tensor:
    """_grouped_mm_wgrad_kernel for a (T, K) and dout (T, N) of any strides (the fp8 dB passes
    transposed views of its token-major operands); ``scales`` the fp8 epilogue's arguments."""
    _, k = a.shape
    experts, _, n = db.shape
    grid = (experts * triton.cdiv(k, cfg["BLOCK_K"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    with launch_device(a.device):
        _grouped_mm_wgrad_kernel[grid](
            a, dout, offs, db, n, k,
            a.stride(0), a.stride(1), dout.stride(0), dout.stride(1), db.stride(0), db.stride(1), db.stride(2),
            **_flags(a, [(cfg["BLOCK_M"], a.stride(0)), (cfg["BLOCK_K"], a.stride(1)), (cfg["BLOCK_M"], dout.stride(0)),
                         (cfg["BLOCK_N"], dout.stride(1)), (cfg["BLOCK_K"], db.stride(1)), (cfg["BLOCK_N"], db.stride(2))]),
            **(scales or {}), **cfg)
    return db


def all_configs() -> list[tuple[str, dict]]:
    """(kernel name, constexprs + num_warps/num_stages) for the compile gate, bf16."""
    out = [("_grouped_mm_kernel", dict(cfg, UPCAST=False, IEEE=False, WIDE=False, TMA=tma, TRANS_B=trans))
           for cfg in FORWARD_CONFIGS.values() for tma, trans in ((False, False), (True, False), (True, True))]
    out.append(("_grouped_mm_wgrad_kernel", dict(WGRAD_CONFIG, UPCAST=False, IEEE=False, WIDE=False)))
    out += [("_grouped_mm_kernel", dict(cfg, UPCAST=False, IEEE=False, WIDE=False, TMA=tma, TRANS_B=True, SCALED=True,
                                        BLOCKWISE=blockwise))
            for cfg in FP8_FORWARD_CONFIGS.values() for tma in (False, True) for blockwise in (False, True)]
    out.append(("_grouped_mm_wgrad_kernel", dict(FP8_WGRAD_CONFIG, UPCAST=False, IEEE=False, WIDE=False, SCALED=True)))
    out.append(("_grouped_mm_wgrad_kernel", dict(FP8_WGRAD_BLOCKWISE_CONFIG, UPCAST=False, IEEE=False, WIDE=False,
                                                 SCALED=True, BLOCKWISE=True)))
    return out
