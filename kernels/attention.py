"""Fused attention in Triton (FlashAttention-2 schedule), forward and backward.

Notation (per batch b, query head h, kv head hk = h // GROUP):

    s[i, j] = scale * q[i] . k[j]                        (or softcap * tanh(scale * q.k / softcap))
    s[i, j] = -inf where key j is masked for query i     (beyond seqlen_k, causal, sliding window)
    p       = softmax_j(s),  o = p @ v,  lse[i] = log sum_j exp(s[i, j])

Dropout (HAS_DROPOUT): o = (p * keep / (1 - p_drop)) @ v with lse that of the undropped scores;
keep comes from Philox in registers (_dropout_keep), a function of (seed, head, query, key), so the
backward passes redraw the forward's mask and nothing S x S is stored.

Masks are bottom-right aligned as in flash_attn: with off = seqlen_k - seqlen_q, query i may see key
j iff  i + off - left <= j <= i + off + right  (left/right = -1: unbounded). ``causal`` is the
window (left, 0). A query that sees no key (causal with seqlen_q > seqlen_k) gets o = 0 and
lse = +inf, so exp(s - lse) = 0 for it in the backward: no NaN anywhere.

Forward: one program per (query block, batch * query head); an online softmax over key blocks in
the log2 domain (exp2 is the native instruction), fp32 accumulators, S x S never stored. Key blocks
that the causal/window mask hides entirely are never visited.

Backward:
  1. ``_attn_bwd_preprocess``: delta[i] = sum_d dO[i, d] * O[i, d] (fp32).
  2. ``_attn_bwd_dkdv``: one program per (key block, batch * kv head) walks every query head of
     its GQA group and every query block that sees the key block; dk and dv stay in registers, so
     the sum over the group costs nothing and nothing is written twice. With ATOMIC_DQ (the
     one-pass backward, deterministic=False where :func:`fused_backward_runs`) it also adds each
     key block's share of dq into an fp32 buffer with atomics, and step 3 is skipped.
  3. ``_attn_bwd_dq``: one program per (query block, batch * query head) walks the key blocks
     (the two-pass backward: no atomics, deterministic bit for bit).
  Scores are recomputed from q, k and the saved lse (O(seqlen) extra memory).

Varlen (packed documents): q/k/v are (total, heads, head_dim) and cu_seqlens give each document's
start; the grid is sized from max_seqlen, and programs past a document's end return at once, so
there is no host sync. Dense inputs use the same kernels with cu_seqlens absent (IS_VARLEN=False).

head_dim: any multiple of 8 from 32 to 256; the head dim block is the next power of two and the
tail lanes are masked (they read 0, so they add nothing to q.k).

Sizes: batch and row offsets are int64 always; head offsets (h * stride_h, i32 when both fit) are
int64 when a tensor reaches 2^31 elements past its start (``HEAD_I64``, chosen by the launcher:
the 64-bit head index would cost the sm_80 backward kernels a spill at every size). The grid is
(blocks, batch x heads); past 65535 batch x heads (axis 1's limit) the launcher folds both into
axis 0 (``FOLD``). tests/test_attention.py runs a view whose third head starts past 2^31 and checks
the grids of 2048 documents x 32 heads.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device
from tokenforge.kernels.activations import tanh_fast
import triton.testing

from tokenforge.kernels import INTERPRETED

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

MIN_HEAD_DIM = 32
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # The interpreter multiplies the raw bits of bf16 operands; in fp32 it is exact.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _rows_of(CU, SEQUSED, b, SEQ, IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr):
    """(first row, length) of batch entry b in one of q / k. Varlen: document b is rows CU[b] ..
    CU[b + 1], or the SEQUSED[b] rows from CU[b] (a document anywhere in the rows). Dense: the whole
    sequence, or its SEQUSED[b] rows from CU[b] (CU then holds one start per sequence: the live
    stretch of a left- or right-padded row, read in place)."""
    if HAS_SEQUSED:
        start = tl.load(CU + b)
        length = tl.load(SEQUSED + b)
    elif IS_VARLEN:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
    else:
        start = 0
        length = SEQ
    return start, length


@triton.jit
def _doc_bounds(CU_Q, CU_K, b, SEQ_Q, SEQ_K, IS_VARLEN: tl.constexpr, SEQUSED_Q, SEQUSED_K,
                HAS_SEQUSED_Q: tl.constexpr, HAS_SEQUSED_K: tl.constexpr):
    """(first row, length) of batch entry b's queries and keys (see _rows_of)."""
    q_start, seqlen_q = _rows_of(CU_Q, SEQUSED_Q, b, SEQ_Q, IS_VARLEN, HAS_SEQUSED_Q)
    k_start, seqlen_k = _rows_of(CU_K, SEQUSED_K, b, SEQ_K, IS_VARLEN, HAS_SEQUSED_K)
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _scores(qk, offs_m, offs_n, seqlen_k, off, qk_scale, softcap, WIN_LEFT, WIN_RIGHT,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Scores in the log2 domain (s * log2 e) with masked entries at -inf, and tanh's value
    (needed for the softcap gradient; 0 when there is no softcap)."""
    if HAS_SOFTCAP:
        t = tanh_fast(qk * (qk_scale / softcap))
        s = t * (softcap * 1.4426950408889634)
    else:
        t = qk
        s = qk * (qk_scale * 1.4426950408889634)
    keep = offs_n[None, :] < seqlen_k
    if HAS_RIGHT:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + off + WIN_RIGHT)
    if HAS_LEFT:
        keep = keep & (offs_n[None, :] >= offs_m[:, None] + off - WIN_LEFT)
    s = tl.where(keep, s, float("-inf"))
    return s, t


@triton.jit
def _alibi(s, slope2, offs_m, offs_n, off, TRANSPOSED: tl.constexpr):
    """s - slope * |i + off - j| for query i, key j (flash_attn's ALiBi bias, bottom-right aligned),
    in the log2 domain (slope2 = slope * log2 e); TRANSPOSED for the (key, query) tiles of the
    dk/dv pass. A masked -inf stays -inf."""
    if TRANSPOSED:
        dist = offs_m[None, :] + off - offs_n[:, None]
    else:
        dist = offs_m[:, None] + off - offs_n[None, :]
    return s - slope2 * tl.abs(dist).to(tl.float32)


@triton.jit
def _dropout_keep(seed, bh, offs_m, n_start, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: True where attention dropout keeps the probability of query
    offs_m[i] for key n_start + j (document-local positions) in head bh = batch * heads + head.
    One Philox-4x32-10 call per 4 keys, counter (key // 4, query, bh, 0) and key ``seed``; key j
    takes word j % 4 and is kept when that word >= threshold (round(p * 2^32)). The mask is a
    function of (seed, bh, query, key) alone, never of the tiling, so the forward, both backward
    passes and ops.attention's torch mirror (dropout_keep_reference) draw the same one. n_start
    is a multiple of 4 (key blocks start on BLOCK_N >= 16)."""
    groups = (n_start // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)
    c0 = tl.broadcast_to(groups[None, :], (BLOCK_M, BLOCK_N // 4))
    c1 = tl.broadcast_to(offs_m.to(tl.uint32)[:, None], (BLOCK_M, BLOCK_N // 4))
    zero = c0 * 0
    r0, r1, r2, r3 = tl.random.philox(seed, c0, c1, zero + tl.cast(bh, tl.uint32), zero)
    # join(join(r0, r2), join(r1, r3))[.., a, b] is word 2a + b: flattened, key 4t + u takes word u.
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return words >= tl.cast(threshold, tl.uint32)


@triton.jit
def _alibi_slope2(ALIBI, b64, stride_alb, h, HAS_ALIBI: tl.constexpr):
    """Head h's ALiBi slope in the log2 domain (slope * log2 e), 0 without ALiBi."""
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + b64 * stride_alb + h) * 1.4426950408889634
    return slope2


@triton.jit
def _dropout_seed(SEED, HAS_DROPOUT: tl.constexpr):
    """The call's dropout seed (an int64 on the device), 0 without dropout."""
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    return seed


@triton.jit
def _kv_range(m_start, seqlen_q, seqlen_k, off, WIN_LEFT, WIN_RIGHT, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[lo, hi) of key positions that rows m_start .. m_start + BLOCK_M - 1 may see, lo a
    multiple of BLOCK_N: blocks outside are fully masked and skipped."""
    lo = 0
    hi = seqlen_k
    if HAS_RIGHT:
        m_last = tl.minimum(m_start + BLOCK_M, seqlen_q) - 1
        hi = tl.minimum(hi, tl.maximum(m_last + off + WIN_RIGHT + 1, 0))
    if HAS_LEFT:
        lo = tl.maximum(m_start + off - WIN_LEFT, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _q_range(n_start, seqlen_q, seqlen_k, off, WIN_LEFT, WIN_RIGHT, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[lo, hi) of query rows that may see keys n_start .. n_start + BLOCK_N - 1, lo a multiple
    of BLOCK_M."""
    lo = 0
    hi = seqlen_q
    if HAS_RIGHT:
        lo = tl.maximum(n_start - off - WIN_RIGHT, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        n_last = tl.minimum(n_start + BLOCK_N, seqlen_k) - 1
        hi = tl.minimum(hi, tl.maximum(n_last - off + WIN_LEFT + 1, 0))
    return lo, hi


@triton.jit
def _unmasked_range(lo, hi, m_start, seqlen_k, off, WIN_LEFT, WIN_RIGHT, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[a, b) within [lo, hi): key blocks (starts lo + i * BLOCK_N) every row m_start ..
    m_start + BLOCK_M - 1 sees whole (inside seqlen_k, the causal / right-window bound of the
    first row and the left-window bound of the last), so no mask is needed there; a and b stay
    on lo's block grid (or equal hi)."""
    a = lo
    if HAS_LEFT:  # key j >= i + off - WIN_LEFT for the last row i of the block
        first = m_start + BLOCK_M - 1 + off - WIN_LEFT
        a = tl.maximum(a, ((tl.maximum(first, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    a = tl.minimum(a, hi)
    limit = seqlen_k
    if HAS_RIGHT:  # key j <= i + off + WIN_RIGHT for the first row i of the block
        limit = tl.minimum(limit, m_start + off + WIN_RIGHT + 1)
    count = tl.maximum(limit - a, 0) // BLOCK_N
    b = tl.minimum(a + count * BLOCK_N, hi)
    return a, b


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_base, v_base, n_start, offs_m, offs_n0, offs_d, d_ok, seqlen_k, off,
               qk_scale, softcap, WIN_LEFT, WIN_RIGHT, stride_ks, stride_vs, kv_b, kv_h, HAS_LEFT: tl.constexpr,
               HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, MASK: tl.constexpr,
               TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, slope2, HAS_ALIBI: tl.constexpr,
               seed, bh, drop_threshold, BLOCK_M: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """One key block of the online softmax. MASK: the block straddles a causal/window edge or the
    seqlen_k tail (key bounds checked, masked scores at -inf); else no mask math at all. TMA:
    k_base / v_base are tensor descriptors of the (batch, seq, kv heads, dim) K and V, read in
    [1, BLOCK_N, 1, BLOCK_D] boxes at (kv_b, n_start, kv_h, 0), zero-filled past seqlen_k and dim."""
    offs_n = n_start + offs_n0
    kv_rows = tl.cast(offs_n, tl.int64)
    if TMA:
        kt = tl.trans(k_base.load([kv_b, n_start, kv_h, 0]).reshape(BLOCK_N, BLOCK_D))
    elif MASK:
        n_ok = offs_n < seqlen_k
        kt = tl.load(k_base + kv_rows[None, :] * stride_ks + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    else:
        kt = tl.load(k_base + kv_rows[None, :] * stride_ks + offs_d[:, None], mask=d_ok[:, None], other=0.0)
    qk = _dot(q, kt, UPCAST)
    if MASK:
        s, _t = _scores(qk, offs_m, offs_n, seqlen_k, off, qk_scale, softcap, WIN_LEFT, WIN_RIGHT,
                        HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP)
    elif HAS_SOFTCAP:
        s = tanh_fast(qk * (qk_scale / softcap)) * (softcap * 1.4426950408889634)
    else:
        s = qk * (qk_scale * 1.4426950408889634)
    if HAS_ALIBI:  # a bias on every block, masked or not
        s = _alibi(s, slope2, offs_m, offs_n, off, False)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row that has seen only masked keys so far keeps m = -inf; subtract 0 instead so that
    # exp2(-inf - -inf) never makes a NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if HAS_DROPOUT:  # the normaliser l_i sums every probability; only the output sees the mask
        p = tl.where(_dropout_keep(seed, bh, offs_m, n_start, drop_threshold, BLOCK_M, BLOCK_N), p, 0.0)
    if TMA:
        v = v_base.load([kv_b, n_start, kv_h, 0]).reshape(BLOCK_N, BLOCK_D)
    elif MASK:
        v = tl.load(v_base + kv_rows[:, None] * stride_vs + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        v = tl.load(v_base + kv_rows[:, None] * stride_vs + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return acc, m_new, l_i


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _split_pid(N_BLOCKS, FOLD: tl.constexpr):
    """(sequence block, batch x head) of this program. The grid is (blocks, batch x heads), blocks
    fastest so programs of one head run together and share its K/V in L2; when batch x heads
    passes axis 1's limit of 65535 (2048 packed documents x 32 heads) the launcher folds both
    into axis 0 (2^31 - 1) and sets FOLD (the index math costs the sm_80 backward kernels, at 255
    registers, a spill, so it is not the default)."""
    if FOLD:
        pid = tl.program_id(0)
        pid_bh = pid // N_BLOCKS
        return pid - pid_bh * N_BLOCKS, pid_bh
    else:
        return tl.program_id(0), tl.program_id(1)


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    SEQ_Q, SEQ_K, HEADS, HEAD_DIM, N_BLOCKS,
    qk_scale, softcap, WIN_LEFT, WIN_RIGHT,
    GROUP: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    HEAD_I64: tl.constexpr, FOLD: tl.constexpr, TMA: tl.constexpr = False,
    ALIBI=None, stride_alb=0, HAS_ALIBI: tl.constexpr = False,
    SEED=None, DROP_THRESHOLD=0, drop_scale=1.0, HAS_DROPOUT: tl.constexpr = False,
    SEQUSED_Q=None, SEQUSED_K=None, HAS_SEQUSED_Q: tl.constexpr = False, HAS_SEQUSED_K: tl.constexpr = False,
    SINKS=None, HAS_SINKS: tl.constexpr = False,
):
    # HAS_SINKS: fp32 SINKS[h], one learned logit per query head that every row's softmax also
    # normalises over (GPT-OSS's attention sinks) but that has no value: the running max and sum
    # start at it instead of at -inf and 0, so out = sum_j p_j v_j with the sink's mass in the sum,
    # and lse includes it (the backward recomputes the probabilities from that lse and needs no
    # other change; the sink's own gradient, -sum_i p_sink,i * rowsum(dO_i * O_i), is the caller's).
    # HAS_SEQUSED_Q / _K: batch entry b's queries / keys are the SEQUSED[b] rows from CU[b] (see
    # _rows_of): varlen documents anywhere in the rows (a KV cache read in place, flattened to rows),
    # or the live stretch of a padded dense row. Query rows outside every stretch are not written.
    # HAS_DROPOUT: attention dropout, probability p = DROP_THRESHOLD / 2^32; a kept probability
    # is scaled by drop_scale = 1 / (1 - p) (see _dropout_keep); lse is that of the undropped scores.
    # SEED points at the call's int64 seed, drawn on q's device (read here: no host sync).
    # ALIBI: fp32 slopes, one per (batch or document, query head) at ALIBI + b * stride_alb + h
    # (stride_alb 0: one per head), the bias -slope * |i + off - j| added to every score.
    # TMA (dense only): Q, K, V and O are tensor descriptors of the (batch, seq, heads, dim)
    # tensors: Q's block, every K/V block and the O block move by the copy engine
    # (cp.async.bulk.tensor on sm_90) instead of by every thread; past seqlen and the head dim a load
    # is zero-filled and the store clipped.
    tl.static_assert(not (TMA and (HAS_SEQUSED_Q or HAS_SEQUSED_K)), "TMA boxes start at row 0 of a sequence")
    pid_m, pid_bh = _split_pid(N_BLOCKS, FOLD)
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    h32 = h  # TMA coordinates are 32-bit
    kv_h = h // GROUP
    if HEAD_I64:  # h * stride_h passes 2^31 at 128 heads x 128k x d128 (see _head_i64)
        h = tl.cast(h, tl.int64)
    hk = h // GROUP
    q_start, seqlen_q, k_start, seqlen_k = _doc_bounds(CU_Q, CU_K, b, SEQ_Q, SEQ_K, IS_VARLEN, SEQUSED_Q, SEQUSED_K,
                                                       HAS_SEQUSED_Q, HAS_SEQUSED_K)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen_q:
        return
    off = seqlen_k - seqlen_q

    b64 = tl.cast(b, tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen_q
    rows_q = tl.cast(q_start + offs_m, tl.int64)
    slope2 = _alibi_slope2(ALIBI, b64, stride_alb, h, HAS_ALIBI)
    seed = _dropout_seed(SEED, HAS_DROPOUT)

    if TMA:
        q = Q.load([b, m_start, h32, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q_ptrs = Q + b64 * stride_qb + h * stride_qh + rows_q[:, None] * stride_qs + offs_d[None, :]
        q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if TMA:
        k_base = K
        v_base = V
    else:
        k_base = K + b64 * stride_kb + hk * stride_kh + tl.cast(k_start, tl.int64) * stride_ks
        v_base = V + b64 * stride_vb + hk * stride_vh + tl.cast(k_start, tl.int64) * stride_vs

    if HAS_SINKS:  # the scores are in log2 units (qk_scale * log2(e) folded in)
        m_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + tl.load(SINKS + h) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = _kv_range(m_start, seqlen_q, seqlen_k, off, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N,
                       HAS_LEFT, HAS_RIGHT)
    # Only the blocks on the causal diagonal, the window's edges and the seqlen_k tail need the
    # mask; the ones in [whole_lo, whole_hi) are seen whole by every row of this query block and skip it.
    whole_lo, whole_hi = _unmasked_range(lo, hi, m_start, seqlen_k, off, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N,
                                         HAS_LEFT, HAS_RIGHT)
    for n_start in range(lo, whole_lo, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, n_start, offs_m, offs_n0, offs_d, d_ok,
                                   seqlen_k, off, qk_scale, softcap, WIN_LEFT, WIN_RIGHT, stride_ks, stride_vs,
                                   b, kv_h, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, UPCAST, True, TMA, BLOCK_N, BLOCK_D,
                                   slope2, HAS_ALIBI, seed, pid_bh, DROP_THRESHOLD, BLOCK_M, HAS_DROPOUT)
    for n_start in range(whole_lo, whole_hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, n_start, offs_m, offs_n0, offs_d, d_ok,
                                   seqlen_k, off, qk_scale, softcap, WIN_LEFT, WIN_RIGHT, stride_ks, stride_vs,
                                   b, kv_h, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, UPCAST, False, TMA, BLOCK_N, BLOCK_D,
                                   slope2, HAS_ALIBI, seed, pid_bh, DROP_THRESHOLD, BLOCK_M, HAS_DROPOUT)
    for n_start in range(whole_hi, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, n_start, offs_m, offs_n0, offs_d, d_ok,
                                   seqlen_k, off, qk_scale, softcap, WIN_LEFT, WIN_RIGHT, stride_ks, stride_vs,
                                   b, kv_h, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, UPCAST, True, TMA, BLOCK_N, BLOCK_D,
                                   slope2, HAS_ALIBI, seed, pid_bh, DROP_THRESHOLD, BLOCK_M, HAS_DROPOUT)

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        acc = acc * drop_scale
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if TMA:
        O.store([b, m_start, h32, 0], acc.to(q.dtype).reshape(1, BLOCK_M, 1, BLOCK_D))
    else:
        o_ptrs = O + b64 * stride_ob + h * stride_oh + rows_q[:, None] * stride_os + offs_d[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b64 * stride_lb + h * stride_lh + rows_q, lse, mask=m_ok)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh,
    SEQ_Q, HEADS, HEAD_DIM, N_BLOCKS,
    IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_I64: tl.constexpr,
    FOLD: tl.constexpr, SEQUSED_Q=None, HAS_SEQUSED_Q: tl.constexpr = False,
):
    pid_m, pid_bh = _split_pid(N_BLOCKS, FOLD)
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    if HEAD_I64:
        h = tl.cast(h, tl.int64)
    q_start, seqlen_q = _rows_of(CU_Q, SEQUSED_Q, b, SEQ_Q, IS_VARLEN, HAS_SEQUSED_Q)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen_q:
        return
    b64 = tl.cast(b, tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = tl.cast(q_start + offs_m, tl.int64)
    o = tl.load(O + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + rows, tl.sum(o * do, axis=1), mask=m_ok)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    SEQ_Q, SEQ_K, KV_HEADS, HEAD_DIM, N_BLOCKS,
    qk_scale, softcap, WIN_LEFT, WIN_RIGHT,
    GROUP: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    HEAD_I64: tl.constexpr, FOLD: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr = False,
    ALIBI=None, stride_alb=0, HAS_ALIBI: tl.constexpr = False,
    SEED=None, DROP_THRESHOLD=0, drop_scale=1.0, HAS_DROPOUT: tl.constexpr = False,
    SEQUSED_Q=None, SEQUSED_K=None, HAS_SEQUSED_Q: tl.constexpr = False, HAS_SEQUSED_K: tl.constexpr = False,
):
    # Transposed formulation: sT = k @ q^T is (BLOCK_N, BLOCK_M), so dk += dsT @ q and
    # dv += pT @ dO need no transposes of the accumulators. With ATOMIC_DQ the same pass also adds
    # this key block's dq share, scale * ds @ k, into the fp32 DQ_ACC with atomics (five GEMMs per block
    # pair, no second pass that recomputes the scores; the order of the adds varies run to run).
    # TMA (dense only): Q and dO are (batch, seq, heads, dim) tensor descriptors, every streamed
    # Q/dO block loaded by the copy engine (zero-filled past seqlen). K and V, read once per program,
    # stay pointer loads: Triton then keeps them in shared memory as wgmma operands, while a
    # descriptor load's tile is materialised in registers (64 more per thread at d128, which spilled
    # the 32x128 tiles).
    tl.static_assert(not (TMA and (HAS_SEQUSED_Q or HAS_SEQUSED_K)), "TMA boxes start at row 0 of a sequence")
    pid_n, pid_bh = _split_pid(N_BLOCKS, FOLD)
    b = pid_bh // KV_HEADS
    hk = pid_bh % KV_HEADS
    hk32 = hk  # TMA coordinates are 32-bit
    if HEAD_I64:
        hk = tl.cast(hk, tl.int64)
    q_start, seqlen_q, k_start, seqlen_k = _doc_bounds(CU_Q, CU_K, b, SEQ_Q, SEQ_K, IS_VARLEN, SEQUSED_Q, SEQUSED_K,
                                                       HAS_SEQUSED_Q, HAS_SEQUSED_K)
    n_start = pid_n * BLOCK_N
    if n_start >= seqlen_k:
        return
    off = seqlen_k - seqlen_q

    b64 = tl.cast(b, tl.int64)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < seqlen_k
    kv_mask = n_ok[:, None] & d_ok[None, :]
    rows_k = tl.cast(k_start + offs_n, tl.int64)
    k = tl.load(K + b64 * stride_kb + hk * stride_kh + rows_k[:, None] * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk * stride_vh + rows_k[:, None] * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    seed = _dropout_seed(SEED, HAS_DROPOUT)

    lo, hi = _q_range(n_start, seqlen_q, seqlen_k, off, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N,
                      HAS_LEFT, HAS_RIGHT)
    q_row0 = tl.cast(q_start, tl.int64)
    for g in range(GROUP):
        h = hk * GROUP + g
        h32 = hk32 * GROUP + g
        if not TMA:
            q_base = Q + b64 * stride_qb + h * stride_qh + q_row0 * stride_qs
            do_base = DO + b64 * stride_dob + h * stride_doh + q_row0 * stride_dos
        l_base = LSE + b64 * stride_lb + h * stride_lh + q_row0
        dl_base = DELTA + b64 * stride_lb + h * stride_lh + q_row0
        slope2 = _alibi_slope2(ALIBI, b64, stride_alb, h, HAS_ALIBI)
        for m_start in range(lo, hi, BLOCK_M):
            offs_m = m_start + offs_m0
            m_ok = offs_m < seqlen_q
            rows = tl.cast(offs_m, tl.int64)
            if TMA:
                qt = tl.trans(Q.load([b, m_start, h32, 0]).reshape(BLOCK_M, BLOCK_D))
            else:
                qt = tl.load(q_base + rows[None, :] * stride_qs + offs_d[:, None],
                             mask=m_ok[None, :] & d_ok[:, None], other=0.0)
            lse = tl.load(l_base + rows, mask=m_ok, other=float("inf"))
            qkT = _dot(k, qt, UPCAST)
            # _scores masks (row, col) = (query, key); here rows are keys, so flip the roles by
            # computing the mask on the transposed index grids.
            sT, tT = _scores_t(qkT, offs_m, offs_n, seqlen_k, off, qk_scale, softcap, WIN_LEFT,
                               WIN_RIGHT, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP)
            if HAS_ALIBI:
                sT = _alibi(sT, slope2, offs_m, offs_n, off, True)
            pT = tl.math.exp2(sT - (lse * 1.4426950408889634)[None, :])
            if TMA:
                do = DO.load([b, m_start, h32, 0]).reshape(BLOCK_M, BLOCK_D)
            else:
                do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :],
                             mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            if HAS_DROPOUT:  # o used p * keep * scale: so do dv and dp (delta = do . o already does)
                keepT = tl.trans(_dropout_keep(seed, b * (KV_HEADS * GROUP) + h32, offs_m, n_start, DROP_THRESHOLD,
                                               BLOCK_M, BLOCK_N))
                dv += _dot(tl.where(keepT, pT * drop_scale, 0.0).to(do.dtype), do, UPCAST)
            else:
                dv += _dot(pT.to(do.dtype), do, UPCAST)
            delta = tl.load(dl_base + rows, mask=m_ok, other=0.0)
            dpT = _dot(v, tl.trans(do), UPCAST)
            if HAS_DROPOUT:
                dpT = tl.where(keepT, dpT * drop_scale, 0.0)
            dsT = pT * (dpT - delta[None, :])
            if HAS_SOFTCAP:
                dsT = dsT * (1.0 - tT * tT)
            dk += _dot(dsT.to(qt.dtype), tl.trans(qt), UPCAST)
            if ATOMIC_DQ:
                dq = _dot(tl.trans(dsT.to(k.dtype)), k, UPCAST)
                dq_ptrs = (DQ_ACC + b64 * stride_dqb + h * stride_dqh + (q_row0 + rows)[:, None] * stride_dqs
                           + offs_d[None, :])
                tl.atomic_add(dq_ptrs, dq * qk_scale, mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
    dk = dk * qk_scale
    tl.store(DK + b64 * stride_dkb + hk * stride_dkh + rows_k[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + hk * stride_dvh + rows_k[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _scores_t(qkT, offs_m, offs_n, seqlen_k, off, qk_scale, softcap, WIN_LEFT, WIN_RIGHT,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """_scores for the transposed tile (keys along rows, queries along columns)."""
    if HAS_SOFTCAP:
        t = tanh_fast(qkT * (qk_scale / softcap))
        s = t * (softcap * 1.4426950408889634)
    else:
        t = qkT
        s = qkT * (qk_scale * 1.4426950408889634)
    keep = offs_n[:, None] < seqlen_k
    if HAS_RIGHT:
        keep = keep & (offs_n[:, None] <= offs_m[None, :] + off + WIN_RIGHT)
    if HAS_LEFT:
        keep = keep & (offs_n[:, None] >= offs_m[None, :] + off - WIN_LEFT)
    s = tl.where(keep, s, float("-inf"))
    return s, t


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    SEQ_Q, SEQ_K, HEADS, HEAD_DIM, N_BLOCKS,
    qk_scale, softcap, WIN_LEFT, WIN_RIGHT,
    GROUP: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    HEAD_I64: tl.constexpr, FOLD: tl.constexpr,
    ALIBI=None, stride_alb=0, HAS_ALIBI: tl.constexpr = False,
    SEED=None, DROP_THRESHOLD=0, drop_scale=1.0, HAS_DROPOUT: tl.constexpr = False,
    SEQUSED_Q=None, SEQUSED_K=None, HAS_SEQUSED_Q: tl.constexpr = False, HAS_SEQUSED_K: tl.constexpr = False,
):
    pid_m, pid_bh = _split_pid(N_BLOCKS, FOLD)
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    if HEAD_I64:  # h * stride_h passes 2^31 at 128 heads x 128k x d128 (see _head_i64)
        h = tl.cast(h, tl.int64)
    hk = h // GROUP
    q_start, seqlen_q, k_start, seqlen_k = _doc_bounds(CU_Q, CU_K, b, SEQ_Q, SEQ_K, IS_VARLEN, SEQUSED_Q, SEQUSED_K,
                                                       HAS_SEQUSED_Q, HAS_SEQUSED_K)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen_q:
        return
    off = seqlen_k - seqlen_q

    b64 = tl.cast(b, tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen_q
    q_mask = m_ok[:, None] & d_ok[None, :]
    rows_q = tl.cast(q_start + offs_m, tl.int64)
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + rows_q[:, None] * stride_qs + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + rows_q[:, None] * stride_dos + offs_d[None, :],
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + b64 * stride_lb + h * stride_lh + rows_q, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + b64 * stride_lb + h * stride_lh + rows_q, mask=m_ok, other=0.0)
    lse2 = lse * 1.4426950408889634
    slope2 = _alibi_slope2(ALIBI, b64, stride_alb, h, HAS_ALIBI)
    seed = _dropout_seed(SEED, HAS_DROPOUT)
    k_base = K + b64 * stride_kb + hk * stride_kh + tl.cast(k_start, tl.int64) * stride_ks
    v_base = V + b64 * stride_vb + hk * stride_vh + tl.cast(k_start, tl.int64) * stride_vs
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = _kv_range(m_start, seqlen_q, seqlen_k, off, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N,
                       HAS_LEFT, HAS_RIGHT)
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + offs_n0
        n_ok = offs_n < seqlen_k
        kv_rows = tl.cast(offs_n, tl.int64)
        kt = tl.load(k_base + kv_rows[None, :] * stride_ks + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + kv_rows[None, :] * stride_vs + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        qk = _dot(q, kt, UPCAST)
        s, t = _scores(qk, offs_m, offs_n, seqlen_k, off, qk_scale, softcap, WIN_LEFT, WIN_RIGHT,
                       HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP)
        if HAS_ALIBI:
            s = _alibi(s, slope2, offs_m, offs_n, off, False)
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, vt, UPCAST)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, pid_bh, offs_m, n_start, DROP_THRESHOLD, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), UPCAST)
    dq = dq * qk_scale
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + rows_q[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration. The compile gate (tests/test_attention.py) compiles every config these
# functions can return, so keep them the single source of truth.
# ---------------------------------------------------------------------------------------------

HEAD_DIM_BLOCKS = (32, 64, 128, 256)
# One-pass backward tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim block, sm_90
# only. None at d128/d256: every wgmma-shaped tile there spills (136+ bytes at 64x64 under both
# triton 3.6 and the newest; dk, dv and dq's share do not fit one thread's registers next to the
# scores), so those head dims keep the two-pass backward (the CUDA C++ backend is one-pass at d128).
# sm_80 spills at these tiles too (216+ bytes). Tried since: 32 queries x 128 keys on 8 warps with
# K/V in shared memory, dq^T = k^T ds^T (m64n32) added by a TMA reduce (descriptor atomic_add,
# cp.reduce.async.bulk.tensor; the interpreter has no descriptor reduce) fits at d128 under the
# newest triton with 2 stages, but triton 3.6 (the GPU machine's) spills 216-404 B at 2 stages,
# and 1 stage leaves every Q/dO load's latency exposed where the two-pass backward pipelines them.
FUSED_TILES = {32: (64, 64, 4, 2), 64: (64, 64, 8, 2)}


# Warp specialization, tried on the forward for sm_90 (tl.range(..., warp_specialize=True) over the
# unmasked key blocks, dense TMA, d128) under triton 3.6 and 3.9: at 8 warps, every forward config
# here, the compiler leaves the loop as it was (the same PTX: no setmaxnreg, no producer warp); at 4
# warps its NVGPUWarpSpecialization pass fails on this kernel (PassManager::run failed) under both.
# So there is no warp-specialized Triton variant to measure; the CUDA C++ backend
# (csrc/attention_sm90.cu) is the producer/consumer design.


def block_d(head_dim: int) -> int:
    return max(32, triton.next_power_of_2(head_dim))


# The fixed configs below take the architecture family (arch_family(): "sm_90", "sm_80" or
# "default" for every other GPU) where one tile cannot serve both: on sm_90 a wgmma is issued per
# warpgroup (4 warps) over 64 rows, so a tile whose 64 rows are split across two warpgroups issues
# narrow m64n16 wgmma, while sm_80's mma.sync has no such constraint but less register room.


def fwd_config(head_dim: int, interpreted: bool = INTERPRETED, arch: str = "default") -> dict:
    """BLOCK_M/BLOCK_N/BLOCK_D/num_warps/num_stages of the forward for a head dim. Sizes are the
    largest that ptxas fits without spills on both sm_80 and sm_90 (tests/test_attention.py)."""
    bd = block_d(head_dim)
    if interpreted:
        # Small tiles: several blocks per sequence even at seqlen 64, so the tails, the online
        # softmax across blocks and block skipping are all exercised on CPU.
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=bd, num_warps=4, num_stages=1)
    if bd <= 128:
        # 8 warps (two warpgroups on sm_90) even at d64: with 4, triton 3.6 spills 16 B once
        # window + softcap + varlen are on.
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=bd, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=bd, num_warps=8, num_stages=2)


def bwd_config(head_dim: int, interpreted: bool = INTERPRETED, arch: str = "default") -> dict:
    """Tiles of the dk/dv kernel: BLOCK_N keys held (k, v in shared memory, dk, dv in registers),
    BLOCK_M queries streamed."""
    bd = block_d(head_dim)
    if interpreted:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=bd, num_warps=4, num_stages=1)
    if bd <= 64:
        return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_D=bd, num_warps=8, num_stages=2)
    if bd == 128:
        if arch == "sm_90":
            # 64 whole keys per warpgroup: S^T and dP^T are m64n32 wgmma, dk and dv m64n128 (the
            # 64-key tile below splits each GEMM across the warpgroups: m64n16). No spills under
            # triton 3.6 and the newest, dense (TMA or pointers) or varlen, except on the pointer
            # path with a sliding window on varlen, or softcap, at 255 registers: 16-24 B under 3.6.
            # One stage spills nothing, but leaves every Q/dO load's latency exposed (one program
            # per SM at these registers): it is the tuner's candidate instead.
            return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_D=bd, num_warps=8, num_stages=2)
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_D=bd, num_warps=8, num_stages=2)  # 128 keys spill 300+ B on sm_80
    # d256: no wgmma-shaped tile fits the registers (dk and dv alone are 64 per thread per 16 keys):
    # mma.sync tiles.
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=bd, num_warps=8, num_stages=1)


def dq_config(head_dim: int, interpreted: bool = INTERPRETED, arch: str = "default") -> dict:
    """Tiles of the dq kernel: BLOCK_M queries held (q, dO, dq), BLOCK_N keys streamed."""
    bd = block_d(head_dim)
    if interpreted:
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=bd, num_warps=4, num_stages=1)
    if bd <= 64:
        return dict(BLOCK_M=128, BLOCK_N=32, BLOCK_D=bd, num_warps=4 if bd <= 32 else 8, num_stages=2)
    if bd == 128:
        if arch == "sm_90":
            # 64 whole queries per warpgroup: S and dP m64n64, dq m64n128 (the 64-query tile below
            # gives m64n16).
            return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=bd, num_warps=8, num_stages=2)
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=bd, num_warps=8, num_stages=2)
    # 64x16 tiles use wgmma on sm_90 but spill on sm_80; one config serves both for now.
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=bd, num_warps=8, num_stages=1)


def fused_config(head_dim: int, interpreted: bool = INTERPRETED, arch: str = "default") -> dict:
    """Tiles of the one-pass backward (the dk/dv kernel with ATOMIC_DQ): BLOCK_N keys held,
    BLOCK_M queries streamed. On sm_90 every GEMM is a wgmma of m64n32 or wider (S^T and dP^T are
    BLOCK_N x BLOCK_M, dq's share BLOCK_M x BLOCK_D): no n16 tiles."""
    bd = block_d(head_dim)
    if interpreted:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=bd, num_warps=4, num_stages=1, ATOMIC_DQ=True)
    bm, bn, w, st = FUSED_TILES[bd]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=w, num_stages=st, ATOMIC_DQ=True)


def fused_backward_runs(head_dim: int, device: torch.device, interpreted: bool | None = None) -> bool:
    """Whether deterministic=False takes the one-pass backward here: under the interpreter (so the
    CPU tests run it), and on sm_90 at the head dims FUSED_TILES has; else the two-pass one."""
    if INTERPRETED if interpreted is None else interpreted:
        return True
    return block_d(head_dim) in FUSED_TILES and arch_family(device) == "sm_90"


def fused_configs() -> list[dict]:
    """The one-pass backward's configs (sm_90 only: the compile gate checks them there)."""
    return [fused_config(bd, interpreted=False) for bd in sorted(FUSED_TILES)]


def preprocess_config(head_dim: int) -> dict:
    bd = block_d(head_dim)
    return dict(BLOCK_M=max(16, min(128, 4096 // bd)), BLOCK_D=bd, num_warps=4)


# Autotuning candidates: per architecture family, kernel and head dim block, the configs tried
# beyond the fixed one above (which always comes first and is what the interpreter, CPU and
# TOKENFORGE_AUTOTUNE=0 use). Tuples are (BLOCK_M, BLOCK_N, num_warps, num_stages). Every one is in
# all_configs(), so the compile gate compiles it without spills for the targets that can pick it;
# on sm_90 every tile up to d128 issues wgmma of n32 or wider (no m64n16: the gate checks).
_EXTRA = {
    "sm_90": {
        "_attn_fwd": {32: [(128, 128, 8, 3), (64, 64, 4, 3)], 64: [(128, 128, 8, 3), (64, 64, 4, 3)],
                      128: [(64, 64, 4, 3), (128, 32, 8, 3)], 256: [(64, 16, 8, 2), (32, 32, 4, 2)]},
        "_attn_bwd_dkdv": {32: [(64, 128, 8, 2), (32, 64, 4, 3)], 64: [(64, 128, 8, 2), (32, 64, 4, 3)],
                           128: [(32, 128, 8, 1)], 256: [(16, 32, 8, 1)]},
        "_attn_bwd_dq": {32: [(128, 64, 8, 2), (64, 64, 4, 3)], 64: [(64, 64, 4, 3), (128, 64, 8, 2)],
                         128: [(128, 32, 8, 2), (64, 64, 4, 2)], 256: [(16, 32, 4, 1)]},
    },
    "sm_80": {
        "_attn_fwd": {32: [(64, 64, 4, 3), (128, 32, 4, 4)], 64: [(64, 64, 4, 3), (128, 32, 4, 4)],
                      128: [(64, 64, 4, 3), (128, 32, 8, 3)], 256: [(64, 16, 8, 2), (32, 32, 4, 2)]},
        "_attn_bwd_dkdv": {32: [(32, 64, 4, 3), (16, 128, 8, 2)], 64: [(16, 128, 8, 2), (32, 64, 8, 2)],
                           128: [(16, 64, 4, 2), (16, 64, 8, 2)], 256: [(16, 32, 8, 1)]},
        "_attn_bwd_dq": {32: [(64, 64, 4, 3), (64, 32, 4, 3)], 64: [(64, 64, 4, 3), (64, 32, 8, 2)],
                         128: [(64, 64, 8, 2), (64, 32, 8, 3)], 256: [(16, 32, 4, 1)]},
    },
    "default": {},
}
ARCH_FAMILIES = tuple(_EXTRA)
_FIXED = {"_attn_fwd": fwd_config, "_attn_bwd_dkdv": bwd_config, "_attn_bwd_dq": dq_config,
          "_attn_bwd_fused": fused_config}
# Config tags that name a variant of another kernel: the one-pass backward is _attn_bwd_dkdv with
# ATOMIC_DQ (in its configs).
KERNEL_OF = {"_attn_bwd_fused": "_attn_bwd_dkdv"}


def candidates(kernel: str, head_dim: int, arch: str = "default", interpreted: bool = INTERPRETED) -> list[dict]:
    """Configs the autotuner tries for ``kernel`` at ``head_dim`` on ``arch`` (a family from
    ARCH_FAMILIES), the fixed config first; under the interpreter only the fixed one."""
    first = _FIXED[kernel](head_dim, interpreted=interpreted, arch=arch)
    if interpreted:
        return [first]
    bd = first["BLOCK_D"]
    out = [first]
    for bm, bn, w, st in _EXTRA.get(arch, {}).get(kernel, {}).get(bd, []):
        c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=w, num_stages=st)
        if "ATOMIC_DQ" in first:
            c["ATOMIC_DQ"] = first["ATOMIC_DQ"]
        if c not in out:
            out.append(c)
    return out


def all_configs(target: str | None = None) -> list[tuple[str, dict]]:
    """Every (kernel name, constexpr + launch config) the GPU launchers can pick on ``target``
    ("sm_90" or "sm_80": that family's configs and candidates, and the fixed configs of the other
    GPUs, which both targets stand for), or on any GPU when None."""
    families = ARCH_FAMILIES if target is None else (target, "default")
    out = []
    for bd in HEAD_DIM_BLOCKS:
        out.append(("_attn_bwd_preprocess", preprocess_config(bd)))
        for name in _FIXED:
            if name == "_attn_bwd_fused":  # sm_90 only: fused_configs()
                continue
            for arch in families:
                for c in candidates(name, bd, arch, interpreted=False):
                    if (name, c) not in out:
                        out.append((name, c))
    return out


# ---------------------------------------------------------------------------------------------
# Autotuner: configs are chosen ahead of time, never by a timing run inside a training step unless
# asked. ``TOKENFORGE_AUTOTUNE``:
#   cache (default)  the on-disk cache (``tokenforge tune attention ...`` writes it; keyed by GPU,
#                    Triton version, kernel, head dim, dtype, features and shape buckets), else
#                    the fixed first candidate. No timing, so every rank makes the same choice.
#   on               as cache, and a miss times every candidate on the real arguments (into scratch
#                    outputs) and stores the fastest, in memory and on disk. Refused under
#                    torch.distributed with more than one rank (ranks could pick different kernels):
#                    there the cache or the fixed config decides.
#   off              the fixed first candidate only.
# The interpreter, CPU tensors and CUDA graph capture always use the fixed candidate (or the cache).
# A candidate that does not fit this GPU (Triton's OutOfResources) is skipped; any other launch
# error is raised. ``tuned_configs()`` shows what was chosen in this process.
# ---------------------------------------------------------------------------------------------

_TUNED: dict[tuple, dict] = {}
_DISK: dict | None = None  # the on-disk cache, loaded on first use
SEQ_BUCKET_CAP = 16384
AUTOTUNE_MODES = ("cache", "on", "off")


def tuned_configs() -> dict[tuple, dict]:
    """A copy of the autotuner cache: key -> chosen config."""
    return {k: dict(v) for k, v in _TUNED.items()}


def clear_tuned_configs() -> None:
    _TUNED.clear()


def autotune_mode() -> str:
    """``cache``, ``on`` or ``off`` from TOKENFORGE_AUTOTUNE (1/true/yes mean on, 0/false/no off)."""
    raw = os.environ.get("TOKENFORGE_AUTOTUNE", "cache").strip().lower()
    mode = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off", "": "cache"}.get(raw, raw)
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"TOKENFORGE_AUTOTUNE={raw!r}: use cache (the default), on or off")
    return mode


def autotune_enabled() -> bool:
    """True when a cache miss may time candidates (TOKENFORGE_AUTOTUNE=on)."""
    return autotune_mode() == "on"


def cache_path() -> str:
    """TOKENFORGE_TUNE_CACHE, else ~/.cache/tokenforge/attention-tune.json."""
    return os.environ.get("TOKENFORGE_TUNE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tokenforge", "attention-tune.json")


@functools.lru_cache(maxsize=None)
def _device_tag(device: torch.device) -> str:
    """GPU name and Triton version: a cache entry is valid for that pair only (asked once per device)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|triton {triton.__version__}"


def _disk_key(device: torch.device, key: tuple) -> str:
    return "|".join([_device_tag(device), *map(str, key)])


def _disk() -> dict:
    global _DISK
    if _DISK is None:
        import json

        try:
            with open(cache_path()) as f:
                _DISK = json.load(f)
        except FileNotFoundError:
            _DISK = {}
        except (OSError, ValueError) as exc:
            raise ValueError(f"the attention tuning cache {cache_path()} is unreadable ({exc}); delete it and "
                             "rerun `tokenforge tune attention ...`, or set TOKENFORGE_AUTOTUNE=off") from exc
    return _DISK


def _disk_store(device: torch.device, key: tuple, cfg: dict) -> None:
    """Add one entry and rewrite the file atomically (a temporary file, then a rename)."""
    import json

    entries = _disk()
    entries[_disk_key(device, key)] = dict(cfg)
    path = cache_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _distributed_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def arch_family(device: torch.device) -> str:
    if device.type != "cuda":
        return "default"
    major, _ = torch.cuda.get_device_capability(device)
    return {9: "sm_90", 8: "sm_80"}.get(major, "default")


def _can_tune(device: torch.device) -> bool:
    return (not INTERPRETED and device.type == "cuda" and autotune_enabled()
            and not torch.cuda.is_current_stream_capturing() and _distributed_world() == 1)


def _seq_bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(int(n), 1)), SEQ_BUCKET_CAP)


def _time_config(launch, cfg: dict) -> float:
    """Milliseconds per launch of ``cfg`` (tests replace this with a fake timer)."""
    return triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20)


def _select(kernel: str, head_dim: int, device: torch.device, key_extra: tuple, launch) -> dict:
    """The config to launch ``kernel`` with; ``launch(cfg)`` runs it into scratch outputs."""
    arch = arch_family(device)
    cands = candidates(kernel, head_dim, arch)
    if len(cands) == 1:
        return cands[0]
    key = (kernel, arch, cands[0]["BLOCK_D"], *key_extra)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if autotune_mode() != "off":
        cached = _disk().get(_disk_key(device, key))
        if cached in cands:  # an entry for a config this version no longer has is ignored
            _TUNED[key] = dict(cached)
            return _TUNED[key]
    if not _can_tune(device):
        return cands[0]
    from triton.runtime.errors import OutOfResources

    best, best_t = cands[0], float("inf")
    for c in cands:
        try:
            t = _time_config(launch, c)
        except OutOfResources:  # does not fit this part (shared memory, registers): not a candidate
            continue
        if t < best_t:
            best, best_t = c, t
    _TUNED[key] = best
    _disk_store(device, key, best)
    return best


def _scratch(launch, *outputs):
    """``launch`` redirected to scratch copies of ``outputs`` (allocated once, on first use), so
    timing a candidate never touches the real results."""
    bufs: list[torch.Tensor] = []

    def run(cfg):
        if not bufs:
            bufs.extend(torch.empty_like(t) for t in outputs)
        launch(cfg, *bufs)

    return run


def _tune_key(q, k, window, softcap, varlen, max_seqlen_q, max_seqlen_k, batch: int = 1, alibi: bool = False,
              dropout: bool = False) -> tuple:
    """dtype, features, GQA group, sequence buckets and a batch x heads bucket (how many programs
    share the GPU changes which tile wins). Dropout enters the key only when on, so the cache
    entries written before it existed still match."""
    left, right = window
    return (str(q.dtype).removeprefix("torch."), varlen, left >= 0, right >= 0, right == 0, softcap > 0, alibi,
            *(("dropout",) if dropout else ()), q.shape[-2] // k.shape[-2], _seq_bucket(max_seqlen_q),
            _seq_bucket(max_seqlen_k), _seq_bucket(batch * q.shape[-2]))


# ---------------------------------------------------------------------------------------------
# Launchers: inputs already validated by tokenforge.ops.attention (head dim unit stride).
# ---------------------------------------------------------------------------------------------


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when these kernels can run on (q, k, v), else why not (the backend rules aside)."""
    if q.dtype not in SUPPORTED_DTYPES:
        return (f"dtype {q.dtype} is not float16/bfloat16 for the triton attention kernels; cast q, k, v "
                "to bfloat16 (or use backend='torch', which materialises the scores)")
    d = q.shape[-1]
    if d % 8 or not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        return (f"head_dim {d} is not a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] for the triton "
                "attention kernels; use backend='torch'")
    return None


def _bshd(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, seq, head) strides; varlen tensors (total, heads, dim) have no batch stride."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    # dense lse (batch, heads, seqlen_q); varlen lse (heads, total_q)
    if varlen:
        return 0, lse.stride(0)
    return lse.stride(0), lse.stride(1)


MAX_GRID_Y = 65535


def _grid(n_blocks: int, bh: int) -> tuple[tuple, bool]:
    """(grid, FOLD): (blocks, batch x heads), or one folded axis past axis 1's limit."""
    if bh > MAX_GRID_Y:
        return (n_blocks * bh,), True
    return (n_blocks, bh), False


def _head_i64(*tensors) -> bool:
    """True when an element of any tensor lies 2^31 or more past its first: then head offsets
    (h * stride_h, i32 when both fit) are computed in int64. Off otherwise, because the 64-bit
    head index costs the sm_80 backward kernels, already at 255 registers, a spill."""
    for t in tensors:
        if t is not None and t.numel() and sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= 2**31:
            return True
    return False


# The d256 forward with descriptors crashes triton 3.6's ptxas for sm_90a (SIGSEGV, seen in the
# compile gate); d256 keeps the pointer loads.
TMA_MAX_BLOCK_D = 128


def bwd_tma_config(cfg: dict) -> bool:
    """Whether the dk/dv pass at ``cfg`` streams Q/dO through descriptors: head dim blocks up to
    TMA_MAX_BLOCK_D (the interpreter's small tiles take them too, so the CPU tests run this path)."""
    return cfg["BLOCK_D"] <= TMA_MAX_BLOCK_D


def tma_usable(*tensors: torch.Tensor) -> bool:
    """Dense (batch, seq, heads, dim) tensors a kernel can move through tensor descriptors: an
    sm_90+ GPU (or the interpreter), unit-stride head dim, 16-byte aligned bases and strides (TMA's
    rules; SDPA's transposed (b, h, s, d) views qualify)."""
    first = tensors[0]
    if not INTERPRETED and (first.device.type != "cuda" or torch.cuda.get_device_capability(first.device) < (9, 0)):
        return False
    size = first.element_size()
    # A broadcast (stride 0) dim, e.g. an expanded dout, is left to the pointer loads.
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all((st * size) % 16 == 0 and (st > 0 or n == 1) for st, n in zip(t.stride()[:-1], t.shape[:-1]))
               for t in tensors)


def _window_args(window: tuple[int, int]) -> dict:
    left, right = window
    return dict(WIN_LEFT=max(left, 0), WIN_RIGHT=max(right, 0), HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0)



def _alibi_args(alibi) -> dict:
    """The kernels' ALiBi arguments for fp32 slopes (heads,) or (batch, heads), or None."""
    if alibi is None:
        return {}
    return dict(ALIBI=alibi, stride_alb=alibi.stride(0) if alibi.dim() == 2 else 0, HAS_ALIBI=True)


def _dropout_args(dropout) -> dict:
    """The kernels' dropout arguments for ``dropout`` = (seed, threshold): seed an int64 scalar
    tensor on the inputs' device, p = threshold / 2^32; or None."""
    if dropout is None:
        return {}
    seed, threshold = dropout
    return dict(SEED=seed, DROP_THRESHOLD=threshold, drop_scale=2.0**32 / (2.0**32 - threshold), HAS_DROPOUT=True)


def _seqused_args(seqused_q, seqused_k) -> dict:
    """The kernels' SEQUSED arguments (see _rows_of)."""
    args = {}
    if seqused_q is not None:
        args.update(SEQUSED_Q=seqused_q, HAS_SEQUSED_Q=True)
    if seqused_k is not None:
        args.update(SEQUSED_K=seqused_k, HAS_SEQUSED_K=True)
    return args




def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                      scale: float, window: tuple[int, int], softcap: float, alibi=None, dropout=None,
                      seqused_q=None, seqused_k=None, sinks=None):
    """(out, lse): out like q (contiguous), lse fp32 (batch, heads, seqlen_q) or (heads, total_q).

    Dense: q (b, sq, hq, d), k/v (b, sk, hkv, d). Varlen: q (total_q, hq, d), k/v (total_k, hkv, d),
    cu_seqlens int32 (batch + 1,). ``window`` has causal already folded in (right = 0). ``alibi``:
    contiguous fp32 slopes (hq,) or (batch, hq), or None. ``dropout``: (seed tensor, threshold),
    the probability p = threshold / 2^32 (see _dropout_keep), or None. ``seqused_q`` / ``seqused_k``
    (int32 (batch,)): batch entry b's queries / keys are the seqused[b] rows from cu_seqlens[b]
    (only cu_seqlens[:batch] is read). Varlen: the documents can lie anywhere in the rows (a KV
    cache read where it is). Dense: cu_seqlens_q / _k are then each sequence's first live row (a
    padded batch's live stretch, read in place). Query rows outside every stretch get out 0 and
    lse +inf (an empty row's). ``sinks``: contiguous fp32 (hq,) attention-sink logits (each row's
    softmax also normalises over its head's sink; lse includes it), or None."""
    varlen = q.dim() == 3
    heads, d = q.shape[-2], q.shape[-1]
    kv_heads = k.shape[-2]
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        seq_q, seq_k = 0, 0
        lse_shape = (heads, q.shape[0])
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        batch, seq_q = q.shape[0], q.shape[1]
        seq_k = k.shape[1]
        lse_shape = (batch, heads, seq_q)
        # each sequence's first live row with seqused, else never read (IS_VARLEN False)
        cu_q = cu_seqlens_q if seqused_q is not None else q
        cu_k = cu_seqlens_k if seqused_k is not None else q
    if seqused_q is None:
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    else:  # rows no program writes
        lse = torch.full(lse_shape, float("inf"), dtype=torch.float32, device=q.device)
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    group = heads // kv_heads
    seqused = _seqused_args(seqused_q, seqused_k)

    tma_layout = not varlen and not seqused and tma_usable(k, v) and tma_usable(q, out)

    def launch(cfg, out=out, lse=lse):
        n_blocks = triton.cdiv(max(max_seqlen_q, 1), cfg["BLOCK_M"])
        grid, fold = _grid(n_blocks, batch * heads)
        q_arg, k_arg, v_arg, o_arg = q, k, v, out
        tma = tma_layout and cfg["BLOCK_D"] <= TMA_MAX_BLOCK_D
        if tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            box = [1, cfg["BLOCK_N"], 1, cfg["BLOCK_D"]]
            k_arg, v_arg = TensorDescriptor.from_tensor(k, box), TensorDescriptor.from_tensor(v, box)
            q_box = [1, cfg["BLOCK_M"], 1, cfg["BLOCK_D"]]
            q_arg, o_arg = TensorDescriptor.from_tensor(q, q_box), TensorDescriptor.from_tensor(out, q_box)
        _attn_fwd[grid](
            q_arg, k_arg, v_arg, o_arg, lse, cu_q, cu_k,
            *_bshd(q, varlen), *_bshd(k, varlen), *_bshd(v, varlen), *_bshd(out, varlen),
            *_lse_strides(lse, varlen),
            seq_q, seq_k, heads, d, n_blocks, scale, softcap if softcap > 0 else 1.0,
            GROUP=group, IS_VARLEN=varlen, HAS_SOFTCAP=softcap > 0, HEAD_I64=_head_i64(q, k, v, out, lse), FOLD=fold,
            UPCAST=INTERPRETED, TMA=tma, **_window_args(window), **cfg, **_alibi_args(alibi),
            **_dropout_args(dropout), **seqused, **({} if sinks is None else dict(SINKS=sinks, HAS_SINKS=True)),
        )

    with launch_device(q):
        key = _tune_key(q, k, window, softcap, varlen, max_seqlen_q, max_seqlen_k, batch, alibi is not None,
                        dropout is not None)
        cfg = _select("_attn_fwd", d, q.device, key, _scratch(launch, out, lse))
        launch(cfg)
    return out, lse


def attention_backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                       max_seqlen_k: int, scale: float, window: tuple[int, int], softcap: float,
                       deterministic: bool = True, alibi=None, dropout=None, seqused_q=None, seqused_k=None):
    """(dq, dk, dv), contiguous, in q/k/v's dtype; rows outside seqused's stretches (see
    attention_forward) get 0.

    deterministic=False (the API's default, as in flash_attn), where :func:`fused_backward_runs`:
    one pass per key block computes dk, dv and adds dq's share with fp32 atomics (scores computed
    once). Otherwise (deterministic=True, d > 64, or not sm_90): the dk/dv pass, then a dq pass per
    query block that recomputes the scores; no atomics, bitwise reproducible."""
    varlen = q.dim() == 3
    heads, d = q.shape[-2], q.shape[-1]
    kv_heads = k.shape[-2]
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        seq_q, seq_k = 0, 0
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        batch, seq_q = q.shape[0], q.shape[1]
        seq_k = k.shape[1]
        cu_q = cu_seqlens_q if seqused_q is not None else q  # as in attention_forward
        cu_k = cu_seqlens_k if seqused_k is not None else q
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    # rows outside seqused's stretches: no program writes them
    dq = (torch.empty if seqused_q is None else torch.zeros)(q.shape, dtype=q.dtype, device=q.device)
    dk = (torch.empty if seqused_k is None else torch.zeros)(k.shape, dtype=k.dtype, device=k.device)
    dv = (torch.empty if seqused_k is None else torch.zeros)(v.shape, dtype=v.dtype, device=v.device)
    lse_strides = _lse_strides(lse, varlen)
    wide = _head_i64(q, k, v, do, out, lse, dq, dk, dv)
    seqused = _seqused_args(seqused_q, seqused_k)
    common = dict(GROUP=heads // kv_heads, IS_VARLEN=varlen, HAS_SOFTCAP=softcap > 0, UPCAST=INTERPRETED,
                  HEAD_I64=wide, **_window_args(window), **_alibi_args(alibi), **_dropout_args(dropout), **seqused)
    cap = softcap if softcap > 0 else 1.0
    sq_blocks = max(max_seqlen_q, 1)
    with launch_device(q):
        pcfg = preprocess_config(d)
        n_pre = triton.cdiv(sq_blocks, pcfg["BLOCK_M"])
        grid, fold = _grid(n_pre, batch * heads)
        _attn_bwd_preprocess[grid](
            out, do, delta, cu_q, *_bshd(out, varlen), *_bshd(do, varlen), *lse_strides,
            seq_q, heads, d, n_pre, IS_VARLEN=varlen, HEAD_I64=wide, FOLD=fold, **pcfg,
            **{name: value for name, value in seqused.items() if name.endswith("_Q")},
        )

        fused = not deterministic and fused_backward_runs(d, q.device)
        dq_acc = torch.empty(q.shape, dtype=torch.float32, device=q.device) if fused else None  # zeroed per launch

        # the streamed operands; K/V are pointer loads
        tma_layout = not varlen and not seqused and tma_usable(q, do)

        def launch_dkdv(cfg, dk=dk, dv=dv, dq_acc=dq_acc):
            n_blocks = triton.cdiv(max(max_seqlen_k, 1), cfg["BLOCK_N"])
            grid, fold = _grid(n_blocks, batch * kv_heads)
            q_arg, do_arg = q, do
            tma = tma_layout and bwd_tma_config(cfg)
            if tma:
                from triton.tools.tensor_descriptor import TensorDescriptor

                q_box = [1, cfg["BLOCK_M"], 1, cfg["BLOCK_D"]]
                q_arg, do_arg = TensorDescriptor.from_tensor(q, q_box), TensorDescriptor.from_tensor(do, q_box)
            acc = dq_acc if dq_acc is not None else delta  # not read without ATOMIC_DQ
            acc_strides = _bshd(dq_acc, varlen) if dq_acc is not None else (0, 0, 0)
            if dq_acc is not None:
                dq_acc.zero_()  # a timed candidate may have added into it before
            _attn_bwd_dkdv[grid](
                q_arg, k, v, do_arg, lse, delta, dk, dv, acc, cu_q, cu_k,
                *_bshd(q, varlen), *_bshd(k, varlen), *_bshd(v, varlen), *_bshd(do, varlen),
                *_bshd(dk, varlen), *_bshd(dv, varlen), *acc_strides, *lse_strides,
                seq_q, seq_k, kv_heads, d, n_blocks, scale, cap, FOLD=fold, **common,
                TMA=tma, **{**cfg, "ATOMIC_DQ": dq_acc is not None},  # the mode decides, not the config
            )

        def launch_dq(cfg, dq=dq):
            n_blocks = triton.cdiv(sq_blocks, cfg["BLOCK_M"])
            grid, fold = _grid(n_blocks, batch * heads)
            _attn_bwd_dq[grid](
                q, k, v, do, lse, delta, dq, cu_q, cu_k,
                *_bshd(q, varlen), *_bshd(k, varlen), *_bshd(v, varlen), *_bshd(do, varlen),
                *_bshd(dq, varlen), *lse_strides,
                seq_q, seq_k, heads, d, n_blocks, scale, cap, FOLD=fold, **common, **cfg,
            )

        # Candidates are timed into scratch buffers; the winner then writes the real outputs.
        key = _tune_key(q, k, window, softcap, varlen, max_seqlen_q, max_seqlen_k, batch, alibi is not None,
                        dropout is not None)
        if fused:
            launch_dkdv(_select("_attn_bwd_fused", d, q.device, key, _scratch(launch_dkdv, dk, dv, dq_acc)))
            dq.copy_(dq_acc)  # the kernel added scale * ds @ k: only the rounding to q's dtype is left
            return dq, dk, dv
        cfg = _select("_attn_bwd_dkdv", d, q.device, key, _scratch(launch_dkdv, dk, dv))
        launch_dkdv(cfg)
        cfg = _select("_attn_bwd_dq", d, q.device, key, _scratch(launch_dq, dq))
        launch_dq(cfg)
    return dq, dk, dv


# Flop counts (flash_attn convention) for the benchmarks.
def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool,
                    backward: bool = False) -> float:
    """4 * b * h * sq * sk * d, halved for causal; the backward counts 2.5x the forward."""
    f = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        f /= 2
    return f * 2.5 if backward else f

