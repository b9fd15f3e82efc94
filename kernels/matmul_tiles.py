"""Pieces every Triton GEMM here shares (fp8_gemm, newton_schulz, grouped_mm): the grouped tile order,
the K loop. ``@triton.jit`` helpers are inlined into their callers, so they cost nothing."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` when tiles are grouped GROUP_M rows at a time: a wave of
    programs then shares B tiles in L2 instead of streaming all of B per row of tiles."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: the dot in fp32 (the interpreter's bf16/fp16 dot is wrong);
    IEEE: fp32 operands without tf32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def k_loop(a_ptrs, b_ptrs, K, step_a, step_b, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """fp32 sum over K of a (BLOCK_M, BLOCK_K) @ b (BLOCK_K, BLOCK_N) tiles; the pointers advance
    by ``step_a`` / ``step_b`` elements per K tile and the K tail is masked. UPCAST: dot in fp32
    (the interpreter's bf16 dot is wrong); IEEE: fp32 operands without tf32."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = dot_acc(a, b, acc, UPCAST, IEEE)
        a_ptrs += step_a
        b_ptrs += step_b
    return acc
