"""Data-parallel training on torch.distributed: DDP, or FSDP2's ``fully_shard``; rank-0 logging.

    torchrun --nproc_per_node 8 -m tokenforge.train --dist ddp  ...
    torchrun --nproc_per_node 8 -m tokenforge.train --dist fsdp ...

NCCL on GPUs (one per local rank), gloo on CPU. Each rank draws its slice of the same global
batch (tokenforge.data.BatchSampler), so N ranks x batch B train exactly what one process with
batch N*B would, up to the order of floating-point reductions.

Expert parallelism (``--dist ddp --ep N``, N = the world size): every MoE layer keeps E/N experts
per rank (:meth:`tokenforge.nn.MoE.shard_experts`) and exchanges tokens with all-to-all; DDP leaves
those parameters out of its all-reduce (their gradients already hold every rank's tokens, divided
by N here to average as DDP does), gradient clipping adds the sharded part of the norm over ranks,
and checkpoints hold every expert (gathered on save, sliced on load), so a run resumes exactly on
the same N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    mode: str            # "none", "ddp" or "fsdp"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA GPU; use --device cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(requested)


def setup(mode: str = "none", device: str = "auto") -> DistContext:
    """Initialise the process group for ``mode`` ('ddp'/'fsdp') from torchrun's environment; 'none'
    is a single process. Raises ValueError (the CLI's one-line error) with the torchrun command line
    when the environment is missing."""
    if mode not in ("none", "ddp", "fsdp"):
        raise ValueError(f"--dist must be none, ddp or fsdp, got {mode!r}")
    if mode == "none":
        if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError("launched by torchrun with several processes but --dist none: pass --dist ddp or fsdp")
        return DistContext("none", device=pick_device(device))
    if not launched_by_torchrun():
        raise ValueError(f"--dist {mode} needs torchrun's environment: "
                           f"torchrun --nproc_per_node N -m tokenforge.train --dist {mode} ...")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistContext(mode, rank=rank, world=world, local_rank=local_rank, device=dev)


def shard_experts(model: nn.Module, ctx: DistContext, ep: int) -> list[str]:
    """Expert parallelism over the whole world (``ep`` must equal it): shard every MoE layer's
    experts, scale their gradients by 1 / world; returns the sharded parameters' names."""
    from tokenforge.nn.moe import MoE

    if ctx.mode != "ddp" or ep != ctx.world:
        raise ValueError(f"--ep {ep}: expert parallelism runs under --dist ddp with --ep equal to the number of "
                         f"ranks ({ctx.world} here, --dist {ctx.mode}); e.g. torchrun --nproc_per_node {ep} -m "
                         f"tokenforge.train --dist ddp --ep {ep}")
    names = []
    for prefix, m in model.named_modules():
        if isinstance(m, MoE):
            m.shard_experts(dist.group.WORLD)
            for pname in ("w_gate_up", "w_down"):
                getattr(m, pname).register_hook(lambda g, n=ctx.world: g / n)
                names.append(f"{prefix}.{pname}" if prefix else pname)
    if not names:
        raise ValueError(f"--ep {ep}: the model has no MoE layers to shard; use an MoE preset (moe-tiny, moe-2b)")
    return names


def clip_sharded_grads_(params: list, sharded: set, max_norm: float) -> torch.Tensor:
    """Clip to the global 2-norm when some params are expert shards (different on every rank):
    their squared norms are summed over ranks, the replicated ones counted once."""
    dense = [p.grad for p in params if id(p) not in sharded]
    local = [p.grad for p in params if id(p) in sharded]
    sq = lambda gs: sum((g.float().square().sum() for g in gs), torch.zeros((), device=params[0].grad.device))  # noqa: E731
    shard_sq = sq(local)
    dist.all_reduce(shard_sq)
    total = (sq(dense) + shard_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return total


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _rows_of_rank(t: torch.Tensor) -> torch.Tensor:
    n = t.shape[0] // dist.get_world_size()
    return t[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def _state_index(model: nn.Module, optimizer, names: list[str]) -> dict[str, tuple]:
    """name -> (state_dict index, param) of each sharded parameter in ``optimizer``."""
    params = dict(model.named_parameters())
    index = {}
    position = 0
    ids = {id(params[n]): n for n in names}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in ids:
                index[ids[id(p)]] = (position, p)
            position += 1
    return index


def gather_expert_state(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict, names: list[str]) -> None:
    """Every rank: replace the sharded entries of the state dicts by the whole tensors (collective)."""
    for name in names:
        model_sd[name] = _gather_rows(model_sd[name])
    for name, (idx, p) in _state_index(model, optimizer, names).items():
        state = optim_sd["state"].get(idx)
        if state is None:
            continue
        state = dict(state)  # the optimizer's own dict is live state: never write into it
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() and tuple(value.shape) == tuple(p.shape):
                state[key] = _gather_rows(value)
            elif torch.is_tensor(value) and value.dim():
                raise NotImplementedError(f"--ep checkpoint: optimizer state {key!r} of {name} has shape "
                                          f"{tuple(value.shape)}, not the parameter's; use a full-precision optimizer")
        optim_sd["state"][idx] = state


def slice_expert_state(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict, names: list[str]) -> None:
    """The inverse of :func:`gather_expert_state` on load: each rank keeps its experts' rows."""
    for name in names:
        model_sd[name] = _rows_of_rank(model_sd[name])
    for name, (idx, p) in _state_index(model, optimizer, names).items():
        state = optim_sd["state"].get(idx)
        if state is not None:
            optim_sd["state"][idx] = {k: _rows_of_rank(v) if torch.is_tensor(v) and v.dim() else v
                                      for k, v in state.items()}


def wrap(model: nn.Module, ctx: DistContext, block_types: tuple = (), ignore: tuple = ()) -> nn.Module:
    """DDP-wrap the model, or shard it in place with FSDP2 (each ``block_types`` module, then the
    root). Returns the module to call; for FSDP2 that is the model itself. DDP leaves the
    parameters named in ``ignore`` (expert shards) out of its gradient all-reduce."""
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if ignore:
            DDP._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if ctx.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world,))
        for m in model.modules():
            if block_types and isinstance(m, block_types):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers (whose state_dict keys are the model's)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of a tensor over ranks (a no-op without a process group)."""
    if ctx.enabled and ctx.world > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= ctx.world
    return value


def all_gather_object(obj, ctx: DistContext) -> list:
    if not ctx.enabled or ctx.world == 1:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def teardown(ctx: Optional[DistContext]) -> None:
    if ctx is not None and ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
