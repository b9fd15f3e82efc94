"""tokenforge.nn.RotaryEmbedding: builds and caches the cos/sin table, applies RoPE to q and k."""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge.ops.rope import LAYOUTS, rope


class RotaryEmbedding(torch.nn.Module):
    """RoPE with angles ``position * base**(-2i/dim)`` (Hugging Face LLaMA's default rope) over the
    first ``dim`` (= rotary_dim, even, <= head_dim) entries of each head; ``forward(q, k,
    position_ids=None)`` returns (q_out, k_out). ``interleaved`` picks GPT-J's pairs (2i, 2i+1)
    over LLaMA's half-split; ``layout`` is "bshd" (batch, seq, heads, head_dim) or "bhsd".

    The table (max_position_embeddings, dim) is computed in float64 and kept as fp32 buffers
    ``cos_cached``/``sin_cached`` (not in the state_dict); positions must stay below
    max_position_embeddings."""

    def __init__(self, dim: int, max_position_embeddings: int = 4096, base: float = 10000.0,
                 interleaved: bool = False, device=None, *, layout: str = "bshd",
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim (rotary_dim) must be an even int >= 2, got {dim!r}")
        if not isinstance(max_position_embeddings, int) or max_position_embeddings < 1:
            raise ValueError(f"RotaryEmbedding: max_position_embeddings must be a positive int, "
                             f"got {max_position_embeddings!r}")
        if not base > 0:
            raise ValueError(f"RotaryEmbedding: base must be positive, got {base!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"RotaryEmbedding: layout must be one of {LAYOUTS}, got {layout!r}")
        self.dim, self.max_position_embeddings, self.base = dim, max_position_embeddings, float(base)
        self.interleaved, self.layout, self.backend = bool(interleaved), layout, backend
        cos, sin = self._table(device)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def _table(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        # float64 angles: position * inv_freq reaches ~1e5 rad, where fp32 loses ~1e-2 rad.
        inv_freq = self.base ** -(torch.arange(0, self.dim, 2, dtype=torch.float64, device=device) / self.dim)
        freqs = torch.outer(torch.arange(self.max_position_embeddings, dtype=torch.float64, device=device), inv_freq)
        angles = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), dim=-1)
        return angles.cos().float(), angles.sin().float()

    def forward(self, q: torch.Tensor, k: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids is not None:
            return rope(q, k, self.cos_cached, self.sin_cached, position_ids=position_ids,
                        interleaved=self.interleaved, layout=self.layout, backend=self.backend)
        seq = q.shape[1 if self.layout == "bshd" else 2] if q.dim() == 4 else -1
        if seq > self.max_position_embeddings:
            raise ValueError(f"RotaryEmbedding: seq {seq} > max_position_embeddings "
                             f"{self.max_position_embeddings}; build the module with a larger table")
        return rope(q, k, self.cos_cached[:seq], self.sin_cached[:seq], interleaved=self.interleaved,
                    layout=self.layout, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, max_position_embeddings={self.max_position_embeddings}, base={self.base}, "
                f"interleaved={self.interleaved}, layout={self.layout!r}")
