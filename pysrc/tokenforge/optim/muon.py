"""Muon: momentum, orthogonalised by Newton-Schulz, for the 2-D weight matrices of hidden layers;
tokenforge's fused AdamW for everything else, in the same optimizer (one step, one state_dict,
one LR scheduler).

    opt = tokenforge.optim.Muon(model, lr=3e-4, adjust_lr_fn="match_rms_adamw")   # groups by rule
    opt = tokenforge.optim.Muon(tokenforge.optim.muon_param_groups(model, ...), ...)  # or your own

A Muon group (``use_muon=True``, the default for a group) updates each matrix W (torch.optim.Muon's
formulas, argument names and defaults):

    B <- lerp(B, G, 1 - momentum)                     momentum buffer
    U <- lerp(G, B, momentum) if nesterov else B
    O <- newton_schulz(U, ns_steps, ns_coefficients, eps)     (bf16, tokenforge.ops.newton_schulz)
    W <- W * (1 - lr * weight_decay) - lr * ratio(rows, cols) * O

with ratio = sqrt(max(1, rows / cols)) (``adjust_lr_fn`` None or "original", Keller Jordan's) or
0.2 * sqrt(max(rows, cols)) ("match_rms_adamw", Moonlight's: the update's RMS matches AdamW's, so
Muon reuses AdamW's learning rate and weight decay). Matrices of one shape are orthogonalised in one
batched launch. An AdamW group (``use_muon=False``) is stepped exactly as tokenforge.optim.AdamW
with the group's lr, betas, eps and weight_decay (defaults: ``adamw_*`` arguments).

Which parameter goes where (:func:`muon_param_groups`, the rule ``Muon(model)`` applies): 2-D
weights of hidden layers -> Muon; embeddings (nn.Embedding weights), the output head (a Linear
tied to an embedding, whose out_features is an embedding's vocabulary, or named lm_head / output /
head / classifier / score) -> AdamW with weight decay; norms, biases and other 1-D or scalar
params -> AdamW without weight decay; conv weights (3-D+) -> AdamW unless ``conv_to_muon=True``,
which orthogonalises them viewed as (out_channels, -1) (``matrix_view="flatten"`` on the group).
A Muon group given any other shape raises a ValueError that says this.

Low-precision (bf16/fp16) params keep an fp32 ``master_param`` and an fp32 momentum buffer; fp32
params keep the buffer in fp32 (state key ``momentum_buffer``, as torch.optim.Muon). With
``max_grad_norm`` the global grad norm clips every group inside the step.

Distributed: FSDP2's DTensor params (sharded on dim 0) are orthogonalised whole, exactly once per
step: matrix k belongs to rank k mod world, which gathers the momentum-updated rows of every rank,
runs Newton-Schulz and scatters each rank its rows back (one gather and one scatter per matrix;
the element-wise parts run on the local shards). So N ranks produce the parameters one process
does (tests/muon_shard_worker.py checks 2 gloo ranks bit for bit). Replicated DTensors and DDP's
plain tensors are orthogonalised locally (every rank holds the same matrix).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from tokenforge.ops.newton_schulz import COEFFICIENTS, EPS, newton_schulz
from tokenforge.optim.adamw import AdamW
from tokenforge.optim.multi_tensor import CaptureError, LOW_PRECISION, _capturing, is_dtensor, local

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
HEAD_NAMES = ("lm_head", "output", "head", "classifier", "score")


def adjusted_ratio(adjust_lr_fn: Optional[str], rows: int, cols: int) -> float:
    """The factor on lr for a (rows, cols) matrix (see the module docstring)."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def _matrix_shape(p: torch.Tensor, group: dict) -> tuple[int, int]:
    if group.get("matrix_view") == "flatten" and p.dim() > 2:
        return int(p.shape[0]), int(p[0].numel())
    return int(p.shape[0]), int(p.shape[1])


# ---------------------------------------------------------------------------------------------
# Which parameters Muon takes
# ---------------------------------------------------------------------------------------------


def muon_param_groups(model: torch.nn.Module, *, conv_to_muon: bool = False, adamw_weight_decay: Optional[float] = None,
                      extra_adamw: Iterable[torch.nn.Parameter] = ()) -> list[dict]:
    """Param groups for :class:`Muon` by the documented rule: [Muon matrices, AdamW decayed
    (embeddings, head), AdamW not decayed (1-D)]; empty groups are left out. ``extra_adamw``:
    params to send to AdamW whatever their shape (decayed if 2-D+). ``adamw_weight_decay`` sets the
    decayed AdamW group's weight decay (default: the optimizer's ``adamw_weight_decay``)."""
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    embedding_ids = {id(m.weight) for m in embeddings}
    vocab_sizes = {m.num_embeddings for m in embeddings}
    forced = {id(p) for p in extra_adamw}
    head_ids = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if id(module.weight) in embedding_ids or module.out_features in vocab_sizes or leaf in HEAD_NAMES:
                head_ids.add(id(module.weight))
    muon, adam_decay, adam_flat, seen = [], [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2:
            adam_flat.append(p)
        elif id(p) in embedding_ids or id(p) in head_ids or id(p) in forced:
            adam_decay.append(p)
        elif p.dim() == 2 or conv_to_muon:
            muon.append(p)
        else:
            adam_decay.append(p)
    groups = []
    if muon:
        groups.append({"params": muon, "use_muon": True, **({"matrix_view": "flatten"} if conv_to_muon else {})})
    if adam_decay:
        groups.append({"params": adam_decay, "use_muon": False,
                       **({"weight_decay": adamw_weight_decay} if adamw_weight_decay is not None else {})})
    if adam_flat:
        groups.append({"params": adam_flat, "use_muon": False, "weight_decay": 0.0})
    return groups


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------


class Muon(AdamW):
    """torch.optim.Muon's arguments (same defaults) plus AdamW groups for the params Muon must not
    take, ``max_grad_norm`` and ``backend`` (triton / torch / None for Newton-Schulz and AdamW).

    ``params``: an nn.Module (grouped by :func:`muon_param_groups`), or params / param groups as
    for any optimizer; a group is a Muon group unless it says ``use_muon=False``. AdamW groups
    default to ``adamw_lr`` (None: ``lr``), ``adamw_betas``, ``adamw_eps`` and
    ``adamw_weight_decay`` (None: ``weight_decay``)."""

    NAME = "Muon"
    SUPPORTS_DTENSOR = True

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=COEFFICIENTS, eps=EPS, ns_steps=5, adjust_lr_fn: Optional[str] = None, *,
                 ns_dtype: torch.dtype = torch.bfloat16, adamw_lr=None, adamw_betas=(0.9, 0.95), adamw_eps=1e-8, adamw_weight_decay=None,
                 conv_to_muon: bool = False, max_grad_norm: Optional[float] = None, backend: Optional[str] = None):
        if isinstance(params, torch.nn.Module):
            params = muon_param_groups(params, conv_to_muon=conv_to_muon)
        self._muon_defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                   ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                                   adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
        adamw_lr = lr if adamw_lr is None else adamw_lr
        adamw_weight_decay = weight_decay if adamw_weight_decay is None else adamw_weight_decay
        self._adamw_defaults = dict(lr=adamw_lr, betas=tuple(adamw_betas), eps=adamw_eps,
                                    weight_decay=adamw_weight_decay, amsgrad=False, maximize=False)
        super().__init__(params, lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay,
                         max_grad_norm=max_grad_norm, backend=backend)

    # -- groups ---------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        use_muon = bool(group.setdefault("use_muon", True))
        for k, v in (self._muon_defaults if use_muon else self._adamw_defaults).items():
            group.setdefault(k, v)
        if use_muon and isinstance(group["ns_dtype"], torch.dtype):
            # kept as a name: distributed checkpointing (DCP) flattens param groups and takes no dtypes
            group["ns_dtype"] = str(group["ns_dtype"]).replace("torch.", "")
        super().add_param_group(group)

    def _check_group(self, group: dict) -> None:
        if not group["use_muon"]:
            return super()._check_group(group)
        name = self.NAME
        lr = group["lr"]
        lr_value = float(lr.detach().reshape(()).cpu()) if isinstance(lr, torch.Tensor) else lr
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"{name}: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        if not (isinstance(lr_value, (int, float)) and 0.0 <= lr_value < math.inf):
            raise ValueError(f"{name}: Invalid learning rate: {lr_value!r}; lr must be a finite number >= 0")
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"{name}: momentum must lie in [0, 1), got {group['momentum']!r}")
        if not 0.0 <= group["weight_decay"] < math.inf:
            raise ValueError(f"{name}: weight_decay must be >= 0, got {group['weight_decay']!r}")
        steps = group["ns_steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps < 100:
            raise ValueError(f"{name}: ns_steps must be an int in [1, 100), got {steps!r} (5 is the usual choice)")
        if len(tuple(group["ns_coefficients"])) != 3:
            raise ValueError(f"{name}: ns_coefficients must be three floats (a, b, c), got {group['ns_coefficients']!r}")
        if not group["eps"] > 0:
            raise ValueError(f"{name}: eps must be > 0, got {group['eps']!r}")
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(f"{name}: adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}")
        if group["ns_dtype"] not in NS_DTYPES:
            raise ValueError(f"{name}: ns_dtype must be torch.bfloat16 (the usual), float32 or float64, got {group['ns_dtype']!r}")
        if group.get("matrix_view") not in (None, "flatten"):
            raise ValueError(f"{name}: matrix_view must be None or 'flatten', got {group['matrix_view']!r}")
        flatten = group.get("matrix_view") == "flatten"
        for i, p in enumerate(group["params"]):
            if p.dim() == 2 or (flatten and p.dim() > 2):
                continue
            rule = ("put it in a group with use_muon=False (AdamW); tokenforge.optim.muon_param_groups(model) "
                    "or Muon(model) does this for norms, biases and embeddings")
            if p.dim() > 2:
                rule += ", or set matrix_view='flatten' on the group (conv_to_muon=True) to orthogonalise it as (shape[0], -1)"
            raise ValueError(f"{name}: Muon orthogonalises 2-D matrices, but param {i} of a Muon group has shape "
                             f"{tuple(p.shape)}; {rule}")

    # -- state ----------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict, mode: str) -> dict:
        if not group["use_muon"]:
            return super()._init_state(p, group, mode)
        state = self.state[p]
        low = p.dtype in LOW_PRECISION
        buf_dtype = torch.float32 if low else p.dtype
        buf = state.get("momentum_buffer")
        if buf is None:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=buf_dtype, memory_format=torch.contiguous_format)
        elif buf.dtype != buf_dtype or buf.device != p.device:
            state["momentum_buffer"] = buf.to(device=p.device, dtype=buf_dtype)
        if low:
            if "master_param" not in state or state["master_param"].shape != p.shape:
                state["master_param"] = p.detach().float().clone(memory_format=torch.contiguous_format)
        else:
            state.pop("master_param", None)
        return state

    # -- step -----------------------------------------------------------------------------------
    def _step_group(self, gi: int, group: dict, items: list, scales: Optional[dict], keys: dict) -> None:
        if not group["use_muon"]:
            return super()._step_group(gi, group, items, scales, keys)
        if _capturing():
            raise CaptureError("Muon: capturing the step of a Muon group in a CUDA graph is not supported "
                               "(its distributed exchange and per-shape batching run on the host); step eagerly")
        params = [p for p, _ in items]
        momentum, nesterov = float(group["momentum"]), bool(group["nesterov"])
        updates = []
        for p in params:
            st = self.state[p]
            buf = local(st["momentum_buffer"])
            g = local(p.grad).to(buf.dtype)
            if scales is not None:
                g = g * scales[p.device].to(buf.dtype)
            buf.lerp_(g, 1 - momentum)
            updates.append(g.lerp(buf, momentum) if nesterov else buf)  # never in place: g may be p.grad
        ortho = self._orthogonalise(params, updates, group, keys)
        lr, wd = group["lr"], float(group["weight_decay"])
        for p, o in zip(params, ortho):
            st = self.state[p]
            target = local(st["master_param"]) if "master_param" in st else local(p)
            rows, cols = _matrix_shape(p, group)
            step = lr * adjusted_ratio(group["adjust_lr_fn"], rows, cols)
            if wd:
                target.mul_(1 - lr * wd)
            o = o.reshape(target.shape).to(target.dtype)
            if isinstance(step, torch.Tensor):
                target.sub_(o * step.to(target.device, target.dtype))
            else:
                target.add_(o, alpha=-step)
            if target is not local(p):
                local(p).copy_(target)

    # -- Newton-Schulz on whole matrices --------------------------------------------------------
    def _ns(self, x: torch.Tensor, group: dict) -> torch.Tensor:
        backend = None if self.backend == "cuda" else self.backend  # no CUDA C++ Newton-Schulz
        return newton_schulz(x, group["ns_steps"], tuple(group["ns_coefficients"]), group["eps"],
                             dtype=NS_DTYPES[group["ns_dtype"]], backend=backend)

    def _orthogonalise(self, params: list, updates: list, group: dict, keys: dict) -> list:
        """O for each param, shaped as its local update: whole-matrix Newton-Schulz, batched by
        shape; sharded matrices via their owner rank (see the module docstring)."""
        out: list = [None] * len(params)
        whole: dict = {}   # (shape, device) -> [(index, matrix)]
        owned: list = []   # sharded matrices this rank orthogonalises: (index, full matrix)
        exchanges = []
        for i, (p, u) in enumerate(zip(params, updates)):
            rows, cols = _matrix_shape(p, group)
            if is_dtensor(p) and _sharded(p):
                ex = _ShardExchange(p, u.reshape(u.shape[0], -1) if u.dim() > 2 else u, keys[p], cols,
                                    NS_DTYPES[group["ns_dtype"]])
                exchanges.append((i, ex))
                full = ex.gather()
                if full is not None:
                    owned.append((i, full, ex))
                continue
            whole.setdefault(((rows, cols), u.device), []).append((i, u.reshape(rows, cols)))
        for (_shape, _device), entries in list(whole.items()):
            result = self._ns(torch.stack([m for _, m in entries]), group)
            for (i, _), o in zip(entries, result.unbind(0)):
                out[i] = o
        by_shape: dict = {}
        for i, full, ex in owned:
            by_shape.setdefault((tuple(full.shape), full.device), []).append((i, full, ex))
        for entries in by_shape.values():
            result = self._ns(torch.stack([f for _, f, _ in entries]), group)
            for (_, _, ex), o in zip(entries, result.unbind(0)):
                ex.result = o
        for i, ex in exchanges:
            out[i] = ex.scatter()
        return out


def _sharded(p) -> bool:
    """True for a DTensor split across ranks (so no rank holds the whole matrix)."""
    from torch.distributed.tensor import Replicate, Shard

    if any(not isinstance(pl, (Shard, Replicate)) for pl in p.placements) or p.device_mesh.ndim != 1:
        raise ValueError(f"Muon: DTensor params must be replicated or sharded on dim 0 over a 1-D mesh (FSDP2's "
                         f"layout); got placements {p.placements} on a {p.device_mesh.ndim}-D mesh")
    shards = [pl for pl in p.placements if isinstance(pl, Shard)]
    if shards and shards[0].dim != 0:
        raise ValueError(f"Muon: DTensor params sharded on dim {shards[0].dim}; only dim 0 (FSDP2) is supported")
    return bool(shards)


class _ShardExchange:
    """One dim-0-sharded matrix: gather its rows to the owner rank, scatter the result back.
    Every rank calls gather() then scatter() for the same matrices in the same order (the
    collectives pair up), the owner orthogonalising in between (``result``)."""

    def __init__(self, p, update_local: torch.Tensor, key: int, cols: int, dtype: torch.dtype):
        import torch.distributed as dist

        mesh = p.device_mesh
        self.group = mesh.get_group(0)
        self.world = mesh.size(0)
        self.me = mesh.get_local_rank(0)
        self.owner = key % self.world
        self.owner_global = dist.get_global_rank(self.group, self.owner)
        rows = int(p.shape[0])
        # DTensor's Shard(0) splits as torch.chunk: ceil(rows / world) rows per rank, the last
        # ranks shorter or empty.
        sizes = [len(c) for c in torch.arange(rows).chunk(self.world)]
        self.sizes = sizes + [0] * (self.world - len(sizes))
        self.chunk = max(self.sizes) if rows else 0
        self.rows, self.cols = rows, cols
        self.local = update_local
        self.dtype = dtype  # of the orthogonalised result (the group's ns_dtype)
        self.result: Optional[torch.Tensor] = None

    def _padded(self, t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((self.chunk, self.cols), dtype=t.dtype, device=t.device)
        out[: t.shape[0]] = t
        return out

    def gather(self) -> Optional[torch.Tensor]:
        import torch.distributed as dist

        mine = self._padded(self.local)
        bucket = [torch.empty_like(mine) for _ in range(self.world)] if self.me == self.owner else None
        dist.gather(mine, bucket, dst=self.owner_global, group=self.group)
        if bucket is None:
            return None
        return torch.cat([b[:n] for b, n in zip(bucket, self.sizes)])

    def scatter(self) -> torch.Tensor:
        import torch.distributed as dist

        recv = torch.empty((self.chunk, self.cols), dtype=self.dtype, device=self.local.device)
        pieces = None
        if self.me == self.owner:
            parts = torch.split(self.result.to(self.dtype), self.sizes)
            pieces = [self._padded(part).contiguous() for part in parts]
        dist.scatter(recv, pieces, src=self.owner_global, group=self.group)
        return recv[: self.sizes[self.me]]
