"""tokenforge.nn.RMSNorm: a drop-in for torch.nn.RMSNorm (same arguments, parameters, state_dict)."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from tokenforge.ops.rms_norm import check_offset_and_casting_mode, rms_norm


class RMSNorm(torch.nn.Module):
    """RMSNorm over the trailing ``normalized_shape`` dims, same signature as torch.nn.RMSNorm, except
    that the default eps is 1e-6 (LLaMA's); ``eps=None`` means torch.finfo(x.dtype).eps like torch.
    ``offset=1.0`` is Gemma's norm: scale by ``1 + weight`` (in fp32), weights initialised to zero.
    ``casting_mode`` ("gemma", the default, "llama", "none"): where the rounding happens, as in
    :func:`tokenforge.ops.rms_norm`."""

    def __init__(
        self,
        normalized_shape: Union[int, Sequence[int], torch.Size],
        eps: Optional[float] = 1e-6,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        offset: float = 0.0,
        casting_mode: str = "gemma",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(d) for d in normalized_shape)
        if not self.normalized_shape or any(d <= 0 for d in self.normalized_shape):
            raise ValueError(f"RMSNorm: normalized_shape must be positive sizes, got {normalized_shape}")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        check_offset_and_casting_mode("RMSNorm", offset, casting_mode)
        self.offset = float(offset)
        self.casting_mode = casting_mode
        self.backend = backend
        # A tokenforge.fp8.EmitCast when the next layer is a Float8Linear taking that input cast: the
        # output then carries its fp8 copy, made in the same pass (tokenforge.fp8.emit; set by
        # tokenforge.patch(model, fp8=...)). Not state: it is not saved in the state_dict.
        self.fp8_emit = None
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            # The identity scale: weight 1, or 0 under an offset of 1 (offset + weight = 1).
            torch.nn.init.constant_(self.weight, 1.0 - self.offset)

    @classmethod
    def from_torch(cls, module: torch.nn.RMSNorm, *, backend: Optional[str] = None) -> "RMSNorm":
        """A tokenforge RMSNorm sharing ``module``'s weight (same Parameter object) and eps."""
        new = cls(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                  device="meta", backend=backend)
        new.weight = module.weight
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.normalized_shape)
        if tuple(x.shape[-k:]) != self.normalized_shape:
            raise ValueError(
                f"RMSNorm: input shape {tuple(x.shape)} does not end with normalized_shape {self.normalized_shape}"
            )
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        if k == 1:
            return rms_norm(x, self.weight, eps, offset=self.offset, casting_mode=self.casting_mode,
                            backend=self.backend, fp8=self.fp8_emit)
        # Several normalised dims: flatten them into one row of length prod(normalized_shape).
        n = math.prod(self.normalized_shape)
        weight = self.weight.reshape(n) if self.weight is not None else None
        y = rms_norm(x.reshape(*x.shape[:-k], n), weight, eps, offset=self.offset, casting_mode=self.casting_mode,
                     backend=self.backend)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        offset = f", offset={self.offset}" if self.offset else ""
        cast = f", casting_mode={self.casting_mode!r}" if self.casting_mode != "gemma" else ""
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}{offset}{cast}"
