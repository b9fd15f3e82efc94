"""Lion on the multi-tensor machinery of :mod:`tokenforge.optim.adamw` (same partitions, tables,
modes, clipping and state_dict handling; one moment, ``exp_avg``, plus the ``step`` counter).

    p <- p * (1 - lr * wd) - lr * sign(beta1 * m + (1 - beta1) * g);   m <- beta2 * m + (1 - beta2) * g
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import backends
from tokenforge.optim.adamw import AdamW, stochastic_round_bf16_reference
from tokenforge.optim.multi_tensor import global_offset, local

OP = "lion"


def _triton_supports(param) -> Optional[str]:
    reason = backends.triton_unsupported_reason(param.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import adamw as kadamw

    return kadamw.supports(param)


backends.register_op(
    OP,
    cuda_preference=("triton",),
    supports={"triton": _triton_supports, "torch": lambda param: None},
    example_inputs=lambda device, dtype: (torch.empty(16, device=device, dtype=dtype),),
)


def lion_reference(param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr, beta1: float, beta2: float,
                   weight_decay: float, maximize: bool = False, grad_scale: Optional[torch.Tensor] = None,
                   stochastic: bool = False, seed: int = 0, key: int = 0, offset: int = 0) -> None:
    """Update param and state['exp_avg'] in place by one Lion step (fp32 math; master/SR as AdamW)."""
    lr = float(lr)
    master = state.get("master_param")
    p = master if master is not None else (param.float() if param.dtype != torch.float32 else param)
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    g = grad.to(compute)
    if grad_scale is not None:
        g = g * grad_scale.to(compute)
    if maximize:
        g = -g
    m = state["exp_avg"].to(compute)
    p.mul_(1 - lr * weight_decay)
    p.add_(torch.sign(m * beta1 + g * (1 - beta1)), alpha=-lr)
    m.mul_(beta2).add_(g * (1 - beta2))
    state["exp_avg"].copy_(m)
    if p is not param:
        if stochastic:
            param.copy_(stochastic_round_bf16_reference(p, seed, int(float(state["step"])), key, offset))
        else:
            param.copy_(p)


class Lion(AdamW):
    """Lion (sign of an interpolated momentum) with one multi-tensor launch per param group;
    same extras as :class:`tokenforge.optim.AdamW` (max_grad_norm, bf16_stochastic_rounding, backend)."""

    NAME = "Lion"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False, *,
                 max_grad_norm: Optional[float] = None, bf16_stochastic_rounding: bool = False,
                 sr_state_dtype: torch.dtype = torch.bfloat16, seed: int = 0, backend: Optional[str] = None):
        super().__init__(params, lr=lr, betas=betas, eps=0.0, weight_decay=weight_decay, maximize=maximize,
                         max_grad_norm=max_grad_norm, bf16_stochastic_rounding=bf16_stochastic_rounding,
                         sr_state_dtype=sr_state_dtype, seed=seed, backend=backend)
        if backend == "cuda":
            raise ValueError("Lion has no CUDA C++ kernel; use backend='triton' or 'torch'")

    def _moment_keys(self, group: dict) -> list:
        return ["exp_avg"]

    def _hyper_values(self, group: dict) -> list:
        beta1, beta2 = (float(b) for b in group["betas"])
        return [group["lr"], beta1, beta2, group["weight_decay"]]

    def _reference(self, p, st, group, scale, mode, key) -> None:
        beta1, beta2 = (float(b) for b in group["betas"])
        offset = global_offset(p) or 0  # as AdamW._reference: local shards, global indices
        grad, p = local(p.grad), local(p)
        st = {k: local(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
        lion_reference(p, grad, st, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                       maximize=group["maximize"], grad_scale=scale, stochastic=mode == "stochastic",
                       seed=self.seed, key=key, offset=offset)

    def _launch(self, name, tables, hyper, scale, group, **kw) -> None:
        from tokenforge.kernels import lion as klion

        klion.lion_step(tables, hyper, scale, maximize=bool(group["maximize"]), **kw)
