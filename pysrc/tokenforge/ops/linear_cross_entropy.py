"""Fused linear + cross-entropy: ``cross_entropy(hidden @ weight.T + bias, target)`` without ever
holding the (tokens, vocab) logits.

Path of a call: :func:`linear_cross_entropy` validates and picks a backend ->
:class:`LinearCrossEntropyFunction` -> the custom op ``tokenforge::linear_cross_entropy_fwd``
(opaque to ``torch.compile``) -> :func:`chunked_forward`, a loop over token chunks:

    logits = hidden[c] @ weight.T (+ bias)             cuBLAS, (chunk, V) in hidden's dtype
    loss[c], logits <- d loss / d logits               cross-entropy kernel, gradient in place
    grad_hidden[c]  = dlogits @ weight                 cuBLAS
    grad_weight    += dlogits.T @ hidden[c]            fp32 accumulator across chunks
    grad_bias      += dlogits.sum(0)                   fp32 accumulator

so only one chunk of logits exists at a time, and the gradients are done by the end of the
forward. Memory beyond the inputs, for N tokens, H hidden, V vocab, chunk C, element size e (2 for
bf16) and weight element size ew: during the forward C*V*e (one chunk of logits) + N*H*e
(grad_hidden) + 4*V*H (the fp32 grad_weight accumulator: bf16 sums over many chunks drift) + V*H*ew
at its end (the rounded copy); held from forward to backward N*H*e + V*H*ew (no fp32 V x H buffer).
At N=16384, H=4096, V=128256, bf16: 128 MiB of logits, 128 MiB grad_hidden, 2 GiB fp32 accumulator
in the forward, 1 GiB grad_weight held. For reduction 'mean' / 'sum' backward only scales them by grad_output. For 'none' each
token's gradient needs its own grad_output, which is not known in the forward: the forward then
computes only the losses, and backward runs the chunk loop again with dlogits rows scaled by
grad_output (twice the matmuls; correct for any grad_output).

The cross-entropy step runs the Triton kernel (``backend='triton'``) or the same math in torch
(``backend='torch'``, the CPU fallback; also chunked, so it saves memory too).

``chunk_size`` default (:func:`default_chunk_size`): tokens per chunk such that a chunk's logits
are about the size of ``hidden`` (chunk * V ~ N * H, rounded to a power of two; Liger-Kernel's
rule): 16384 tokens, H 4096, V 128256 -> chunks of 512 tokens.

Semantics (ignore_index, reduction, label_smoothing, z_loss, softcap, class weights (here
``class_weight``: ``weight`` is the lm_head's), ``return_z_loss`` / ``return_token_accuracy`` /
``return_predicted_tokens`` (the argmax of each chunk's logits, never the whole logits),
``token_scaling`` (Liger-Kernel's ``use_token_scaling``), fp32
loss, all-ignored 'mean' = 0, out-of-range targets) are those of :func:`tokenforge.ops.cross_entropy`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tokenforge import backends
from tokenforge.dtensor import any_dtensor
from tokenforge.ops.cross_entropy import _triton_supports as _ce_triton_supports
from tokenforge.ops.cross_entropy import (
    CrossEntropyOutput,
    _check_targets_in_range,
    _is_one,
    check_class_weight,
    check_flags,
    check_options,
    check_target,
    class_weight_for_kernel,
    cross_entropy_reference,
    function_outputs,
    n_valid_of,
    reduce_loss,
    weight_valid_of,
)

OP = "linear_cross_entropy"


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    class_weight: Optional[torch.Tensor] = None,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    token_scaling: bool = False,
):
    """Unfused: the full logits ``hidden @ weight.T + bias`` then :func:`cross_entropy_reference`
    (the oracle of the tests and the eager baseline of the benchmarks)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return cross_entropy_reference(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap,
                                   class_weight, return_z_loss, return_token_accuracy, return_predicted_tokens,
                                   token_scaling)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss and weight/bias-gradient accumulators: fp32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_size(tokens: int, hidden_size: int, vocab: int) -> int:
    """Tokens per chunk so that a chunk's logits (chunk x vocab) are about as large as hidden."""
    ratio = max(1, math.ceil(vocab / max(1, hidden_size)))
    chunk = 1 << max(0, math.ceil(tokens / ratio) - 1).bit_length()  # next power of two
    return max(1, min(tokens, chunk))


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                  chunk_size) -> None:
    name = "linear_cross_entropy"
    for what, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {what} must be floating point, got {t.dtype}; convert it, e.g. {what}.float()")
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"{name}: hidden must be (..., H) with H >= 1, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{name}: weight must be (V, H) = (vocab, {hidden.shape[-1]}) like nn.Linear.weight, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{name}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one to the other "
                        "(e.g. hidden.to(weight.dtype)) or run the projection under torch.autocast")
    if weight.device != hidden.device:
        raise ValueError(f"{name}: hidden is on {hidden.device} but weight on {weight.device}; move both to one device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{name}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{name}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{name}: bias is {bias.dtype} but hidden is {hidden.dtype}; cast it, e.g. "
                            "bias.to(hidden.dtype)")
        if bias.device != hidden.device:
            raise ValueError(f"{name}: bias is on {bias.device} but hidden on {hidden.device}; move both to one device")
    check_target(name, target, hidden.shape[:-1], hidden.device)
    check_options(name, ignore_index, reduction, label_smoothing, z_loss, softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name}: chunk_size must be a positive int or None (automatic), got {chunk_size!r}")


# The chunk loop runs the cross-entropy kernel on each chunk's logits, which have hidden's dtype
# and device: the same check decides whether Triton can run.
backends.register_op(OP, cuda_preference=("triton",),
                     supports={"triton": _ce_triton_supports, "torch": lambda hidden: None},
                     example_inputs=lambda device, dtype: (torch.empty(4, 64, device=device, dtype=dtype),))


# ---------------------------------------------------------------------------------------------
# The chunk loop (runs inside the custom op)
# ---------------------------------------------------------------------------------------------


def _ce_chunk_torch(logits, target, ignore_index, label_smoothing, z_loss, softcap, n_valid, row_scale,
                    compute_grad, class_weight=None, weight_valid=None, z_rows=None, pred_rows=None,
                    token_scaling=False):
    """The cross-entropy kernel's contract (tokenforge.kernels.cross_entropy.cross_entropy_forward)
    in torch: per-row loss (z-loss term in ``z_rows`` when given), gradient written over logits."""
    V = logits.shape[1]
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    if pred_rows is not None:
        pred_rows.copy_(torch.where(target != ignore_index, logits.argmax(dim=1), -1))
    if softcap:
        c = torch.tanh(x / softcap)
        x = softcap * c
    lse = torch.logsumexp(x, dim=1)
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    x_t = x.gather(1, t[:, None])[:, 0]
    eps = label_smoothing
    if class_weight is not None:
        w = class_weight.to(x.dtype)
        w_t = w[t]
        ce = (1.0 - eps) * w_t * (lse - x_t) + eps / V * (w.sum() * lse - x @ w)
    else:
        w, w_t = None, torch.ones_like(lse)
        ce = lse - (1.0 - eps) * x_t - eps / V * x.sum(1)
    zl = z_loss * lse * lse
    p_t = torch.exp(x_t - lse) if token_scaling else None
    if p_t is not None:
        ce, zl = ce * p_t, zl * p_t
    if z_rows is not None:
        z_rows.copy_(torch.where(valid, zl, 0.0))
    else:
        ce = ce + zl
    loss = torch.where(valid, ce, 0.0)
    if compute_grad:
        scale = valid.to(x.dtype) if p_t is None else valid * p_t
        if row_scale is not None:
            scale = scale * row_scale
        ce_scale = z_scale = scale
        if n_valid is not None:
            z_scale = scale / n_valid
            ce_scale = scale / weight_valid if w is not None else z_scale
        p_coef = ((1.0 - eps) * w_t + eps * (w.sum() if w is not None else V) / V) * ce_scale \
            + 2.0 * z_loss * lse * z_scale
        g = torch.exp(x - lse[:, None]) * p_coef[:, None]
        g -= eps / V * ce_scale[:, None] * (w if w is not None else 1.0)
        g.scatter_add_(1, t[:, None], (-(1.0 - eps) * w_t * ce_scale)[:, None])
        if softcap:
            g = g * (1.0 - c * c)
        logits.copy_(g)
    return loss


def chunked_forward(hidden, weight, target, bias, row_scale, ignore_index, label_smoothing, z_loss, softcap,
                    mean, chunk_size, need_grad_hidden, need_grad_weight, backend, class_weight=None,
                    split_z=False, want_predictions=False, token_scaling=False):
    """(loss (N,), n_valid, weight_valid, z_rows, pred_rows, grad_hidden, grad_weight, grad_bias)
    for hidden (N, H) contiguous: the gradients of sum(loss * row_scale) / (n_valid if mean else 1)
    (with class weights and a mean: the class part over weight_valid, the z-loss part over
    n_valid); grad_weight and grad_bias (with a bias) fp32 when ``need_grad_weight``, grad_hidden
    when ``need_grad_hidden``, else None; weight_valid (with class weights), z_rows (``split_z``:
    then left out of loss) and pred_rows (int64 argmax per token, -1 if ignored; ``want_predictions``)
    None when not asked for. Allocates one
    (chunk, V) buffer, never (N, V)."""
    N, _ = hidden.shape
    n_valid = n_valid_of(target, ignore_index)
    w_valid = weight_valid_of(class_weight, target, ignore_index) if class_weight is not None else None
    acc = accumulate_dtype(hidden.dtype)
    loss = torch.empty((N,), dtype=acc, device=hidden.device)
    z_rows = torch.empty((N,), dtype=acc, device=hidden.device) if split_z else None
    pred_rows = torch.empty((N,), dtype=torch.int64, device=hidden.device) if want_predictions else None
    compute_grad = need_grad_hidden or need_grad_weight
    grad_hidden, grad_weight, grad_bias = grad_buffers(hidden, weight, bias, need_grad_hidden, need_grad_weight)
    if backend == "triton":
        from tokenforge.kernels import cross_entropy as kernels_ce
    for start, end, h, logits in head_chunks(hidden, weight, bias, chunk_size):
        rs = row_scale[start:end] if row_scale is not None else None
        zr = z_rows[start:end] if z_rows is not None else None
        pr = pred_rows[start:end] if pred_rows is not None else None
        nv, wv = (n_valid, w_valid) if mean else (None, None)
        if backend == "triton":
            loss[start:end], _ = kernels_ce.cross_entropy_forward(
                logits, target[start:end], ignore_index=ignore_index, label_smoothing=label_smoothing,
                z_loss=z_loss, softcap=softcap, n_valid=nv, row_scale=rs, dlogits=logits, compute_grad=compute_grad,
                class_weight=class_weight, weight_valid=wv, z_rows=zr, pred_rows=pr, token_scaling=token_scaling)
        else:
            loss[start:end] = _ce_chunk_torch(logits, target[start:end], ignore_index, label_smoothing, z_loss,
                                              softcap, nv, rs, compute_grad, class_weight, wv, zr, pr, token_scaling)
        # From here on ``logits`` holds dlogits.
        head_backward_(logits, h, weight, grad_hidden[start:end] if grad_hidden is not None else None,
                       grad_weight, grad_bias)
    return loss, n_valid, w_valid, z_rows, pred_rows, grad_hidden, grad_weight, grad_bias


def grad_buffers(hidden, weight, bias, need_grad_hidden: bool, need_grad_weight: bool):
    """(grad_hidden, grad_weight, grad_bias) of a chunk loop over the head, None where not needed;
    the weight's and bias's accumulators are zeroed and fp32 (float64 for float64): a bf16 sum over
    many chunks drifts (a known training bug)."""
    acc = accumulate_dtype(hidden.dtype)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = grad_bias = None
    if need_grad_weight:
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=hidden.device)
        if bias is not None:
            grad_bias = torch.zeros((weight.shape[0],), dtype=acc, device=hidden.device)
    return grad_hidden, grad_weight, grad_bias


def head_chunks(hidden, weight, bias, chunk_size: int):
    """Yield (start, end, h, logits) for each chunk of ``chunk_size`` tokens: h = hidden[start:end] and
    logits = h @ weight.T (+ bias), one (chunk, V) buffer reused by every chunk of that size (the
    consumer may write over it before asking for the next)."""
    N, V = hidden.shape[0], weight.shape[0]
    logits = None
    for start in range(0, N, chunk_size):
        end = min(N, start + chunk_size)
        h = hidden[start:end]
        if logits is None or logits.shape[0] != end - start:
            logits = torch.empty((end - start, V), dtype=hidden.dtype, device=hidden.device)
        if bias is not None:
            torch.addmm(bias, h, weight.t(), out=logits)
        else:
            torch.mm(h, weight.t(), out=logits)
        yield start, end, h, logits


def head_backward_(dlogits, h, weight, grad_hidden_rows, grad_weight, grad_bias) -> None:
    """One chunk's share of the head's gradients from its dlogits: grad_hidden_rows = dlogits @ weight,
    grad_weight += dlogits.T @ h, grad_bias += the column sums (each skipped when None)."""
    if grad_hidden_rows is not None:
        torch.mm(dlogits, weight, out=grad_hidden_rows)
    if grad_weight is not None:
        accumulate_mm_(grad_weight, dlogits.t(), h)
    if grad_bias is not None:
        grad_bias += dlogits.sum(0, dtype=grad_bias.dtype)


def head_context(ctx, hidden, weight, target, bias, reduction):
    """The forward bookkeeping of a fused-head Function (what saved_grads_times and computed_grads
    read): the reduction, shapes, and which gradients autograd asks for (a frozen lm_head costs no
    grad_weight). Returns (hidden as contiguous (N, H), target as contiguous (N,), weight contiguous)."""
    ctx.reduction = reduction
    ctx.hidden_shape = hidden.shape
    ctx.has_bias = bias is not None
    ctx.weight_dtype = weight.dtype
    ctx.need_hidden = bool(ctx.needs_input_grad[0])
    ctx.need_weight = bool(ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[3]))
    return hidden.reshape(-1, hidden.shape[-1]).contiguous(), target.reshape(-1).contiguous(), weight.contiguous()


def save_forward_grads(ctx, gh, gw, gb) -> None:
    """'mean'/'sum': keep the gradients the forward computed until backward, in the weight's dtype:
    the fp32 accumulator (4 V H bytes) lives only inside the forward's chunk loop; rounding it once
    here is what backward did before."""
    if ctx.need_weight:
        gw = gw.to(ctx.weight_dtype)
        gb = gb.to(ctx.weight_dtype) if ctx.has_bias else gb
    ctx.save_for_backward(gh, gw, gb)


def saved_grads_times(ctx, grad_output, gh, gw, gb):
    """Backward of 'mean'/'sum' for a Function whose forward saved the gradients (``ctx.need_hidden``,
    ``ctx.need_weight``, ``ctx.has_bias``, ``ctx.weight_dtype``, ``ctx.hidden_shape``): (grad hidden,
    grad weight, grad bias) times grad_output, None where not needed. ``loss.backward()`` (grad_output
    1) skips the multiplications."""
    if not _is_one(grad_output):
        g = grad_output.to(accumulate_dtype(ctx.weight_dtype))
        gh = (gh * g).to(gh.dtype) if ctx.need_hidden else gh
        gw = (gw * g).to(gw.dtype) if ctx.need_weight else gw
        gb = (gb * g).to(gb.dtype) if ctx.need_weight and ctx.has_bias else gb
    return computed_grads(ctx, gh, gw, gb)


def computed_grads(ctx, gh, gw, gb):
    """(grad hidden in hidden's shape, grad weight, grad bias in the weight's dtype), None where not needed."""
    grad_hidden = gh.view(ctx.hidden_shape) if ctx.need_hidden else None
    grad_weight = gw.to(ctx.weight_dtype) if ctx.need_weight else None
    grad_bias = gb.to(ctx.weight_dtype) if ctx.need_weight and ctx.has_bias else None
    return grad_hidden, grad_weight, grad_bias


_ADDMM_OUT_DTYPE = {}  # device type -> whether torch.addmm(..., out_dtype=) runs there


def accumulate_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b in a lower precision. Where torch has it (CUDA, recent
    torch) one cuBLAS call with an fp32 output; elsewhere the product is rounded to a's dtype once
    per chunk and then added in fp32 (a (V, H) temporary; still no low-precision sum across chunks)."""
    if acc.dtype != a.dtype and acc.is_cuda and _ADDMM_OUT_DTYPE.get(acc.device.type, True):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):  # torch without addmm.dtype_out here
            _ADDMM_OUT_DTYPE[acc.device.type] = False
    acc += torch.mm(a, b)


@torch.library.custom_op("tokenforge::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor], ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
    mean: bool, chunk_size: int, need_grad_hidden: bool, need_grad_weight: bool, validate: bool, backend: str,
    class_weight: Optional[torch.Tensor] = None, split_z: bool = False, want_predictions: bool = False,
    token_scaling: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """(loss fp32 (N,), n_valid fp32 (), weight_valid fp32 (), z_rows (N,), pred_rows int64 (N,),
    grad_hidden, grad_weight fp32, grad_bias fp32); what is not computed comes back as an empty
    tensor."""
    if validate:
        _check_targets_in_range(target, weight.shape[0], ignore_index)
    outs = chunked_forward(hidden, weight, target, bias, row_scale, ignore_index, label_smoothing, z_loss, softcap,
                           mean, chunk_size, need_grad_hidden, need_grad_weight, backend,
                           class_weight_for_kernel(class_weight), split_z, want_predictions, token_scaling)
    acc = accumulate_dtype(hidden.dtype)
    # Custom ops cannot return None, nor one tensor twice: a fresh empty tensor per missing output,
    # of the dtype the output has when present (the device scalars are fp32).
    dtypes = (acc, torch.float32, torch.float32, acc, torch.int64, hidden.dtype, acc, acc)
    return tuple(o if o is not None else hidden.new_empty((0,), dtype=dt) for o, dt in zip(outs, dtypes))


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, target, bias, row_scale, ignore_index, label_smoothing, z_loss, softcap, mean, chunk_size,
      need_grad_hidden, need_grad_weight, validate, backend, class_weight=None, split_z=False,
      want_predictions=False, token_scaling=False):
    N = hidden.shape[0]
    f32 = accumulate_dtype(hidden.dtype)
    gh = hidden.new_empty(hidden.shape) if need_grad_hidden else hidden.new_empty((0,))
    gw = hidden.new_empty(weight.shape, dtype=f32) if need_grad_weight else hidden.new_empty((0,), dtype=f32)
    gb = hidden.new_empty((weight.shape[0],), dtype=f32) if need_grad_weight and bias is not None \
        else hidden.new_empty((0,), dtype=f32)
    wv = hidden.new_empty(() if class_weight is not None else (0,), dtype=torch.float32)
    zr = hidden.new_empty((N,) if split_z else (0,), dtype=f32)
    pr = hidden.new_empty((N,) if want_predictions else (0,), dtype=torch.int64)
    return hidden.new_empty((N,), dtype=f32), hidden.new_empty((), dtype=torch.float32), wv, zr, pr, gh, gw, gb


class LinearCrossEntropyFunction(torch.autograd.Function):
    """'mean'/'sum': gradients computed in the forward, saved, scaled by grad_output in backward.
    'none': the forward saves its inputs; backward reruns the chunk loop with per-token scales.
    Only the gradients autograd asks for are computed (a frozen lm_head costs no grad_weight).
    Returns (loss, z_loss, token accuracy, predicted tokens); the last three are empty unless asked
    for and carry no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, return_z_loss, return_accuracy, return_predictions, token_scaling, chunk_size, validate,
                backend):
        h2, t, w = head_context(ctx, hidden, weight, target, bias, reduction)
        ctx.opts = (ignore_index, float(label_smoothing), float(z_loss), float(softcap), chunk_size, backend,
                    token_scaling)
        eager_grads = reduction != "none"
        split_z = class_weight is not None or return_z_loss
        loss, n_valid, w_valid, z_rows, pred_rows, gh, gw, gb = torch.ops.tokenforge.linear_cross_entropy_fwd(
            h2, w, t, bias, None, ignore_index, float(label_smoothing), float(z_loss), float(softcap),
            reduction == "mean", chunk_size, eager_grads and ctx.need_hidden, eager_grads and ctx.need_weight,
            validate, backend, class_weight, split_z, return_accuracy or return_predictions, token_scaling)
        out = reduce_loss(loss, n_valid, reduction, z_rows if split_z else None,
                          w_valid if class_weight is not None else None)
        if reduction == "none":
            out = out.reshape(target.shape)
            ctx.save_for_backward(h2, w, t, bias, class_weight)
        else:
            save_forward_grads(ctx, gh, gw, gb)
        return function_outputs(ctx, out, z_rows, pred_rows, target, n_valid, reduction, ignore_index,
                                weight.shape[0], return_z_loss, return_accuracy, return_predictions)

    @staticmethod
    def backward(ctx, grad_output, _grad_z, _grad_accuracy, _grad_predictions):
        ignore_index, label_smoothing, z_loss, softcap, chunk_size, backend, token_scaling = ctx.opts
        if ctx.reduction == "none":
            h2, w, t, bias, class_weight = ctx.saved_tensors
            row_scale = grad_output.reshape(-1).to(accumulate_dtype(h2.dtype)).contiguous()
            *_, gh, gw, gb = torch.ops.tokenforge.linear_cross_entropy_fwd(
                h2, w, t, bias, row_scale, ignore_index, label_smoothing, z_loss, softcap, False, chunk_size,
                ctx.need_hidden, ctx.need_weight, False, backend, class_weight, token_scaling=token_scaling)
            grad_hidden, grad_weight, grad_bias = computed_grads(ctx, gh, gw, gb)
        else:
            grad_hidden, grad_weight, grad_bias = saved_grads_times(ctx, grad_output, *ctx.saved_tensors)
        return (grad_hidden, grad_weight, None, grad_bias) + (None,) * 13


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    class_weight: Optional[torch.Tensor] = None,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    token_scaling: bool = False,
    chunk_size: Optional[int] = None,
    validate: Optional[bool] = None,
    backend: Optional[str] = None,
):
    """cross_entropy(hidden (..., H) @ weight (V, H).T + bias (V,), int64 target (...)) without the
    (tokens, V) logits; hidden/weight/bias share one dtype (fp32/fp16/bf16; float64 on torch); fp32
    loss. ``class_weight`` (V,): torch's cross-entropy ``weight``. With ``return_z_loss`` /
    ``return_token_accuracy`` / ``return_predicted_tokens`` a
    :class:`~tokenforge.ops.cross_entropy.CrossEntropyOutput`. ``token_scaling``: each token's loss and
    gradient times its (constant) target probability, as :func:`tokenforge.ops.cross_entropy`.
    ``chunk_size`` tokens per chunk (None: logits chunk ~ hidden's size). ``backend`` forces
    triton or torch; ``validate`` as in :func:`tokenforge.ops.cross_entropy`.
    DTensors are refused: a vocab-sharded weight's gradient depends on whether hidden is the same on
    every rank (tensor parallelism) or not (FSDP), which the tensors do not say."""
    if any_dtensor(hidden, weight, target, bias, class_weight):
        raise TypeError(f"{OP}: DTensor inputs are not supported; pass local tensors, and a sharded weight whole "
                        "(weight.full_tensor() where hidden is the same on every rank, as in tensor parallelism; "
                        "under FSDP call it inside the head module's forward, where FSDP gathers the weight)")
    _check_inputs(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                  chunk_size)
    check_class_weight(OP, "class_weight", class_weight, weight.shape[0], hidden.device)
    check_flags(OP, return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                return_predicted_tokens=return_predicted_tokens, token_scaling=token_scaling)
    N = hidden.numel() // hidden.shape[-1]
    if N == 0:
        return linear_cross_entropy_reference(hidden, weight, target, bias, ignore_index, reduction,
                                              label_smoothing, z_loss, softcap, class_weight, return_z_loss,
                                              return_token_accuracy, return_predicted_tokens, token_scaling)
    name = backends.choose(OP, hidden, backend=backend)
    if chunk_size is None:
        chunk_size = default_chunk_size(N, hidden.shape[-1], weight.shape[0])
    if validate is None:
        validate = hidden.device.type == "cpu"
    loss, z_out, acc_out, pred_out = LinearCrossEntropyFunction.apply(
        hidden, weight, target, bias, class_weight, ignore_index, reduction, float(label_smoothing), float(z_loss),
        float(softcap), return_z_loss, return_token_accuracy, return_predicted_tokens, token_scaling,
        int(min(chunk_size, N)), bool(validate), name)
    if not (return_z_loss or return_token_accuracy or return_predicted_tokens):
        return loss
    return CrossEntropyOutput(loss, z_out if return_z_loss else None, acc_out if return_token_accuracy else None,
                              pred_out if return_predicted_tokens else None)
