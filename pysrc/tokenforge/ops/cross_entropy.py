"""Cross-entropy over the last dim of logits, with label smoothing, z-loss and logit softcapping.

Path of a call: :func:`cross_entropy` validates and picks a backend -> :class:`CrossEntropyFunction`
(autograd; saves only the gradient w.r.t. the logits, computed in the forward) -> the custom ops
``tokenforge::cross_entropy_fwd`` (loss + gradient) / ``tokenforge::cross_entropy_scale_``
(backward: rescale the saved gradient in place by grad_output) -> ``tokenforge.kernels.cross_entropy``.
The ``torch`` backend is :func:`cross_entropy_reference`, differentiated by autograd.

Semantics follow ``torch.nn.functional.cross_entropy(logits, target, ignore_index=...,
reduction=..., label_smoothing=...)`` with the class dim last, plus:

- ``z_loss``: adds ``z_loss * logsumexp(x)**2`` per non-ignored token (PaLM);
- ``softcap > 0``: x = ``softcap * tanh(logits / softcap)`` first (Gemma 2), gradient included.

Differences from torch, on purpose:

- the loss is fp32 for fp16/bf16/fp32 logits (what autocast gives; float64 stays float64);
- 'mean' with every target ignored is 0 with zero gradients (torch gives nan);
- out-of-range targets: the torch backend and ``validate=True`` raise ValueError; the Triton
  kernel otherwise makes that token's loss and gradient NaN (checking needs a device sync).
  ``validate=None`` (the default) checks when that costs no sync: on CPU tensors.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge.ops.layout import rows_view
import torch.nn.functional as F

from tokenforge import backends

OP = "cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cross_entropy_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Plain PyTorch cross-entropy (class dim last): the oracle of the tests, the CPU fallback and the
    eager baseline of the benchmarks. fp32 math (float64 for float64 logits); fp32 loss."""
    V = logits.shape[-1]
    x = logits.reshape(-1, V).to(_compute_dtype(logits.dtype))
    t = target.reshape(-1)
    _check_targets_in_range(t, V, ignore_index)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    valid = t != ignore_index
    loss = F.cross_entropy(x, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(x, dim=-1).pow(2) * valid
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Input checks: every refusal says what to do.
# ---------------------------------------------------------------------------------------------


def _check_targets_in_range(t: torch.Tensor, V: int, ignore_index: int) -> None:
    """Raise ValueError for a target outside [0, V) that is not ignore_index (syncs the device)."""
    bad = (t != ignore_index) & ((t < 0) | (t >= V))
    if bool(bad.any()):
        value = int(t[bad][0])
        raise ValueError(
            f"cross_entropy: target value {value} is out of range for {V} classes (valid: 0..{V - 1}, "
            f"or ignore_index={ignore_index}); fix the labels or set ignore_index"
        )


def check_options(name, ignore_index, reduction, label_smoothing, z_loss, softcap) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{name}: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    for opt, value, ok, what in (
        ("label_smoothing", label_smoothing, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
        ("z_loss", z_loss, lambda v: v >= 0.0, ">= 0"),
        ("softcap", softcap, lambda v: v >= 0.0 and v != float("inf"), ">= 0 and finite (0 turns it off)"),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
            raise ValueError(f"{name}: {opt} must be a float {what}, got {value!r}")


def check_target(name, target, batch_shape, device) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"{name}: target must be int64 class indices, got {target.dtype}; use target.long()")
    if tuple(target.shape) != tuple(batch_shape):
        raise ValueError(
            f"{name}: target has shape {tuple(target.shape)} but must be {tuple(batch_shape)} (the leading dims "
            "of the input; the class dim is the last one, class probabilities are not supported)"
        )
    if target.device != device:
        raise ValueError(f"{name}: target is on {target.device} but the input is on {device}; move both to one device")


def _check_inputs(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cross_entropy: logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"cross_entropy: logits must be floating point (float32, float16, bfloat16 or float64), "
                        f"got {logits.dtype}; convert them, e.g. logits.float()")
    if logits.dim() == 0:
        raise ValueError("cross_entropy: logits must have at least one dimension (the classes, last)")
    if logits.shape[-1] == 0:
        raise ValueError("cross_entropy: logits need at least one class (last dim is 0)")
    check_target("cross_entropy", target, logits.shape[:-1], logits.device)
    check_options("cross_entropy", ignore_index, reduction, label_smoothing, z_loss, softcap)


def _triton_supports(logits) -> Optional[str]:
    reason = backends.triton_unsupported_reason(logits.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import cross_entropy as kernels_ce

    return kernels_ce.supports(logits)


backends.register_op(OP, cuda_preference=("triton",),
                     supports={"triton": _triton_supports, "torch": lambda logits: None},
                     example_inputs=lambda device, dtype: (torch.empty(4, 1000, device=device, dtype=dtype),))


# ---------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees. logits are 2-D with unit column stride.
# ---------------------------------------------------------------------------------------------


def n_valid_of(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Non-ignored targets as an fp32 device scalar, at least 1 (all ignored: loss 0, no nan)."""
    return (target != ignore_index).sum().clamp_(min=1).to(torch.float32)


@torch.library.custom_op("tokenforge::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float, mean: bool, compute_grad: bool, validate: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row fp32 loss, dlogits or an empty tensor, n_valid fp32 scalar)."""
    from tokenforge.kernels import cross_entropy as kernels_ce

    if validate:
        _check_targets_in_range(target, logits.shape[1], ignore_index)
    n_valid = n_valid_of(target, ignore_index)
    loss, dlogits = kernels_ce.cross_entropy_forward(
        logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, n_valid=n_valid if mean else None, compute_grad=compute_grad,
    )
    return loss, dlogits if dlogits is not None else logits.new_empty((0,)), n_valid


@cross_entropy_fwd.register_fake
def _(logits, target, ignore_index, label_smoothing, z_loss, softcap, mean, compute_grad, validate, backend):
    rows = logits.shape[0]
    dlogits = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return logits.new_empty((rows,), dtype=torch.float32), dlogits, logits.new_empty((), dtype=torch.float32)


@torch.library.custom_op("tokenforge::cross_entropy_scale_", mutates_args=("dlogits",))
def cross_entropy_scale_(dlogits: torch.Tensor, grad_output: torch.Tensor, backend: str) -> None:
    """dlogits *= grad_output (scalar or per row), in place: the whole backward."""
    from tokenforge.kernels import cross_entropy as kernels_ce

    kernels_ce.scale_rows_(dlogits, grad_output)


@cross_entropy_scale_.register_fake
def _(dlogits, grad_output, backend):
    return None




def reduce_loss(loss: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / n_valid
    return loss


def _is_one(grad_output: torch.Tensor) -> bool:
    """True when grad_output is the scalar 1, checked only in eager mode (a host sync, as in
    Liger-Kernel); never under torch.compile or CUDA-graph capture, where it cannot be read."""
    if grad_output.numel() != 1 or torch.compiler.is_compiling():
        return False
    if grad_output.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return bool(grad_output.reshape(()) == 1)


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd for the Triton backend: the forward computes dlogits; only they are saved (no
    logits), and backward rescales them in place by grad_output (no logits-sized allocation in
    backward). A second backward through the same graph (retain_graph=True) is refused by
    autograd's version counter ("modified by an inplace operation"): the gradient was consumed."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap, validate, backend):
        x2 = rows_view(logits)
        compute_grad = bool(ctx.needs_input_grad[0])
        loss, dlogits, n_valid = torch.ops.tokenforge.cross_entropy_fwd(
            x2, target.reshape(-1).contiguous(), ignore_index, float(label_smoothing), float(z_loss), float(softcap),
            reduction == "mean", compute_grad, validate, backend)
        ctx.save_for_backward(dlogits)
        ctx.logits_shape = logits.shape
        ctx.backend = backend
        out = reduce_loss(loss, n_valid, reduction)
        return out.reshape(target.shape) if reduction == "none" else out

    @staticmethod
    def backward(ctx, grad_output):
        (dlogits,) = ctx.saved_tensors
        if _is_one(grad_output):
            # loss.backward() of a 'mean'/'sum' loss: nothing to scale; skipping saves a read and
            # a write of the whole gradient. Bump the version anyway, so that a second backward
            # through this graph is refused just as after an in-place scale.
            torch.autograd.graph.increment_version(dlogits)
        else:
            torch.ops.tokenforge.cross_entropy_scale_(dlogits, grad_output.reshape(-1), ctx.backend)
        return dlogits.view(ctx.logits_shape), None, None, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    validate: Optional[bool] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Cross-entropy of logits (..., V) fp32/fp16/bf16 (float64 on the torch backend) against int64
    target (...); fp32 loss, scalar or target's shape for reduction='none'. ``validate`` raises on
    out-of-range targets (a device sync; default: only on CPU). ``backend`` forces triton or torch."""
    _check_inputs(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap)
    if logits.numel() == 0:
        return cross_entropy_reference(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap)
    name = backends.choose(OP, logits, backend=backend)
    if name == "torch":
        return cross_entropy_reference(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap)
    if validate is None:
        validate = logits.device.type == "cpu"
    return CrossEntropyFunction.apply(logits, target, ignore_index, reduction, float(label_smoothing),
                                      float(z_loss), float(softcap), bool(validate), name)
