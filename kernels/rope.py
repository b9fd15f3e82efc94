"""Rotary position embeddings (RoPE) in Triton: q and k rotated in one launch, forward and backward.

Each head vector x of length D has its first R = rotary_dim entries split into R/2 pairs
(first, second): (j, j + R/2) in the half-split layout (LLaMA, Hugging Face ``rotate_half``),
(2j, 2j + 1) in the interleaved one (GPT-J). With the cos/sin row of the token's position,

    out[first]  = x[first]  * cos[first]  - x[second] * sin[first]
    out[second] = x[second] * cos[second] + x[first]  * sin[second]

which is Hugging Face's ``x * cos + rotate_half(x) * sin`` entry by entry, whatever cos and sin
hold. Entries past R are copied. All arithmetic is fp32 whatever the storage dtype.

Backward: the map is linear, and its transpose is the same formula with
``sin'[first] = -sin[second]``, ``sin'[second] = -sin[first]``; for Hugging Face's cos/sin (both
entries of a pair share one angle) that is the rotation by -theta. ``BACKWARD`` selects it, so the
backward is this kernel reading dq_out/dk_out and writing dq/dk.

Tiling. A program owns one tile [BLOCK_T tokens, BLOCK_H heads, BLOCK_J pairs] of either q or k:
grid axis 0 walks blocks of tokens (batch and seq flattened), axis 1 walks head blocks of q and
then of k, so q and k share one launch and no program is idle. BLOCK_H follows the smaller head
count (8 for LLaMA-8B's 32 q / 8 kv heads: 4 q tiles and 1 k tile per token block, none masked) and
BLOCK_T fills the tile to ``TILE_PAIRS`` pairs. A token's cos/sin row is loaded once per tile and
broadcast over its heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device

# Pairs per program tile: 2048 pairs = 4096 elements of q or k (8 KiB in bf16) in flight per
# program, 8 pairs per thread at 8 warps. At 4 warps the position_ids + pass-through variant with
# many tokens per tile used ~240 of ptxas's 255 registers; at 8 it uses ~110 at most. Checked for
# spills on sm_80 and sm_90 by the compile gate (tests/test_rope.py).
TILE_PAIRS = 2048
NUM_WARPS = 8
# Head dims up to 512 (256 pairs); BLOCK_J never goes below 8 so tiny head dims share configs.
MAX_HEAD_DIM = 512
MIN_BLOCK_J = 8
MAX_BLOCK_H = 64


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rope_tile(
    X, OUT, COS, SIN, POS,
    tok, tok_ok, head0, n_heads,
    stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh,
    stride_cb, stride_cs, stride_pb, stride_ps,
    seq, head_dim, half, n_pos,
    INTERLEAVED: tl.constexpr, HAS_PASS: tl.constexpr, HAS_POS: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr,
):
    b = tok // seq
    s = tok % seq
    h = tl.cast(head0 + tl.arange(0, BLOCK_H), tl.int64)  # heads * stride can pass 2**31 in bhsd
    j = tl.arange(0, BLOCK_J)

    # Column of each pair's entries. Rotated pairs: j < half. With HAS_PASS, pairs past half
    # carry the pass-through columns R, R+1, ... two at a time (2j, 2j+1).
    rot = j < half
    if INTERLEAVED:
        first = 2 * j
        second = 2 * j + 1
        pair_ok = first < head_dim
    elif HAS_PASS:
        first = tl.where(rot, j, 2 * j)
        second = tl.where(rot, j + half, 2 * j + 1)
        pair_ok = first < head_dim
    else:
        # No pass-through: two contiguous runs, which Triton vectorises.
        first = j
        second = j + half
        pair_ok = rot

    # cos/sin row of each token: (batch, seq) rows, or rows of a table picked by position_ids.
    if HAS_POS:
        pos = tl.load(POS + b * stride_pb + s * stride_ps, mask=tok_ok, other=0).to(tl.int64)
        # An out-of-range position has no row: its outputs become NaN (no host sync to raise).
        row_ok = tok_ok & (pos >= 0) & (pos < n_pos)
        c_row = pos * stride_cs
    else:
        row_ok = tok_ok
        c_row = b * stride_cb + s * stride_cs
    c_mask = row_ok[:, None, None] & rot[None, None, :]
    c_off = c_row[:, None, None]
    c1 = tl.load(COS + c_off + first[None, None, :], mask=c_mask, other=float("nan")).to(tl.float32)
    c2 = tl.load(COS + c_off + second[None, None, :], mask=c_mask, other=float("nan")).to(tl.float32)
    if BACKWARD:
        s1 = -tl.load(SIN + c_off + second[None, None, :], mask=c_mask, other=float("nan")).to(tl.float32)
        s2 = -tl.load(SIN + c_off + first[None, None, :], mask=c_mask, other=float("nan")).to(tl.float32)
    else:
        s1 = tl.load(SIN + c_off + first[None, None, :], mask=c_mask, other=float("nan")).to(tl.float32)
        s2 = tl.load(SIN + c_off + second[None, None, :], mask=c_mask, other=float("nan")).to(tl.float32)

    rows_ok = tok_ok[:, None, None] & (h < n_heads)[None, :, None]
    m1 = rows_ok & pair_ok[None, None, :]
    m2 = rows_ok & (pair_ok & (second < head_dim))[None, None, :]
    x_off = (b * stride_xb + s * stride_xs)[:, None, None] + h[None, :, None] * stride_xh
    o_off = (b * stride_ob + s * stride_os)[:, None, None] + h[None, :, None] * stride_oh
    x1 = tl.load(X + x_off + first[None, None, :], mask=m1, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + second[None, None, :], mask=m2, other=0.0).to(tl.float32)

    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
    if HAS_PASS:
        y1 = tl.where(rot[None, None, :], y1, x1)
        y2 = tl.where(rot[None, None, :], y2, x2)
    tl.store(OUT + o_off + first[None, None, :], y1.to(OUT.dtype.element_ty), mask=m1)
    tl.store(OUT + o_off + second[None, None, :], y2.to(OUT.dtype.element_ty), mask=m2)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN, POS,
    n_tok, seq, heads_q, heads_k, head_dim, half, n_pos,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_qob, stride_qos, stride_qoh, stride_kob, stride_kos, stride_koh,
    stride_cb, stride_cs, stride_pb, stride_ps,
    INTERLEAVED: tl.constexpr, HAS_PASS: tl.constexpr, HAS_POS: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < n_tok
    hb = tl.program_id(1)
    q_blocks = tl.cdiv(heads_q, BLOCK_H)
    if hb < q_blocks:
        _rope_tile(Q, QO, COS, SIN, POS, tok, tok_ok, hb * BLOCK_H, heads_q,
                   stride_qb, stride_qs, stride_qh, stride_qob, stride_qos, stride_qoh,
                   stride_cb, stride_cs, stride_pb, stride_ps, seq, head_dim, half, n_pos,
                   INTERLEAVED, HAS_PASS, HAS_POS, BACKWARD, BLOCK_H, BLOCK_J)
    else:
        _rope_tile(K, KO, COS, SIN, POS, tok, tok_ok, (hb - q_blocks) * BLOCK_H, heads_k,
                   stride_kb, stride_ks, stride_kh, stride_kob, stride_kos, stride_koh,
                   stride_cb, stride_cs, stride_pb, stride_ps, seq, head_dim, half, n_pos,
                   INTERLEAVED, HAS_PASS, HAS_POS, BACKWARD, BLOCK_H, BLOCK_J)


# ---------------------------------------------------------------------------------------------
# Launch configuration. The compile gate compiles every config ``config`` can return (all_configs),
# so keep them the single source of truth.
# ---------------------------------------------------------------------------------------------


def block_j(head_dim: int) -> int:
    """Pairs per head vector, rounded up to a power of two (at least MIN_BLOCK_J)."""
    return max(MIN_BLOCK_J, triton.next_power_of_2((head_dim + 1) // 2))


def config(heads_q: int, heads_k: int, head_dim: int) -> dict:
    """BLOCK_T/BLOCK_H/BLOCK_J/num_warps for q (.., heads_q, head_dim) and k (.., heads_k, head_dim)."""
    bj = block_j(head_dim)
    bh = min(triton.next_power_of_2(max(1, min(heads_q, heads_k))), MAX_BLOCK_H, TILE_PAIRS // bj)
    bt = max(1, TILE_PAIRS // (bh * bj))
    return dict(BLOCK_T=bt, BLOCK_H=bh, BLOCK_J=bj, num_warps=NUM_WARPS)


def all_configs() -> list[dict]:
    """Every config :func:`config` can return (the flags INTERLEAVED/HAS_PASS/HAS_POS/BACKWARD
    are separate specialisations of each)."""
    out = []
    bj = MIN_BLOCK_J
    while bj <= block_j(MAX_HEAD_DIM):
        bh = 1
        while bh <= min(MAX_BLOCK_H, TILE_PAIRS // bj):
            out.append(dict(BLOCK_T=max(1, TILE_PAIRS // (bh * bj)), BLOCK_H=bh, BLOCK_J=bj, num_warps=NUM_WARPS))
            bh *= 2
        bj *= 2
    return out


# ---------------------------------------------------------------------------------------------
# Launcher: inputs already validated and normalised by tokenforge.ops.rope.
# ---------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """None when these kernels can run on the tensors (the backend rules aside), else why not."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} is not one of float32/float16/bfloat16 for the triton kernels; use backend='torch'"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the triton kernels; use backend='torch'"
    return None


def rope_forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    position_ids: torch.Tensor | None, interleaved: bool, layout: str, backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_out, k_out), new tensors contiguous in ``layout`` ("bshd": (batch, seq, heads, head_dim),
    "bhsd": (batch, heads, seq, head_dim)) and in q's/k's dtypes.

    q, k: 4-D in ``layout``, any strides with a unit last stride. cos, sin: same shape and strides,
    unit last stride, last dim R (even, <= head_dim); (batch or 1, seq, R) without position_ids, a
    table (n_pos, R) with them. position_ids: (batch or 1, seq) integers. ``backward`` applies the
    transpose (dq, dk from dq_out, dk_out)."""
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if layout == "bhsd":  # the kernel indexes (batch, seq, heads, head_dim): transposed views
        qv, kv, qov, kov = (t.transpose(1, 2) for t in (q, k, q_out, k_out))
    else:
        qv, kv, qov, kov = q, k, q_out, k_out
    batch, seq, heads_q, head_dim = qv.shape
    heads_k = kv.shape[2]
    half = cos.shape[-1] // 2
    has_pos = position_ids is not None
    if has_pos:
        n_pos = cos.shape[0]
        stride_cb, stride_cs = 0, cos.stride(0)
        stride_pb = position_ids.stride(0) if position_ids.shape[0] > 1 else 0
        stride_ps = position_ids.stride(1)
        pos = position_ids
    else:
        n_pos = 0
        stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
        stride_cs = cos.stride(1)
        stride_pb = stride_ps = 0
        pos = cos  # never read when HAS_POS is False
    cfg = config(heads_q, heads_k, head_dim)
    n_tok = batch * seq
    grid = (triton.cdiv(n_tok, cfg["BLOCK_T"]),
            triton.cdiv(heads_q, cfg["BLOCK_H"]) + triton.cdiv(heads_k, cfg["BLOCK_H"]))
    with launch_device(q.device):
        _rope_kernel[grid](
            qv, kv, qov, kov, cos, sin, pos,
            n_tok, seq, heads_q, heads_k, head_dim, half, n_pos,
            *qv.stride()[:3], *kv.stride()[:3], *qov.stride()[:3], *kov.stride()[:3],
            stride_cb, stride_cs, stride_pb, stride_ps,
            INTERLEAVED=bool(interleaved), HAS_PASS=2 * half < head_dim, HAS_POS=has_pos,
            BACKWARD=bool(backward), **cfg,
        )
    return q_out, k_out


def rope_backward(
    dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    position_ids: torch.Tensor | None, interleaved: bool, layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk) from the gradients of q_out, k_out: :func:`rope_forward` with the transposed map."""
    return rope_forward(dq_out, dk_out, cos, sin, position_ids, interleaved, layout, backward=True)
