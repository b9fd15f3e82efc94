"""FSDP2 fp8 all-gather: Float8Linear weights cast to fp8 *before* FSDP2 gathers them.

Under FSDP2 (``fully_shard``) each rank holds a shard of every weight and all-gathers the whole
weight before a layer runs (forward, and again in backward). By default that all-gather moves the
weight in its own dtype and Float8Linear casts it afterwards; with
``Float8LinearConfig(enable_fsdp_float8_all_gather=True)`` it moves fp8 bytes instead (half of
bf16, a quarter of fp32) and the gathered weight arrives already quantized:

    convert_to_float8(model, config=Float8LinearConfig(enable_fsdp_float8_all_gather=True))
    for block in model.layers: fully_shard(block)
    fully_shard(model)
    ...
    optimizer.step()
    precompute_float8_dynamic_scale_for_fsdp(model)   # optional: one all-reduce for every layer

How: convert_to_float8 wraps each weight in :class:`Float8AllGatherWeight`, a tensor subclass that
behaves as its high-precision data everywhere (optimizers, state_dict, clipping) and implements
FSDP2's all-gather extension. Before the all-gather, ``fsdp_pre_all_gather`` computes the
tensorwise scale of the *whole* weight (amax of the local shard, max-all-reduced over the FSDP
mesh, so every rank uses the scale one process would) and casts the shard with it; after it,
``fsdp_post_all_gather`` wraps the gathered bytes and the scale as a :class:`Float8Weight`, which
Float8Linear uses as its already-quantized weight (for y and for dX). The result is bit-identical
to quantizing the unsharded weight (same amax, same rounding).

:func:`precompute_float8_dynamic_scale_for_fsdp` computes every wrapped weight's scale at once
(one fused amax, one all-reduce) after the optimizer step, so the per-layer all-reduces go away;
a scale is used only while its weight is unchanged (tracked by the tensor's version counter), so
forgetting to call it, or calling it before the step, is never wrong, only slower.

Tensorwise weight scaling only (a rowwise or blockwise weight scale would need the full rows or
blocks on one rank); the all-gathered bytes travel as uint8 (gloo has no fp8 dtype).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from tokenforge.fp8.quantize import _amax, cast_with_scale, scale_from_amax

aten = torch.ops.aten

# Ops whose result is the same weight (or a view of it): they keep the subclass, so FSDP2's
# sharding (new_zeros, narrow, view, copy_) and Parameter wrapping (detach) preserve it.
_KEEP_SUBCLASS = {aten.detach.default, aten.alias.default, aten.view.default, aten._unsafe_view.default,
                  aten.as_strided.default, aten.narrow.default, aten.slice.Tensor, aten.split.Tensor,
                  aten.split_with_sizes.default, aten.clone.default, aten.new_zeros.default,
                  aten.new_empty.default, aten.empty_like.default, aten._to_copy.default,
                  aten._pin_memory.default, aten.chunk.default}


class Float8AllGatherWeight(torch.Tensor):
    """A Float8Linear weight (high-precision data) that FSDP2 all-gathers in fp8."""

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, power_of_two: bool = False):
        return torch.Tensor._make_wrapper_subclass(
            cls, tensor.size(), strides=tensor.stride(), storage_offset=tensor.storage_offset(),
            dtype=tensor.dtype, layout=tensor.layout, device=tensor.device, requires_grad=tensor.requires_grad)

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, power_of_two: bool = False):
        self._tensor = tensor
        self._fp8_dtype = dtype
        self._power_of_two = power_of_two
        self._precomputed: Optional[tuple[torch.Tensor, int]] = None  # (scale, _tensor._version)

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"Float8AllGatherWeight({self._tensor!r}, fp8={self._fp8_dtype})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        like = next(a for a in tree_leaves((args, kwargs)) if isinstance(a, cls))
        out = func(*tree_map_only(cls, lambda t: t._tensor, args), **tree_map_only(cls, lambda t: t._tensor, kwargs))
        if func not in _KEEP_SUBCLASS:
            return out  # arithmetic (optimizer steps, norms, copies out) sees plain tensors
        return tree_map_only(torch.Tensor, lambda t: cls(t, like._fp8_dtype, like._power_of_two), out)

    def __tensor_flatten__(self):
        return ["_tensor"], (self._fp8_dtype, self._power_of_two)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Float8AllGatherWeight(inner["_tensor"], *meta)

    # ----- FSDP2's all-gather extension -----------------------------------------------------

    def _whole_weight_scale(self, mesh) -> torch.Tensor:
        if self._precomputed is not None and self._precomputed[1] == self._tensor._version:
            return self._precomputed[0]
        amax = _amax(self._tensor, None).reshape(1)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
        return scale_from_amax(amax[0], self._fp8_dtype, self._power_of_two)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        scale = self._whole_weight_scale(mesh)
        data = cast_with_scale(self._tensor, scale, self._fp8_dtype).view(torch.uint8)
        # FSDP2 gathers equal (padded) shards: the last ranks' may be short or empty.
        rows = -(-outer_size[0] // mesh.size())
        if data.shape[0] < rows:
            data = torch.cat([data, data.new_zeros((rows - data.shape[0], *outer_size[1:]))])
        return (data.contiguous(),), (scale,)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (gathered,), (scale,) = all_gather_outputs, metadata
        data = gathered.view(self._fp8_dtype)
        if out is not None:  # FSDP2 re-gathered into the same buffer: only the scale is new
            if not isinstance(out, Float8Weight):
                raise RuntimeError(f"fp8 all-gather: expected the previous Float8Weight as out, got {type(out).__name__}")
            out._scale = scale
            return
        return Float8Weight(data, scale, param_dtype), (gathered,)


class Float8Weight(torch.Tensor):
    """A gathered weight already in fp8: ``data`` (fp8) times the tensorwise ``scale``, presented
    as a tensor of the parameter dtype. Float8Linear reads data and scale directly; any other op
    sees the dequantized weight."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, data.size(), strides=data.stride(),
                                                   storage_offset=data.storage_offset(), dtype=dtype,
                                                   device=data.device, requires_grad=False)

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self._data, self._scale = data, scale

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"Float8Weight(shape={tuple(self.shape)}, fp8={self._data.dtype}, dtype={self.dtype})"

    def dequantize(self) -> torch.Tensor:
        return (self._data.float() * self._scale).to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default, aten.as_strided.default, aten.view.default):
            src = args[0]
            return cls(func(src._data, *args[1:], **kwargs), src._scale, src.dtype)
        return func(*tree_map_only(cls, lambda t: t.dequantize(), args),
                    **tree_map_only(cls, lambda t: t.dequantize(), kwargs))

    def __tensor_flatten__(self):
        return ["_data", "_scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner, dtype, outer_size, outer_stride):
        return Float8Weight(inner["_data"], inner["_scale"], dtype)


def local_weight(weight: torch.Tensor) -> torch.Tensor:
    """The Float8AllGatherWeight under a (possibly DTensor-sharded) parameter, else ``weight``."""
    return weight._local_tensor if hasattr(weight, "_local_tensor") else weight


def precompute_float8_dynamic_scale_for_fsdp(model: nn.Module) -> int:
    """After the optimizer step: every fp8-all-gathered weight's tensorwise scale in one fused
    amax and one max-all-reduce per mesh (instead of one per layer inside FSDP2's all-gathers).
    Returns how many weights got a scale."""
    groups: dict = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        local = local_weight(weight)  # not .data: that detaches into a new wrapper FSDP2 never sees
        if isinstance(local, Float8AllGatherWeight):
            mesh = getattr(weight, "device_mesh", None)
            groups.setdefault(mesh, []).append(local)
    for mesh, weights in groups.items():
        with torch.no_grad():
            inner = [w._tensor for w in weights]
            amax = torch.stack([n.float() for n in torch._foreach_norm(inner, ord=math.inf)])
            if mesh is not None:
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
            for w, a in zip(weights, amax):
                w._precomputed = (scale_from_amax(a, w._fp8_dtype, w._power_of_two), w._tensor._version)
    return sum(len(w) for w in groups.values())
