"""Rotary position embeddings (RoPE) applied to q and k together: ``x * cos + rotate(x) * sin``.

Path of a call: :func:`rope` validates, normalises cos/sin/position_ids and picks a backend ->
:class:`RoPEFunction` (autograd; saves only cos, sin and position_ids) -> the custom ops
``tokenforge::rope_fwd`` / ``tokenforge::rope_bwd`` (opaque to ``torch.compile`` through their fake
implementations) -> ``tokenforge.kernels.rope`` (Triton; one launch rotates q and k). The ``torch``
backend is :func:`rope_reference`, differentiated by autograd.

Conventions (those of Hugging Face ``apply_rotary_pos_emb``):

- half-split (default, LLaMA / ``rotate_half``): ``rotate(x) = cat(-x[R/2:R], x[:R/2])``;
  Hugging Face's ``LlamaRotaryEmbedding`` returns ``cos = cat(freqs, freqs).cos()``.
- interleaved (GPT-J, ``interleaved=True``): pairs (2i, 2i+1), ``rotate(x)[2i] = -x[2i+1]``,
  ``rotate(x)[2i+1] = x[2i]``; pass cos/sin with each frequency repeated for its pair,
  ``freqs.repeat_interleave(2, -1).cos()``.
- partial rotary: cos/sin have last dim R = rotary_dim (even, <= head_dim); entries of q/k past R
  pass through unchanged.

The formula is applied entry by entry with the cos/sin given, so any cos/sin of the right shape
works and the gradient is exact for them; cos and sin get no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import backends
from tokenforge.dtensor import any_dtensor, run_on_shards

OP = "rope"
LAYOUTS = ("bshd", "bhsd")


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rows_of(cos: torch.Tensor, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """cos/sin as (batch or 1, seq, R): the rows of each token."""
    if position_ids is not None:
        table = cos if cos.dim() == 2 else cos[0]
        ids = position_ids if position_ids.dim() == 2 else position_ids[None]
        return table[ids]
    return cos if cos.dim() == 3 else cos[None]


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None, interleaved: bool = False, layout: str = "bshd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch RoPE (same arguments as :func:`rope`): the oracle of the tests, the CPU
    fallback and the eager baseline of the benchmarks. Math in fp32 (float64 for float64 q/k)."""
    rot_dim = cos.shape[-1]
    c, s = _rows_of(cos, position_ids), _rows_of(sin, position_ids)
    # Broadcast the (batch, seq, R) rows over the heads dim.
    c, s = (t[:, :, None, :] if layout == "bshd" else t[:, None, :, :] for t in (c, s))

    def apply(x):
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        xr = x[..., :rot_dim].to(compute)
        out = (xr * c.to(compute) + _rotate(xr, interleaved) * s.to(compute)).to(x.dtype)
        if rot_dim == x.shape[-1]:
            return out
        return torch.cat((out, x[..., rot_dim:]), dim=-1)

    return apply(q), apply(k)


# ---------------------------------------------------------------------------------------------
# Input checks: every refusal says what to do.
# ---------------------------------------------------------------------------------------------


def _check_inputs(q, k, cos, sin, position_ids, layout) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rope: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"rope: {name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                f"got {t.dtype}; convert it first, e.g. {name}.float()"
            )
        if t.device != q.device:
            raise ValueError(f"rope: q is on {q.device} but {name} is on {t.device}; move all inputs to one device")
    if layout not in LAYOUTS:
        raise ValueError(f"rope: layout must be 'bshd' (batch, seq, heads, head_dim) or 'bhsd' "
                         f"(batch, heads, seq, head_dim), got {layout!r}")
    names = "(batch, seq, heads, head_dim)" if layout == "bshd" else "(batch, heads, seq, head_dim)"
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"rope: {name} must be 4-D {names} for layout={layout!r}, got shape {tuple(t.shape)}")
    seq_dim = 1 if layout == "bshd" else 2
    batch, seq, head_dim = q.shape[0], q.shape[seq_dim], q.shape[-1]
    if (k.shape[0], k.shape[seq_dim], k.shape[-1]) != (batch, seq, head_dim):
        raise ValueError(
            f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, seq and head_dim "
            f"(layout {layout!r} = {names}); only the head counts may differ"
        )
    if cos.shape != sin.shape:
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    rot_dim = cos.shape[-1] if cos.dim() > 0 else 0
    if rot_dim < 2 or rot_dim % 2 or rot_dim > head_dim:
        raise ValueError(
            f"rope: the last dim of cos/sin is rotary_dim {rot_dim}; it must be even, >= 2 and <= head_dim "
            f"{head_dim} (entries past rotary_dim pass through unchanged)"
        )
    if position_ids is None:
        ok = (cos.dim() == 2 and cos.shape[0] == seq) or (cos.dim() == 3 and cos.shape[0] in (1, batch)
                                                         and cos.shape[1] == seq)
        if not ok:
            raise ValueError(
                f"rope: cos/sin have shape {tuple(cos.shape)}; without position_ids they must be (seq, rotary_dim), "
                f"(1, seq, rotary_dim) or (batch, seq, rotary_dim) with batch {batch}, seq {seq}; slice a longer "
                f"table as cos[:seq], or pass the whole table with position_ids"
            )
        return
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"rope: position_ids must be a torch.Tensor or None, got {type(position_ids).__name__}")
    if position_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"rope: position_ids must be int64 or int32, got {position_ids.dtype}; "
                        f"convert it, e.g. position_ids.long()")
    if position_ids.device != q.device:
        raise ValueError(f"rope: q is on {q.device} but position_ids is on {position_ids.device}; "
                         f"move all inputs to one device")
    pshape = tuple(position_ids.shape)
    if not (pshape == (seq,) or (len(pshape) == 2 and pshape[0] in (1, batch) and pshape[1] == seq)):
        raise ValueError(f"rope: position_ids has shape {pshape}; it must be (batch, seq), (1, seq) or (seq,) "
                         f"with batch {batch}, seq {seq}")
    if not (cos.dim() == 2 or (cos.dim() == 3 and cos.shape[0] == 1)):
        raise ValueError(
            f"rope: with position_ids, cos/sin must be a table (max_position, rotary_dim) (or (1, max_position, "
            f"rotary_dim)) whose rows position_ids index, got {tuple(cos.shape)}"
        )
    # A range check needs the values; on CPU that costs no device sync. On CUDA the kernels write NaN
    # for a token whose position has no row (the torch backend raises a device-side assert instead).
    if position_ids.device.type == "cpu" and position_ids.numel() and not torch.compiler.is_compiling():
        n_pos = cos.shape[-2]
        lo, hi = int(position_ids.min()), int(position_ids.max())
        if lo < 0 or hi >= n_pos:
            raise ValueError(f"rope: position_ids range over [{lo}, {hi}] but the cos/sin table has {n_pos} rows; "
                             f"build a table with max_position_embeddings > {hi}")


def _triton_supports(q, k, cos, sin) -> Optional[str]:
    reason = backends.triton_unsupported_reason(q.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import rope as triton_rope

    return triton_rope.supports(q, k, cos, sin)


backends.register_op(
    OP,
    cuda_preference=("triton",),
    supports={"triton": _triton_supports, "torch": lambda q, k, cos, sin: None},
    # q, k (batch, seq, heads, head_dim) with GQA 4:1, and LLaMA-style cos/sin (seq, head_dim) in fp32.
    example_inputs=lambda device, dtype: (torch.empty(1, 8, 4, 64, device=device, dtype=dtype),
                                          torch.empty(1, 8, 1, 64, device=device, dtype=dtype),
                                          torch.empty(8, 64, device=device), torch.empty(8, 64, device=device)),
)


# The custom ops below call their backend's launcher through this table (no dispatch in between).
LAUNCHERS = backends.Launchers(OP, triton="tokenforge.kernels.rope")


# ---------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees. q, k (and dq_out, dk_out) have a unit last stride; cos/sin
# are (batch or 1, seq, R) rows, or a (max_position, R) table with position_ids (batch or 1, seq).
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("tokenforge::rope_fwd", mutates_args=())
def rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             position_ids: Optional[torch.Tensor], interleaved: bool, layout: str,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return LAUNCHERS[backend].rope_forward(q, k, cos, sin, position_ids, interleaved, layout)


@rope_fwd.register_fake
def _(q, k, cos, sin, position_ids, interleaved, layout, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("tokenforge::rope_bwd", mutates_args=())
def rope_bwd(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             position_ids: Optional[torch.Tensor], interleaved: bool, layout: str,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return LAUNCHERS[backend].rope_backward(dq_out, dk_out, cos, sin, position_ids, interleaved, layout)


@rope_bwd.register_fake
def _(dq_out, dk_out, cos, sin, position_ids, interleaved, layout, backend):
    return dq_out.new_empty(dq_out.shape), dk_out.new_empty(dk_out.shape)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim is contiguous (any other strides are fine), else a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _normalise_tables(cos, sin, position_ids):
    """cos/sin as the kernels read them (3-D rows, or a 2-D table with 2-D position_ids), sharing
    strides, with a unit last stride."""
    if position_ids is not None:
        cos, sin = (t if t.dim() == 2 else t[0] for t in (cos, sin))
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
    else:
        cos, sin = (t if t.dim() == 3 else t[None] for t in (cos, sin))
    cos, sin = _unit_last_stride(cos), _unit_last_stride(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, position_ids


class RoPEFunction(torch.autograd.Function):
    """Autograd for the kernel backends: saves cos, sin and position_ids only (the map is linear)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, interleaved, layout, backend):
        q_out, k_out = torch.ops.tokenforge.rope_fwd(q, k, cos, sin, position_ids, interleaved, layout, backend)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.interleaved, ctx.layout, ctx.backend = interleaved, layout, backend
        ctx.dtypes = (q.dtype, k.dtype)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin, position_ids = ctx.saved_tensors
        dq_out = _unit_last_stride(dq_out.to(ctx.dtypes[0]))
        dk_out = _unit_last_stride(dk_out.to(ctx.dtypes[1]))
        dq, dk = torch.ops.tokenforge.rope_bwd(dq_out, dk_out, cos, sin, position_ids,
                                               ctx.interleaved, ctx.layout, ctx.backend)
        return dq, dk, None, None, None, None, None, None


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
    position_ids: Optional[torch.Tensor] = None, interleaved: bool = False, layout: str = "bshd",
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_out, k_out): RoPE of q (B, S, Hq, D) and k (B, S, Hk, D) ("bhsd": (B, H, S, D)) by cos/sin
    (S, R), (1|B, S, R), or a (P, R) table indexed by position_ids (B|1, S); returns new tensors
    (never in place) in q's/k's dtype. fp32/fp16/bf16 (float64 on the torch backend), any strides
    with a contiguous last dim; R <= D even, dims past R pass through; cos/sin get no gradient.
    On the kernel backends an out-of-range position id on CUDA gives NaN outputs for that token
    (checked and refused on CPU). ``backend`` forces triton or torch. DTensor q / k (heads sharded
    by tensor parallelism): each rank rotates its heads; the sequence and head_dim (and the batch,
    with per-batch cos/sin or position_ids) are gathered where sharded, as cos/sin are whole
    (:mod:`tokenforge.dtensor`)."""
    if any_dtensor(q, k, cos, sin, position_ids):
        per_batch = (cos.dim() == 3 and cos.shape[0] > 1) or (position_ids is not None and position_ids.dim() == 2
                                                               and position_ids.shape[0] > 1)
        whole = (-3 if layout == "bshd" else -2, -1) + ((-4,) if per_batch else ())
        return run_on_shards("rope", lambda q, k, c, s, p: rope(q, k, c, s, position_ids=p, interleaved=interleaved,
                                                               layout=layout, backend=backend),
                             [q, k], [cos, sin, position_ids], whole_dims=whole)
    _check_inputs(q, k, cos, sin, position_ids, layout)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("rope: cos/sin require grad but rope computes no gradient for them; "
                         "pass cos.detach(), sin.detach()")
    interleaved = bool(interleaved)
    if q.numel() == 0 or k.numel() == 0:
        return rope_reference(q, k, cos, sin, position_ids, interleaved, layout)
    name = backends.choose(OP, q, k, cos, sin, backend=backend)
    if name == "torch":
        return rope_reference(q, k, cos, sin, position_ids, interleaved, layout)
    cos, sin, position_ids = _normalise_tables(cos, sin, position_ids)
    return RoPEFunction.apply(_unit_last_stride(q), _unit_last_stride(k), cos, sin, position_ids,
                              interleaved, layout, name)


def rope_tables_from_frequencies(cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False):
    """flash_attn's and GPT-NeoX's (positions, rotary_dim / 2) tables, one entry per frequency, as
    the (positions, rotary_dim) tables :func:`rope` takes: each frequency in both halves, or twice
    side by side with ``interleaved`` (the pairs (2i, 2i+1))."""
    if interleaved:
        return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
             interleaved: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """RoPE of one tensor x (batch, seq, heads, head_dim) at position_ids (batch, seq) of the
    (positions, rotary_dim) tables: for callers whose q and k sit at different positions (a KV cache
    appends keys where the queries are not). :func:`rope` rotates a (q, k) pair in one launch, so x
    goes as q with its first head as k, one head of extra work, dropped."""
    return rope(x, x[:, :, :1], cos, sin, position_ids=position_ids, interleaved=interleaved, backend=backend)[0]
