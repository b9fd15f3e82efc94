"""Cross-entropy over the last dim of logits, with label smoothing, z-loss and logit softcapping.

Path of a call: :func:`cross_entropy` validates and picks a backend -> :class:`CrossEntropyFunction`
(autograd; saves only the gradient w.r.t. the logits, computed in the forward) -> the custom ops
``tokenforge::cross_entropy_fwd`` (loss + gradient) / ``tokenforge::cross_entropy_scale_``
(backward: rescale the saved gradient in place by grad_output) -> ``tokenforge.kernels.cross_entropy``.
The ``torch`` backend is :func:`cross_entropy_reference`, differentiated by autograd.

Semantics follow ``torch.nn.functional.cross_entropy(logits, target, ignore_index=...,
reduction=..., label_smoothing=...)`` with the class dim last, plus:

- ``z_loss``: adds ``z_loss * logsumexp(x)**2`` per non-ignored token (PaLM);
- ``softcap > 0``: x = ``softcap * tanh(logits / softcap)`` first (Gemma 2), gradient included;
- ``weight`` (V,): torch's class weights; 'mean' divides the cross-entropy part by the sum of
  weight[target] over non-ignored tokens (torch's rule) and the z-loss part by their count;
- ``return_z_loss`` / ``return_token_accuracy`` / ``return_predicted_tokens``: a
  :class:`CrossEntropyOutput` (loss, z_loss, token_accuracy, predicted_tokens) instead of the loss,
  z-loss and accuracy reduced like the loss ('mean': over non-ignored tokens; 'none': per token),
  all without gradient (for logging; the loss carries the z-loss's gradient). The predicted token
  is the first argmax of the logits as given (before the softcap), int64 in target's shape, -1 for
  ignored tokens, found in the same pass as the loss (no logits-sized argmax afterwards). Token
  accuracy: the predicted token equals the target; ignored tokens count as neither.
- ``token_scaling``: each token's loss (z-loss included) and gradient times its target
  probability softmax(x)[t], held constant (no gradient through it): Liger-Kernel's
  ``use_token_scaling``, the per-token weighting of dynamic fine-tuning (DFT). 'mean' still divides
  by the non-ignored count (or the class weights' sum), as without it.

The loss (and z-loss) has torch's dtype: the logits' dtype, but fp32 for fp16/bf16 logits under
autocast (cross_entropy is on autocast's fp32 list); computed in fp32 and rounded once.

Differences from torch, on purpose:

- 'mean' with every target ignored is 0 with zero gradients (torch gives nan);
- out-of-range targets: the torch backend and ``validate=True`` raise ValueError; the Triton
  kernel otherwise makes that token's loss and gradient NaN (checking needs a device sync).
  ``validate=None`` (the default) checks when that costs no sync: on CPU tensors.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from tokenforge.ops.layout import rows_view
import torch.nn.functional as F

from tokenforge import backends
from tokenforge.dtensor import any_dtensor

OP = "cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class CrossEntropyOutput(NamedTuple):
    """What ``return_z_loss`` / ``return_token_accuracy`` / ``return_predicted_tokens`` give: the
    loss (with gradient), and the requested extras (no gradient; None when not requested). The
    fields and their order are Liger-Kernel's."""

    loss: torch.Tensor
    z_loss: Optional[torch.Tensor]
    token_accuracy: Optional[torch.Tensor]
    predicted_tokens: Optional[torch.Tensor] = None


def cross_entropy_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    weight: Optional[torch.Tensor] = None,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    token_scaling: bool = False,
):
    """Plain PyTorch cross-entropy (class dim last): the oracle of the tests, the CPU fallback and the
    eager baseline of the benchmarks. fp32 math (float64 for float64 logits); fp32 loss."""
    V = logits.shape[-1]
    raw = logits.reshape(-1, V)
    x = raw.to(_compute_dtype(logits.dtype))
    t = target.reshape(-1)
    _check_targets_in_range(t, V, ignore_index)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    valid = t != ignore_index
    w = weight.to(x.dtype) if weight is not None else None
    ce = F.cross_entropy(x, t, weight=w, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    lse = torch.logsumexp(x, dim=-1)
    z_rows = z_loss * lse.pow(2) * valid
    if token_scaling:
        p_t = torch.exp(x.gather(1, torch.where(valid, t, 0)[:, None])[:, 0] - lse).detach()
        ce, z_rows = ce * p_t, z_rows * p_t
    n_valid = valid.sum().clamp(min=1).to(x.dtype)
    if reduction == "none":
        loss = (ce + z_rows).reshape(target.shape)
    elif reduction == "sum":
        loss = ce.sum() + z_rows.sum()
    else:
        w_valid = (w[torch.where(valid, t, 0)] * valid).sum() if w is not None else n_valid
        w_valid = torch.where(valid.any(), w_valid, torch.ones_like(w_valid))
        loss = ce.sum() / w_valid + z_rows.sum() / n_valid
    if not (return_z_loss or return_token_accuracy or return_predicted_tokens):
        return loss
    pred_rows = torch.where(valid, raw.argmax(dim=-1), -1)
    acc_rows = accuracy_rows(pred_rows, t, ignore_index, V) if return_token_accuracy else None
    return with_extras(loss, z_rows if return_z_loss else None, acc_rows, n_valid, reduction, target.shape,
                       pred_rows if return_predicted_tokens else None)


def accuracy_rows(pred_rows: torch.Tensor, target: torch.Tensor, ignore_index: int, V: int) -> torch.Tensor:
    """Per-row fp32 token accuracy from the predicted tokens: 1.0 / 0.0, 0.0 for ignored rows, NaN
    for a target outside [0, V) (the kernels' rule for a bad label: it never passes as a number)."""
    valid = target != ignore_index
    acc = ((pred_rows == target) & valid).float()
    return torch.where(valid & ((target < 0) | (target >= V)), float("nan"), acc)


def with_extras(loss, z_rows, acc_rows, n_valid, reduction, shape, pred_rows=None) -> CrossEntropyOutput:
    """The :class:`CrossEntropyOutput` of per-row z-loss terms, 1.0/0.0 accuracy flags and predicted
    tokens (None: not asked for): 'none' keeps z-loss and accuracy per token (in ``shape``);
    otherwise the z-loss is summed ('sum') or averaged over non-ignored tokens ('mean'), and
    accuracy is always that fraction. Predicted tokens stay per token (int64, in ``shape``)."""
    def per_token(rows):
        return rows.detach().to(loss.dtype).reshape(shape)

    z_out = acc_out = None
    if z_rows is not None:
        z_out = per_token(z_rows)
        if reduction != "none":
            z_out = z_out.sum() if reduction == "sum" else z_out.sum() / n_valid.to(loss.dtype)
    if acc_rows is not None:
        acc_out = per_token(acc_rows)
        if reduction != "none":
            acc_out = acc_out.sum() / n_valid.to(loss.dtype)
    pred_out = pred_rows.detach().reshape(shape) if pred_rows is not None else None
    return CrossEntropyOutput(loss, z_out, acc_out, pred_out)


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


def check_class_weight(name, what, weight, V, device) -> None:
    """Class weights: None or a floating (V,) tensor on the input's device, without gradient."""
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: {what} must be a torch.Tensor of one weight per class or None, "
                        f"got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{name}: {what} must be floating point, got {weight.dtype}; use {what}.float()")
    if tuple(weight.shape) != (V,):
        raise ValueError(f"{name}: {what} must have one entry per class, shape ({V},), got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"{name}: {what} is on {weight.device} but the input is on {device}; move both to one device")
    if weight.requires_grad:
        raise ValueError(f"{name}: {what} requires grad, but class weights are constants here (no gradient is "
                         f"computed for them); pass {what}.detach()")


def check_flags(name, **flags) -> None:
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {flag} must be True or False, got {value!r}")


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


def weight_valid_of(class_weight: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Sum of class_weight[target] over non-ignored targets (fp32 device scalar; 1 when every target
    is ignored, so that 'mean' gives 0, not nan): the weighted 'mean''s denominator, torch's rule."""
    valid = target != ignore_index
    t = torch.where(valid, target, 0).clamp_(0, class_weight.shape[0] - 1)  # out of range: NaN rows anyway
    total = (class_weight.float()[t] * valid).sum()
    return torch.where(valid.any(), total, torch.ones_like(total))


def class_weight_for_kernel(class_weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return class_weight.detach().to(torch.float32).contiguous() if class_weight is not None else None


@torch.library.custom_op("tokenforge::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float, mean: bool, compute_grad: bool, validate: bool, backend: str,
    class_weight: Optional[torch.Tensor] = None, split_z: bool = False, want_predictions: bool = False,
    token_scaling: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row fp32 loss, dlogits or an empty tensor, n_valid fp32 scalar, weight_valid fp32 scalar
    (with class weights; else empty), per-row z-loss terms (``split_z``: then left out of the loss;
    else empty), per-row int64 predicted tokens, -1 if ignored (``want_predictions``; else empty))."""
    from tokenforge.kernels import cross_entropy as kernels_ce

    if validate:
        _check_targets_in_range(target, logits.shape[1], ignore_index)
    rows = logits.shape[0]
    n_valid = n_valid_of(target, ignore_index)
    w = class_weight_for_kernel(class_weight)
    w_valid = weight_valid_of(w, target, ignore_index) if w is not None else None
    f32 = dict(dtype=torch.float32, device=logits.device)
    z_rows = torch.empty((rows,), **f32) if split_z else None
    pred_rows = torch.empty((rows,), dtype=torch.int64, device=logits.device) if want_predictions else None
    loss, dlogits = kernels_ce.cross_entropy_forward(
        logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, n_valid=n_valid if mean else None, compute_grad=compute_grad, class_weight=w,
        weight_valid=w_valid if mean else None, z_rows=z_rows, pred_rows=pred_rows, token_scaling=token_scaling,
    )
    empty = lambda: torch.empty((0,), **f32)  # noqa: E731  custom ops return no None, no tensor twice
    return (loss, dlogits if dlogits is not None else logits.new_empty((0,)), n_valid,
            w_valid if w_valid is not None else empty(), z_rows if z_rows is not None else empty(),
            pred_rows if pred_rows is not None else target.new_empty((0,), dtype=torch.int64))


@cross_entropy_fwd.register_fake
def _(logits, target, ignore_index, label_smoothing, z_loss, softcap, mean, compute_grad, validate, backend,
      class_weight=None, split_z=False, want_predictions=False, token_scaling=False):
    rows = logits.shape[0]
    dlogits = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    f32 = dict(dtype=torch.float32)
    return (logits.new_empty((rows,), **f32), dlogits, logits.new_empty((), **f32),
            logits.new_empty(() if class_weight is not None else (0,), **f32),
            logits.new_empty((rows,) if split_z else (0,), **f32),
            logits.new_empty((rows,) if want_predictions else (0,), dtype=torch.int64))


@torch.library.custom_op("tokenforge::cross_entropy_scale_", mutates_args=("dlogits",))
def cross_entropy_scale_(dlogits: torch.Tensor, grad_output: torch.Tensor, backend: str) -> None:
    """dlogits *= grad_output (scalar or per row), in place: the whole backward."""
    from tokenforge.kernels import cross_entropy as kernels_ce

    kernels_ce.scale_rows_(dlogits, grad_output)


@cross_entropy_scale_.register_fake
def _(dlogits, grad_output, backend):
    return None




def reduce_loss(loss: torch.Tensor, n_valid: torch.Tensor, reduction: str, z_rows: Optional[torch.Tensor] = None,
                w_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reduce per-row losses. With ``z_rows`` (split out by the kernel) the z-loss terms are added
    back, and 'mean' divides the class part by ``w_valid`` (the class weights' sum, when given) and
    the z-loss part by ``n_valid``."""
    if z_rows is None:
        if reduction == "sum":
            return loss.sum()
        if reduction == "mean":
            return loss.sum() / n_valid
        return loss
    if reduction == "sum":
        return loss.sum() + z_rows.sum()
    if reduction == "mean":
        return loss.sum() / (w_valid if w_valid is not None else n_valid) + z_rows.sum() / n_valid
    return loss + z_rows


def function_outputs(ctx, loss, z_rows, pred_rows, target, n_valid, reduction, ignore_index: int, V: int,
                     return_z_loss, return_accuracy, return_predictions):
    """(loss, z-loss, accuracy, predicted tokens) as an autograd Function returns them: the extras
    reduced (or the empty placeholders the custom op gave when they were not asked for), marked
    non-differentiable. ``pred_rows``: the kernel's per-row predicted tokens (accuracy's source)."""
    t = target.reshape(-1)
    acc_rows = accuracy_rows(pred_rows, t, ignore_index, V) if return_accuracy else None
    extras = with_extras(loss, z_rows if return_z_loss else None, acc_rows, n_valid, reduction, target.shape,
                         pred_rows if return_predictions else None)
    z_out = extras.z_loss if return_z_loss else z_rows
    acc_out = extras.token_accuracy if return_accuracy else z_rows.new_empty((0,))
    pred_out = extras.predicted_tokens if return_predictions else pred_rows.new_empty((0,))
    ctx.mark_non_differentiable(z_out, acc_out, pred_out)
    return loss, z_out, acc_out, pred_out


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
    autograd's version counter ("modified by an inplace operation"): the gradient was consumed.
    Returns (loss, z-loss, accuracy, predicted tokens); the last three are empty unless asked for
    and carry no gradient."""

    @staticmethod
    def forward(ctx, logits, target, class_weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                return_z_loss, return_accuracy, return_predictions, token_scaling, validate, backend):
        x2 = rows_view(logits)
        compute_grad = bool(ctx.needs_input_grad[0])
        split_z = class_weight is not None or return_z_loss
        loss, dlogits, n_valid, w_valid, z_rows, pred_rows = torch.ops.tokenforge.cross_entropy_fwd(
            x2, target.reshape(-1).contiguous(), ignore_index, float(label_smoothing), float(z_loss), float(softcap),
            reduction == "mean", compute_grad, validate, backend, class_weight, split_z,
            return_accuracy or return_predictions, token_scaling)
        ctx.save_for_backward(dlogits)
        ctx.logits_shape = logits.shape
        ctx.backend = backend
        out = reduce_loss(loss, n_valid, reduction, z_rows if split_z else None,
                          w_valid if class_weight is not None else None)
        out = out.reshape(target.shape) if reduction == "none" else out
        return function_outputs(ctx, out, z_rows, pred_rows, target, n_valid, reduction, ignore_index,
                                logits.shape[-1], return_z_loss, return_accuracy, return_predictions)

    @staticmethod
    def backward(ctx, grad_output, _grad_z, _grad_accuracy, _grad_predictions):
        (dlogits,) = ctx.saved_tensors
        if _is_one(grad_output):
            # loss.backward() of a 'mean'/'sum' loss: nothing to scale; skipping saves a read and
            # a write of the whole gradient. Bump the version anyway, so that a second backward
            # through this graph is refused just as after an in-place scale.
            torch.autograd.graph.increment_version(dlogits)
        else:
            torch.ops.tokenforge.cross_entropy_scale_(dlogits, grad_output.reshape(-1), ctx.backend)
        return (dlogits.view(ctx.logits_shape),) + (None,) * 13


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    token_scaling: bool = False,
    validate: Optional[bool] = None,
    backend: Optional[str] = None,
):
    """Cross-entropy of logits (..., V) fp32/fp16/bf16 (float64 on the torch backend) against int64
    target (...); the loss in torch's dtype (:func:`loss_dtype`: the logits', fp32 under autocast),
    scalar or target's shape for reduction='none'. ``weight``: torch's
    class weights (V,). With ``return_z_loss`` / ``return_token_accuracy`` /
    ``return_predicted_tokens`` a :class:`CrossEntropyOutput` (loss, z_loss, token_accuracy,
    predicted_tokens: int64 argmax per token, -1 where ignored). ``token_scaling`` weights each
    token by its (constant) target probability (Liger's use_token_scaling). ``validate`` raises on
    out-of-range targets (a device sync; default: only on CPU). ``backend`` forces triton or torch."""
    if any_dtensor(logits, target, weight):
        raise TypeError("cross_entropy: DTensor inputs are not supported; pass local tensors (x.to_local()), or for "
                        "vocab-sharded logits torch's loss_parallel() with F.cross_entropy")
    _check_inputs(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap)
    check_class_weight("cross_entropy", "weight", weight, logits.shape[-1], logits.device)
    check_flags("cross_entropy", return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                return_predicted_tokens=return_predicted_tokens, token_scaling=token_scaling)
    options = (ignore_index, reduction, label_smoothing, z_loss, softcap, weight, return_z_loss, return_token_accuracy,
               return_predicted_tokens, token_scaling)
    if logits.numel() == 0:
        return _in_loss_dtype(cross_entropy_reference(logits, target, *options), logits)
    name = backends.choose(OP, logits, backend=backend)
    if name == "torch":
        return _in_loss_dtype(cross_entropy_reference(logits, target, *options), logits)
    if validate is None:
        validate = logits.device.type == "cpu"
    loss, z_out, acc_out, pred_out = CrossEntropyFunction.apply(
        logits, target, weight, ignore_index, reduction, float(label_smoothing), float(z_loss), float(softcap),
        return_z_loss, return_token_accuracy, return_predicted_tokens, token_scaling, bool(validate), name)
    if not (return_z_loss or return_token_accuracy or return_predicted_tokens):
        return _in_loss_dtype(loss, logits)
    return _in_loss_dtype(CrossEntropyOutput(loss, z_out if return_z_loss else None,
                                             acc_out if return_token_accuracy else None,
                                             pred_out if return_predicted_tokens else None), logits)


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """torch's dtype for cross_entropy(logits): the logits' own, except fp32 for fp16/bf16 logits
    under autocast (which runs cross_entropy in fp32)."""
    if logits.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(logits.device.type):
        return logits.dtype
    return _compute_dtype(logits.dtype)


def _in_loss_dtype(result, logits: torch.Tensor):
    """The fp32 loss (and z-loss) rounded once to :func:`loss_dtype`; token accuracy stays fp32."""
    dtype = loss_dtype(logits)
    if isinstance(result, CrossEntropyOutput):
        z = result.z_loss.to(dtype) if result.z_loss is not None else None
        return result._replace(loss=result.loss.to(dtype), z_loss=z)
    return result.to(dtype)
