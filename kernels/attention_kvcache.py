"""Decoding attention over a KV cache in Triton (split-KV, FlashDecoding style): the kernel of
:func:`tokenforge.ops.attention_with_kvcache` for a few queries per sequence.

One program per (sequence b, kv head hk, key split). Its tile's rows are every query of hk's GQA
group: row m is query head hk * GROUP + m // seqlen_q, query m % seqlen_q, so each key and value
block is read once for the whole group (the prefill kernel, one program per query head, would read it
GROUP times) and a decoding step's single query does not waste a 64-row tile. The op sends it up to
tokenforge.ops.attention_kvcache.DECODE_MAX_ROWS rows (the compile gate checks tiles up to 64). Keys are read where they
sit in the cache, never gathered:

    dense cache  key j of sequence b is row START[b] + j of the cache viewed as rows
    paged cache  logical position p = START[b] + j lives in page BLOCK_TABLE[b, p // PAGE], slot
                 p % PAGE, row page * PITCH + slot of the pages viewed as rows

Each split covers SPLIT keys (a multiple of BLOCK_N) and keeps its own online softmax; with one split
the program writes the output and lse directly, with several it writes fp32 partials (output
normalised by its own sum, and its lse) that :func:`combine_splits` merges. Masks follow
tokenforge.kernels.attention: bottom-right aligned (off = seqlen_k - seqlen_q), window (left, right),
softcap, ALiBi; a query that sees no key gets 0 and lse +inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import INTERPRETED, launch_device
from tokenforge.kernels.attention import _dot, _scores

@triton.jit
def _decode_fwd(
    Q, K, V, O, LSE, O_PART, LSE_PART, START, USED, BLOCK_TABLE, ALIBI,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_or, stride_oh,
    stride_bt, stride_alb, stride_ps, stride_pr, stride_ph, stride_ls, stride_lh,
    SEQ_Q, KV_HEADS, HEAD_DIM, SPLIT, PAGE, PITCH, qk_scale, softcap, WIN_LEFT, WIN_RIGHT,
    GROUP: tl.constexpr, PAGED: tl.constexpr, SINGLE: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    # (sequence x kv head) on axis 0 (2^31 - 1 programs), the splits (at most 64) on axis 1.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // KV_HEADS
    hk = tl.cast(pid % KV_HEADS, tl.int64)  # hk * stride_kh passes 2^31 on a (b, heads, 128k, d128) cache view
    b64 = tl.cast(b, tl.int64)
    split64 = tl.cast(split, tl.int64)
    seqlen_k = tl.load(USED + b)
    start = tl.load(START + b)
    off = seqlen_k - SEQ_Q

    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < GROUP * SEQ_Q
    head = hk * GROUP + offs_m // SEQ_Q  # int64 (hk is)
    query = offs_m % SEQ_Q  # the query's index among this sequence's seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n0 = tl.arange(0, BLOCK_N)
    q_rows = b64 * SEQ_Q + query
    q = tl.load(Q + q_rows[:, None] * stride_qr + head[:, None] * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + b64 * stride_alb + head, mask=m_ok, other=0.0) * 1.4426950408889634

    # This split's keys, narrowed to those some query of the tile can see.
    lo = split * SPLIT  # keys of one sequence: int32
    hi = tl.minimum(lo + SPLIT, seqlen_k)
    if HAS_RIGHT:
        hi = tl.minimum(hi, SEQ_Q + off + WIN_RIGHT)
    if HAS_LEFT:
        lo = tl.maximum(lo, (tl.maximum(off - WIN_LEFT, 0) // BLOCK_N) * BLOCK_N)
    k_head = K + hk * stride_kh
    v_head = V + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + offs_n0
        n_ok = offs_n < hi
        pos = start + offs_n
        if PAGED:
            page = tl.load(BLOCK_TABLE + b64 * stride_bt + pos // PAGE, mask=n_ok, other=0)
            rows = tl.cast(page, tl.int64) * PITCH + pos % PAGE
        else:
            rows = tl.cast(pos, tl.int64)
        kt = tl.load(k_head + rows[None, :] * stride_kr + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                     other=0.0)
        qk = _dot(q, kt, UPCAST)
        s, _t = _scores(qk, query, offs_n, hi, off, qk_scale, softcap, WIN_LEFT, WIN_RIGHT, HAS_LEFT, HAS_RIGHT,
                        HAS_SOFTCAP)
        if HAS_ALIBI:
            s = s - slope2[:, None] * tl.abs(query[:, None] + off - offs_n[None, :]).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with only masked keys so far
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + rows[:, None] * stride_vr + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    if SINGLE:
        o_ptrs = O + q_rows[:, None] * stride_or + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        tl.store(LSE + head * stride_lh + q_rows, tl.where(empty, float("inf"), lse), mask=m_ok)
    else:
        part = O_PART + split64 * stride_ps + q_rows[:, None] * stride_pr + head[:, None] * stride_ph + offs_d[None, :]
        tl.store(part, acc, mask=m_ok[:, None] & d_ok[None, :])
        tl.store(LSE_PART + split64 * stride_ls + head * stride_lh + q_rows, tl.where(empty, float("-inf"), lse),
                 mask=m_ok)


def config(head_dim: int, rows: int, interpreted: bool = INTERPRETED) -> dict:
    """Key block and warps for ``rows`` query rows: 64 keys a block up to d128 (32 at d256), and 8
    warps once the fp32 accumulator (rows x head dim) would not fit 4 warps' registers beside the
    tiles (the compile gate checks every shape for spills); the interpreter's 16 keys keep the CPU
    tests quick."""
    if interpreted:
        return dict(BLOCK_N=16, num_warps=1, num_stages=1)
    wide = block_m(rows) * head_dim >= 64 * 128 or head_dim > 128
    return dict(BLOCK_N=64 if head_dim <= 128 else 32, num_warps=8 if wide else 4, num_stages=2)


def block_m(rows: int) -> int:
    return max(16, triton.next_power_of_2(rows))


def choose_splits(device: torch.device, programs: int, longest: int, requested: int, block_n: int) -> int:
    """Key splits: ``requested`` (flash_attn's num_splits) when > 0, else enough to give every SM
    two programs on a GPU, each split at least 512 keys; one on the CPU. Never more than the key
    blocks of the longest sequence."""
    blocks = max(1, triton.cdiv(longest, block_n))
    if requested > 0:
        return min(requested, blocks)
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, max(programs, 1)), triton.cdiv(longest, 512), blocks, 64))


def combine_splits(o_part: torch.Tensor, lse_part: torch.Tensor, dtype: torch.dtype):
    """Merge per-split partials (splits, rows, heads, d) fp32 and lse (splits, heads, rows) into the
    output (rows, heads, d) in ``dtype`` and lse (heads, rows): each split weighed by exp(lse_s -
    lse). Rows no split saw get 0 and lse +inf."""
    lse = torch.logsumexp(lse_part, dim=0)
    seen = torch.isfinite(lse)
    weights = torch.exp(lse_part - torch.where(seen, lse, 0.0)).nan_to_num(0.0)  # (splits, heads, rows)
    out = (o_part * weights.transpose(1, 2)[..., None]).sum(0)
    return out.to(dtype), torch.where(seen, lse, float("inf"))


def attention_decode(q, k_rows, v_rows, starts, used, block_table, page: int, pitch: int, seqlen_q: int,
                     longest: int, scale: float, window: tuple[int, int], softcap: float, alibi=None,
                     num_splits: int = 0):
    """(out (batch * seqlen_q, heads, d) like q, lse (heads, batch * seqlen_q) fp32).

    q: (batch * seqlen_q, heads, d) rows, sequence b's queries at rows b * seqlen_q ..; k_rows /
    v_rows: (rows, kv heads, d), the cache viewed as rows. Sequence b attends to its used[b] keys from
    logical position starts[b]: rows starts[b] + j (dense, block_table None) or through block_table
    (batch, pages) int32 with pages of ``page`` slots ``pitch`` rows apart. ``window`` has causal
    folded in. ``alibi``: fp32 (heads,) or (batch, heads), or None."""
    heads, d = q.shape[1], q.shape[2]
    kv_heads = k_rows.shape[1]
    group = heads // kv_heads
    batch = starts.shape[0]
    cfg = config(d, group * seqlen_q)
    splits = choose_splits(q.device, batch * kv_heads, longest, num_splits, cfg["BLOCK_N"])
    split_len = triton.cdiv(triton.cdiv(max(longest, 1), splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, q.shape[0]), dtype=torch.float32, device=q.device)
    if splits > 1:
        o_part = torch.empty((splits, *q.shape), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, heads, q.shape[0]), dtype=torch.float32, device=q.device)
    else:
        o_part, lse_part = out, lse  # never written
    left, right = window
    with launch_device(q):
        _decode_fwd[(batch * kv_heads, splits)](
            q, k_rows, v_rows, out, lse, o_part, lse_part, starts, used,
            block_table if block_table is not None else starts, alibi if alibi is not None else lse,
            q.stride(0), q.stride(1), k_rows.stride(0), k_rows.stride(1), v_rows.stride(0), v_rows.stride(1),
            out.stride(0), out.stride(1), block_table.stride(0) if block_table is not None else 0,
            alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0,
            o_part.stride(0) if splits > 1 else 0, o_part.stride(-3) if splits > 1 else 0,
            o_part.stride(-2) if splits > 1 else 0, lse_part.stride(0) if splits > 1 else 0, lse.stride(0),
            seqlen_q, kv_heads, d, split_len, page, pitch, scale, softcap if softcap > 0 else 1.0,
            max(left, 0), max(right, 0),
            GROUP=group, PAGED=block_table is not None, SINGLE=splits == 1, HAS_LEFT=left >= 0,
            HAS_RIGHT=right >= 0, HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi is not None,
            BLOCK_M=block_m(group * seqlen_q), BLOCK_D=max(16, triton.next_power_of_2(d)), UPCAST=INTERPRETED,
            **cfg,
        )
    if splits > 1:
        out, lse = combine_splits(o_part, lse_part, q.dtype)
    return out, lse
