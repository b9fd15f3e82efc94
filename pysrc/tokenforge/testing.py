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


# A row may be off by this many times the tolerance before rel_error reports it: per-row errors of
# a correct kernel scatter around the norm-wise one (the worst of thousands of rows is ~2-3x it),
# while one wrong row among thousands barely moves the norm-wise error (by 1/sqrt(rows)).
ROW_SLACK = 4.0


def normwise_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the whole tensor, in float64 (inf for NaN/inf in out)."""
    out64, ref64 = _as64(out, ref)
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    if denom == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / denom


def row_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """float64 (rows,): ||out_r - ref_r|| / max(||ref_r||, ||ref|| / sqrt(rows)) for each row r of
    the (-1, last dim) view. The floor keeps a row whose reference is ~0 (a masked query, a row of
    tiny gradients) from counting a rounding-sized difference as a large relative error; so a row
    far smaller than the typical one is judged against the typical row. A test whose rows differ in
    magnitude on purpose measures each row against itself (tests/test_fp8_linear.py does)."""
    out64, ref64 = _as64(out, ref)
    if out64.dim() < 2:
        out64, ref64 = out64.reshape(1, -1), ref64.reshape(1, -1)
    o, r = out64.reshape(-1, out64.shape[-1]), ref64.reshape(-1, ref64.shape[-1])
    rows = max(o.shape[0], 1)
    floor = r.norm() / rows ** 0.5
    denom = torch.maximum(r.norm(dim=1), floor)
    num = (o - r).norm(dim=1)
    err = torch.where(denom > 0, num / torch.where(denom > 0, denom, torch.ones_like(denom)),
                      torch.where(num > 0, torch.full_like(num, float("inf")), torch.zeros_like(num)))
    return torch.where(torch.isfinite(o).all(dim=1), err, torch.full_like(err, float("inf")))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The error every tokenforge test bounds by TOLERANCE: the norm-wise ||out - ref|| / ||ref||,
    or the worst row's error (:func:`row_errors`) divided by ROW_SLACK when that is larger, so one
    wrong row among 16384 fails the same bound a wrong tensor does. float64, on out's device (a
    real-size GPU check pays no copy to the host); inf if out has NaN/inf where ref is finite."""
    err = normwise_error(out, ref)
    if err == float("inf") or out.dim() < 2 or out.numel() == 0:
        return err
    worst = row_errors(out, ref).max().item()
    return max(err, worst / ROW_SLACK)


def _as64(out: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out64 = out.detach().to(dtype=torch.float64)
    ref64 = ref.detach().to(device=out64.device, dtype=torch.float64)
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape mismatch: {tuple(out64.shape)} vs reference {tuple(ref64.shape)}")
    return out64, ref64


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
    """Within this mode every floating-point ``torch.empty*`` comes back filled with NaN (an integer
    one with its dtype's most negative value), so an output element that a kernel never writes
    shows up instead of passing as stale memory.

    Use it around direct calls of kernel launchers (a custom op's body runs outside the mode)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _empty_ops() and isinstance(out, torch.Tensor):
            if out.is_floating_point():
                out.fill_(float("nan"))
            elif out.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
                out.fill_(torch.iinfo(out.dtype).min)
        return out


def keep_checkout_off_sys_path() -> None:
    """Drop the repository root from ``sys.path`` (tests/ and bench/ conftests call this first).

    ``python -m pytest`` from the checkout puts its root on ``sys.path``, and there the top-level
    ``kernels/`` folder (installed as ``tokenforge.kernels``) shadows Hugging Face's ``kernels``
    package, which transformers 5.25+ imports: the HF tests would fail on an ImportError that no
    installed user sees. tokenforge itself is imported from the installed package either way."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isdir(os.path.join(root, "kernels")):  # an installed copy: nothing to shadow
        return
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    stale = sys.modules.get("kernels")
    if stale is not None and os.path.dirname(os.path.dirname(getattr(stale, "__file__", "") or "")) == root:
        del sys.modules["kernels"]  # imported through the shadow before this ran
