"""DTensor inputs (``torch.distributed.tensor``) for the ops that work row by row or element by element.

Tensor- and sequence-parallel training hands norms, activations and RoPE sharded tensors. Such an op
runs on each rank's shard as it is: ``to_local``, the kernel, ``from_local``, with no communication,
once the dims it reduces over are whole on every rank. Those dims are redistributed to Replicate
first, an all-gather, which is what DTensor's own op would do.

Roles of the inputs:

- activations: each output keeps the placements of its activation (output j, activation j, or
  activation 0 when there are fewer). Activations of activation 0's shape are moved to its
  placements first, so an elementwise op meets aligned shards.
- parameters (a norm's weight, RoPE's cos/sin): used whole on every rank. A DTensor parameter's
  gradient is Partial on each mesh dim where activation 0 is sharded, because each rank saw only
  its rows, and Replicate where it is not. A plain tensor is used as it is. With only parameters
  as DTensors (plain activations), the outputs stay plain tensors.

Every autograd step is DTensor's own (``redistribute``, ``to_local``, ``from_local``), so gradients
come back with the inputs' placements.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(t, DTensor)


def any_dtensor(*tensors) -> bool:
    """Whether any argument is a DTensor."""
    return any(is_dtensor(t) for t in tensors if t is not None)


def _whole(placements, ndim: int, whole_dims: Sequence[int]):
    """placements with every Shard of a dim in ``whole_dims`` (negative: from the end), and every
    Partial, made Replicate."""
    from torch.distributed.tensor import Replicate, Shard

    whole = {d % ndim for d in whole_dims}
    out = []
    for p in placements:
        if p.is_partial() or (isinstance(p, Shard) and p.dim % ndim in whole):
            out.append(Replicate())
        else:
            out.append(p)
    return tuple(out)


def run_on_shards(name: str, fn: Callable, activations: Sequence[torch.Tensor],
                  params: Sequence[Optional[torch.Tensor]] = (), whole_dims: Sequence[int] = (-1,)):
    """``fn(*activations, *params)`` on each rank's local shards, its outputs DTensors again (see the
    module docstring). ``whole_dims``: the dims of the activations the op reduces over or mixes
    (negative: from the end; a norm's last dim, () for an elementwise op); they are gathered where
    sharded."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    lead = next((t for t in (*activations, *params) if isinstance(t, DTensor)), None)
    mesh = lead.device_mesh
    for t in (*activations, *params):
        if isinstance(t, DTensor) and t.device_mesh != mesh:
            raise ValueError(f"{name}: DTensor inputs live on different device meshes ({mesh} and {t.device_mesh}); "
                             "redistribute them onto one mesh first")
    first = activations[0]
    if not any(isinstance(t, DTensor) for t in activations):
        # Plain activations beside DTensor parameters (Hugging Face's tensor parallelism keeps
        # activations local, a norm's weight may be a replicated DTensor): the whole parameter on
        # every rank, its gradient whole too (each rank saw all the rows), plain outputs.
        whole = [Replicate()] * mesh.ndim
        return fn(*activations, *[p.redistribute(mesh, whole).to_local(grad_placements=whole)
                                  if isinstance(p, DTensor) else p for p in params])
    base = _whole(first.placements, first.dim(), whole_dims) if isinstance(first, DTensor) else \
        tuple(Replicate() for _ in range(mesh.ndim))
    local_acts, out_meta = [], []
    for t in activations:
        if isinstance(t, DTensor):
            placements = base if t.shape == first.shape else _whole(t.placements, t.dim(), whole_dims)
            t = t.redistribute(mesh, placements)
        else:
            # A plain tensor beside DTensors is taken as the whole tensor, the same on every rank (as
            # Liger does); from_local + redistribute keep its gradient and cost no communication.
            placements = base if t.shape == first.shape else tuple(Replicate() for _ in range(mesh.ndim))
            t = DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(mesh, placements)
        local_acts.append(t.to_local())
        out_meta.append((placements, t.shape))
    # A parameter's gradient from one rank covers that rank's rows only where activation 0 is sharded.
    grad_placements = [Partial() if p.is_shard() else Replicate() for p in base]
    local_params = []
    for p in params:
        if isinstance(p, DTensor):
            p = p.redistribute(mesh, [Replicate()] * mesh.ndim).to_local(grad_placements=grad_placements)
        local_params.append(p)
    result = fn(*local_acts, *local_params)
    outputs = result if isinstance(result, tuple) else (result,)
    wrapped = []
    for j, out in enumerate(outputs):
        placements, shape = out_meta[j] if j < len(out_meta) else out_meta[0]
        if not isinstance(out, torch.Tensor) or out.dim() != len(shape):
            # Every op routed here returns activation-shaped outputs; anything else is a caller's bug.
            raise RuntimeError(f"{name}: output {j} does not follow an activation's layout, so run_on_shards "
                               "cannot place it; route only ops whose outputs are shaped like their inputs")
        # A sharded dim keeps the activation's global size; a whole one is the local size (a packed
        # SwiGLU halves its last dim).
        sharded = {p.dim % len(shape) for p in placements if p.is_shard()}
        global_shape = torch.Size(shape[d] if d in sharded else out.shape[d] for d in range(out.dim()))
        wrapped.append(DTensor.from_local(out, mesh, placements, run_check=False, shape=global_shape,
                                          stride=torch.empty(global_shape, device="meta").stride()))
    return tuple(wrapped) if isinstance(result, tuple) else wrapped[0]
