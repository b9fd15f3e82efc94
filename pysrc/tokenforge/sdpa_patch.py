"""Route ``torch.nn.functional.scaled_dot_product_attention`` to tokenforge's fused attention.

    with tokenforge.patch_sdpa():          # a block of code
        loss = model(batch).loss
    tokenforge.sdpa_patch.install()        # or a whole script (uninstall() undoes it)

A call is routed when the kernel computes exactly what SDPA would: 4-D (batch, heads, seq, dim)
fp16/bf16 q, k, v on a device where the Triton kernel runs; no attn_mask, or a boolean key-padding
mask (shape (batch or 1, 1, 1, seqlen_k), or one the same for every head and query, as
transformers' encoders build it) whose live keys are one non-empty stretch in every row (left or
right padding: the kernel reads that stretch in place, tokenforge.ops.attention.attention_padded;
the mask is read on the host once per mask tensor, which the layers of a forward share);
dropout_p in [0, 1)
(the kernel's own dropout: SDPA's semantics, tokenforge's Philox mask, so not SDPA's random
numbers); is_causal only with seqlen_q == seqlen_k (SDPA aligns its causal mask to the top left, flash_attn
and tokenforge to the bottom right: they agree only on square masks); heads_q == heads_kv, or
heads_q % heads_kv == 0 with enable_gqa=True; a head dim the kernel has tiles for (no padding). Every other call goes
to the original function untouched (same arguments, same errors). SDPA's layout is read through
transposed views, no copies. Code that bound the function before patching
(``from torch.nn.functional import scaled_dot_product_attention``) keeps the original.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_original = None
# How many calls were routed to the kernel or passed through, since install (tests, debugging).
stats = {"routed": 0, "passed": 0}


def _route_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, extra) -> Optional[str]:
    """None when the call can go to the kernel, else why not."""
    from tokenforge import backends
    from tokenforge.dtensor import any_dtensor
    from tokenforge.ops import attention as _registers_the_op  # noqa: F401

    if extra:
        return f"unknown arguments {sorted(extra)}"
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return "non-tensor inputs"
    if any_dtensor(query, key, value):
        return "DTensor inputs (SDPA shards them itself; the kernel takes local tensors)"
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        return "dropout_p outside [0, 1)"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "not 4-D"
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in (torch.float16, torch.bfloat16):
        return "dtype"
    if key.shape != value.shape or query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1]:
        return "shapes"
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv and not (enable_gqa and hkv > 0 and hq % hkv == 0):
        return "heads"
    if is_causal and query.shape[2] != key.shape[2]:
        return "causal with seqlen_q != seqlen_k (SDPA aligns top-left)"
    if key.shape[2] == 0 or query.numel() == 0:
        return "empty"
    if scale is not None and not isinstance(scale, (int, float)):
        return "scale"
    from tokenforge.ops.attention import kernel_head_dim

    if kernel_head_dim(query.shape[-1]) != query.shape[-1]:
        # tokenforge.ops.attention would zero-pad it (a copy, more FLOPs); SDPA runs it as it is.
        return "a head dim the kernel would pad"
    if attn_mask is not None and (is_causal or _key_padding(attn_mask, query, key) is None):
        return "attn_mask (other than a boolean key-padding mask of one stretch of keys per row)"
    return backends.why_not("attention", "triton", query, key, value)


def _key_stretches(rows: torch.Tensor, seqlen_q: int):
    """(starts_q, used_q, starts_k, used_k, longest key stretch) of a (batch, seqlen_k) boolean
    key-padding mask whose live keys are one non-empty stretch in every row (every query live),
    else None. Reads the mask on the host (one sync)."""
    from tokenforge.hf_attention import _plan_from_mask

    plan = _plan_from_mask(rows)
    used_k = plan.cu.diff()
    if not plan.one_stretch or not bool((used_k > 0).all()):  # SDPA gives NaN rows for no key at all
        return None
    batch = rows.shape[0]
    starts_q = torch.zeros(batch, dtype=torch.int32, device=rows.device)
    used_q = torch.full((batch,), seqlen_q, dtype=torch.int32, device=rows.device)
    return starts_q, used_q, plan.starts, used_k, plan.longest


def _key_padding(attn_mask, query, key):
    """_key_stretches of ``attn_mask`` when it is a boolean key-padding mask for these 4-D query
    and key, else None; memoised per mask tensor (tokenforge.hf_attention._memoised)."""
    from tokenforge.hf_attention import _memoised

    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool or attn_mask.dim() > 4:
        return None
    if attn_mask.device != query.device:
        return None
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    batch, seqlen_q, seqlen_k = query.shape[0], query.shape[2], key.shape[2]
    if m.shape[0] not in (1, batch) or m.shape[3] != seqlen_k:
        return None

    def build(_):
        rows = m[:, 0, 0, :]
        # A mask materialised over heads or queries (transformers' encoders build (b, 1, sq, sk))
        # is a key-padding mask when every head's and query's row is the first one.
        materialised = any(m.shape[dim] != 1 and m.stride(dim) != 0 for dim in (1, 2))
        if materialised and not bool((m == rows[:, None, None]).all()):
            return None
        return _key_stretches(rows.expand(batch, seqlen_k), seqlen_q)

    return _memoised(attn_mask, ("key padding", batch, seqlen_q), build)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
          **extra):
    if _route_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, extra) is not None:
        stats["passed"] += 1
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra)
        if enable_gqa:
            kwargs["enable_gqa"] = enable_gqa
        return _original(query, key, value, **kwargs)
    from tokenforge.ops.attention import attention, attention_padded

    stats["routed"] += 1
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    softmax_scale = None if scale is None else float(scale)
    if attn_mask is not None:  # a key-padding mask: every query over its row's stretch of keys
        starts_q, used_q, starts_k, used_k, longest = _key_padding(attn_mask, query, key)
        out = attention_padded(q, k, v, starts_q, used_q, starts_k, used_k, q.shape[1], longest, float(dropout_p),
                               softmax_scale)
    else:
        out = attention(q, k, v, float(dropout_p), causal=bool(is_causal), softmax_scale=softmax_scale,
                        backend="triton")
    return out.transpose(1, 2)


def is_installed() -> bool:
    return F.scaled_dot_product_attention is _sdpa


def install() -> None:
    """Route supported ``F.scaled_dot_product_attention`` calls to tokenforge for the rest of the
    process (idempotent; :func:`uninstall` restores the original)."""
    global _original
    if is_installed():
        return
    _original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa


def uninstall() -> None:
    """Restore the original ``F.scaled_dot_product_attention`` (no-op when not installed)."""
    if is_installed():
        F.scaled_dot_product_attention = _original


class patch_sdpa:
    """Route supported ``F.scaled_dot_product_attention`` calls to tokenforge's fused attention.

    Called bare, ``tokenforge.patch_sdpa()`` installs the routing for the rest of the process
    (:func:`unpatch_sdpa` removes it); used as ``with tokenforge.patch_sdpa():`` it routes only
    inside the block and restores what was there before."""

    def __init__(self) -> None:
        self._was_installed = is_installed()
        install()

    def __enter__(self) -> "patch_sdpa":
        return self

    def __exit__(self, *exc) -> None:
        if not self._was_installed:
            uninstall()


def unpatch_sdpa() -> None:
    """Undo a bare :func:`patch_sdpa` (or :func:`install`): SDPA calls run PyTorch's own again."""
    uninstall()
