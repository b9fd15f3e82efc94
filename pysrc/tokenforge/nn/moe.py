"""A dropless mixture-of-experts SwiGLU layer: every token reaches its k experts (no capacity, no
dropped tokens), the experts run as two grouped GEMMs.

    logits = router(x)                                  (T, E)
    w, e   = moe_route(logits, k, ...)                  top-k, optional selection bias / groups
    xs     = x rows in expert order (moe_permute)       (T*k, D), offs (E,)
    h      = swiglu_packed(grouped_mm(xs, w_gate_up))   (T*k, H)
    y      = moe_unpermute(grouped_mm(h, w_down), w)    (T, D), weighted combine in fp32
    y     += shared_experts(x)                          (a dense SwiGLU, when asked)

Weights: ``w_gate_up`` (E, D, 2H) = [gate | up] per expert, ``w_down`` (E, H, D), the router an
nn.Linear(D, E) without bias. Balancing, both optional: ``aux_loss_coef`` > 0 puts the
Switch-style auxiliary loss in ``self.aux_loss`` (add it to the training loss); ``bias_update_rate``
> 0 is DeepSeek-V3's auxiliary-loss-free balancing: after each training forward the selection
bias (buffer ``expert_bias``) moves by rate * sign(mean load - load) per expert. The last
forward's tokens per expert are in ``self.last_expert_counts`` (a device tensor: reading it syncs).

FP8: ``fp8="rowwise"`` (every GEMM) or ``"rowwise_with_gw_hp"`` (weight gradients in the compute
dtype) runs both expert GEMMs through :func:`tokenforge.fp8.grouped_mm_float8` (dim and hidden_dim
multiples of 16); router and shared experts stay as they are.

Expert parallelism: ``layer.shard_experts(group)`` keeps only this rank's E/P experts (rank r of
the group's P: experts r*E/P ..), and the forward exchanges token rows with the other ranks around
the expert GEMMs (:mod:`tokenforge.ops.moe_expert_parallel`); the router, shared experts and
selection bias stay whole on every rank (the bias moves by the group's summed load, so it stays the
same everywhere). Expert weights then get the gradient of the sum of the group's losses; under data
parallelism over the same ranks divide it by P to average as DDP does (``tokenforge train --ep``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tokenforge.nn.swiglu import SwiGLU
from tokenforge.ops.moe_routing import load_balancing_loss, moe_permute, moe_route, moe_unpermute
from tokenforge.ops.swiglu import swiglu_packed


class MoE(torch.nn.Module):
    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, *, num_shared_experts: int = 0,
                 shared_hidden_dim: Optional[int] = None, score: str = "softmax", normalize: bool = True,
                 n_groups: int = 1, topk_groups: int = 1, routed_scaling: float = 1.0,
                 aux_loss_coef: float = 0.0, bias_update_rate: float = 0.0, device=None, dtype=None,
                 backend: Optional[str] = None, fp8: Optional[str] = None) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MoE: {name} must be a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE: top_k must be in [1, num_experts={num_experts}], got {top_k!r}")
        if num_shared_experts < 0 or aux_loss_coef < 0 or bias_update_rate < 0:
            raise ValueError("MoE: num_shared_experts, aux_loss_coef and bias_update_rate must be >= 0")
        self.dim, self.hidden_dim, self.num_experts, self.top_k = dim, hidden_dim, num_experts, top_k
        self.route_kw = dict(score=score, normalize=normalize, n_groups=n_groups, topk_groups=topk_groups,
                             scaling=routed_scaling)
        # Validate the routing options once, here, with a dummy call.
        moe_route(torch.zeros(1, num_experts), top_k, **self.route_kw, backend="torch")
        self.aux_loss_coef, self.bias_update_rate, self.backend = aux_loss_coef, bias_update_rate, backend
        self.fp8 = fp8
        if fp8 is not None:
            from tokenforge.fp8.grouped import check_recipe

            check_recipe(fp8, "MoE")
            if dim % 16 or hidden_dim % 16:
                raise ValueError(f"MoE: fp8 experts need dim ({dim}) and hidden_dim ({hidden_dim}) multiples of 16 "
                                 "(FP8 tensor cores); leave fp8=None for this layer")
            from tokenforge.fp8.grouped import fit_expert_recipe

            if fit_expert_recipe(fp8, dim, hidden_dim) != fp8:
                raise ValueError(f"MoE: fp8='blockwise' needs dim ({dim}) and hidden_dim ({hidden_dim}) multiples of 128 "
                                 "(128x128 weight blocks); use fp8='rowwise' for this layer")
        kw = dict(device=device, dtype=dtype)
        self.router = torch.nn.Linear(dim, num_experts, bias=False, **kw)
        self.w_gate_up = torch.nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim, **kw))
        self.w_down = torch.nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **kw))
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        self.shared_experts = None
        if num_shared_experts:
            width = (shared_hidden_dim or hidden_dim) * num_shared_experts
            self.shared_experts = SwiGLU(dim, width, backend=None if backend == "cuda" else backend, **kw)
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_expert_counts: Optional[torch.Tensor] = None
        self.ep_group = None
        self.local_experts = num_experts
        self.reset_parameters()

    @property
    def rows_backend(self) -> Optional[str]:
        """The backend of the permutation and SwiGLU: ``backend``, except that "cuda" names the CUDA
        C++ grouped GEMM; those ops have no CUDA C++ kernels and pick their own then (forcing "cuda"
        on them would raise). Read per call: tokenforge.patch switches ``backend``."""
        return None if self.backend == "cuda" else self.backend

    def shard_experts(self, group) -> "MoE":
        """Keep this rank's slice of the experts (see the module docstring); returns self."""
        from tokenforge.ops.moe_expert_parallel import ep_world

        if self.ep_group is not None:
            raise RuntimeError("MoE.shard_experts: the experts are sharded already")
        rank, world = ep_world(group)
        if self.num_experts % world:
            raise ValueError(f"MoE.shard_experts: {self.num_experts} experts do not split over {world} ranks; "
                             "use an expert count divisible by the expert-parallel group size")
        n = self.num_experts // world
        lo = rank * n
        self.w_gate_up = torch.nn.Parameter(self.w_gate_up.detach()[lo:lo + n].clone())
        self.w_down = torch.nn.Parameter(self.w_down.detach()[lo:lo + n].clone())
        self.ep_group, self.local_experts = group, n
        return self

    def reset_parameters(self) -> None:
        # nn.Linear's default per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        with torch.no_grad():
            self.w_gate_up.uniform_(-1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
            self.w_down.uniform_(-1 / math.sqrt(self.hidden_dim), 1 / math.sqrt(self.hidden_dim))
            self.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoE: input's last dim must be {self.dim}, got shape {tuple(x.shape)}")
        shape = x.shape
        h = x.reshape(-1, self.dim)
        use_bias = self.bias_update_rate > 0
        weights, experts, scores = moe_route(self.router(h), self.top_k, bias=self.expert_bias if use_bias else None,
                                             **self.route_kw, backend=self.rows_backend)
        xs, offs, order, counts = moe_permute(h, experts, self.num_experts, backend=self.rows_backend)
        w_gate_up, w_down = self.w_gate_up, self.w_down
        # Custom ops are invisible to autocast: cast as nn.Linear would be under it (the expert
        # GEMMs in bf16, fp32 masters keep their gradients through the cast).
        device_type = xs.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            xs, w_gate_up, w_down = xs.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
        plan = None
        if self.ep_group is not None:
            from tokenforge.ops.moe_expert_parallel import ep_dispatch

            xs, plan = ep_dispatch(xs, counts, self.ep_group)
            offs = plan.offs
        from tokenforge.fp8.grouped import expert_gemm

        expert_mm = expert_gemm(self.fp8)
        gate_up = expert_mm(xs, w_gate_up, offs, check_offs=False, backend=self.backend)
        ys = expert_mm(swiglu_packed(gate_up, backend=self.rows_backend), w_down, offs, check_offs=False,
                       backend=self.backend)
        if plan is not None:
            from tokenforge.ops.moe_expert_parallel import ep_combine

            ys = ep_combine(ys, plan)
        y = moe_unpermute(ys, order, weights, backend=self.rows_backend)
        if self.shared_experts is not None:
            y = y + self.shared_experts(h)
        self.last_expert_counts = counts.detach()
        self.aux_loss = self.aux_loss_coef * load_balancing_loss(scores, counts) if self.aux_loss_coef > 0 else None
        if self.training and use_bias:
            with torch.no_grad():
                load = counts.to(torch.float32)
                if self.ep_group is not None:  # the group's load: the bias stays equal on every rank
                    import torch.distributed as dist

                    dist.all_reduce(load, group=self.ep_group)
                self.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
        return y.view(shape)

    def extra_repr(self) -> str:
        shared = f", shared_experts={self.shared_experts.hidden_dim}" if self.shared_experts is not None else ""
        ep = f", local_experts={self.local_experts} (expert parallel)" if self.ep_group is not None else ""
        fp8 = f", fp8={self.fp8}" if self.fp8 is not None else ""
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}{shared}{ep}{fp8}")
