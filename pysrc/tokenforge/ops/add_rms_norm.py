"""Residual add + RMSNorm, fused: ``h = x + residual; y = rms_norm(h) * weight``, returning (y, h).

The pre-norm transformer block does this between every sublayer: the sublayer output x joins the
residual stream, and the stream is normalised for the next sublayer. Fused, x and residual are read
once and y and h written once (unfused: the add reads 2 and writes 1, the norm reads 1 and writes 1).

Rounding: h is computed in fp32 and rounded to ``residual``'s dtype *before* it is normalised, so
the result is that of the unfused ``h = x + residual; y = rms_norm(h, weight)`` with h stored in
residual's dtype (in bf16 the norm sees bf16 h, exactly like the unfused bf16 code). y has x's
dtype; both gradients receive dh + d(rms_norm)/dh, in x's and residual's dtypes.

Path of a call: :func:`add_rms_norm` validates and picks a backend -> :class:`AddRMSNormFunction`
(autograd; saves h, weight and the per-row rstd) -> the custom ops ``tokenforge::add_rms_norm_fwd``
/ ``_bwd`` -> ``tokenforge.kernels.add_rms_norm`` (Triton). The ``torch`` backend is
:func:`add_rms_norm_reference`, differentiated by autograd.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge.ops.layout import rows_view

from tokenforge import backends
from tokenforge.dtensor import any_dtensor, run_on_shards
from tokenforge.ops.rms_norm import check_offset_and_casting_mode, emits_fp8, rms_norm_cast_reference

OP = "add_rms_norm"


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                           eps: float = 1e-6, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch (y, h): h = x + residual rounded to residual's dtype, y = RMSNorm(h) * (offset +
    weight) in x's dtype. The oracle of the tests, the CPU fallback and the eager baseline of the
    benchmarks. Low-precision math is fp32; float64 stays float64."""
    compute = torch.float64 if torch.float64 in (x.dtype, residual.dtype) else torch.float32
    h = (x.to(compute) + residual.to(compute)).to(residual.dtype)
    hc = h.to(compute)
    y = hc * torch.rsqrt(hc.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (weight.to(compute) + offset)
    return y.to(x.dtype), h


# ---------------------------------------------------------------------------------------------
# Input checks: every refusal says what to do.
# ---------------------------------------------------------------------------------------------


def _check_inputs(x, residual, weight, eps) -> None:
    for what, t in (("x", x), ("residual", residual)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"add_rms_norm: {what} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"add_rms_norm: {what} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                f"got {t.dtype}; convert it first, e.g. {what}.float()"
            )
    if x.shape != residual.shape:
        raise ValueError(
            f"add_rms_norm: x has shape {tuple(x.shape)} but residual has {tuple(residual.shape)}; they must "
            "match (broadcasting is not supported: expand the residual explicitly)"
        )
    if x.device != residual.device:
        raise ValueError(f"add_rms_norm: x is on {x.device} but residual is on {residual.device}; move both to the same device")
    if x.dim() == 0:
        raise ValueError("add_rms_norm: x must have at least one dimension (the one normalised over)")
    if x.shape[-1] == 0:
        raise ValueError("add_rms_norm: the last dim of x (normalised over) must be at least 1, got 0")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"add_rms_norm: weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"add_rms_norm: weight must be floating point, got {weight.dtype}; convert it, e.g. weight.float()")
        if tuple(weight.shape) != (x.shape[-1],):
            raise ValueError(
                f"add_rms_norm: weight has shape {tuple(weight.shape)} but must be ({x.shape[-1]},), the last dim of x"
            )
        if weight.device != x.device:
            raise ValueError(f"add_rms_norm: x is on {x.device} but weight is on {weight.device}; move both to the same device")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"add_rms_norm: eps must be a non-negative float, got {eps!r}")


def _triton_supports(x, residual, weight) -> Optional[str]:
    reason = backends.triton_unsupported_reason(x.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import add_rms_norm as triton_add_rms_norm

    return triton_add_rms_norm.supports(x, residual, weight)


backends.register_op(OP, cuda_preference=("triton",),
                     supports={"triton": _triton_supports, "torch": lambda x, residual, weight: None},
                     example_inputs=lambda device, dtype: (torch.empty(2, 64, device=device, dtype=dtype),
                                                           torch.empty(2, 64, device=device, dtype=dtype),
                                                           torch.empty(64, device=device, dtype=dtype)))


# The custom ops below call their backend's launcher through this table (no dispatch in between).
LAUNCHERS = backends.Launchers(OP, triton="tokenforge.kernels.add_rms_norm")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees. Tensors are 2-D with unit column stride.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("tokenforge::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return LAUNCHERS[backend].add_rms_norm_forward(x, residual, weight, eps)


@add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, backend):
    return (x.new_empty(x.shape), residual.new_empty(x.shape),
            x.new_empty((x.shape[0],), dtype=torch.float32))


@torch.library.custom_op("tokenforge::add_rms_norm_bwd", mutates_args=())
def add_rms_norm_bwd(dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor, weight: Optional[torch.Tensor],
                     rstd: torch.Tensor, x_dtype: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dr, dw = LAUNCHERS[backend].add_rms_norm_backward(dy, dh, h, weight, rstd, _DTYPES[x_dtype])
    # Custom ops cannot return None; an empty tensor stands for "no weight, no dweight".
    return dx, dr, dw if dw is not None else h.new_empty((0,))


@add_rms_norm_bwd.register_fake
def _(dy, dh, h, weight, rstd, x_dtype, backend):
    dw = weight.new_empty(weight.shape) if weight is not None else h.new_empty((0,))
    return h.new_empty(h.shape, dtype=_DTYPES[x_dtype]), h.new_empty(h.shape), dw




class AddRMSNormFunction(torch.autograd.Function):
    """Autograd for the kernel backends: saves h (the new residual, an output anyway), weight and
    rstd (4 bytes a row); x and residual themselves are not kept."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, backend):
        w = weight.contiguous() if weight is not None else None
        y, h, rstd = torch.ops.tokenforge.add_rms_norm_fwd(rows_view(x), rows_view(residual), w, float(eps), backend)
        ctx.save_for_backward(h, w, rstd)
        ctx.set_materialize_grads(False)  # an unused h gets no gradient pass at all
        ctx.backend = backend
        ctx.shape = x.shape
        ctx.x_dtype = x.dtype
        return y.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh):
        h, w, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(ctx.shape, dtype=ctx.x_dtype, device=h.device)
        dy2 = rows_view(dy.to(ctx.x_dtype))
        dh2 = rows_view(dh.to(h.dtype)) if dh is not None else None
        dx, dr, dw = torch.ops.tokenforge.add_rms_norm_bwd(dy2, dh2, h, w, rstd, str(ctx.x_dtype).split(".")[-1],
                                                           ctx.backend)
        return dx.view(ctx.shape), dr.view(ctx.shape), (dw if w is not None else None), None, None


@torch.library.custom_op("tokenforge::add_rms_norm_fwd_fp8", mutates_args=())
def add_rms_norm_fwd_fp8(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                         fp8_dtype: torch.dtype, blockwise: bool, power_of_two: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from tokenforge.kernels import add_rms_norm as kernel

    return kernel.add_rms_norm_forward_fp8(x, residual, weight, eps, fp8_dtype, blockwise, power_of_two)


@add_rms_norm_fwd_fp8.register_fake
def _(x, residual, weight, eps, fp8_dtype, blockwise, power_of_two):
    groups = -(-x.shape[1] // 128) if blockwise else 1
    return (x.new_empty(x.shape), residual.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=torch.float32),
            x.new_empty(x.shape, dtype=fp8_dtype), x.new_empty((x.shape[0], groups), dtype=torch.float32))


class AddRMSNormFP8Function(torch.autograd.Function):
    """AddRMSNormFunction whose forward also emits the normed output in fp8 for the next
    Float8Linear (the Triton row kernel; see tokenforge.fp8.emit): outputs (y, h, data, scale)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, cast):
        w = weight.contiguous() if weight is not None else None
        y, h, rstd, data, scale = torch.ops.tokenforge.add_rms_norm_fwd_fp8(
            rows_view(x), rows_view(residual), w, float(eps), cast.fp8_dtype, cast.blockwise, cast.power_of_two)
        ctx.save_for_backward(h, w, rstd)
        ctx.set_materialize_grads(False)
        ctx.backend = "triton"
        ctx.shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(data, scale)
        return y.view(x.shape), h.view(x.shape), data, scale

    @staticmethod
    def backward(ctx, dy, dh, _ddata, _dscale):
        return AddRMSNormFunction.backward(ctx, dy, dh)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6, *,
                 offset: float = 0.0, casting_mode: str = "gemma", backend: Optional[str] = None,
                 fp8=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) for x, residual (..., n) and weight (n,) or None: new_residual = x +
    residual in residual's dtype, normed = RMSNorm(new_residual) * weight in x's dtype; fp32/fp16/bf16
    (float64 on the torch backend). ``offset`` and ``casting_mode`` are :func:`tokenforge.ops.rms_norm`'s
    (Gemma: ``offset=1.0``; ``"llama"`` rounds x_hat to x's dtype before the weight multiply, ``"none"``
    computes in the stream's dtype). ``backend`` forces triton or torch. ``fp8``: a
    tokenforge.fp8.EmitCast to also emit normed in fp8 for the next Float8Linear where the Triton
    row kernel runs (tokenforge.fp8.emit; the fused "gemma" mode only). DTensor inputs: as
    :func:`tokenforge.ops.rms_norm`, each output in its input's placements."""
    if any_dtensor(x, residual, weight):
        return run_on_shards("add_rms_norm", lambda x, r, w: add_rms_norm(x, r, w, eps, offset=offset,
                                                                          casting_mode=casting_mode, backend=backend),
                             [x, residual], [weight])
    _check_inputs(x, residual, weight, eps)
    check_offset_and_casting_mode("add_rms_norm", offset, casting_mode)
    if weight is None:
        offset = 0.0  # nothing to shift, as in rms_norm
    if casting_mode == "none":
        h = (x + residual).to(residual.dtype)
        return rms_norm_cast_reference(h, weight, eps, offset, "none").to(x.dtype), h
    if casting_mode == "llama":
        # The kernel adds and normalises (x_hat rounded to x's dtype); the weight multiplies after.
        x_hat, h = add_rms_norm(x, residual, None, eps, backend=backend)
        return ((weight + offset) * x_hat if weight is not None else x_hat), h
    if x.numel() == 0:
        return add_rms_norm_reference(x, residual, weight, eps, offset)
    name = backends.choose(OP, x, residual, weight, backend=backend)
    if name == "torch":
        return add_rms_norm_reference(x, residual, weight, eps, offset)
    if offset:
        # As in rms_norm: an fp32 (offset + weight); autograd carries dweight back to weight's dtype.
        weight = weight.float() + offset
    if emits_fp8(fp8, name, x):
        from tokenforge.fp8.emit import attach

        y, h, data, scale = AddRMSNormFP8Function.apply(x, residual, weight, eps, fp8)
        return attach(y, data, scale, fp8), h
    return AddRMSNormFunction.apply(x, residual, weight, eps, name)
