"""QK-clip (the "Clip" of MuonClip, Kimi K2): keep attention logits bounded by rescaling the query
and key projections of a head whose largest logit passed a threshold.

    opt = tokenforge.optim.Muon(model, ...)
    clip = tokenforge.optim.QKClip(model, threshold=100.0, optimizer=opt)   # after tokenforge.patch
    ... loss.backward(); opt.step(); clip.step(); opt.zero_grad()

For tokenforge's reference Transformer (modules with ``wq``, ``wk``, ``n_heads``, ``n_kv_heads``,
``head_dim`` and an ``attention_fn``). While training, each attention call also records, per query
head h, the largest causal logit S_h = max_ij q_i . k_j / sqrt(head_dim) (a running max over the
micro-batches since the last ``step``). It is computed in torch from the q and k the attention
function receives (after RoPE), in query chunks, with no autograd: one extra Q K^T per layer, paid
only while a QKClip is installed (the fused attention kernels do not expose their row maxima).

``step()`` takes gamma_h = min(1, threshold / S_h) and rescales so that head h's logits shrink by
exactly gamma_h: the key head g it reads (shared by n_heads / n_kv_heads query heads under GQA) by
k_g = (min over its query heads of gamma_h) ** (1 - alpha), and query head h by gamma_h / k_g. With
MHA and alpha = 0.5 this is Kimi's sqrt(gamma) on both; heads under the threshold keep their logits
(their W_q rows may grow by 1 / k_g when a head sharing their key head was clipped). Under
torch.distributed the maxima are all-reduced (MAX) first, so every rank applies the same factors;
FSDP2-sharded weights are scaled row by row on their local shards. Pass the ``optimizer`` so fp32
master copies (bf16 params) are scaled too.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tokenforge.optim.multi_tensor import global_offset, is_dtensor, local

_CHUNK_ELEMENTS = 1 << 24  # scores held at once while taking the max (64 MB in fp32)


@torch.no_grad()
def max_logits(q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Per query head, the largest causal logit q_i . k_j * scale (j <= i) over the batch:
    q (batch, seq, heads, dim), k (batch, seq, kv_heads, dim) -> (heads,) fp32."""
    b, t, h, d = q.shape
    rep = h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh = q.detach().float().transpose(1, 2)
    kh = k.detach().float().transpose(1, 2).repeat_interleave(rep, dim=1)
    out = torch.full((h,), -math.inf, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * t))
    for s in range(0, t, chunk):
        e = min(t, s + chunk)
        scores = (qh[:, :, s:e] @ kh[:, :, :e].mT) * scale
        causal = torch.arange(s, e, device=q.device)[:, None] >= torch.arange(e, device=q.device)[None, :]
        out = torch.maximum(out, scores.masked_fill(~causal, -math.inf).amax(dim=(0, 2, 3)))
    return out


def _attention_modules(model: torch.nn.Module) -> list:
    need = ("wq", "wk", "n_heads", "n_kv_heads", "head_dim", "attention_fn")
    return [m for m in model.modules() if all(hasattr(m, a) for a in need)]


class QKClip:
    """Record per-head max logits in ``model``'s attention and rescale W_q / W_k past
    ``threshold`` on :meth:`step` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, threshold: float = 100.0, alpha: float = 0.5,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        if not (isinstance(threshold, (int, float)) and 0 < threshold < math.inf):
            raise ValueError(f"QKClip: threshold must be a positive finite logit, got {threshold!r} (Kimi K2 used 100)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"QKClip: alpha (the query's share of the rescale) must lie in [0, 1], got {alpha!r}")
        self.threshold, self.alpha, self.optimizer = float(threshold), float(alpha), optimizer
        self.modules = _attention_modules(model)
        if not self.modules:
            raise ValueError("QKClip: the model has no attention module with wq, wk, n_heads, n_kv_heads, head_dim "
                             "and attention_fn (tokenforge's reference Transformer has them)")
        self._maxima: dict = {}
        self._originals = {}
        for m in self.modules:
            self._originals[m] = m.attention_fn
            m.attention_fn = self._recorder(m, m.attention_fn)
        self.last_max_logit: Optional[float] = None  # the largest logit seen in the last step
        self.clipped_heads = 0                       # heads rescaled by the last step

    def _recorder(self, module, fn):
        def attention_fn(q, k, v, *args, **kwargs):
            if torch.is_grad_enabled():  # training forwards; evaluation does not count
                m = max_logits(q, k)
                old = self._maxima.get(module)
                self._maxima[module] = m if old is None else torch.maximum(old, m)
            return fn(q, k, v, *args, **kwargs)

        return attention_fn

    def remove(self) -> None:
        """Put the attention functions back as they were."""
        for m, fn in self._originals.items():
            m.attention_fn = fn
        self._originals.clear()

    @torch.no_grad()
    def step(self) -> int:
        """Rescale the heads whose recorded max logit passed the threshold; reset the record.
        Returns the number of query heads clipped."""
        import torch.distributed as dist

        clipped, largest = 0, -math.inf
        for m in self.modules:
            s = self._maxima.pop(m, None)
            if s is None:
                continue
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(s, op=dist.ReduceOp.MAX)
            largest = max(largest, float(s.max()))
            gamma = torch.clamp(self.threshold / s.clamp_min(1e-30), max=1.0)
            over = gamma < 1.0
            if not bool(over.any()):
                continue
            clipped += int(over.sum())
            rep = m.n_heads // m.n_kv_heads
            k_factor = gamma.view(m.n_kv_heads, rep).amin(dim=1) ** (1.0 - self.alpha)
            q_factor = gamma / k_factor.repeat_interleave(rep)
            self._scale_rows(m.wq.weight, q_factor.repeat_interleave(m.head_dim))
            self._scale_rows(m.wk.weight, k_factor.repeat_interleave(m.head_dim))
        self.last_max_logit = largest if largest > -math.inf else None
        self.clipped_heads = clipped
        return clipped

    def _scale_rows(self, weight: torch.Tensor, row_factor: torch.Tensor) -> None:
        targets = [weight]
        if self.optimizer is not None:
            master = self.optimizer.state.get(weight, {}).get("master_param")
            if master is not None:
                targets.append(master)
        for t in targets:
            shard = local(t)
            first = 0
            if is_dtensor(t):
                first = (global_offset(t) or 0) // max(1, math.prod(t.shape[1:]))
            f = row_factor[first:first + shard.shape[0]].to(shard.device, shard.dtype)
            shard.mul_(f.view(-1, *([1] * (shard.dim() - 1))))
