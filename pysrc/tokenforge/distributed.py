"""Data-parallel training on torch.distributed: DDP, or FSDP2's ``fully_shard``; rank-0 logging.

    torchrun --nproc_per_node 8 -m tokenforge.train --dist ddp  ...
    torchrun --nproc_per_node 8 -m tokenforge.train --dist fsdp ...

NCCL on GPUs (one per local rank), gloo on CPU. Each rank draws its slice of the same global
batch (tokenforge.data.BatchSampler), so N ranks x batch B train exactly what one process with
batch N*B would, up to the order of floating-point reductions.
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
    is a single process. Raises with the torchrun command line when the environment is missing."""
    if mode not in ("none", "ddp", "fsdp"):
        raise ValueError(f"--dist must be none, ddp or fsdp, got {mode!r}")
    if mode == "none":
        if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise RuntimeError("launched by torchrun with several processes but --dist none: pass --dist ddp or fsdp")
        return DistContext("none", device=pick_device(device))
    if not launched_by_torchrun():
        raise RuntimeError(f"--dist {mode} needs torchrun's environment: "
                           f"torchrun --nproc_per_node N -m tokenforge.train --dist {mode} ...")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistContext(mode, rank=rank, world=world, local_rank=local_rank, device=dev)


def wrap(model: nn.Module, ctx: DistContext, block_types: tuple = ()) -> nn.Module:
    """DDP-wrap the model, or shard it in place with FSDP2 (each ``block_types`` module, then the
    root). Returns the module to call; for FSDP2 that is the model itself."""
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

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
