"""Checking kernels against references: relative error, tolerances, NaN-poisoned outputs.

Shared by tests/ and bench/ (and usable by anyone validating a tokenforge kernel on their setup).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ||out - ref|| / ||ref|| bounds against a float64 reference, by the dtype of the *inputs*
# (see DESIGN.md, "Precision and numerics").
TOLERANCE = {
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf if out has NaN/inf where ref is finite), computed on
    out's device: real-size GPU checks should not pay a copy of both tensors to the host."""
    out64 = out.detach().to(dtype=torch.float64)
    ref64 = ref.detach().to(device=out64.device, dtype=torch.float64)
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape mismatch: {tuple(out64.shape)} vs reference {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    if denom == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / denom


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> float:
    """Assert rel_error(out, ref) <= tol; returns the error."""
    err = rel_error(out, ref)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} > tolerance {tol:.1e}")
    return err


_EMPTY_OPS = None


def _empty_ops():
    global _EMPTY_OPS
    if _EMPTY_OPS is None:
        aten = torch.ops.aten
        _EMPTY_OPS = {
            aten.empty.memory_format,
            aten.empty_strided.default,
            aten.empty_like.default,
            aten.new_empty.default,
            aten.new_empty_strided.default,
        }
    return _EMPTY_OPS


class PoisonEmpty(TorchDispatchMode):
    """Within this mode every floating-point ``torch.empty*`` comes back filled with NaN, so an
    output element that a kernel never writes shows up as NaN instead of passing as stale memory.

    Use it around direct calls of kernel launchers (a custom op's body runs outside the mode)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _empty_ops() and isinstance(out, torch.Tensor) and out.is_floating_point():
            out.fill_(float("nan"))
        return out
