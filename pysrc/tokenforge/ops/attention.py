"""Fused scaled-dot-product attention (FlashAttention-2 style), dense and varlen, with GQA/MQA,
bottom-right causal masks, sliding windows, softcapping, ALiBi and attention dropout; the API
mirrors flash_attn.

Path of a call: :func:`attention` / :func:`attention_varlen` validate and pick a backend ->
:class:`AttentionFunction` (autograd; saves q, k, v, out and the fp32 lse, never the scores) ->
the custom ops ``tokenforge::attention_fwd`` / ``tokenforge::attention_bwd`` (opaque to
``torch.compile`` through their fake implementations) -> ``tokenforge.kernels.attention``
(Triton) or ``tokenforge.cuda.attention`` (``backend="cuda"``: CUDA C++ in csrc/attention_sm90.cu,
FlashAttention-3 style for sm_90a). The ``torch`` backend on CUDA tensors is ``F.scaled_dot_product_attention`` (PyTorch's
own fused attention: the real baseline), wherever SDPA can express the call (no softcap, no lse
asked for, every query row sees a key; windows as a boolean mask); otherwise, and on the CPU, it is
:func:`attention_reference` (materialises the scores, the tests' oracle), differentiated by autograd.

Dtypes: the Triton kernels take fp16/bf16 with fp32 accumulation. fp32 (and float64) inputs run on
the torch reference (``backend='triton'`` refuses them and says so); cast to bf16 for the kernel.
Rows that see no key at all (causal with seqlen_q > seqlen_k) give out = 0 and lse = +inf, as in
flash_attn.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch

from tokenforge import backends
from tokenforge.dtensor import any_dtensor

OP = "attention"


# ---------------------------------------------------------------------------------------------
# The torch reference: the oracle of the tests and the CPU fallback; SDPA, the CUDA baseline.
# ---------------------------------------------------------------------------------------------


def _keep_mask(seqlen_q: int, seqlen_k: int, window: tuple[int, int], device) -> Optional[torch.Tensor]:
    """(seqlen_q, seqlen_k) bool, True where query i may see key j (bottom-right aligned)."""
    left, right = window
    if left < 0 and right < 0:
        return None
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    off = seqlen_k - seqlen_q
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= j <= i + off + right
    if left >= 0:
        keep &= j >= i + off - left
    return keep


def _alibi_bias(slopes: torch.Tensor, seqlen_q: int, seqlen_k: int, compute: torch.dtype) -> torch.Tensor:
    """(b or 1, hq, sq, sk): -slope * |i + seqlen_k - seqlen_q - j|, flash_attn's ALiBi bias, for
    slopes (hq,) or (b, hq)."""
    i = torch.arange(seqlen_q, device=slopes.device)[:, None]
    j = torch.arange(seqlen_k, device=slopes.device)[None, :]
    dist = (i + (seqlen_k - seqlen_q) - j).abs().to(compute)
    per = slopes.to(compute).reshape(-1, slopes.shape[-1])
    return -per[:, :, None, None] * dist


# Attention dropout: p is carried as threshold = round(p * 2^32); a probability is dropped when its
# 32-bit Philox word is below the threshold, so the keep rate is exactly 1 - threshold / 2^32 and
# kept probabilities are scaled by 2^32 / (2^32 - threshold). The Triton kernels draw the words in
# kernels/attention.py (_dropout_keep); dropout_keep_reference below draws the same ones in torch.
_U32 = 0xFFFFFFFF


def dropout_threshold(p: float) -> int:
    """The 32-bit threshold of dropout probability p in [0, 1)."""
    return min(int(round(p * 2.0**32)), 2**32 - 1)


def _mul_u32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for uint32 values held in int64, from 16-bit pieces (no
    int64 overflow, so the same on every device)."""
    ah, al = a >> 16, a & 0xFFFF
    bh, bl = b >> 16, b & 0xFFFF
    mid = ah * bl + al * bh
    low = al * bl
    return (ah * bh + ((mid + (low >> 16)) >> 16)) & _U32, (((mid & 0xFFFF) << 16) + low) & _U32


def _philox_4x32(seed: int, c0, c1, c2, c3) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 (Salmon et al., 2011) of int64 tensors holding uint32 counters, keyed by the
    64-bit seed: Triton's tl.random.philox, bit for bit."""
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi_b, lo_b = _mul_u32(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul_u32(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _U32, (k1 + 0xBB67AE85) & _U32
    return c0, c1, c2, c3


def dropout_keep_reference(seed: int, threshold: int, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
                           device=None, first_batch: int = 0) -> torch.Tensor:
    """(batch, heads, seqlen_q, seqlen_k) bool, True where the kernels' dropout keeps a probability:
    query i, key j of head h in batch entry (or varlen document) first_batch + b draws Philox word
    j % 4 of counter (j // 4, i, (first_batch + b) * heads + h, 0) and keeps it when the word is
    >= threshold."""
    i = torch.arange(seqlen_q, device=device, dtype=torch.int64)[:, None]
    j = torch.arange(seqlen_k, device=device, dtype=torch.int64)[None, :]
    bh = (first_batch * heads + torch.arange(batch * heads, device=device, dtype=torch.int64))[:, None, None]
    shape = (batch * heads, seqlen_q, seqlen_k)
    words = torch.stack(_philox_4x32(seed, (j >> 2).expand(shape), i.expand(shape), bh.expand(shape),
                                     torch.zeros(shape, dtype=torch.int64, device=device)), -1)
    word = words.gather(-1, (j & 3).expand(shape)[..., None])[..., 0]
    return (word >= threshold).view(batch, heads, seqlen_q, seqlen_k)


def _reference_scores(q, k, scale: float, window: tuple[int, int], softcap: float, compute: torch.dtype,
                      alibi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(b, hq, sq, sk) scores in ``compute``: scaled q.k, softcapped, ALiBi-biased, masked to -inf."""
    group = q.shape[2] // k.shape[2]
    qc = q.to(compute).transpose(1, 2)
    kc = k.to(compute).repeat_interleave(group, dim=2).transpose(1, 2)
    s = (qc @ kc.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        s = s + _alibi_bias(alibi, q.shape[1], k.shape[1], compute)
    keep = _keep_mask(q.shape[1], k.shape[1], window, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _reference_dense(q, k, v, scale: float, window: tuple[int, int], softcap: float, compute: torch.dtype,
                     alibi: Optional[torch.Tensor] = None, dropout: Optional[tuple[int, int]] = None,
                     first_batch: int = 0, sinks: Optional[torch.Tensor] = None):
    """out (b, sq, hq, d) in q's dtype and lse (b, hq, sq) fp32/fp64, computed in ``compute``;
    ``alibi`` slopes (hq,) or (b, hq) add their bias after the softcap; ``dropout`` =
    (seed, threshold) drops probabilities as the kernels do (lse undropped), batch entry b drawing
    as first_batch + b (a varlen document's index); ``sinks`` (hq,): one more logit per head in
    every row's softmax, with no value (GPT-OSS's eager attention: a column, dropped after)."""
    group = q.shape[2] // k.shape[2]
    vc = v.to(compute).repeat_interleave(group, dim=2).transpose(1, 2)
    s = _reference_scores(q, k, scale, window, softcap, compute, alibi)
    if sinks is not None:
        s = torch.cat([s, sinks.to(compute)[None, :, None, None].expand(*s.shape[:-1], 1)], -1)
    # A row with every key masked has max -inf: subtract 0 instead so exp gives 0, not NaN.
    if s.shape[-1] == 0:  # a varlen document with no keys: every row is empty
        m = s.new_zeros(s.shape[:-1] + (1,))
    else:
        m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    if sinks is not None:
        p = p[..., :-1]
    empty = denom == 0
    safe = torch.where(empty, torch.ones_like(denom), denom)
    if dropout is not None:
        seed, threshold = dropout
        keep = dropout_keep_reference(seed, threshold, q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.device,
                                      first_batch)
        p = torch.where(keep, p * (2.0**32 / (2.0**32 - threshold)), torch.zeros_like(p))
    out = (p @ vc) / safe
    lse = torch.where(empty, torch.full_like(denom, float("inf")), m + torch.log(safe)).squeeze(-1)
    lse_dtype = torch.float64 if compute == torch.float64 else torch.float32
    return out.transpose(1, 2).to(q.dtype), lse.to(lse_dtype)


def _fa2_block_n(head_dim: int, dropout: bool, causal: bool, device: torch.device) -> int:
    """The key-block width of flash_attn 2's S_dmask layout on this device (its forward tile: the
    running max a stored probability was scaled by changes from one such block to the next)."""
    if head_dim <= 32:
        return 128
    if head_dim <= 64:
        return 64 if dropout else 128
    if head_dim <= 96 or head_dim > 128:
        return 64
    major, minor = torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)
    return 64 if not dropout and (causal or not (major == 8 and minor > 0)) else 32  # sm_86/89 differ


def _attn_probs_fa2(q, k, scale: float, window: tuple[int, int], softcap: float, alibi, dropout, rows: int,
                    cols: int, first_batch: int = 0) -> torch.Tensor:
    """flash_attn's S_dmask for one dense call: (b, hq, rows, cols) in q's dtype, zero past
    (seqlen_q, seqlen_k). Entry (i, j) is exp(s_ij - M), M the largest score of key blocks j's block
    and after (flash_attn walks key blocks last to first, so that is the running max it scaled by),
    negative where dropout dropped it. Normalising, as flash_attn's tests do, gives the softmax."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = _reference_scores(q, k, scale, window, softcap, compute, alibi)
    sq, sk = s.shape[-2:]
    out = torch.zeros(s.shape[:2] + (rows, cols), dtype=q.dtype, device=q.device)
    if sk == 0 or sq == 0:
        return out
    width = _fa2_block_n(q.shape[-1], dropout is not None, window == (-1, 0), q.device)
    nb = -(-sk // width)
    padded = torch.nn.functional.pad(s, (0, nb * width - sk), value=float("-inf"))
    block_max = padded.view(*s.shape[:-1], nb, width).amax(-1)
    running = block_max.flip(-1).cummax(-1).values.flip(-1).repeat_interleave(width, -1)[..., :sk]
    running = torch.where(torch.isfinite(running), running, torch.zeros_like(running))
    a = torch.exp(s - running)
    if dropout is not None:
        seed, threshold = dropout
        keep = dropout_keep_reference(seed, threshold, q.shape[0], q.shape[2], sq, sk, q.device, first_batch)
        a = torch.where(keep, a, -a)
    out[:, :, :sq, :sk] = a.to(q.dtype)
    return out


def sdpa_can_run(seqlen_q: int, seqlen_k: int, window: tuple[int, int], softcap: float, return_lse: bool) -> bool:
    """True when F.scaled_dot_product_attention computes exactly this call: no softcap or lse (SDPA
    has neither) and no query row without a key (SDPA gives NaN there, tokenforge 0). Rows see
    j in [i + off - left, i + off + right] with off = seqlen_k - seqlen_q; that range is empty for
    some row only when right >= 0 and off + right < 0."""
    right = window[1]
    return softcap <= 0 and not return_lse and seqlen_k > 0 and (right < 0 or seqlen_k - seqlen_q + right >= 0)


def sdpa_dense(q, k, v, scale: float, window: tuple[int, int], dropout_p: float = 0.0) -> torch.Tensor:
    """Attention through F.scaled_dot_product_attention on (b, s, h, d) tensors: causal as SDPA's
    own flag when the mask is its top-left one (seqlen_q == seqlen_k), any other window as a
    bottom-right aligned boolean mask; dropout_p is SDPA's own (its RNG, not the kernels' mask).
    Call only where :func:`sdpa_can_run` says so."""
    sq, sk = q.shape[1], k.shape[1]
    causal_square = window == (-1, 0) and sq == sk
    mask = None if causal_square else _keep_mask(sq, sk, window, q.device)
    # The builtin behind F.scaled_dot_product_attention, called directly: tokenforge.patch_sdpa
    # replaces the Python name and must never route this call back here.
    out = torch._C._nn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         dropout_p=dropout_p, is_causal=causal_square, scale=scale,
                                         enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    return torch.float32 if upcast else dtype


def attention_reference(q, k, v, causal: bool = False, softmax_scale: Optional[float] = None,
                        window: tuple[int, int] = (-1, -1), softcap: float = 0.0, return_lse: bool = False,
                        upcast: bool = True, alibi_slopes: Optional[torch.Tensor] = None,
                        dropout: Optional[tuple[int, int]] = None, sinks: Optional[torch.Tensor] = None):
    """Plain PyTorch attention over q (b, sq, hq, d), k/v (b, sk, hkv, d): materialises the
    (sq, sk) scores. Math in fp32 (float64 for float64 inputs; the input dtype with upcast=False,
    the low-precision baseline of the error bounds). ``dropout`` = (seed, threshold) drops
    probabilities with the kernels' mask (:func:`dropout_keep_reference`); ``sinks`` (hq,)
    attention-sink logits. Returns out, or (out, lse (b, hq, sq))."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _reference_dense(q, k, v, scale, _fold_causal(causal, window), softcap,
                                _compute_dtype(q.dtype, upcast), alibi_slopes,
                                dropout, sinks=sinks)
    return (out, lse) if return_lse else out


def attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                               causal: bool = False, softmax_scale: Optional[float] = None,
                               window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                               return_lse: bool = False, upcast: bool = True,
                               alibi_slopes: Optional[torch.Tensor] = None,
                               dropout: Optional[tuple[int, int]] = None, seqused_q: Optional[torch.Tensor] = None,
                               seqused_k: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None):
    """:func:`attention_reference` per document of packed q (total_q, hq, d), k/v (total_k, hkv, d);
    lse is (hq, total_q). Reads cu_seqlens on the host (a sync: a reference, not a hot path).
    ``dropout`` = (seed, threshold): the kernels' dropout, document b drawing as batch entry b.
    ``seqused_q`` / ``seqused_k`` (batch,): document b is only the first seqused[b] rows from
    cu_seqlens[b]; the other query rows get out 0 and lse +inf."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    win = _fold_causal(causal, window)
    compute = _compute_dtype(q.dtype, upcast)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    batch = len(cq) - 1
    ends_q = [a + n for a, n in zip(cq, seqused_q.tolist())] if seqused_q is not None else cq[1:]
    ends_k = [a + n for a, n in zip(ck, seqused_k.tolist())] if seqused_k is not None else ck[1:]
    lse_dtype = torch.float64 if compute == torch.float64 else torch.float32
    outs, lses = [], []
    for b in range(batch):
        slopes = None if alibi_slopes is None else (alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes)
        o, l = _reference_dense(q[None, cq[b]:ends_q[b]], k[None, ck[b]:ends_k[b]], v[None, ck[b]:ends_k[b]],
                                scale, win, softcap, compute, slopes, dropout, b, sinks)
        outs.append(o[0])
        lses.append(l[0])
    if seqused_q is None:
        out = torch.cat(outs, 0) if outs else q.new_empty(q.shape)
        lse = torch.cat(lses, 1) if lses else q.new_empty((q.shape[1], 0), dtype=lse_dtype)
    else:  # the documents' used rows among rows no document uses
        out = q.new_zeros(q.shape)
        lse = q.new_full((q.shape[1], q.shape[0]), float("inf"), dtype=lse_dtype)
        for b in range(batch):
            out[cq[b]:ends_q[b]] = outs[b]
            lse[:, cq[b]:ends_q[b]] = lses[b]
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Input checks: every refusal says what to do.
# ---------------------------------------------------------------------------------------------


def _fold_causal(causal: bool, window: tuple[int, int]) -> tuple[int, int]:
    """flash_attn's convention: causal is the window (left, 0)."""
    left, right = int(window[0]), int(window[1])
    return (left, 0) if causal else (left, right)


def _check_common(name, q, k, v, dims: int, layout: str, causal, softmax_scale, window, softcap) -> None:
    if any_dtensor(q, k, v):
        raise TypeError(f"{name}: DTensor inputs are not supported; pass each rank's local tensors (x.to_local(), "
                        "q and k/v heads sharded alike), as tensor parallelism runs attention on local heads")
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {label} must be floating point (bfloat16 or float16 for the kernel), got "
                            f"{t.dtype}; convert it first, e.g. {label}.bfloat16()")
        if t.dim() != dims:
            raise ValueError(f"{name}: {label} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v are on {q.device}, {k.device}, {v.device}; move them to one device")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: head_dim of q ({q.shape[-1]}) and k/v ({k.shape[-1]}) must match")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{name}: heads_q ({hq}) must be a multiple of heads_kv ({hkv}) (GQA/MQA); "
                         "repeat the k/v heads or fix the head counts")
    if q.shape[-1] == 0:
        raise ValueError(f"{name}: head_dim must be at least 1, got 0")
    if not isinstance(causal, bool):
        raise TypeError(f"{name}: causal must be a bool, got {causal!r}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"{name}: softmax_scale must be a finite float or None (1/sqrt(head_dim)), got {softmax_scale!r}")
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        raise ValueError(f"{name}: window must be (left, right) ints >= -1 (-1 = unbounded), got {window!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap >= 0 or math.isinf(softcap):
        raise ValueError(f"{name}: softcap must be a finite float >= 0 (0 = off), got {softcap!r}")


def _check_cu_seqlens(name, cu, label, total: int, batch: int, device, max_seqlen) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1:
        raise TypeError(f"{name}: {label} must be a 1-D int32 tensor of document offsets (batch + 1,), got "
                        f"{cu.dtype if isinstance(cu, torch.Tensor) else type(cu).__name__}"
                        f"{'' if not isinstance(cu, torch.Tensor) else ' of shape ' + str(tuple(cu.shape))}")
    if cu.shape[0] != batch + 1:
        raise ValueError(f"{name}: {label} has {cu.shape[0]} entries but must have batch + 1 = {batch + 1} "
                         "(cu_seqlens_q and cu_seqlens_k describe the same documents)")
    if cu.shape[0] < 2:
        raise ValueError(f"{name}: {label} needs at least 2 entries (0 and the total length), got {cu.shape[0]}")
    if cu.device != device:
        raise ValueError(f"{name}: {label} is on {cu.device} but q is on {device}; move it to {device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{name}: max_seqlen for {label} must be an int >= 0, got {max_seqlen!r}")
    # Checking the values reads them on the host: free for CPU tensors, a sync on CUDA (skipped
    # there, as flash_attn does, and while torch.compile traces).
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        c = cu.tolist()
        if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
            raise ValueError(f"{name}: {label} must start at 0, never decrease and end at the packed length "
                             f"{total}; got {c[:8]}{'...' if len(c) > 8 else ''}")
        longest = max(b - a for a, b in zip(c, c[1:]))
        if longest > max_seqlen:
            raise ValueError(f"{name}: a document in {label} has {longest} tokens but max_seqlen is {max_seqlen}; "
                             "pass the longest document length")
    return cu.to(torch.int32)


def _check_seqused(name, used, label, cu: torch.Tensor, batch: int, device) -> Optional[torch.Tensor]:
    """seqused_q / seqused_k as int32, or None: (batch,) counts on q's device, each within its
    document (checked on the host for CPU tensors, as cu_seqlens are)."""
    if used is None:
        return None
    if not isinstance(used, torch.Tensor) or used.dtype not in (torch.int32, torch.int64) or used.dim() != 1:
        raise TypeError(f"{name}: {label} must be a 1-D int32 tensor of per-document counts (batch,), got "
                        f"{used.dtype if isinstance(used, torch.Tensor) else type(used).__name__}")
    if used.shape[0] != batch:
        raise ValueError(f"{name}: {label} has {used.shape[0]} entries but there are {batch} documents")
    if used.device != device:
        raise ValueError(f"{name}: {label} is on {used.device} but q is on {device}; move it to {device}")
    if used.device.type == "cpu" and not torch.compiler.is_compiling():
        room = cu.diff()
        if bool(((used < 0) | (used > room)).any()):
            raise ValueError(f"{name}: {label} must count 0 up to each document's rows in cu_seqlens "
                             f"({room.tolist()[:8]}); got {used.tolist()[:8]}")
    return used.to(torch.int32)


def kernel_head_dim(d: int) -> int:
    """The head dim the kernel runs a head dim ``d`` at: d itself when it is a multiple of 8 in the
    kernels' range, else d zero-padded up to one (flash_attn takes any d <= 256; zero columns add
    nothing to q.k and give zero output columns, sliced off). d past the range stays d (refused)."""
    from tokenforge.kernels import attention as kernels

    if d > kernels.MAX_HEAD_DIM:
        return d
    return max(kernels.MIN_HEAD_DIM, -(-d // 8) * 8)


def _triton_supports(q, k, v) -> Optional[str]:
    reason = backends.triton_unsupported_reason(q.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import attention as kernels

    d = kernel_head_dim(q.shape[-1])
    if d != q.shape[-1]:  # judged at the padded size the call will run at
        q, k, v = (torch.empty(t.shape[:-1] + (d,), dtype=t.dtype, device="meta") for t in (q, k, v))
    return kernels.supports(q, k, v)


def _pad_head_dim(q, k, v):
    """q, k, v zero-padded to :func:`kernel_head_dim` (differentiable; a copy), and the true d."""
    d = q.shape[-1]
    dp = kernel_head_dim(d)
    if dp == d:
        return q, k, v, d
    pad = lambda t: torch.nn.functional.pad(t, (0, dp - d))  # noqa: E731
    return pad(q), pad(k), pad(v), d


def _as_window(window):
    """(left, right) as Python ints when window is a pair of integers in any form flash_attn takes: a
    tuple or list of ints or numpy / 0-d torch integers, or a 2-element integer tensor (flash_attn's
    own tests pass ``torch.randint(0, seqlen_k, (2,))``). Anything else is returned unchanged, for
    _check_common to refuse with what to pass."""
    if isinstance(window, torch.Tensor):
        if window.dtype == torch.bool or window.is_floating_point() or window.is_complex() or window.numel() != 2:
            return window
        return tuple(int(w) for w in window.reshape(2).tolist())
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        return window
    try:
        if any(isinstance(w, bool) or (isinstance(w, torch.Tensor) and w.dtype == torch.bool) for w in window):
            return window
        return tuple(operator.index(w) for w in window)
    except TypeError:
        return window


def _check_flash_attn_keywords(name, dropout_p, window, window_size, alibi_slopes, return_attn_probs):
    """flash_attn's keywords, for code ported from it: window_size is window. Returns the window,
    as Python ints where it is a pair of integers (:func:`_as_window`)."""
    window = _as_window(window) if window is not None else None
    window_size = _as_window(window_size) if window_size is not None else None
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not isinstance(return_attn_probs, bool):
        raise TypeError(f"{name}: return_attn_probs must be True or False, got {return_attn_probs!r}")
    if window_size is not None:
        if window is not None and not (isinstance(window, tuple) and window == window_size):
            raise ValueError(f"{name}: window={window!r} and window_size={window_size!r} disagree; pass one "
                             "(window_size is flash_attn's name for window)")
        return window_size
    return window if window is not None else (-1, -1)


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A forward's (out (rows, hq, d), lse (hq, rows)) without attention sinks -> with them (no
    autograd: the cache-reading kernels' results). Adding a value-less logit s to a row's softmax
    scales its output by exp(lse) / (exp(lse) + exp(s)) = sigmoid(lse - s) and makes its lse
    logaddexp(lse, s); a row that saw no key (out 0, lse +inf) keeps out 0 and gets lse s."""
    s = sinks.float()[:, None]
    seen = torch.isfinite(lse)
    out = (out.float() * torch.where(seen, torch.sigmoid(lse - s), 0.0).t()[..., None]).to(out.dtype)
    return out, torch.where(seen, torch.logaddexp(lse, s), s.expand_as(lse))


def _check_sinks(name: str, sinks, heads: int, device, dropout_p, return_attn_probs) -> Optional[torch.Tensor]:
    """Attention sinks: a floating (heads,) tensor on q's device -> fp32 (autograd-aware: a bf16
    parameter gets its gradient back in bf16); refused with dropout and return_attn_probs."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or tuple(sinks.shape) != (heads,):
        raise ValueError(f"{name}: sinks must be a floating-point tensor of shape ({heads},), one logit per query "
                         f"head, got {getattr(sinks, 'dtype', type(sinks).__name__)} "
                         f"{tuple(getattr(sinks, 'shape', ()))}")
    if sinks.device != device:
        raise ValueError(f"{name}: sinks is on {sinks.device} but q is on {device}; move it")
    if float(dropout_p) > 0.0 or return_attn_probs:
        raise ValueError(f"{name}: sinks are not taken with "
                         f"{'dropout_p > 0' if float(dropout_p) > 0.0 else 'return_attn_probs'}; drop one of the two")
    return sinks.float().contiguous()


def alibi_slopes(heads: int, device=None) -> torch.Tensor:
    """The ALiBi paper's slopes for ``heads`` heads, fp32 (heads,): the geometric sequence
    2^(-8 i / n), i = 1..n, for the nearest power of two n <= heads, then every other term of the
    sequence for 2n for the heads beyond it (as BLOOM and MPT build them)."""
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"alibi_slopes: heads must be a positive int, got {heads!r}")
    n = 2 ** int(math.floor(math.log2(heads)))
    slopes = [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
    slopes += [2.0 ** (-4.0 * i / n) for i in range(1, 2 * (heads - n), 2)]  # odd terms of the 2n sequence
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def _check_alibi(name: str, alibi_slopes, heads: int, batch: int, device) -> Optional[torch.Tensor]:
    """flash_attn's alibi_slopes: fp32 (heads,) or (batch, heads) on q's device, one slope per
    query head (and batch entry, or document for varlen). Returns them contiguous, or None."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32 \
            or tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"{name}: alibi_slopes must be a float32 tensor of shape ({heads},) or ({batch}, {heads}) "
                         f"(one slope per query head, optionally per batch entry), got "
                         f"{getattr(alibi_slopes, 'dtype', type(alibi_slopes).__name__)} "
                         f"{tuple(getattr(alibi_slopes, 'shape', ()))}")
    if alibi_slopes.device != device:
        raise ValueError(f"{name}: alibi_slopes is on {alibi_slopes.device} but q is on {device}; move it")
    return alibi_slopes.contiguous()


def _cuda_supports(q, k, v) -> Optional[str]:
    from tokenforge.cuda import attention as cuda_attention

    return cuda_attention.supports(q, k, v)


backends.register_op(
    OP,
    cuda_preference=("triton", "cuda"),
    supports={"triton": _triton_supports, "cuda": _cuda_supports, "torch": lambda q, k, v: None},
    example_inputs=lambda device, dtype: tuple(torch.empty(1, 128, 8, 64, device=device, dtype=dtype)
                                               for _ in range(3)),
)


# ---------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees. Dense q is (b, sq, hq, d), varlen q is (total, hq, d)
# (cu_seqlens given). window has causal folded in. Head dims have unit stride.
# ---------------------------------------------------------------------------------------------


# The custom ops below call their backend's launcher through this table (no dispatch in between).
LAUNCHERS = backends.Launchers(OP, triton="tokenforge.kernels.attention", cuda="tokenforge.cuda.attention")


def _feature_kwargs(alibi_slopes: Optional[torch.Tensor], dropout_p: float, dropout_seed: Optional[torch.Tensor]) -> dict:
    """The launcher keywords of what only the Triton launchers take (the cuda backend refuses both
    before it launches): ALiBi slopes, and dropout as (seed, threshold)."""
    kw = {} if alibi_slopes is None else {"alibi": alibi_slopes}
    if dropout_p > 0.0:
        kw["dropout"] = (dropout_seed, dropout_threshold(dropout_p))
    return kw


def _dropout_seed(device=None) -> torch.Tensor:
    """A fresh seed for one call's dropout mask: an int64 scalar tensor drawn by ``device``'s
    default generator on that device (the kernels load it; no host sync). So torch.manual_seed
    makes masks reproducible, activation checkpointing (which restores the RNG state for its
    recompute) redraws the same one, CUDA graphs capture the draw, and a model-parallel RNG
    tracker (Megatron's fork of the CUDA generator) gives each rank its own masks."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def _seqused_kwargs(seqused_q: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor]) -> dict:
    """The Triton launchers' seqused keywords, only those given (the cuda launcher has none)."""
    return {name: t for name, t in (("seqused_q", seqused_q), ("seqused_k", seqused_k)) if t is not None}


def _lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op("tokenforge::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                  cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float,
                  window_left: int, window_right: int, softcap: float, backend: str,
                  alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                  dropout_seed: Optional[torch.Tensor] = None, seqused_k: Optional[torch.Tensor] = None,
                  seqused_q: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    # dropout_seed: the int64 scalar tensor of _dropout_seed (an input, so the op is a function of
    # its arguments and the backward redraws the forward's mask). seqused_q / seqused_k (Triton):
    # each batch entry's query / key count from cu_seqlens[b] (varlen: attention_over_cache_rows;
    # dense, cu_seqlens then the starts: attention_padded). sinks (Triton): fp32 (hq,) sink logits;
    # the backward op needs nothing more (lse includes them).
    return LAUNCHERS[backend].attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                 scale, (window_left, window_right), softcap,
                                                 **_feature_kwargs(alibi_slopes, dropout_p, dropout_seed),
                                                 **_seqused_kwargs(seqused_q, seqused_k),
                                                 **({} if sinks is None else {"sinks": sinks}))


@attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
      softcap, backend, alibi_slopes=None, dropout_p=0.0, dropout_seed=None, seqused_k=None, seqused_q=None,
      sinks=None):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, q.dim() == 3), dtype=torch.float32)


@torch.library.custom_op("tokenforge::attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                  max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int,
                  softcap: float, deterministic: bool, backend: str, alibi_slopes: Optional[torch.Tensor] = None,
                  dropout_p: float = 0.0, dropout_seed: Optional[torch.Tensor] = None,
                  seqused_q: Optional[torch.Tensor] = None, seqused_k: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # deterministic=False lets a backward add dq with atomics in one pass (Triton on sm_90 at d <= 64,
    # always the cuda backend); True takes Triton's two-pass backward, bitwise reproducible (the op
    # layer refuses True for cuda: check_call).
    return LAUNCHERS[backend].attention_backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                  max_seqlen_k, scale, (window_left, window_right), softcap,
                                                  deterministic,
                                                  **_feature_kwargs(alibi_slopes, dropout_p, dropout_seed),
                                                  **_seqused_kwargs(seqused_q, seqused_k))


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
      window_right, softcap, deterministic, backend, alibi_slopes=None, dropout_p=0.0, dropout_seed=None,
      seqused_q=None, seqused_k=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when its head dim has unit stride (SDPA's transposed views qualify), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


class AttentionFunction(torch.autograd.Function):
    """Autograd for the kernel backend: saves q, k, v, out and lse (fp32, one per query row)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window, softcap,
                deterministic, backend, alibi_slopes=None, dropout_p=0.0, dropout_seed=None, seqused_q=None,
                seqused_k=None, sinks=None):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        out, lse = torch.ops.tokenforge.attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                      max_seqlen_k, scale, window[0], window[1], softcap, backend,
                                                      alibi_slopes, dropout_p, dropout_seed, seqused_k, seqused_q,
                                                      sinks)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, dropout_seed, seqused_q,
                              seqused_k, sinks)
        ctx.args = (max_seqlen_q, max_seqlen_k, scale, window[0], window[1], softcap, deterministic, backend)
        ctx.dropout_p = dropout_p
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k, alibi_slopes, dropout_seed, seqused_q, seqused_k, sinks = ctx.saved_tensors
        dout = _unit_last(dout.to(q.dtype))
        dq, dk, dv = torch.ops.tokenforge.attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args, alibi_slopes,
                                                        ctx.dropout_p, dropout_seed, seqused_q, seqused_k)
        dsinks = _sink_grad(dout, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[17] else None
        return dq, dk, dv, *([None] * 14), dsinks


def _sink_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """d loss / d sinks (hq,) fp32: a sink has no value, so its logit's gradient is
    -sum over rows of p_sink * rowsum(dO * O), p_sink = exp(sink - lse); rows no program wrote
    (lse +inf) add 0. Dense out (b, s, hq, d) with lse (b, hq, s); varlen (total, hq, d), (hq, total)."""
    delta = (dout.float() * out.float()).sum(-1)  # (b, s, hq) or (total, hq)
    if out.dim() == 4:
        p_sink = torch.exp(sinks[None, :, None] - lse)  # (b, hq, s)
        return -(p_sink * delta.transpose(1, 2)).sum((0, 2))
    return -(torch.exp(sinks[:, None] - lse) * delta.t()).sum(1)


def _distinct(*tensors):
    """While torch.compile traces, the tensors each replaced by another of the same values (a view
    for q, k, v: free; a copy for the small int32 offsets and counts): dynamo refuses one tensor
    passed twice to an autograd.Function (self-attention's attention(x, x, x); one cu_seqlens for
    q and k), and two different tensors can trace to one graph node there (cu.to(torch.int32) of an
    int32 cu_seqlens given as both). Eager autograd takes repeats: unchanged, nothing launched."""
    if not torch.compiler.is_compiling():
        return tensors
    return [t if t is None else t.view(t.shape) if t.is_floating_point() else t.clone() for t in tensors]


def _run_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, win, softcap, deterministic, name, alibi=None,
                dropout_p: float = 0.0, dropout_seed: Optional[torch.Tensor] = None, seqused_q=None, seqused_k=None,
                sinks=None):
    """AttentionFunction at the kernel's head dim (zero-padded when d is not one), out sliced back."""
    if name == "cuda":  # what the CUDA C++ kernels do not do, refused before anything runs
        from tokenforge.cuda import attention as cuda_attention

        cuda_attention.check_call(softcap, scale, deterministic)
        for feature, used in (("ALiBi", alibi is not None), ("attention dropout", dropout_p > 0.0),
                              ("attention sinks", sinks is not None)):
            if used:
                raise ValueError(f"attention: backend='cuda' has no {feature}; use backend='triton' (the default) "
                                 "for it")
    qp, kp, vp, d = _pad_head_dim(q, k, v)
    qp, kp, vp, cu_q, cu_k, seqused_q, seqused_k = _distinct(qp, kp, vp, cu_q, cu_k, seqused_q, seqused_k)
    out, lse = AttentionFunction.apply(qp, kp, vp, cu_q, cu_k, max_q, max_k, scale, win, softcap, deterministic,
                                       name, alibi, dropout_p, dropout_seed, seqused_q, seqused_k, sinks)
    return (out[..., :d] if out.shape[-1] != d else out), lse


def _returns(out, lse, return_lse: bool, return_attn_probs: bool, attn_probs=None):
    """flash_attn's return_attn_probs gives (out, softmax_lse, S_dmask), S_dmask None without
    dropout (flash_attn returns no probabilities then either)."""
    if return_attn_probs:
        return out, lse, attn_probs
    return (out, lse) if return_lse else out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
              softmax_scale: Optional[float] = None, causal: bool = False,
              window_size: Optional[tuple[int, int]] = None, softcap: float = 0.0, alibi_slopes=None,
              deterministic: bool = False, return_attn_probs: bool = False, *,
              window: Optional[tuple[int, int]] = None, return_lse: bool = False, backend: Optional[str] = None,
              sinks: Optional[torch.Tensor] = None):
    """Attention of q (b, sq, hq, d) over k/v (b, sk, hkv, d), hq % hkv == 0; bf16/fp16 on the kernel
    (any head_dim up to 256: one that is not a multiple of 8 in 32..256 is zero-padded to one).
    Returns out (b, sq, hq, d), plus lse (b, hq, sq) fp32 with return_lse. causal is bottom-right
    aligned; window (or flash_attn's window_size) = (left, right), -1 unbounded; softcap > 0 caps
    scores at softcap * tanh(s / softcap); alibi_slopes, fp32 (hq,) or (b, hq), add flash_attn's ALiBi
    bias -slope * |i + sk - sq - j| to the (capped) score of query i and key j. dropout_p drops
    each attention probability with that probability and scales the kept ones by 1 / (1 - p), as
    flash_attn and SDPA do (lse stays the undropped one); the mask is Philox's, seeded from the default
    generator of q's device (torch.manual_seed reproduces it; activation checkpointing redraws it).
    ``backend`` forces triton, cuda (CUDA C++, sm_90a: bf16, d 64/128, no softcap, ALiBi or
    dropout, dq by atomics so deterministic=True is refused) or torch (on CUDA that is SDPA, with
    SDPA's own dropout mask, where SDPA can express the call).

    The positional order and keywords are flash_attn_func's, so ported code runs unchanged:
    return_attn_probs=True returns (out, lse, S_dmask), S_dmask flash_attn 2's (b, hq, sq, sk)
    probabilities (rounded up to 128) with the dropped ones negative, for testing (it materialises
    the scores), or None when dropout_p is 0, as flash_attn.

    ``sinks`` (hq,) floating point, with autograd: attention sinks (GPT-OSS), one learned logit per
    query head that each row's softmax also normalises over and that has no value, so a row can
    put weight on nothing (lse includes it). Not with dropout, return_attn_probs or backend='cuda'."""
    window = _check_flash_attn_keywords("attention", dropout_p, window, window_size, alibi_slopes,
                                        return_attn_probs)
    _check_common("attention", q, k, v, 4, "(batch, seqlen, heads, head_dim)", causal, softmax_scale, window,
                  softcap)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: q has batch {q.shape[0]} but k/v have batch {k.shape[0]}")
    if k.shape[1] == 0 and q.shape[1] > 0:
        raise ValueError("attention: seqlen_k must be at least 1 (there is nothing to attend to)")
    alibi = _check_alibi("attention", alibi_slopes, q.shape[2], q.shape[0], q.device)
    sinks = _check_sinks("attention", sinks, q.shape[2], q.device, dropout_p, return_attn_probs)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    win = _fold_causal(causal, window)
    name = backends.choose(OP, q, k, v, backend=backend)
    want_lse = return_lse or return_attn_probs
    p = float(dropout_p)
    if name == "torch" and q.is_cuda and q.numel() and alibi is None and sinks is None \
            and sdpa_can_run(q.shape[1], k.shape[1], win, softcap, want_lse):
        return sdpa_dense(q, k, v, scale, win, p)
    seed = _dropout_seed(q.device) if p > 0.0 else None
    if name == "torch" or q.numel() == 0:
        out, lse = _reference_dense(q, k, v, scale, win, float(softcap), _compute_dtype(q.dtype, True), alibi,
                                    _reference_dropout(p, seed), sinks=sinks)
    else:
        out, lse = _run_kernel(q, k, v, None, None, q.shape[1], k.shape[1], scale, win, float(softcap),
                               bool(deterministic), name, alibi, p, seed, sinks=sinks)
    probs = None
    if return_attn_probs and seed is not None:
        probs = _attn_probs_fa2(q, k, scale, win, float(softcap), alibi, _reference_dropout(p, seed),
                                _round128(q.shape[1]), _round128(k.shape[1]))
    return _returns(out, lse, return_lse, return_attn_probs, probs)


def _round128(n: int) -> int:
    return -(-n // 128) * 128


def _reference_dropout(p: float, seed: Optional[torch.Tensor]):
    """The torch reference's dropout argument (seed, threshold), or None. Only
    the reference paths read the seed as an int (a sync on CUDA; the kernel path hands the tensor
    to the op, so torch.compile sees no .item())."""
    return None if seed is None else (int(seed), dropout_threshold(p))


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                     softmax_scale: Optional[float] = None, causal: bool = False,
                     window_size: Optional[tuple[int, int]] = None, softcap: float = 0.0, alibi_slopes=None,
                     deterministic: bool = False, return_attn_probs: bool = False, block_table=None, *,
                     window: Optional[tuple[int, int]] = None, return_lse: bool = False,
                     backend: Optional[str] = None, seqused_q: Optional[torch.Tensor] = None,
                     seqused_k: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None):
    """Attention within each packed document: q (total_q, hq, d), k/v (total_k, hkv, d), document b is
    rows cu_seqlens[b]:cu_seqlens[b+1] (int32, batch + 1 entries); max_seqlen_* bound the document
    lengths and size the grid (no host sync). Returns out (total_q, hq, d), plus lse (hq, total_q).
    Arguments in flash_attn_varlen_func's order, with :func:`attention`'s rules for them.
    ``block_table`` (batch, blocks per document), int32: flash_attn's paged KV cache, k/v then
    (num_blocks, page_size, hkv, d) and document b's key i at page block_table[b, i // page_size],
    row i % page_size; the pages are gathered into rows first (one host sync for the row count).
    ``seqused_q`` / ``seqused_k`` (batch,) int32, flash_attn 3's: document b is only the first
    seqused[b] of its rows (say, buffers of fixed capacity filled to different lengths); the other
    query rows get out 0 and lse +inf, the other rows no gradient. Not with return_attn_probs, and
    not on backend='cuda'. ``sinks`` (hq,): attention sinks, as :func:`attention`."""
    if block_table is not None:
        k, v = _gather_pages("attention_varlen", k, v, block_table, cu_seqlens_k)
    window = _check_flash_attn_keywords("attention_varlen", dropout_p, window, window_size, alibi_slopes,
                                        return_attn_probs)
    _check_common("attention_varlen", q, k, v, 3, "(total_tokens, heads, head_dim)", causal, softmax_scale,
                  window, softcap)
    batch = (cu_seqlens_q.shape[0] - 1) if isinstance(cu_seqlens_q, torch.Tensor) and cu_seqlens_q.dim() == 1 else 0
    cu_q = _check_cu_seqlens("attention_varlen", cu_seqlens_q, "cu_seqlens_q", q.shape[0], batch, q.device,
                             max_seqlen_q)
    cu_k = _check_cu_seqlens("attention_varlen", cu_seqlens_k, "cu_seqlens_k", k.shape[0], batch, q.device,
                             max_seqlen_k)
    used_q = _check_seqused("attention_varlen", seqused_q, "seqused_q", cu_q, batch, q.device)
    used_k = _check_seqused("attention_varlen", seqused_k, "seqused_k", cu_k, batch, q.device)
    alibi = _check_alibi("attention_varlen", alibi_slopes, q.shape[1], batch, q.device)
    sinks = _check_sinks("attention_varlen", sinks, q.shape[1], q.device, dropout_p, return_attn_probs)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    win = _fold_causal(causal, window)
    name = backends.choose(OP, q, k, v, backend=backend)
    if (used_q is not None or used_k is not None) and (return_attn_probs or name == "cuda"):
        raise ValueError("attention_varlen: seqused_q / seqused_k are not taken with "
                         f"{'return_attn_probs' if return_attn_probs else 'backend=cuda'}; drop one of the two "
                         "(backend='triton', the default, takes seqused)")
    p = float(dropout_p)
    seed = _dropout_seed(q.device) if p > 0.0 else None
    if name == "torch" or q.numel() == 0:
        out, lse = attention_varlen_reference(q, k, v, cu_q, cu_k, causal=False, softmax_scale=scale, window=win,
                                              softcap=float(softcap), return_lse=True, alibi_slopes=alibi,
                                              dropout=_reference_dropout(p, seed), seqused_q=used_q,
                                              seqused_k=used_k, sinks=sinks)
    else:
        out, lse = _run_kernel(q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), scale, win,
                               float(softcap), bool(deterministic), name, alibi, p, seed, used_q, used_k, sinks)
    probs = None
    if return_attn_probs and seed is not None:
        probs = _attn_probs_varlen(q, k, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), scale, win,
                                   float(softcap), alibi, _reference_dropout(p, seed))
    return _returns(out, lse, return_lse, return_attn_probs, probs)


def check_cache_options(name: str, q, k_rows, v_rows, batch: int, softmax_scale, causal, window_size, softcap,
                        alibi_slopes) -> tuple[float, tuple[int, int], Optional[torch.Tensor]]:
    """The KV-cache kernels' options checked as :func:`attention_varlen` checks them, for q and the
    cache as rows (total, heads, d): (scale, window with causal folded in, fp32 ALiBi slopes or None)."""
    window = _check_flash_attn_keywords(name, 0.0, None, window_size, alibi_slopes, False)
    _check_common(name, q, k_rows, v_rows, 3, "(total_tokens, heads, head_dim)", causal, softmax_scale, window,
                  softcap)
    alibi = _check_alibi(name, alibi_slopes, q.shape[1], batch, q.device)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return scale, _fold_causal(causal, window), alibi


def attention_over_cache_rows(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              starts_k: torch.Tensor, used_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                              softmax_scale: Optional[float], causal: bool, window_size, softcap: float,
                              alibi_slopes) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of :func:`attention_varlen`'s forward on the Triton kernel, except that document
    b's keys are rows starts_k[b] .. starts_k[b] + used_k[b] - 1 of k_rows/v_rows (int32 (batch,)
    each): anywhere, apart, in any order. A dense KV cache (batch_cache, seqlen_cache, heads, d)
    flattened to rows is read where it is, with no gather (attention_with_kvcache's dense caches).
    No autograd. The caller has checked that the rows exist and that the kernel takes these inputs
    (head dim a kernel tile, unit stride); the options are checked here as attention_varlen does."""
    scale, win, alibi = check_cache_options("attention_with_kvcache", q, k_rows, v_rows, starts_k.shape[0],
                                            softmax_scale, causal, window_size, softcap, alibi_slopes)
    return torch.ops.tokenforge.attention_fwd(q, k_rows, v_rows, cu_seqlens_q, starts_k, int(max_seqlen_q),
                                              int(max_seqlen_k), scale, win[0], win[1], float(softcap), "triton",
                                              alibi, 0.0, None, used_k)


def kernel_reads_in_place(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = None) -> bool:
    """Whether the Triton kernel reads these tensors where they are (:func:`attention_padded`, a KV
    cache as rows): it is the backend, the head dim is a kernel tile (no zero-padded copy) and its
    stride is 1."""
    if backends.choose(OP, q, k, v, backend=backend) != "triton":
        return False
    return kernel_head_dim(q.shape[-1]) == q.shape[-1] and all(t.stride(-1) == 1 for t in (q, k, v))


def attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts_q: torch.Tensor,
                     used_q: torch.Tensor, starts_k: torch.Tensor, used_k: torch.Tensor, max_used_q: int,
                     max_used_k: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                     causal: bool = False, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     deterministic: bool = False, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`attention` over a padded batch, read where it is (no gather of the live rows, no
    scatter of the output): q (b, sq, hq, d), k/v (b, sk, hkv, d); sequence b's queries are rows
    starts_q[b] .. starts_q[b] + used_q[b] - 1 of q[b], its keys the used_k[b] rows from
    starts_k[b] of k[b] and v[b] (int32 (b,) each: left or right padding, every row's live tokens
    one stretch), the longest stretches max_used_q / max_used_k. Each sequence is what
    :func:`attention_varlen` computes for it as one document (causal aligns the stretches' ends,
    dropout draws the same mask); out is 0 on the other query rows, and their gradients (and the
    other key rows') are 0. With autograd, on the Triton kernel: the caller has checked
    :func:`kernel_reads_in_place` and that the stretches lie within the rows (the Hugging Face
    implementation builds them from the padding mask); the options are checked as attention's
    (``sinks`` too)."""
    _check_common("attention_padded", q, k, v, 4, "(batch, seqlen, heads, head_dim)", causal, softmax_scale,
                  window, softcap)
    batch = q.shape[0]
    for name, t in (("starts_q", starts_q), ("used_q", used_q), ("starts_k", starts_k), ("used_k", used_k)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.shape != (batch,) or t.device != q.device:
            raise ValueError(f"attention_padded: {name} must be an int32 tensor of shape ({batch},) on {q.device}, "
                             f"got {t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    # The stretches checked on the host for CPU tensors (as cu_seqlens are); on CUDA that is a sync.
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        for label, starts, used, rows, longest in (("q", starts_q, used_q, q.shape[1], max_used_q),
                                                   ("k", starts_k, used_k, k.shape[1], max_used_k)):
            if bool(((starts < 0) | (used < 0) | (starts + used > rows) | (used > longest)).any()):
                raise ValueError(f"attention_padded: the {label} stretches must lie within its {rows} rows and be "
                                 f"at most max_used_{label} = {longest} long; got starts {starts.tolist()[:8]}, "
                                 f"counts {used.tolist()[:8]}")
    sinks = _check_sinks("attention_padded", sinks, q.shape[2], q.device, dropout_p, False)
    q, k, v, starts_q, used_q, starts_k, used_k = _distinct(q, k, v, starts_q, used_q, starts_k, used_k)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    p = float(dropout_p)
    seed = _dropout_seed(q.device) if p > 0.0 else None
    out, _ = AttentionFunction.apply(q, k, v, starts_q, starts_k, int(max_used_q), int(max_used_k), scale,
                                     _fold_causal(causal, window), float(softcap), bool(deterministic), "triton",
                                     None, p, seed, used_q, used_k, sinks)
    return out


def _gather_pages(name: str, k_pages, v_pages, block_table, cu_seqlens_k) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v as (total_k, hkv, d) rows from a paged cache: row j of document b (cu_seqlens_k[b] + i)
    is page block_table[b, i // page_size], slot i % page_size. Gradients flow to the pages. Two host
    syncs: the row count with the boundary checks, then the page-range check."""
    shape = tuple(getattr(k_pages, "shape", ()))
    if not (isinstance(k_pages, torch.Tensor) and isinstance(v_pages, torch.Tensor) and k_pages.dim() == 4
            and v_pages.dim() == 4 and v_pages.shape[:2] == k_pages.shape[:2]):
        raise ValueError(f"{name}: with block_table, k and v are paged caches (num_blocks, page_size, heads, "
                         f"head_dim) with the same pages; got {shape} and {tuple(getattr(v_pages, 'shape', ()))}")
    if not (isinstance(block_table, torch.Tensor) and block_table.dim() == 2
            and block_table.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name}: block_table must be an int32 (batch, blocks per document) tensor, got "
                         f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                         f"{tuple(getattr(block_table, 'shape', ()))}")
    if not (isinstance(cu_seqlens_k, torch.Tensor) and cu_seqlens_k.dim() == 1
            and cu_seqlens_k.shape[0] == block_table.shape[0] + 1 and not cu_seqlens_k.is_floating_point()):
        raise ValueError(f"{name}: with block_table (batch {block_table.shape[0]}), cu_seqlens_k must be an "
                         f"int32 tensor of batch + 1 = {block_table.shape[0] + 1} document boundaries")
    if block_table.device != k_pages.device or cu_seqlens_k.device != k_pages.device:
        raise ValueError(f"{name}: block_table and cu_seqlens_k must be on k's device {k_pages.device}")
    num_blocks, page = k_pages.shape[:2]
    cu = cu_seqlens_k.long()
    lengths = cu[1:] - cu[:-1]
    capacity = block_table.shape[1] * page
    longest = lengths.max() if lengths.numel() else cu.new_zeros(())
    shortest = lengths.min() if lengths.numel() else cu.new_zeros(())
    total, first, shortest, longest = torch.stack((cu[-1], cu[0], shortest, longest)).tolist()  # one sync
    if shortest < 0 or first != 0 or longest > capacity:
        raise ValueError(f"{name}: cu_seqlens_k must start at 0 and rise by at most block_table.shape[1] x "
                         f"page_size = {capacity} keys per document, got {cu_seqlens_k.tolist()}")
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)
    pos = torch.arange(total, device=cu.device) - cu[doc]
    blocks = block_table.long()[doc, pos // page]
    if blocks.numel() and bool(((blocks < 0) | (blocks >= num_blocks)).any()):
        raise ValueError(f"{name}: block_table names a page outside 0..{num_blocks - 1} for a key "
                         "cu_seqlens_k says is in use")
    rows = blocks * page + pos % page
    return k_pages.flatten(0, 1)[rows], v_pages.flatten(0, 1)[rows]


def _attn_probs_varlen(q, k, cu_q, cu_k, max_seqlen_q: int, max_seqlen_k: int, scale, win, softcap, alibi, drop):
    """flash_attn's varlen S_dmask: (documents, hq, max_seqlen_q, max_seqlen_k) rounded up to 128,
    document b's probabilities at its top left (:func:`_attn_probs_fa2` per document)."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    rows, cols = _round128(max_seqlen_q), _round128(max_seqlen_k)
    docs = []
    for b in range(len(cq) - 1):
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        docs.append(_attn_probs_fa2(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], scale, win, softcap, slopes,
                                    drop, rows, cols, first_batch=b))
    return torch.cat(docs, 0)


def _unpack(name: str, packed, count: int, layout: str):
    """The count tensors packed along dim -3 of ``packed`` (flash_attn's qkv / kv layout), as views."""
    if not isinstance(packed, torch.Tensor) or packed.dim() != len(layout.split(",")) or packed.shape[-3] != count:
        raise ValueError(f"{name}: expected a {layout} tensor with {count} at dim -3, got "
                         f"{tuple(getattr(packed, 'shape', ())) or type(packed).__name__}")
    return packed.unbind(-3)


def attention_qkvpacked(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                        causal: bool = False, window_size: Optional[tuple[int, int]] = None, softcap: float = 0.0,
                        alibi_slopes=None, deterministic: bool = False, return_attn_probs: bool = False, **kw):
    """flash_attn_qkvpacked_func: :func:`attention` of qkv (batch, seqlen, 3, heads, head_dim) = q, k, v
    stacked at dim 2 (read in place, as views); the gradient comes back packed the same way."""
    q, k, v = _unpack("attention_qkvpacked", qkv, 3, "(batch, seqlen, 3, heads, head_dim)")
    return attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                     return_attn_probs, **kw)


def attention_kvpacked(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                       causal: bool = False, window_size: Optional[tuple[int, int]] = None, softcap: float = 0.0,
                       alibi_slopes=None, deterministic: bool = False, return_attn_probs: bool = False, **kw):
    """flash_attn_kvpacked_func: :func:`attention` of q (batch, seqlen_q, heads, head_dim) over
    kv (batch, seqlen_k, 2, kv_heads, head_dim) = k, v stacked at dim 2."""
    k, v = _unpack("attention_kvpacked", kv, 2, "(batch, seqlen_k, 2, kv_heads, head_dim)")
    return attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                     return_attn_probs, **kw)


def attention_varlen_qkvpacked(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, dropout_p: float = 0.0,
                               softmax_scale: Optional[float] = None, causal: bool = False,
                               window_size: Optional[tuple[int, int]] = None, softcap: float = 0.0,
                               alibi_slopes=None, deterministic: bool = False, return_attn_probs: bool = False, **kw):
    """flash_attn_varlen_qkvpacked_func: :func:`attention_varlen` of qkv (total, 3, heads, head_dim),
    the same documents for queries and keys."""
    q, k, v = _unpack("attention_varlen_qkvpacked", qkv, 3, "(total_tokens, 3, heads, head_dim)")
    return attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                            window_size, softcap, alibi_slopes, deterministic, return_attn_probs, **kw)


def attention_varlen_kvpacked(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                              dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
                              window_size: Optional[tuple[int, int]] = None, softcap: float = 0.0, alibi_slopes=None,
                              deterministic: bool = False, return_attn_probs: bool = False, **kw):
    """flash_attn_varlen_kvpacked_func: :func:`attention_varlen` of q (total_q, heads, head_dim) over
    kv (total_k, 2, kv_heads, head_dim)."""
    k, v = _unpack("attention_varlen_kvpacked", kv, 2, "(total_tokens, 2, kv_heads, head_dim)")
    return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                            causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, **kw)


def tune(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, dtype=torch.bfloat16,
         causal: bool = True, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
         device: Optional[torch.device] = None) -> dict:
    """Time every candidate config of the forward and backward kernels for this shape on this GPU
    and store the winners in the on-disk tuning cache (kernels/attention.py: ``cache_path()``),
    where training steps find them without timing anything. Returns {key: config} of this call."""
    import os

    from tokenforge.kernels import attention as kernels_attention

    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError("tuning needs a CUDA GPU: the tuner times the kernels on the device it tunes for")
    q = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    old = os.environ.get("TOKENFORGE_AUTOTUNE")
    os.environ["TOKENFORGE_AUTOTUNE"] = "on"
    try:
        kernels_attention.clear_tuned_configs()  # time again, even what this process already chose
        for deterministic in (False, True):  # the one-pass backward (where it runs) and the two-pass one
            attention(q, k, v, causal=causal, window=window, softcap=softcap, deterministic=deterministic,
                      backend="triton").sum().backward()
        torch.cuda.synchronize(device)
    finally:
        if old is None:
            os.environ.pop("TOKENFORGE_AUTOTUNE", None)
        else:
            os.environ["TOKENFORGE_AUTOTUNE"] = old
    return kernels_attention.tuned_configs()
