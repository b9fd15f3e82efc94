"""A Hugging Face attention implementation that runs padded and packed batches on tokenforge's kernel.

``tokenforge.patch(model)`` switches a known Hugging Face family (transformers >= 4.53, whose models
build their masks through ``masking_utils``) from ``attn_implementation="sdpa"`` or ``"eager"`` to
:data:`NAME`; ``unpatch`` switches it back. Why not just route SDPA: under ``"sdpa"`` a padded batch
(Trainer's default collator) or a packed one (``DataCollatorWithFlattening``) reaches SDPA with a
dense (batch, 1, q, k) mask, which the kernel cannot take, so those batches never reached it. Under
:data:`NAME` the model hands over what FlashAttention-2's integration gets instead:

- a 2-D padding mask (batch, keys): each sequence's live tokens are one document. A left- or
  right-padded batch (every row's live tokens one stretch; Trainer's padding collators) with as
  many queries as keys runs where it is, forward and backward, with no gathered copy
  (:func:`tokenforge.ops.attention.attention_padded`: a start and a count per sequence); padding
  rows get 0. Other masks (holes, or a block of queries after a cache) have their live tokens
  gathered and run through :func:`tokenforge.ops.attention_varlen`, the output scattered back.
  Without autograd (generate()), when each row's live keys are one stretch, the kernel reads them
  where they are in the KV cache instead of gathering them (the decoding kernel for one query;
  :func:`tokenforge.ops.attention.attention_over_cache_rows` for a block);
- packed sequences, as ``cu_seq_lens_q/k`` and ``max_length_q/k`` keywords
  (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) or as position ids that restart
  (a new document wherever a position is not the previous one + 1, in any row: the rule
  transformers' SDPA masks use): one document each;
- otherwise no mask: :func:`tokenforge.ops.attention`, causal aligned bottom-right, so decoding
  with a KV cache (fewer queries than keys) is right.

Sliding windows follow transformers' flash rule (``window = (w - 1, w - 1)`` when there are more
than w keys), softcap (Gemma2) is the kernel's, dropout the kernel's Philox mask. fp32 and float64
inputs run on the ops' torch path (SDPA on CUDA where it can express the call), so every dtype is
right, only bf16/fp16 reach the kernel. A ready-made 4-D mask (a caller's own) goes to transformers'
SDPA function (the model's eager function when the layer has a softcap), as unpatched.

The unpadding plan (which rows are live, the document offsets, the longest document) costs a host
sync; it is built once per mask or position-id tensor and reused by every layer of the forward
(and by gradient checkpointing's recompute), where transformers' flash path syncs in every layer.

The name holds "flash" on purpose: transformers keys flash-only behaviour on that substring, and
one of them is needed here: generate() with a static cache keeps the padding mask, which is how
the unfilled cache slots are left out.
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

NAME = "tokenforge_flash"


def available() -> bool:
    """Whether this transformers builds masks through ``masking_utils`` (4.53 and later)."""
    try:
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
        from transformers.modeling_utils import AttentionInterface  # noqa: F401
    except ImportError:
        return False
    return True


def register() -> None:
    """Make :data:`NAME` a valid ``config._attn_implementation`` (idempotent, process-wide; a name
    nobody uses costs nothing, so it is never unregistered)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, hf_attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """The mask transformers builds for :data:`NAME`: the 2-D (batch, keys) bool padding mask, its
    last ``kv_length`` columns (sliding-window caches keep the last keys), or None when no token is
    padding and the mask covers every key (a static cache's mask is longer than its filled part,
    and kept). Causality, windows and packing are the attention function's, not the mask's."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


# ---------------------------------------------------------------------------------------------
# Unpadding plans, built once per mask / position-id tensor.
# ---------------------------------------------------------------------------------------------

# (tensor, (its version, tag), plan) for the last few tensors seen: a forward alternates between at most
# a full-attention and a sliding-window mask, so a handful of entries never thrash.
_PLANS: list = []
_PLANS_KEPT = 8  # a mask's plan and the index tensors built from it, for a forward or two


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _memoised(t: torch.Tensor, tag, build):
    """build(t), reused while ``t`` is the same unmodified tensor asked for the same ``tag`` (not
    while torch.compile traces)."""
    version = _version(t)
    if version is None or torch.compiler.is_compiling():
        return build(t)
    for entry in _PLANS:
        if entry[0] is t and entry[1] == (version, tag):
            return entry[2]
    plan = build(t)
    _PLANS.insert(0, (t, (version, tag), plan))
    del _PLANS[_PLANS_KEPT:]
    return plan


_UNPADDED_ROWS: dict = {}


def _unpadded_rows(device: torch.device, batch: int, pitch: int, kv_len: int):
    """(starts, used) int32 (batch,) of an unpadded decoding step: sequence b's kv_len keys from row
    b * pitch. Every layer of a step asks for the same pair, so it is built once per step, not
    twice per layer (two launches each on a GPU, where a decoding step is launch-bound)."""
    def build():
        starts = torch.arange(batch, device=device, dtype=torch.int32) * pitch
        return starts, torch.full((batch,), kv_len, device=device, dtype=torch.int32)

    if torch.compiler.is_compiling():
        return build()
    key = (device, batch, pitch, kv_len)
    if key not in _UNPADDED_ROWS:
        _UNPADDED_ROWS.clear()  # one step's pair: the next step has one more key
        _UNPADDED_ROWS[key] = build()
    return _UNPADDED_ROWS[key]


class _Unpadding(NamedTuple):
    rows: torch.Tensor    # the live rows of the flattened (batch * len) rows
    cu: torch.Tensor      # int32 (batch + 1,) document offsets over the live rows
    longest: int          # the longest document
    starts: torch.Tensor  # int32 (batch,) each row's first live position
    one_stretch: bool     # every row's live positions are one stretch (left or right padding)


def _plan_from_mask(mask: torch.Tensor) -> _Unpadding:
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    rows = torch.nonzero(mask.reshape(-1)).reshape(-1)
    cu = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    starts = mask.int().argmax(dim=-1).to(torch.int32)
    last = mask.shape[-1] - 1 - mask.int().flip(-1).argmax(dim=-1)
    stretch = (lengths == 0) | (last - starts + 1 == lengths)
    if not lengths.numel():
        return _Unpadding(rows, cu, 0, starts, True)
    longest, one_stretch = torch.stack([lengths.max(), stretch.all().int()]).tolist()  # the host sync
    return _Unpadding(rows, cu, longest, starts, bool(one_stretch))


def _plan_from_positions(positions: torch.Tensor):
    """(int32 document offsets over the flattened rows, longest) when the position ids restart
    somewhere inside a row (packed documents), else None. Each row starts a document too."""
    step = torch.diff(positions, dim=-1) != 1
    if not bool(step.any()):
        return None
    starts = F.pad(step, (1, 0), value=True).reshape(-1)
    total = starts.numel()
    cu = torch.cat([torch.nonzero(starts).reshape(-1), torch.tensor([total], device=positions.device)])
    cu = cu.to(torch.int32)
    return cu, int(cu.diff().max())


# ---------------------------------------------------------------------------------------------
# The attention function transformers calls.
# ---------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(batch, len, heads, dim) -> the listed rows of its (batch * len, heads, dim) flattening."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, rows)


def _ready_mask_fallback(module, query, key, value, attention_mask, dropout, scaling, softcap, is_causal,
                         kwargs, s_aux=None):
    """A ready-made 4-D mask: the function the model would have used unpatched."""
    if softcap is not None or s_aux is not None:  # SDPA has no softcap or sinks; the modeling file's eager has
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise ValueError(f"tokenforge attention: {type(module).__name__} passed a 4-D attention mask with a "
                             "softcap or attention sinks, which neither the kernel nor SDPA takes; load the model "
                             "with attn_implementation='eager' and patch it with attention=False")
        extra = {} if s_aux is None else {"s_aux": s_aux}
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap,
                     **extra, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _cache_pitch(q, k, v, keys: Optional[_Unpadding], dropout, *inputs) -> Optional[int]:
    """The row pitch at which the Triton kernel reads the keys where they are (no gather of the
    live ones), or None: only without autograd (generation; the in-place forward has no backward),
    without dropout, when every row's live keys are one stretch (left or right padding; ``keys``
    None: no padding) and the layout suits the kernel (tokenforge.ops.attention_kvcache's rule)."""
    from tokenforge.ops.attention_kvcache import cache_row_pitch

    if dropout or (keys is not None and not keys.one_stretch):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return None
    return cache_row_pitch(q, k, v, None)


def _decode_step(q, k, v, starts, used, pitch: int, longest: int, options: dict) -> torch.Tensor:
    """q (batch, q_len, heads, d) against each sequence's used[b] keys from row starts[b] of the
    cache k/v (batch, kv_len, kv heads, d) viewed as rows, by the decoding kernel; out like q."""
    from tokenforge.ops.attention import with_sinks
    from tokenforge.ops.attention_kvcache import decode_over_cache

    batch, q_len = q.shape[:2]
    out, lse = decode_over_cache(q.reshape(batch * q_len, *q.shape[2:]), k, v, starts, used, None, pitch, q_len,
                                 longest, options["softmax_scale"], options["causal"], options["window"],
                                 options["softcap"], None, 0)
    if "sinks" in options:  # GPT-OSS: the sinks applied to the kernel's output (no autograd here)
        out, _ = with_sinks(out, lse, options["sinks"])
    return out.view(q.shape)


def _padded(q, k, v, attention_mask, options: dict, grad_inputs) -> torch.Tensor:
    """Attention under a 2-D padding mask (batch, kv_len): the live queries and keys of each row as
    one document, padding rows 0. A left- or right-padded batch (every row's live tokens one
    stretch) with as many queries as keys, training included, runs where it is
    (:func:`tokenforge.ops.attention.attention_padded`). Otherwise the live rows are gathered
    (varlen) and the output scattered back; except that without autograd, keys that are one
    stretch per row are read in place: a decoding step (one query) by the decoding kernel, longer
    blocks by the varlen kernel with key starts and counts."""
    from tokenforge.ops.attention import (attention_over_cache_rows, attention_padded, attention_varlen,
                                          kernel_reads_in_place, with_sinks)
    from tokenforge.ops.attention_kvcache import DECODE_MAX_ROWS, cache_as_rows
    from tokenforge.patch import count_call

    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    keys = _memoised(attention_mask, "mask", _plan_from_mask)
    count_call("attention_varlen")
    if 1 < q_len == kv_len and keys.one_stretch and kernel_reads_in_place(q, k, v):  # no gather, no scatter
        used = _memoised(attention_mask, "lengths", lambda _: keys.cu.diff())
        return attention_padded(q, k, v, keys.starts, used, keys.starts, used, keys.longest, keys.longest, **options)
    pitch = _cache_pitch(q, k, v, keys, options["dropout_p"], *grad_inputs)
    if pitch is not None:  # built once per mask, like the plan: every layer reads the same rows
        starts, used = _memoised(attention_mask, ("cache rows", batch, pitch), lambda _: (
            torch.arange(batch, device=q.device, dtype=torch.int32) * pitch + keys.starts, keys.cu.diff()))
        if q_len == 1 and q.shape[2] // k.shape[2] <= DECODE_MAX_ROWS:  # every sequence's one query
            return _decode_step(q, k, v, starts, used, pitch, keys.longest, options)
    if q_len == kv_len:
        rows_q, cu_q, longest_q = keys.rows, keys.cu, keys.longest
    elif q_len == 1:  # one new token per sequence, never padding
        rows_q, cu_q = _memoised(attention_mask, ("one query", batch), lambda _: (
            torch.arange(batch, device=q.device), torch.arange(batch + 1, dtype=torch.int32, device=q.device)))
        longest_q = 1
    else:  # the queries are the last q_len positions (left padding)
        rows_q, cu_q, longest_q = _memoised(attention_mask, ("last queries", q_len),
                                            lambda m: _plan_from_mask(m[:, -q_len:]))[:3]
    if pitch is not None:
        out_rows, lse_rows = attention_over_cache_rows(_rows(q, rows_q), cache_as_rows(k, pitch),
                                                       cache_as_rows(v, pitch), cu_q, starts, used, longest_q,
                                                       keys.longest, options["softmax_scale"], options["causal"],
                                                       options["window"], options["softcap"], None)
        if "sinks" in options:  # GPT-OSS: the sinks applied to the kernel's output (no autograd here)
            out_rows, _ = with_sinks(out_rows, lse_rows, options["sinks"])
    else:
        out_rows = attention_varlen(_rows(q, rows_q), _rows(k, keys.rows), _rows(v, keys.rows), cu_q, keys.cu,
                                    longest_q, keys.longest, **options)
    out = out_rows.new_zeros(batch * q_len, *out_rows.shape[1:]).index_copy(0, rows_q, out_rows)
    return out.view(batch, q_len, *out_rows.shape[1:])


def _documents(cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, position_ids, batch: int, q_len: int,
               kv_len: int):
    """(cu_q, cu_k, longest_q, longest_k) of packed documents, or None: flash-attention keywords
    (DataCollatorWithFlattening(return_flash_attn_kwargs=True)) when given, else position ids that
    restart inside a row (broadcast over the batch when given for one row)."""
    if all(x is not None for x in (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)):
        return cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32), int(max_length_q), int(max_length_k)
    if position_ids is None or q_len != kv_len or q_len < 2:
        return None
    plan = _memoised(position_ids, ("positions", batch), lambda p: _plan_from_positions(p.expand(batch, -1)))
    return None if plan is None else (plan[0], plan[0], plan[1], plan[1])


def hf_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                         scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                         softcap: Optional[float] = None, is_causal: Optional[bool] = None, s_aux=None,
                         cu_seq_lens_q: Optional[torch.Tensor] = None, cu_seq_lens_k: Optional[torch.Tensor] = None,
                         max_length_q=None, max_length_k=None, position_ids: Optional[torch.Tensor] = None,
                         **kwargs):
    """transformers' attention-function contract: query (batch, heads_q, q_len, dim), key/value
    (batch, heads_kv, kv_len, dim); returns ((batch, q_len, heads_q, dim), None)."""
    from tokenforge.ops.attention import attention, attention_varlen
    from tokenforge.ops.attention_kvcache import DECODE_MAX_ROWS
    from tokenforge.patch import count_call

    if attention_mask is not None and attention_mask.dim() != 2:
        return _ready_mask_fallback(module, query, key, value, attention_mask, dropout, scaling, softcap,
                                    is_causal, dict(kwargs, position_ids=position_ids), s_aux)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    batch, _, q_len, head_dim = query.shape
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    v_dim = v.shape[-1]
    if v_dim != head_dim:  # MLA's narrower values: one head dim for the kernel, the zero columns cropped
        v = F.pad(v, (0, head_dim - v_dim))
    if attention_mask is not None and k.shape[1] > attention_mask.shape[1]:
        k, v = k[:, :attention_mask.shape[1]], v[:, :attention_mask.shape[1]]  # a static cache's unfilled tail
    kv_len = k.shape[1]
    window = (-1, -1)
    if sliding_window is not None and kv_len > sliding_window:
        window = (int(sliding_window) - 1, int(sliding_window) - 1)
    options = dict(dropout_p=float(dropout), softmax_scale=scaling, causal=causal, window=window,
                   softcap=float(softcap or 0.0))
    if s_aux is not None:  # GPT-OSS's attention sinks: one logit per query head, in every row's softmax
        options["sinks"] = s_aux

    grad_inputs = (query, key, value)
    if attention_mask is not None:
        out = _padded(q, k, v, attention_mask, options, grad_inputs)
    else:
        documents = _documents(cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, position_ids, batch, q_len,
                               kv_len)
        if documents is not None:
            flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]
            count_call("attention_varlen")
            out = attention_varlen(*flat, *documents, **options).view(batch, q_len, *q.shape[2:])
        else:
            count_call("attention")
            pitch = None
            if q_len * (q.shape[2] // k.shape[2]) <= DECODE_MAX_ROWS:
                pitch = _cache_pitch(q, k, v, None, options["dropout_p"], *grad_inputs)
            if pitch is not None:  # a decoding step, unpadded: the decoding kernel, one tile per GQA group
                starts, used = _unpadded_rows(q.device, batch, pitch, kv_len)
                out = _decode_step(q, k, v, starts, used, pitch, kv_len, options)
            else:
                out = attention(q, k, v, **options)
    if v_dim != head_dim:
        out = out[..., :v_dim]
    return out, None
