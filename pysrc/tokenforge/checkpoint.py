"""Checkpoints that resume exactly: model, optimizer, LR scheduler, every rank's RNG states and
the data sampler's position, written atomically (temp file + rename) by rank 0.

Single process and DDP save the plain module's state_dict. FSDP2 gathers full (unsharded) model
and optimizer state dicts through torch.distributed.checkpoint.state_dict, so a checkpoint is one
ordinary file that loads into any world size or into a single process.
"""

from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch

from tokenforge.distributed import DistContext, all_gather_object, barrier, unwrap

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_state(model, optimizer, ctx: DistContext, expert_names: list) -> tuple[dict, dict]:
    if ctx.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(unwrap(model), optimizer, options=opts)
    model_sd, optim_sd = unwrap(model).state_dict(), optimizer.state_dict()
    if expert_names:  # expert-parallel shards: the checkpoint holds every expert
        from tokenforge.distributed import gather_expert_state

        gather_expert_state(unwrap(model), optimizer, model_sd, optim_sd, expert_names)
    return model_sd, optim_sd


def save(path: str, *, model, optimizer, scheduler, sampler_state: dict, step: int, ctx: DistContext,
         extra: Optional[dict] = None, expert_names: list = ()) -> None:
    """Collective under FSDP and expert parallelism (every rank must call it); rank 0 writes ``path``.
    ``expert_names``: parameters sharded over the ranks by expert parallelism (gathered whole)."""
    model_sd, optim_sd = _full_state(model, optimizer, ctx, list(expert_names))
    rngs = all_gather_object(rng_state(), ctx)
    if ctx.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        payload = {"model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                   "sampler": sampler_state, "step": step, "rng": rngs, "world": ctx.world,
                   "extra": extra or {}}
        # Atomic: a temp file renamed over the old one, so an interrupted save leaves the previous
        # checkpoint; its SHA-256 beside it (written first) lets load tell a corrupt file from a good one.
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(payload, tmp)
        digest = _sha256(tmp)
        with open(f"{tmp}.sha256", "w") as f:
            f.write(digest + "\n")
        os.replace(f"{tmp}.sha256", f"{path}.sha256")
        os.replace(tmp, path)
    barrier(ctx)


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _corrupt(path: str, why: str) -> ValueError:
    return ValueError(f"--resume: {path} is corrupt ({why}); restore a good copy, or delete it and "
                      f"{os.path.basename(path)}.sha256 to start the run over")


def load(path: str, *, model, optimizer, scheduler, ctx: DistContext, expert_names: list = ()) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path``; returns the payload
    (``step``, ``sampler``, ``extra``) for the caller to restore the rest."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; train with --out DIR first")
    sidecar = f"{path}.sha256"
    if os.path.exists(sidecar):
        with open(sidecar) as f:
            want = f.read().strip()
        if _sha256(path) != want:
            raise _corrupt(path, "its SHA-256 does not match the one saved with it")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means the file is not a checkpoint
        raise _corrupt(path, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}") from exc
    if not isinstance(payload, dict) or not {"model", "optimizer", "scheduler", "step"} <= set(payload):
        raise _corrupt(path, "it is not a tokenforge train checkpoint")
    if ctx.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(unwrap(model), optimizer, model_state_dict=payload["model"],
                       optim_state_dict=payload["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        if expert_names:
            from tokenforge.distributed import slice_expert_state

            slice_expert_state(unwrap(model), optimizer, payload["model"], payload["optimizer"], list(expert_names))
        unwrap(model).load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    rngs = payload["rng"]
    set_rng_state(rngs[ctx.rank] if ctx.rank < len(rngs) else rngs[0])
    return payload
