"""Attention over a KV cache, with flash_attn_with_kvcache's arguments: decoding and chunked prefill
for the generation a training run does (evaluation samples, RL rollouts), on the same kernels.

Path of a call: :func:`attention_with_kvcache` validates (one host sync reads the cache lengths), then
under ``torch.no_grad``: the new keys are rotated by :func:`tokenforge.ops.rope.rope_one` and written
with the new values into the cache in place -> on the Triton backend the cache is read where it is:

- a few queries per sequence (GQA group x seqlen_q <= DECODE_MAX_ROWS: decoding, speculative steps):
  the custom op ``tokenforge::attention_kvcache_decode`` -> ``tokenforge.kernels.attention_kvcache``,
  split-KV with the group's query rows in one tile, dense or paged cache;
- longer query blocks on a dense cache: the varlen forward kernel with per-sequence key starts and
  counts (:func:`tokenforge.ops.attention.attention_over_cache_rows`);

otherwise (longer query blocks on a paged cache, the torch or cuda backend, a head dim the kernel
pads) each sequence's live keys are gathered into packed rows first ->
:func:`tokenforge.ops.attention_varlen`; the gather copies the live part of the cache once per call.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from tokenforge.ops.attention import _as_window, _check_sinks, attention_over_cache_rows, attention_varlen, with_sinks
from tokenforge.ops.rope import rope_one, rope_tables_from_frequencies

NAME = "attention_with_kvcache"


class CacheOverflowError(ValueError, RuntimeError):
    """New keys that do not fit the cache (or a sequence longer than its block_table row). A ValueError,
    tokenforge's error for bad input, and a RuntimeError, flash_attn's, so ported code that catches
    flash_attn's error still catches this one."""


def _int_vector(label: str, t, batch: int, device) -> torch.Tensor:
    """An int32/int64 (batch,) tensor on device, as int64."""
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != (batch,):
        raise ValueError(f"{NAME}: {label} must be an int32 tensor of shape ({batch},) (one entry per sequence), got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if t.device != device:
        raise ValueError(f"{NAME}: {label} is on {t.device} but q is on {device}; move it to {device}")
    return t.long()


def _check_tensors(q, k_cache, v_cache, k, v, block_table) -> None:
    for label, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is None and label in ("k", "v"):
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{NAME}: {label} must be a 4-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{NAME}: {label} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}; "
                             "the cache, the new keys/values and q share one dtype and device")
    cache_layout = ("(num_blocks, page_size, heads_k, head_dim) pages" if block_table is not None
                    else "(batch_cache, seqlen_cache, heads_k, head_dim)")
    if k_cache.shape != v_cache.shape or k_cache.shape[-1] != q.shape[-1]:
        raise ValueError(f"{NAME}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
                         f"{cache_layout} with q's head_dim {q.shape[-1]}")
    if (k is None) != (v is None):
        raise ValueError(f"{NAME}: pass both k and v (the new keys and values to append) or neither")
    if k is not None:
        want = (q.shape[0], k.shape[1], k_cache.shape[2], q.shape[-1])
        if tuple(k.shape) != want or v.shape != k.shape:
            raise ValueError(f"{NAME}: k and v must be (batch, seqlen_new, heads_k, head_dim) = (..., {want[2]}, "
                             f"{want[3]}) with batch {want[0]}, got {tuple(k.shape)} and {tuple(v.shape)}")


def _rotary_tables(rotary_cos, rotary_sin, interleaved: bool, head_dim: int, k, device):
    """flash_attn's (seqlen_ro, rotary_dim / 2) tables as :func:`rope`'s, or None."""
    if rotary_cos is None and rotary_sin is None:
        return None
    if rotary_cos is None or rotary_sin is None:
        raise ValueError(f"{NAME}: pass both rotary_cos and rotary_sin or neither")
    if k is None:
        raise ValueError(f"{NAME}: rotary_cos/rotary_sin rotate the new keys as they are appended; pass k and v "
                         "too (a cache without new keys already holds rotated keys: rotate q yourself)")
    for label, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point() or t.device != device:
            raise ValueError(f"{NAME}: {label} must be a floating (seqlen_ro, rotary_dim / 2) tensor on q's device, "
                             f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if rotary_cos.shape != rotary_sin.shape or not 1 <= rotary_cos.shape[1] <= head_dim // 2:
        raise ValueError(f"{NAME}: rotary_cos {tuple(rotary_cos.shape)} and rotary_sin {tuple(rotary_sin.shape)} must "
                         f"share a shape (seqlen_ro, rotary_dim / 2) with 1 <= rotary_dim / 2 <= head_dim / 2 = "
                         f"{head_dim // 2}")
    return rope_tables_from_frequencies(rotary_cos, rotary_sin, interleaved)


def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
                           rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
                           cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
                           cache_batch_idx: Optional[torch.Tensor] = None,
                           cache_leftpad: Optional[torch.Tensor] = None,
                           block_table: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
                           causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                           rotary_interleaved: bool = True, alibi_slopes: Optional[torch.Tensor] = None,
                           num_splits: int = 0, return_softmax_lse: bool = False, *, backend: Optional[str] = None,
                           sinks: Optional[torch.Tensor] = None):
    """Attention of q (batch, seqlen_q, heads, head_dim) over a KV cache; arguments, order and defaults
    are flash_attn_with_kvcache's. Returns out (batch, seqlen_q, heads, head_dim), plus lse (batch,
    heads, seqlen_q) fp32 with ``return_softmax_lse``. No gradient (as flash_attn): runs under no_grad.

    - k_cache/v_cache: (batch_cache, seqlen_cache, heads_k, head_dim), sequence b in row
      cache_batch_idx[b] (default b); or, with ``block_table`` (batch, blocks per sequence) int32, pages
      (num_blocks, page_size, heads_k, head_dim), key i of sequence b at page block_table[b, i //
      page_size], slot i % page_size (any page_size).
    - cache_seqlens: int or (batch,) int32, the keys already cached per sequence (None: the whole
      cache). k/v (batch, seqlen_new, heads_k, head_dim), if given, are written into the cache in place
      at cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 (which must fit), rotated first by
      rotary_cos/rotary_sin (seqlen_ro, rotary_dim / 2) at those positions when given (interleaved
      pairs by default, as flash_attn; rotary_interleaved=False is the half-split GPT-NeoX/LLaMA form).
      q is rotated too: at cache_seqlens[b] + i when causal or local, else every query at
      cache_seqlens[b].
    - Sequence b attends to its keys cache_leftpad[b] (default 0) .. cache_seqlens[b] + seqlen_new - 1;
      causal and window_size are aligned to the bottom right of those keys, as in :func:`attention`,
      and so are softcap and alibi_slopes ((heads,) or (batch, heads) fp32). A query with no key gets
      0 (lse +inf, as flash_attn).
    - num_splits: flash_attn's split-KV knob: the decoding kernel's key splits (0: chosen from the
      GPU's SM count and the longest sequence); the result is the same up to rounding.
    - ``backend`` forces the attention backend (triton, cuda or torch), as in :func:`attention`.
    - ``sinks`` (heads,): attention sinks, as :func:`attention` (GPT-OSS's; applied to the kernel's
      output and lse: a query with no key gets 0 and lse = its sink).

    One host sync reads the cache lengths (to check they fit and to size the gather), and a paged
    cache's page check is a second one."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{NAME}: q must be a 4-D (batch, seqlen_q, heads, head_dim) tensor, got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    _check_tensors(q, k_cache, v_cache, k, v, block_table)
    batch, seqlen_q, heads, head_dim = q.shape
    device = q.device
    paged = block_table is not None
    if paged:
        if not (isinstance(block_table, torch.Tensor) and block_table.dim() == 2 and block_table.shape[0] == batch
                and block_table.dtype in (torch.int32, torch.int64) and block_table.device == device):
            raise ValueError(f"{NAME}: block_table must be an int32 (batch={batch}, blocks per sequence) tensor on "
                             f"q's device, got {getattr(block_table, 'dtype', type(block_table).__name__)} "
                             f"{tuple(getattr(block_table, 'shape', ()))}")
        if cache_batch_idx is not None:
            raise ValueError(f"{NAME}: cache_batch_idx picks cache rows of an unpaged cache; with block_table, "
                             "block_table[b] already says which pages sequence b owns")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"{NAME}: num_splits must be an int >= 0 (flash_attn's split-KV knob), got {num_splits!r}")
    if not isinstance(return_softmax_lse, bool):
        raise TypeError(f"{NAME}: return_softmax_lse must be True or False, got {return_softmax_lse!r}")
    sinks = _check_sinks(NAME, sinks, heads, device, 0.0, False)
    seqlen_new = 0 if k is None else k.shape[1]
    tables = _rotary_tables(rotary_cos, rotary_sin, bool(rotary_interleaved), head_dim, k, device)

    if cache_seqlens is None:
        if k is not None:
            raise ValueError(f"{NAME}: with new k/v, pass cache_seqlens (where each sequence's new keys go)")
        seqlens = torch.full((batch,), capacity, dtype=torch.long, device=device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        seqlens = torch.full((batch,), cache_seqlens, dtype=torch.long, device=device)
    else:
        seqlens = _int_vector("cache_seqlens", cache_seqlens, batch, device)
    leftpad = (_int_vector("cache_leftpad", cache_leftpad, batch, device) if cache_leftpad is not None
               else torch.zeros_like(seqlens))
    rows = (_int_vector("cache_batch_idx", cache_batch_idx, batch, device) if cache_batch_idx is not None
            else torch.arange(batch, device=device))
    if batch == 0:
        out = q.new_zeros(q.shape)
        return (out, q.new_zeros((0, heads, seqlen_q), dtype=torch.float32)) if return_softmax_lse else out
    ends = seqlens + seqlen_new
    lengths = ends - leftpad
    bounds = [lengths.sum(), lengths.max(), seqlens.min(), ends.max(), (seqlens - leftpad).min(), leftpad.min(),
              rows.min(), rows.max(), seqlens.max()]
    total, longest, fewest, furthest, pad_gap, least_pad, first_row, last_row, most = \
        torch.stack(bounds).tolist()  # the one sync
    if fewest < 0 or furthest > capacity:
        where = ("block_table.shape[1] x page_size = " if paged else "seqlen_cache = ") + str(capacity)
        raise CacheOverflowError(f"{NAME}: cache_seqlens + seqlen_new must lie in 0..{where} for every sequence, got "
                         f"cache_seqlens from {fewest} and up to {furthest} keys; grow the cache or trim the batch")
    if least_pad < 0 or pad_gap < 0:
        raise ValueError(f"{NAME}: cache_leftpad must lie in 0..cache_seqlens[b] for every sequence")
    if not paged and (first_row < 0 or last_row >= k_cache.shape[0]):
        raise ValueError(f"{NAME}: cache_batch_idx must lie in 0..{k_cache.shape[0] - 1} (the cache's batch), "
                         f"got {first_row}..{last_row}")
    per_query = _rotates_per_query(causal, window_size)
    if tables is not None:
        # keys at cache_seqlens .. ends - 1; queries at cache_seqlens (+ i when causal or local)
        reach = max(furthest, most + (seqlen_q if per_query else 1))
        if reach > tables[0].shape[0]:
            raise ValueError(f"{NAME}: rotary_cos/rotary_sin have {tables[0].shape[0]} positions but this call "
                             f"rotates up to position {reach - 1}; pass longer tables")

    def cache_slots(seq: torch.Tensor, pos: torch.Tensor):
        """The (dim 0, dim 1) indices of key pos of sequence seq in k_cache/v_cache."""
        if not paged:
            return rows[seq], pos
        page = k_cache.shape[1]
        return block_table.long()[seq, pos // page], pos % page

    pitch = cache_row_pitch(q, k_cache, v_cache, backend)
    # The decoding kernel (a few queries per sequence: the GQA group's query rows in one tile) reads
    # dense and paged caches in place; longer query blocks of a dense cache take the varlen kernel
    # in place; everything else gathers the live keys.
    decode = pitch is not None and 0 < (heads // k_cache.shape[2]) * seqlen_q <= DECODE_MAX_ROWS
    gather = pitch is None or (paged and not decode)
    with torch.no_grad():
        if paged and total and not _pages_in_range(block_table, leftpad, ends, k_cache.shape[1], k_cache.shape[0]):
            raise ValueError(f"{NAME}: block_table names a page outside 0..{k_cache.shape[0] - 1} for a key in use")
        if gather:
            # Every key this call reads, appended ones included (they sit at the end of each sequence's
            # keys), found before anything is written.
            cu_k = torch.zeros(batch + 1, dtype=torch.long, device=device)
            torch.cumsum(lengths, 0, out=cu_k[1:])
            seq = torch.repeat_interleave(torch.arange(batch, device=device), lengths, output_size=total)
            pos = leftpad[seq] + torch.arange(total, device=device) - cu_k[seq]
            slot0, slot1 = cache_slots(seq, pos)
        if k is not None and seqlen_new:
            positions = seqlens[:, None] + torch.arange(seqlen_new, device=device)
            new0, new1 = cache_slots(torch.arange(batch, device=device).repeat_interleave(seqlen_new),
                                     positions.reshape(-1))
            if tables is not None:
                k = rope_one(k, tables[0], tables[1], positions, bool(rotary_interleaved), backend)
            k_cache[new0, new1] = k.reshape(-1, *k.shape[2:])
            v_cache[new0, new1] = v.reshape(-1, *v.shape[2:])
        if tables is not None and seqlen_q:
            steps = torch.arange(seqlen_q, device=device) if per_query else torch.zeros(seqlen_q, dtype=torch.long,
                                                                                       device=device)
            q = rope_one(q, tables[0], tables[1], seqlens[:, None] + steps, bool(rotary_interleaved), backend)
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen_q
        q_rows = q.reshape(batch * seqlen_q, heads, head_dim)
        # Where sequence b's live keys start: a row of the dense cache as rows, or a logical
        # position in its pages.
        starts = (leftpad if paged else rows * pitch + leftpad).to(torch.int32) if not gather else None
        if decode:
            out, lse = decode_over_cache(q_rows, k_cache, v_cache, starts, lengths.to(torch.int32), block_table,
                                         pitch, seqlen_q, longest, softmax_scale, causal, window_size, softcap,
                                         alibi_slopes, num_splits)
        elif not gather:  # a dense cache, read in place by the varlen kernel
            out, lse = attention_over_cache_rows(q_rows, cache_as_rows(k_cache, pitch), cache_as_rows(v_cache, pitch),
                                                 cu_q, starts, lengths.to(torch.int32), seqlen_q, longest,
                                                 softmax_scale, causal, window_size, softcap, alibi_slopes)
        else:
            keys, values = k_cache[slot0, slot1], v_cache[slot0, slot1]
            out, lse = attention_varlen(q_rows, keys, values, cu_q, cu_k.to(torch.int32), seqlen_q, longest, 0.0,
                                        softmax_scale, causal, window_size, softcap, alibi_slopes, return_lse=True,
                                        backend=backend)
    if sinks is not None:
        out, lse = with_sinks(out, lse, sinks)
    out = out.view(batch, seqlen_q, heads, head_dim)
    if not return_softmax_lse:
        return out
    return out, lse.view(heads, batch, seqlen_q).transpose(0, 1).contiguous()


def cache_row_pitch(q, k_cache, v_cache, backend) -> Optional[int]:
    """The row pitch (flattened rows from one cache sequence, or page, to the next: dim 1's length
    for a contiguous cache, more for a slice of a longer one) at which the Triton kernels read this
    cache where it is, with no gather; or None: the torch and cuda backends, a head dim the kernel
    pads, a non-unit-stride head dim, k and v caches laid out differently, or 2^31 rows or more
    (int32 row offsets). Those gather each sequence's live keys into rows first."""
    from tokenforge.ops.attention import kernel_reads_in_place

    if not kernel_reads_in_place(q, k_cache, v_cache, backend):
        return None
    pitches = set()
    for c in (k_cache, v_cache):
        s0, s1 = c.stride(0), c.stride(1)
        if c.stride(-1) != 1 or s1 <= 0:
            return None
        if c.shape[0] == 1:
            pitches.add(c.shape[1])
        elif s0 % s1 or s0 // s1 < c.shape[1]:
            return None
        else:
            pitches.add(s0 // s1)
    if len(pitches) > 1 or k_cache.shape[0] * max(pitches) >= 2**31:
        return None
    return pitches.pop()


def _pages_in_range(block_table, leftpad, ends, page: int, num_blocks: int) -> bool:
    """Whether every page a sequence reads (positions leftpad[b] .. ends[b] - 1) is a real one
    (a host sync)."""
    index = torch.arange(block_table.shape[1], device=block_table.device)[None, :]
    needed = (index >= (leftpad // page)[:, None]) & (index * page < ends[:, None])
    bad = needed & ((block_table < 0) | (block_table >= num_blocks))
    return not bool(bad.any())


def cache_as_rows(cache: torch.Tensor, pitch: int) -> torch.Tensor:
    """(batch_cache, seqlen_cache, heads, d) -> (rows, heads, d), a view: key i of cache sequence c
    is row c * pitch + i."""
    rows = (cache.shape[0] - 1) * pitch + cache.shape[1]
    return cache.as_strided((rows, *cache.shape[2:]), cache.stride()[1:], cache.storage_offset())


# The most query rows (GQA group x seqlen_q) the decoding kernel puts in one tile.
DECODE_MAX_ROWS = 64


@torch.library.custom_op("tokenforge::attention_kvcache_decode", mutates_args=())
def attention_kvcache_decode(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, starts: torch.Tensor,
                             used: torch.Tensor, block_table: Optional[torch.Tensor], page: int, pitch: int,
                             seqlen_q: int, longest: int, scale: float, window_left: int, window_right: int,
                             softcap: float, alibi_slopes: Optional[torch.Tensor],
                             num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tokenforge.kernels.attention_kvcache import attention_decode

    return attention_decode(q, k_rows, v_rows, starts, used, block_table, page, pitch, seqlen_q, longest, scale,
                            (window_left, window_right), softcap, alibi_slopes, num_splits)


@attention_kvcache_decode.register_fake
def _(q, k_rows, v_rows, starts, used, block_table, page, pitch, seqlen_q, longest, scale, window_left,
      window_right, softcap, alibi_slopes, num_splits):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def decode_over_cache(q_rows, k_cache, v_cache, starts, used, block_table, pitch: int, seqlen_q: int,
                      longest: int, softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits: int):
    """(out rows, lse (heads, rows)) by the decoding kernel, the options checked as
    :func:`attention_varlen` checks them."""
    from tokenforge.ops.attention import check_cache_options

    k_rows, v_rows = cache_as_rows(k_cache, pitch), cache_as_rows(v_cache, pitch)
    scale, (left, right), alibi = check_cache_options(NAME, q_rows, k_rows, v_rows, starts.shape[0], softmax_scale,
                                                      causal, window_size, softcap, alibi_slopes)
    return torch.ops.tokenforge.attention_kvcache_decode(q_rows, k_rows, v_rows, starts, used, block_table,
                                                        k_cache.shape[1], pitch, seqlen_q, longest, scale, left,
                                                        right, float(softcap), alibi, num_splits)


def _rotates_per_query(causal: bool, window_size) -> bool:
    """flash_attn's rule: with a causal or local mask the queries are consecutive positions (rotated at
    cache_seqlens + i); without one, all of them sit at cache_seqlens."""
    window = _as_window(window_size) if window_size is not None else (-1, -1)
    return bool(causal) or (isinstance(window, tuple) and any(w >= 0 for w in window))


__all__ = ["CacheOverflowError", "attention_with_kvcache"]
