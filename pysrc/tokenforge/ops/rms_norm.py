"""RMSNorm: ``y = x / sqrt(mean(x**2, -1) + eps) * weight``, normalising over the last dim.

Path of a call: :func:`rms_norm` validates and picks a backend ->
:class:`RMSNormFunction` (autograd; saves x, weight and the per-row rstd) ->
the custom ops ``tokenforge::rms_norm_fwd`` / ``tokenforge::rms_norm_bwd`` (opaque to
``torch.compile`` through their fake implementations) -> ``tokenforge.kernels.rms_norm`` (Triton)
or ``tokenforge.cuda.rms_norm`` (CUDA C++). The ``torch`` backend is :func:`rms_norm_reference`,
differentiated by autograd.

Semantics follow ``torch.nn.functional.rms_norm``: y has x's dtype, the statistics are computed in
fp32 (or in float64 for float64 inputs on the torch backend), dweight has weight's dtype.
``offset`` scales by ``(offset + weight)`` instead of ``weight``, the sum taken in fp32 (Gemma's
RMSNorm: ``offset=1.0`` with zero-initialised weights, ``(x_hat * (1 + w.float())).to(x.dtype)``).
With no weight there is nothing to shift and ``offset`` is ignored (Gemma's norm without an affine
weight is plain ``x_hat``).

``casting_mode`` picks where the rounding to low precision happens, for exact parity with a model's
own norm (Liger-Kernel's names): ``"gemma"`` (the default; all fp32, y rounded once to x's dtype:
the fused kernel); ``"llama"`` (x_hat rounded to x's dtype, then times the weight in the promoted
dtype of x and weight, so an fp32 weight gives an fp32 y: HF Llama's; the kernel normalises, the
weight multiply is one more elementwise pass); ``"none"`` (every step in x's dtype; the torch
reference, for comparing against models that never upcast).
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge.ops.layout import rows_view

from tokenforge import backends
from tokenforge.dtensor import any_dtensor, run_on_shards

OP = "rms_norm"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rms_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6,
                       offset: float = 0.0) -> torch.Tensor:
    """Plain PyTorch RMSNorm over the last dim: the oracle of the tests, the CPU fallback and the
    eager baseline of the benchmarks. Low-precision inputs are upcast to fp32; float64 stays float64."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute)
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (weight.to(compute) + offset)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Input checks: every refusal says what to do.
# ---------------------------------------------------------------------------------------------


def _check_inputs(x, weight, eps) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"rms_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"rms_norm: x must be a floating-point tensor (float32, float16, bfloat16 or float64), "
            f"got {x.dtype}; convert it first, e.g. x.float()"
        )
    if x.dim() == 0:
        raise ValueError("rms_norm: x must have at least one dimension (the one normalised over)")
    if x.shape[-1] == 0:
        raise ValueError("rms_norm: the last dim of x (normalised over) must be at least 1, got 0")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"rms_norm: weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"rms_norm: weight must be floating point, got {weight.dtype}; convert it, e.g. weight.float()")
        if tuple(weight.shape) != (x.shape[-1],):
            raise ValueError(
                f"rms_norm: weight has shape {tuple(weight.shape)} but must be ({x.shape[-1]},), the last dim "
                f"of x {tuple(x.shape)}; to normalise over several trailing dims use tokenforge.nn.RMSNorm"
            )
        if weight.device != x.device:
            raise ValueError(
                f"rms_norm: x is on {x.device} but weight is on {weight.device}; move both to the same device"
            )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"rms_norm: eps must be a non-negative float, got {eps!r}")


def _triton_supports(x, weight) -> Optional[str]:
    reason = backends.triton_unsupported_reason(x.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import rms_norm as triton_rms_norm

    return triton_rms_norm.supports(x, weight)


def _cuda_supports(x, weight) -> Optional[str]:
    reason = backends.cuda_ext_unsupported_reason(x.device)
    if reason is not None:
        return reason
    from tokenforge.cuda import rms_norm as cuda_rms_norm

    return cuda_rms_norm.supports(x, weight)


backends.register_op(
    OP,
    # Triton first until the H200 benchmark ranks them (bench/results).
    cuda_preference=("triton", "cuda"),
    supports={"triton": _triton_supports, "cuda": _cuda_supports, "torch": lambda x, weight: None},
    example_inputs=lambda device, dtype: (torch.empty(2, 64, device=device, dtype=dtype),
                                          torch.empty(64, device=device, dtype=dtype)),
)


# The custom ops below call their backend's launcher through this table (no dispatch in between).
LAUNCHERS = backends.Launchers(OP, triton="tokenforge.kernels.rms_norm", cuda="tokenforge.cuda.rms_norm")


# ---------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees. x is 2-D with unit column stride.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("tokenforge::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return LAUNCHERS[backend].rms_norm_forward(x, weight, eps)


@rms_norm_fwd.register_fake
def _(x, weight, eps, backend):
    return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("tokenforge::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = LAUNCHERS[backend].rms_norm_backward(dy, x, weight, rstd)
    # Custom ops cannot return None; an empty tensor stands for "no weight, no dweight".
    return dx, dw if dw is not None else x.new_empty((0,))


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, backend):
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))
    return x.new_empty(x.shape), dw




@torch.library.custom_op("tokenforge::rms_norm_fwd_fp8", mutates_args=())
def rms_norm_fwd_fp8(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, fp8_dtype: torch.dtype,
                     blockwise: bool, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from tokenforge.kernels import rms_norm as kernel

    return kernel.rms_norm_forward_fp8(x, weight, eps, fp8_dtype, blockwise, power_of_two)


@rms_norm_fwd_fp8.register_fake
def _(x, weight, eps, fp8_dtype, blockwise, power_of_two):
    groups = -(-x.shape[1] // 128) if blockwise else 1
    return (x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=torch.float32),
            x.new_empty(x.shape, dtype=fp8_dtype), x.new_empty((x.shape[0], groups), dtype=torch.float32))


def _rms_norm_backward(ctx, dy):
    x2, w, rstd = ctx.saved_tensors
    dy2 = rows_view(dy.to(x2.dtype))
    dx, dw = torch.ops.tokenforge.rms_norm_bwd(dy2, x2, w, rstd, ctx.backend)
    return dx.view(ctx.x_shape), (dw if w is not None else None)


class RMSNormFunction(torch.autograd.Function):
    """Autograd for the kernel backends: saves x, weight and rstd (4 bytes a row), recomputes xhat."""

    @staticmethod
    def forward(ctx, x, weight, eps, backend):
        x2 = rows_view(x)
        w = weight.contiguous() if weight is not None else None
        y, rstd = torch.ops.tokenforge.rms_norm_fwd(x2, w, float(eps), backend)
        ctx.save_for_backward(x2, w, rstd)
        ctx.backend = backend
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        return (*_rms_norm_backward(ctx, dy), None, None)


class RMSNormFP8Function(torch.autograd.Function):
    """RMSNormFunction whose forward also emits y in fp8 (the Triton row kernel; see
    tokenforge.fp8.emit): outputs (y, data, scale), the last two without gradients."""

    @staticmethod
    def forward(ctx, x, weight, eps, cast):
        x2 = rows_view(x)
        w = weight.contiguous() if weight is not None else None
        y, rstd, data, scale = torch.ops.tokenforge.rms_norm_fwd_fp8(x2, w, float(eps), cast.fp8_dtype,
                                                                      cast.blockwise, cast.power_of_two)
        ctx.save_for_backward(x2, w, rstd)
        ctx.backend = "triton"
        ctx.x_shape = x.shape
        ctx.mark_non_differentiable(data, scale)
        return y.view(x.shape), data, scale

    @staticmethod
    def backward(ctx, dy, _ddata, _dscale):
        return (*_rms_norm_backward(ctx, dy), None, None)


def emits_fp8(fp8, backend: str, x: torch.Tensor) -> bool:
    """Whether a norm call on x can emit its output in fp8 (see tokenforge.fp8.emit): asked for, on
    the Triton row kernel (rms_norm and add_rms_norm share its row limit), in eager mode (attributes
    on tensors do not trace), and not under an autocast that hands the next layer another dtype."""
    if fp8 is None or backend != "triton" or torch.compiler.is_compiling():
        return False
    from tokenforge.fp8.emit import consumer_keeps_dtype
    from tokenforge.kernels.rms_norm import can_emit_fp8

    return consumer_keeps_dtype(x) and can_emit_fp8(x.shape[-1], fp8.blockwise)


CASTING_MODES = ("gemma", "llama", "none")


def check_offset_and_casting_mode(name: str, offset, casting_mode) -> None:
    """The refusals shared by rms_norm and add_rms_norm, each saying what to pass."""
    if not isinstance(offset, (int, float)) or isinstance(offset, bool) or offset != offset:
        raise ValueError(f"{name}: offset must be a float (1.0 for Gemma's (1 + weight)), got {offset!r}")
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"{name}: casting_mode must be one of {', '.join(CASTING_MODES)}, got {casting_mode!r}")


def rms_norm_cast_reference(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float,
                            casting_mode: str) -> torch.Tensor:
    """The "llama" and "none" casting modes written out in torch (see the module docstring)."""
    if casting_mode == "none":
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y * (weight.to(x.dtype) + offset) if weight is not None else y
    x_hat = rms_norm_reference(x, None, eps)
    return (weight + offset) * x_hat if weight is not None else x_hat


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6, *, offset: float = 0.0,
             casting_mode: str = "gemma", backend: Optional[str] = None, fp8=None) -> torch.Tensor:
    """RMSNorm of x (..., n) over its last dim times weight (n,) or None (times ``offset + weight``
    when offset is given: Gemma's ``offset=1.0``); fp32/fp16/bf16 (float64 on the torch backend);
    returns x's shape and dtype (``casting_mode="llama"``: the promoted dtype of x and weight).
    ``backend`` forces triton, cuda or torch. ``fp8``: a tokenforge.fp8.EmitCast to also emit y
    in fp8 for the next Float8Linear where the Triton row kernel runs (tokenforge.fp8.emit).
    DTensor x / weight (tensor or sequence parallelism): each rank normalises its rows, the last dim
    gathered first where it is sharded (:mod:`tokenforge.dtensor`)."""
    if any_dtensor(x, weight):
        return run_on_shards("rms_norm", lambda x, w: rms_norm(x, w, eps, offset=offset, casting_mode=casting_mode,
                                                               backend=backend), [x], [weight])
    _check_inputs(x, weight, eps)
    check_offset_and_casting_mode("rms_norm", offset, casting_mode)
    if weight is None:
        offset = 0.0  # nothing to shift: y = x_hat (Gemma's norm without an affine weight)
    if casting_mode == "none":
        return rms_norm_cast_reference(x, weight, eps, offset, "none")
    if casting_mode == "llama":
        # The kernel normalises (x_hat in x's dtype, as Llama rounds it); the weight multiplies after.
        x_hat = rms_norm(x, None, eps, backend=backend)
        return (weight + offset) * x_hat if weight is not None else x_hat
    if x.numel() == 0:
        return rms_norm_reference(x, weight, eps, offset)
    name = backends.choose(OP, x, weight, backend=backend)
    if name == "torch":
        return rms_norm_reference(x, weight, eps, offset)
    if offset:
        # The kernels take any weight dtype and multiply in fp32: an fp32 (offset + weight) is
        # exactly Gemma's, and autograd carries dweight back through the sum to weight's dtype.
        weight = weight.float() + offset
    if emits_fp8(fp8, name, x):
        from tokenforge.fp8.emit import attach

        y, data, scale = RMSNormFP8Function.apply(x, weight, eps, fp8)
        return attach(y, data, scale, fp8)
    return RMSNormFunction.apply(x, weight, eps, name)
