"""tokenforge.nn.AddRMSNorm: residual add + RMSNorm in one module, ``(normed, new_residual)``.

Its parameters and state_dict are those of ``torch.nn.RMSNorm(dim)`` (one ``weight``), so a
model's norm weights load into it unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge.ops.add_rms_norm import add_rms_norm
from tokenforge.ops.rms_norm import check_offset_and_casting_mode


class AddRMSNorm(torch.nn.Module):
    """forward(x, residual) -> (RMSNorm(x + residual) * weight, x + residual) over the last dim
    ``dim``; new_residual has residual's dtype, normed x's (see tokenforge.ops.add_rms_norm)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None, *, offset: float = 0.0,
                 casting_mode: str = "gemma", backend: Optional[str] = None) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"AddRMSNorm: dim must be positive, got {dim}")
        check_offset_and_casting_mode("AddRMSNorm", offset, casting_mode)
        self.dim, self.eps, self.backend = dim, eps, backend
        self.offset, self.casting_mode = float(offset), casting_mode
        self.weight = torch.nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The identity scale: weight 1, or 0 under an offset of 1 (offset + weight = 1).
        torch.nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, self.weight, self.eps, offset=self.offset, casting_mode=self.casting_mode,
                            backend=self.backend)

    def extra_repr(self) -> str:
        extra = f", offset={self.offset}" if self.offset else ""
        extra += f", casting_mode={self.casting_mode!r}" if self.casting_mode != "gemma" else ""
        return f"{self.dim}, eps={self.eps}{extra}"
