"""tokenforge.nn.AddRMSNorm: residual add + RMSNorm in one module, ``(normed, new_residual)``.

Its parameters and state_dict are those of ``torch.nn.RMSNorm(dim)`` (one ``weight``), so a
model's norm weights load into it unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge.ops.add_rms_norm import add_rms_norm


class AddRMSNorm(torch.nn.Module):
    """forward(x, residual) -> (RMSNorm(x + residual) * weight, x + residual) over the last dim
    ``dim``; new_residual has residual's dtype, normed x's (see tokenforge.ops.add_rms_norm)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"AddRMSNorm: dim must be positive, got {dim}")
        self.dim, self.eps, self.backend = dim, eps, backend
        self.weight = torch.nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, self.weight, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
