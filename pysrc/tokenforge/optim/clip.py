"""Gradient clipping by global norm with a multi-tensor Triton reduction.

:func:`clip_grad_norm_` is a drop-in for ``torch.nn.utils.clip_grad_norm_`` (same signature, result
and inf/NaN behaviour): grads grouped by (device, dtype) are reduced by one Triton launch per group
into per-program partials, the group norms are combined on the first grad's device exactly as torch
combines its per-group norms, and the grads are scaled by ``min(1, max_norm / (norm + 1e-6))`` with
one more launch per group. Nothing syncs with the host unless ``error_if_nonfinite=True`` (which has
to look at the norm, as in torch).
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Optional, Union

import torch

from tokenforge import backends
from tokenforge.optim.multi_tensor import TableCache, is_dtensor, local

OP = "clip_grad_norm"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_supports(grad) -> Optional[str]:
    reason = backends.triton_unsupported_reason(grad.device)
    if reason is not None:
        return reason
    if grad.dtype not in KERNEL_DTYPES:
        return f"grad dtype {grad.dtype} is not float32/float16/bfloat16 for the triton kernel; use backend='torch'"
    return None


backends.register_op(
    OP,
    cuda_preference=("triton",),
    supports={"triton": _triton_supports, "torch": lambda grad: None},
    example_inputs=lambda device, dtype: (torch.empty(16, device=device, dtype=dtype),),
)


def _kernel_norm_type(norm_type: float) -> bool:
    return norm_type == math.inf or (math.isfinite(norm_type) and norm_type > 0)


def _group(grads, backend: Optional[str], norm_type: float):
    """{(device, dtype, backend): [grads]}; the kernels need contiguous grads and p > 0 or inf."""
    groups: dict = {}
    for g in grads:
        name = backends.choose(OP, g, backend=backend)
        if name != "torch" and not (g.is_contiguous() and _kernel_norm_type(norm_type)):
            name = "torch"
        groups.setdefault((g.device, g.dtype, name), []).append(g)
    return groups


_caches: dict = {}


def _tables(key, grads):
    from tokenforge.kernels import adamw as kadamw

    cache = _caches.setdefault(key, TableCache())
    return cache.get([grads], list(range(len(grads))), kadamw.block_size(), grads[0].device)


def _group_norm(key, grads, norm_type: float, fp32: bool = False) -> torch.Tensor:
    device, dtype, name = key
    if name == "torch":
        acc = torch.float32 if fp32 and dtype in (torch.float16, torch.bfloat16) else None
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, norm_type, dtype=acc) for g in grads]), norm_type)
    from tokenforge.kernels import grad_norm as kgrad

    partials = kgrad.norm_partials(_tables(key, grads), dtype, norm_type)
    if norm_type == math.inf:
        return partials.amax()
    return partials.sum().pow(1.0 / norm_type) if norm_type != 2.0 else partials.sum().sqrt()


def total_norm(grads: list, norm_type: float = 2.0, *, backend: Optional[str] = None,
               fp32: bool = False) -> torch.Tensor:
    """The norm of all ``grads`` together (torch's ``get_total_norm``): a 0-d tensor on the first
    grad's device in the grads' promoted dtype (``fp32``: in float32, every backend accumulating in
    fp32, as the fused in-step clipping uses it); ``tensor(0.)`` when there are none."""
    if len(grads) == 0:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    if any(is_dtensor(g) for g in grads):
        # Sharded grads (FSDP2): the norm needs a reduction across ranks, which DTensor's own
        # norm does; the scaling below is still local and multi-tensor.
        return torch.nn.utils.get_total_norm(grads, norm_type)
    first_device = grads[0].device
    dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads))
    norms = [_group_norm(key, gs, norm_type, fp32).to(first_device)
             for key, gs in _group(grads, backend, norm_type).items()]
    total = torch.linalg.vector_norm(torch.stack([n.to(torch.float32) for n in norms]), norm_type)
    return total if fp32 else total.to(dtype)


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)) as torch computes it (NaN stays NaN)."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def scale_grads_(grads: list, coef: torch.Tensor, *, backend: Optional[str] = None) -> None:
    """grads *= coef, one launch per (device, dtype) group."""
    if is_dtensor(coef):
        coef = coef.full_tensor()
    grads = [local(g) for g in grads]
    for key, gs in _group(grads, backend, 2.0).items():
        device, dtype, name = key
        c = coef.to(device=device, dtype=torch.float32)
        if name == "torch":
            torch._foreach_mul_(gs, c.to(dtype))
        else:
            from tokenforge.kernels import grad_norm as kgrad

            kgrad.scale_(_tables(key, gs), dtype, c)


def clip_grad_norm_(
    parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Scale the grads of ``parameters`` in place so their global ``norm_type``-norm is at most
    ``max_norm``; returns the norm before clipping (a 0-d tensor). Same as
    ``torch.nn.utils.clip_grad_norm_``; ``foreach`` is accepted and ignored (always multi-tensor)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    for g in grads:
        if g.is_sparse:
            raise TypeError("clip_grad_norm_: sparse gradients are not supported; use torch.nn.utils.clip_grad_norm_")
    max_norm = float(max_norm)
    norm = total_norm(grads, norm_type, backend=backend)
    if error_if_nonfinite and torch.logical_or(norm.isnan(), norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    if grads:
        scale_grads_(grads, clip_coefficient(norm, max_norm), backend=backend)
    return norm
