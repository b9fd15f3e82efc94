"""Attention modules backed by tokenforge.ops.attention.

- :class:`Attention`: the core (no projections), q/k/v (batch, seq, heads, head_dim) -> out; the
  drop-in for flash_attn's ``flash_attn_func`` inside an existing block.
- :class:`MultiHeadAttention`: a LLaMA-style self-attention block (fused qkv projection, GQA, optional
  rotary callback, output projection) for the reference transformer.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from tokenforge.ops.attention import attention


class Attention(torch.nn.Module):
    """Fused attention of q (b, sq, hq, d) over k/v (b, sk, hkv, d); fp16/bf16 on the kernel.
    ``alibi_slopes``: fp32 (hq,) ALiBi slopes (``tokenforge.ops.alibi_slopes(heads)`` gives
    the paper's), kept as a buffer so they follow the module's device. ``dropout``: attention
    dropout probability, applied in training mode only (as torch.nn.Dropout). ``sink_heads``: the
    number of query heads hq to give learned attention sinks (GPT-OSS's): a parameter ``sinks``
    (hq,), zeros at init, one logit per head in every row's softmax (not with dropout)."""

    def __init__(self, causal: bool = True, softmax_scale: Optional[float] = None,
                 window: tuple[int, int] = (-1, -1), softcap: float = 0.0, deterministic: bool = False,
                 backend: Optional[str] = None, alibi_slopes: Optional[torch.Tensor] = None, dropout: float = 0.0,
                 sink_heads: Optional[int] = None):
        super().__init__()
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"Attention: dropout must be a float in [0, 1), got {dropout!r}")
        if sink_heads is not None and (isinstance(sink_heads, bool) or not isinstance(sink_heads, int)
                                       or sink_heads < 1 or dropout):
            raise ValueError(f"Attention: sink_heads must be a positive int (the query heads) and dropout 0, got "
                             f"sink_heads={sink_heads!r}, dropout={dropout!r}")
        self.sinks = None if sink_heads is None else torch.nn.Parameter(torch.zeros(sink_heads))
        self.causal, self.softmax_scale, self.window = causal, softmax_scale, tuple(window)
        self.softcap, self.deterministic, self.backend = softcap, deterministic, backend
        self.dropout = float(dropout)
        self.register_buffer("alibi_slopes", None if alibi_slopes is None else alibi_slopes.float(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, self.dropout if self.training else 0.0, causal=self.causal,
                         softmax_scale=self.softmax_scale, window=self.window, softcap=self.softcap,
                         alibi_slopes=self.alibi_slopes, deterministic=self.deterministic, backend=self.backend,
                         sinks=self.sinks)

    def extra_repr(self) -> str:
        alibi = ", alibi" if self.alibi_slopes is not None else ""
        dropout = f", dropout={self.dropout:g}" if self.dropout else ""
        sinks = f", sink_heads={self.sinks.numel()}" if self.sinks is not None else ""
        return f"causal={self.causal}, window={self.window}, softcap={self.softcap}{alibi}{dropout}{sinks}"


class MultiHeadAttention(torch.nn.Module):
    """Self-attention block: x (b, s, dim) -> (b, s, dim), n_heads query heads and n_kv_heads kv heads
    (GQA); ``rotary(q, k) -> (q, k)`` is applied to (b, s, h, d) q and k when given."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: Optional[int] = None, causal: bool = True,
                 bias: bool = False, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                 backend: Optional[str] = None):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"MultiHeadAttention: dim ({dim}) must divide by n_heads ({n_heads}) and n_heads by "
                             f"n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wqkv = torch.nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.wo = torch.nn.Linear(n_heads * self.head_dim, dim, bias=bias)
        self.attn = Attention(causal=causal, window=window, softcap=softcap, backend=backend)

    def forward(self, x: torch.Tensor, rotary: Optional[Callable] = None) -> torch.Tensor:
        b, s, _ = x.shape
        hd = self.head_dim
        qkv = self.wqkv(x)
        q, k, v = qkv.split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        # Views of the projection (no copies): the kernel reads any row stride.
        q = q.view(b, s, self.n_heads, hd)
        k = k.view(b, s, self.n_kv_heads, hd)
        v = v.view(b, s, self.n_kv_heads, hd)
        if rotary is not None:
            q, k = rotary(q, k)
        return self.wo(self.attn(q, k, v).reshape(b, s, self.n_heads * hd))
