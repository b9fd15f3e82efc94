"""Pointer tables for multi-tensor kernels: one launch walks many tensors.

A launch over n tensors gets three small device tensors (see kernels/adamw.py for how a kernel
reads them):

- ``ptrs``  int64 [roles, n]: data_ptr of every role (param, grad, state, ...) of every tensor;
- ``meta``  int64 [3, n]: numel, a stable per-parameter key, and the global flat offset of the
  tensor's first element (nonzero for an FSDP2 shard; stochastic rounding indexes by it);
- ``blockmap`` int32 [2, n_blocks]: (tensor index, chunk index) of each program.

Building them is a host loop over the tensors plus one host-to-device copy, so :class:`TableCache`
keeps them while nothing changed: the block map is keyed on the sizes, the pointer table on the
pointers (grads are often reallocated by ``zero_grad(set_to_none=True)``, and then only the
pointer table is rebuilt; when the caching allocator hands back the same addresses, as it does in
a steady training loop, nothing is). A step whose tables are cached launches kernels only, which is
what CUDA graph capture needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from tokenforge.dtensor import is_dtensor


def local(t):
    """The local shard of a DTensor (FSDP2 params, grads and states), else t itself: the kernels
    update each rank's shard in place, which is exactly the elementwise step on the whole. An fp8
    all-gather weight (tokenforge.fp8.fsdp.Float8AllGatherWeight, a wrapper with no storage of
    its own) gives the high-precision tensor it stands for."""
    if t is None or type(t).__name__ not in ("DTensor", "Parameter", "Float8AllGatherWeight"):
        return t
    if is_dtensor(t):
        t = t.to_local()
    return t._tensor if type(t).__name__ == "Float8AllGatherWeight" else t


def global_offset(t) -> Optional[int]:
    """Flat index, in the full parameter, of the first element of t's local shard: 0 for a plain
    tensor; for a DTensor replicated or sharded on dim 0 (FSDP2's layout), the shard's first row
    times the row size, so its elements keep their global indices. None for any other sharding,
    where the local flat index does not map to one global offset (such params take the torch path)."""
    if not is_dtensor(t):
        return 0
    from torch.distributed.tensor import Replicate, Shard

    if any(not isinstance(pl, (Replicate, Shard)) for pl in t.placements):
        return None
    dims = [pl.dim for pl in t.placements if isinstance(pl, Shard)]
    if any(d != 0 for d in dims):
        return None
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # older torch
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    row = 1
    for n in t.shape[1:]:
        row *= int(n)
    return int(offset[0]) * row if len(offset) else 0


@dataclass
class Tables:
    ptrs: torch.Tensor      # int64 [roles, n_tensors]
    meta: torch.Tensor      # int64 [3, n_tensors]: numel, key, global offset
    blockmap: torch.Tensor  # int32 [2, n_blocks]
    n_tensors: int
    n_blocks: int
    block: int
    aligned: bool  # every pointer 16-byte aligned: the kernels may use 16-byte accesses


def _blockmap(sizes: Sequence[int], block: int) -> list[list[int]]:
    tensor_idx, chunk_idx = [], []
    for i, n in enumerate(sizes):
        chunks = -(-n // block)
        tensor_idx.extend([i] * chunks)
        chunk_idx.extend(range(chunks))
    return [tensor_idx, chunk_idx]


def _upload(rows, dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        # Pinned staging lets the copy run asynchronously, ordered on the current stream.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class TableCache:
    """Device tables of one launch site (one optimizer partition), rebuilt only when pointers or
    sizes change."""

    def __init__(self) -> None:
        self._sizes_key: Optional[tuple] = None
        self._ptrs_key: Optional[tuple] = None
        self._tables: Optional[Tables] = None
        self._meta: Optional[torch.Tensor] = None
        self._blockmap: Optional[torch.Tensor] = None
        self._n_blocks = 0
        self.rebuilds = 0  # pointer-table uploads, for tests

    def get(self, roles: Sequence[Sequence[Optional[torch.Tensor]]], keys: Sequence[int], block: int,
            device: torch.device, offsets: Optional[Sequence[int]] = None) -> Tables:
        """Tables for ``roles[r][i]`` = tensor of role r for tensor i (None: role unused, 0 pointer).
        Every tensor of a column must have the numel of ``roles[0][i]`` and be contiguous.
        ``offsets``: global flat offset of each tensor's first element (default 0)."""
        n = len(roles[0])
        sizes = tuple(t.numel() for t in roles[0])
        offsets = tuple(offsets) if offsets is not None else (0,) * n
        sizes_key = (sizes, tuple(keys), offsets, block, device)
        ptrs = tuple(tuple(0 if t is None else t.data_ptr() for t in role) for role in roles)
        if (sizes_key != self._sizes_key or ptrs != self._ptrs_key) and _capturing():
            raise CaptureError("a multi-tensor table would be rebuilt during CUDA graph capture (a param, grad "
                               "or state moved since the last step): run a step outside capture first and keep "
                               "the grads allocated (zero_grad(set_to_none=False)) while replaying")
        if sizes_key != self._sizes_key:
            bm = _blockmap(sizes, block)
            self._n_blocks = len(bm[0])
            self._blockmap = _upload(bm if self._n_blocks else [[0], [0]], torch.int32, device)
            self._meta = _upload([list(sizes), list(keys), list(offsets)] if n else [[0], [0], [0]], torch.int64, device)
            self._sizes_key = sizes_key
            self._ptrs_key = None
        if ptrs != self._ptrs_key:
            table = _upload([list(r) for r in ptrs] if n else [[0]] * len(roles), torch.int64, device)
            aligned = all(p % 16 == 0 for role in ptrs for p in role)
            self._tables = Tables(table, self._meta, self._blockmap, n, self._n_blocks, block, aligned)
            self._ptrs_key = ptrs
            self.rebuilds += 1
        return self._tables


# ---------------------------------------------------------------------------------------------
# Base class of the multi-tensor optimizers (AdamW, Lion)
# ---------------------------------------------------------------------------------------------

# State dtypes that may differ from the param's on purpose; torch's load_state_dict would cast
# them to the param's dtype, so MultiTensorOptimizer.load_state_dict restores them.
KEPT_STATE_DTYPES = (torch.float32, torch.int8, torch.uint8)

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _capturing() -> bool:
    """True inside torch.cuda.graph capture on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class CaptureError(RuntimeError):
    """The optimizer step was captured into a CUDA graph in a way that would replay wrong values."""


def check_capturable(name: str, group: dict, state: dict) -> None:
    """Refuse a CUDA-graph capture that would freeze a value: a float lr is uploaded from the host
    at capture time and every replay would reuse it (a schedule would silently stop), and a state
    created during capture would be allocated inside the graph's private pool."""
    lr = group["lr"]
    if not (isinstance(lr, torch.Tensor) and lr.device.type == "cuda"):
        raise CaptureError(
            f"{name}: capturing the step in a CUDA graph needs lr as a CUDA tensor (got {type(lr).__name__} "
            f"{lr!r}); a float would be frozen into the graph. Use lr=torch.tensor({float(lr)!r}, device='cuda') "
            "and update it in place (lr.fill_(...)) between replays")
    if len(state) == 0:
        raise CaptureError(f"{name}: run one step before capturing (states are created on the first step, "
                           "outside the graph), as with torch.optim's capturable optimizers")


class SparseGradientError(TypeError, RuntimeError):
    """Sparse gradients reached a dense optimizer (a RuntimeError too, as torch raises)."""


def check_hyper(name: str, lr, betas, eps: float, weight_decay: float) -> None:
    """ValueError for hyper-parameters torch.optim.AdamW would refuse, saying what is allowed."""
    lr_value = lr
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{name}: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        lr_value = float(lr.detach().reshape(()).cpu())  # once, when a group is added
    if not 0.0 <= lr_value:
        raise ValueError(f"{name}: Invalid learning rate: {lr_value}; lr must be >= 0")
    if not 0.0 <= eps:
        raise ValueError(f"{name}: Invalid epsilon value: {eps}; eps must be >= 0")
    if betas is not None:
        if len(betas) != 2:
            raise ValueError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            b = float(b)
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{name}: Invalid beta parameter at index {i}: {b}; betas must lie in [0, 1)")
    if not 0.0 <= weight_decay:
        raise ValueError(f"{name}: Invalid weight_decay value: {weight_decay}; it must be >= 0")


class MultiTensorOptimizer(torch.optim.Optimizer):
    """Shared plumbing: input checks, partitions of params that one launch can update, device
    hyper-parameter tables, fused clipping, and state_dict loading that keeps fp32 states fp32."""

    NAME = "optimizer"

    def __init__(self, params, defaults: dict, *, max_grad_norm: Optional[float], backend: Optional[str]):
        if max_grad_norm is not None and not float(max_grad_norm) > 0:
            raise ValueError(f"{self.NAME}: max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.backend = backend
        self._caches: dict = {}
        self._hyper: dict = {}
        self.last_grad_norm: Optional[torch.Tensor] = None
        super().__init__(params, defaults)

    # -- checks ---------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        devices = set()
        for p in group["params"]:
            if p.is_complex():
                raise TypeError(
                    f"{self.NAME}: complex parameters are not supported (got {p.dtype}); pass "
                    "torch.view_as_real(p) as the parameter or use torch.optim")
            if not p.is_floating_point():
                raise TypeError(f"{self.NAME}: parameters must be floating point, got {p.dtype}")
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(
                f"{self.NAME}: a param group holds parameters on several devices ({sorted(map(str, devices))}); "
                "put each device's parameters in a group of their own")
        self._check_group(group)

    def _check_group(self, group: dict) -> None:
        check_hyper(self.NAME, group["lr"], group.get("betas"), group.get("eps", 0.0), group["weight_decay"])

    def _check_grad(self, p: torch.Tensor) -> None:
        if p.grad.is_sparse:
            raise SparseGradientError(
                f"{self.NAME} does not support sparse gradients; use torch.optim.SparseAdam for sparse "
                "embeddings (nn.Embedding(sparse=False) gives dense ones)")
        if p.grad.shape != p.shape:
            raise ValueError(f"{self.NAME}: grad shape {tuple(p.grad.shape)} != param shape {tuple(p.shape)}")

    # -- hyper-parameter tables -------------------------------------------------------------------
    def _hyper_table(self, gi: int, device: torch.device, values: list) -> torch.Tensor:
        """float64 [len(values)] on ``device``; values[0] (lr) may be a tensor, copied on the device.
        Re-uploaded only when a float changed, so a step with constant floats launches only."""
        lr = values[0]
        floats = tuple(0.0 if isinstance(v, torch.Tensor) else float(v) for v in values)
        key = (gi, device)
        cached = self._hyper.get(key)
        if cached is None or cached[0] != floats:
            table = _upload(list(floats), torch.float64, device)
            self._hyper[key] = (floats, table)
        table = self._hyper[key][1]
        if isinstance(lr, torch.Tensor):
            table[0].copy_(lr.reshape(()), non_blocking=True)
        return table

    # -- clipping -------------------------------------------------------------------------------
    def _grad_scales(self, params: list) -> Optional[dict]:
        """{device: fp32 clip coefficient} from the global grad norm (no host sync), or None."""
        if self.max_grad_norm is None or not params:
            return None
        from tokenforge.optim import clip

        grads = [p.grad for p in params]
        norm = clip.total_norm(grads, 2.0, backend=self.backend, fp32=True)
        if is_dtensor(norm):
            norm = norm.full_tensor()
        self.last_grad_norm = norm
        coef = clip.clip_coefficient(norm.float(), self.max_grad_norm)
        return {d: coef.to(d) for d in {p.device for p in params}}

    # -- state_dict -----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, except that fp32 states of fp16/bf16 params stay fp32 and every step
        moves to its param's device (so the kernels read it without a host sync)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for sid, p in zip(saved_ids, params):
            if p not in self.state or sid not in saved_state:
                continue
            st = self.state[p]
            src = saved_state[sid]
            # torch casts every state tensor to the param's dtype; ours may differ on purpose (fp32
            # master and moments of bf16 params, int8/uint8 codes of 8-bit states): keep them.
            for k, value in src.items():
                if k != "step" and isinstance(value, torch.Tensor) and value.dtype != p.dtype \
                        and value.dtype in KEPT_STATE_DTYPES:
                    st[k] = value.to(p.device, copy=True)
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
            elif "step" in st:
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32, device=p.device)
        self._caches.clear()
        self._hyper.clear()

    def _param_keys(self) -> dict:
        return {p: i for i, p in enumerate(q for g in self.param_groups for q in g["params"])}
