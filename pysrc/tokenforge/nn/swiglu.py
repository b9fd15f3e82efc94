"""tokenforge.nn.SwiGLU: a LLaMA MLP, ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

Parameter names follow Hugging Face's ``LlamaMLP`` (gate_proj, up_proj, down_proj; w1, w3, w2 in
Meta's naming), so a LlamaMLP state_dict loads as is.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge.ops.swiglu import swiglu


class SwiGLU(torch.nn.Module):
    """LLaMA MLP on x (..., dim) -> (..., dim) with hidden size ``hidden_dim``; the activation is
    :func:`tokenforge.ops.swiglu` (the projections are plain nn.Linear)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if dim <= 0 or hidden_dim <= 0:
            raise ValueError(f"SwiGLU: dim and hidden_dim must be positive, got {dim} and {hidden_dim}")
        self.dim, self.hidden_dim, self.backend = dim, hidden_dim, backend
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = torch.nn.Linear(dim, hidden_dim, **kw)
        self.up_proj = torch.nn.Linear(dim, hidden_dim, **kw)
        self.down_proj = torch.nn.Linear(hidden_dim, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}"
