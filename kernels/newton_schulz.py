"""Newton-Schulz orthogonalisation in Triton: the matmuls of Muon's quintic iteration.

One iteration on a batch of X (B, m, n) with m <= n (tokenforge.ops.newton_schulz transposes tall
matrices and normalises first) is three launches, each a GEMM with its epilogue fused:

    A  = X @ X^T                 gram kernel (symmetric: only tiles on or below the diagonal are
                                 computed; each off-diagonal one is stored twice, as itself and
                                 mirrored)
    Bm = c * A @ A + b * A       gram kernel again: A is symmetric, so A @ A = A @ A^T, and the
                                 b * A term is read in the epilogue
    X' = Bm @ X + a * X          general kernel, the a * X term in the epilogue

so a square iteration executes 4 m^3 FLOPs where three plain matmuls would execute 6 m^3. The
accumulator is fp32; each output is rounded once to the input dtype (bf16 in Muon, as
torch.optim.Muon's addmm calls round), and a bf16 iteration never leaves bf16 between launches.

The batch is folded into grid axis 0 (no axis-1/2 limit); batch and row offsets are int64.

Triton's interpreter cannot run a bf16 ``tl.dot`` (it multiplies raw bit patterns), so under
the interpreter bf16 operands are upcast to fp32 (``UPCAST``); fp32 inputs use IEEE fp32 dots (no
tf32) everywhere, so the fp32 path is exact enough to test the iteration itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import INTERPRETED, launch_device
from tokenforge.kernels.matmul_tiles import grouped_tile, k_loop

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _gram_kernel(
    X, D, OUT,
    M, K,
    stride_xb, stride_xm, stride_xk, stride_ob, stride_om, stride_on,
    alpha, beta,
    HAS_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT[b] = alpha * X[b] @ X[b]^T (+ beta * D[b]); D symmetric with OUT's strides. Program t
    of a batch element computes lower-triangle tile (i, j), j <= i, and stores it at (i, j) and,
    transposed, at (j, i): off-diagonal tiles are exact mirrors; a diagonal tile is symmetric up
    to the order of its fp32 sums."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(M, BLOCK)
    per_batch = tiles * (tiles + 1) // 2
    bi = (pid // per_batch).to(tl.int64)
    t = pid % per_batch
    # Row i of the triangle holding t: the largest i with i (i + 1) / 2 <= t. The float estimate
    # is exact to +-1 for any t a grid can hold; the two corrections make it exact.
    i = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)
    i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
    j = t - i * (i + 1) // 2

    rm = i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rn = j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    # Out-of-range rows read row 0 (a valid address); their results are masked at the store.
    rm_safe = tl.where(rm < M, rm, 0)
    rn_safe = tl.where(rn < M, rn, 0)
    x = X + bi * stride_xb
    a_ptrs = x + rm_safe[:, None] * stride_xm + rk[None, :] * stride_xk
    b_ptrs = x + rn_safe[None, :] * stride_xm + rk[:, None] * stride_xk  # X^T tile, K-major

    acc = k_loop(a_ptrs, b_ptrs, K, BLOCK_K * stride_xk, BLOCK_K * stride_xk, BLOCK, BLOCK, BLOCK_K, UPCAST, IEEE)

    # Epilogue addresses: a 64-bit base per tile plus 32-bit offsets inside it (64-bit offsets for
    # every element of a 128x128 tile spill registers on sm_90).
    out = acc * alpha
    lm = tl.arange(0, BLOCK)
    mask = (rm < M)[:, None] & (rn < M)[None, :]
    tile = bi * stride_ob + (i.to(tl.int64) * BLOCK) * stride_om + (j.to(tl.int64) * BLOCK) * stride_on
    inner = lm[:, None] * stride_om + lm[None, :] * stride_on
    if HAS_D:
        out += beta * tl.load(D + tile + inner, mask=mask, other=0.0).to(tl.float32)
    out = out.to(OUT.dtype.element_ty)
    tl.store(OUT + tile + inner, out, mask=mask)
    if i != j:
        mirror = bi * stride_ob + (j.to(tl.int64) * BLOCK) * stride_om + (i.to(tl.int64) * BLOCK) * stride_on
        tl.store(OUT + mirror + (lm[None, :] * stride_om + lm[:, None] * stride_on), out, mask=mask)


@triton.jit
def _gemm_kernel(
    A, B, D, OUT,
    M, N, K,
    stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn, stride_ob, stride_om, stride_on,
    alpha, beta,
    HAS_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT[b] = alpha * A[b] @ B[b] (+ beta * D[b]); D with OUT's strides. Tiles are grouped
    along M so a wave of programs reuses B tiles in L2."""
    pid = tl.program_id(0)
    per_batch = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    bi = (pid // per_batch).to(tl.int64)
    pid_m, pid_n = grouped_tile(pid % per_batch, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm_safe = tl.where(rm < M, rm, 0)
    rn_safe = tl.where(rn < N, rn, 0)
    a_ptrs = A + bi * stride_ab + rm_safe[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + bi * stride_bb + rk[:, None] * stride_bk + rn_safe[None, :] * stride_bn

    acc = k_loop(a_ptrs, b_ptrs, K, BLOCK_K * stride_ak, BLOCK_K * stride_bk, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)

    # 64-bit tile base, 32-bit offsets inside the tile (as in _gram_kernel).
    out = acc * alpha
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tile = bi * stride_ob + (pid_m.to(tl.int64) * BLOCK_M) * stride_om + (pid_n.to(tl.int64) * BLOCK_N) * stride_on
    inner = tl.arange(0, BLOCK_M)[:, None] * stride_om + tl.arange(0, BLOCK_N)[None, :] * stride_on
    if HAS_D:
        out += beta * tl.load(D + tile + inner, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + tile + inner, out.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration: the compile gate compiles every config these functions can return.
# ---------------------------------------------------------------------------------------------

# 128x128 tiles, K-steps of 64 bf16 (one 128-byte swizzle row), 8 warps (two wgmma warpgroups),
# 3 stages = 96 KB of shared memory, for matrices of 1024 rows and more; 64x64 tiles for smaller
# ones (a 768-row gram has 78 lower tiles of 64 but only 21 of 128: too few for 132 SMs).
LARGE = dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=3)
SMALL = dict(BLOCK=64, BLOCK_K=64, num_warps=4, num_stages=3)
# The interpreter's cost is per program: 64-tiles run a tiny model's Muon step 4x faster than 32.
INTERPRETER = dict(BLOCK=64, BLOCK_K=64, num_warps=4, num_stages=1)
GROUP_M = 8


def config(m: int, interpreted: bool = None) -> dict:
    """Tile config for matrices of m rows (the short side)."""
    if INTERPRETED if interpreted is None else interpreted:
        return dict(INTERPRETER)
    return dict(LARGE if m >= 1024 else SMALL)


def all_configs() -> list[dict]:
    return [dict(LARGE), dict(SMALL)]


def _gemm_meta(cfg: dict) -> dict:
    return dict(BLOCK_M=cfg["BLOCK"], BLOCK_N=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=GROUP_M,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def supports(x: torch.Tensor) -> str | None:
    if x.dtype not in SUPPORTED_DTYPES:
        return f"Triton Newton-Schulz runs {', '.join(str(d) for d in SUPPORTED_DTYPES)}, got {x.dtype}"
    return None


# ---------------------------------------------------------------------------------------------
# Launchers: inputs validated by tokenforge.ops.newton_schulz (3-D, m <= n, contiguous).
# ---------------------------------------------------------------------------------------------


def _flags(x: torch.Tensor) -> dict:
    upcast = INTERPRETED and x.dtype == torch.bfloat16
    return dict(UPCAST=upcast, IEEE=x.dtype == torch.float32)


def gram(x: torch.Tensor, out: torch.Tensor, alpha: float = 1.0, beta: float = 0.0,
         d: torch.Tensor | None = None) -> torch.Tensor:
    """out (B, m, m) = alpha * x @ x^T + beta * d for x (B, m, k); d symmetric, laid out as out."""
    bsz, m, k = x.shape
    cfg = config(m)
    tiles = triton.cdiv(m, cfg["BLOCK"])
    grid = (bsz * tiles * (tiles + 1) // 2,)
    with launch_device(x.device):
        _gram_kernel[grid](
            x, d if d is not None else out, out, m, k,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
            float(alpha), float(beta), HAS_D=d is not None, **_flags(x), **cfg)
    return out


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, alpha: float = 1.0, beta: float = 0.0,
         d: torch.Tensor | None = None) -> torch.Tensor:
    """out (B, m, n) = alpha * a @ b + beta * d for a (B, m, k), b (B, k, n); d laid out as out."""
    bsz, m, k = a.shape
    n = b.shape[2]
    meta = _gemm_meta(config(m))
    grid = (bsz * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    with launch_device(a.device):
        _gemm_kernel[grid](
            a, b, d if d is not None else out, out, m, n, k,
            a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            float(alpha), float(beta), HAS_D=d is not None, **_flags(a), **meta)
    return out


def newton_schulz_iterations(x: torch.Tensor, steps: int, coefficients: tuple[float, float, float]) -> torch.Tensor:
    """``steps`` quintic iterations X <- a X + (b A + c A A) X, A = X X^T, on x (B, m, n), m <= n,
    contiguous and already normalised (spectral norm <= 1). Returns a new tensor."""
    a, b, c = (float(v) for v in coefficients)
    bsz, m, n = x.shape
    gram_a = torch.empty((bsz, m, m), dtype=x.dtype, device=x.device)
    gram_b = torch.empty_like(gram_a)
    cur, nxt = x, torch.empty_like(x)
    for it in range(steps):
        gram(cur, gram_a)                                   # A = X X^T
        gram(gram_a, gram_b, alpha=c, beta=b, d=gram_a)     # B = c A A^T + b A
        gemm(gram_b, cur, nxt, alpha=1.0, beta=a, d=cur)    # X' = B X + a X
        if it == 0:
            cur, nxt = nxt, torch.empty_like(x)  # never overwrite the caller's x
        else:
            cur, nxt = nxt, cur
    return cur if steps else x.clone()
