"""KV-cache attention benchmark cases (decoding: one new token per sequence, appended, then attention
over each sequence's cache): shapes, backends, inputs, the reference and the record fields (the
shared flow is bench/harness.py).

Backends (baselines first, so our ratios are known when it runs):

    sdpa        what a static-cache decoder does without flash_attn (Hugging Face's StaticCache): the
                new key/value copied into the cache, then F.scaled_dot_product_attention over the
                whole cache with a boolean mask of each sequence's live keys
    flash_attn  flash_attn.flash_attn_with_kvcache, when installed (CUDA)
    triton      tokenforge.ops.attention_with_kvcache(backend="triton"): the split-KV decoding kernel
    torch       tokenforge.ops.attention_with_kvcache(backend="torch")   (CPU runs only)

Decoding is memory-bound: the floor is reading each sequence's live keys and values once
(``Case.bytes``; q, the new token and the output are noise), at the copy bandwidth measured in the
same run. tokenforge's decoding kernel (tokenforge/kernels/attention_kvcache.py) reads dense and paged
caches where they are, each key block once per GQA group, in key splits sized to the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import bandwidth as bw
import harness
from harness import BackendUnavailable, Prepared

OP = "attention_kvcache"
BASELINES = ("sdpa", "flash_attn")
GPU_BACKENDS = ("sdpa", "flash_attn", "triton")
CPU_BACKENDS = ("sdpa", "torch", "triton")

BACKEND_DESCRIPTIONS = {
    "sdpa": "cache append + F.scaled_dot_product_attention over the whole cache with a live-key mask",
    "flash_attn": "flash_attn.flash_attn_with_kvcache",
    "triton": "tokenforge.ops.attention_with_kvcache(backend='triton')",
    "torch": "tokenforge.ops.attention_with_kvcache(backend='torch')",
}


@dataclass(frozen=True)
class Case(harness.CaseId):
    pass_: str  # "decode": one query and one new key/value per sequence
    batch: int
    capacity: int  # cache length per sequence; the live lengths are spread over [capacity / 2, capacity)
    heads_q: int
    heads_k: int
    head_dim: int
    page: Optional[int] = None  # paged cache with this page size, else a dense one
    dtype: torch.dtype = torch.bfloat16
    headline: bool = False

    @property
    def shape(self) -> str:
        return (f"b{self.batch}-cache{self.capacity}-h{self.heads_q}kv{self.heads_k}-d{self.head_dim}"
                + (f"-paged{self.page}" if self.page else ""))

    def lengths(self, device) -> torch.Tensor:
        """Cached keys per sequence before the new one: evenly spread over [capacity/2, capacity - 1)."""
        return torch.linspace(self.capacity // 2, self.capacity - 2, self.batch, device=device).long().int()

    def bytes(self) -> int:
        """The floor: every live key and value read once (after the append: length + 1 per sequence)."""
        live = int(self.lengths("cpu").sum()) + self.batch
        return 2 * live * self.heads_k * self.head_dim * bw.dtype_bytes(self.dtype)


def cases(device) -> list[Case]:
    """Llama-3-8B's attention (32 q / 8 kv heads, d128) decoding 16 sequences: a dense 4k cache
    first, then a 16k one and a paged (page 256) one."""
    if harness.sizes_mode(device) == "tiny":
        return [Case("decode", 2, 64, 4, 2, 32, headline=True), Case("decode", 2, 64, 4, 2, 32, page=16)]
    return [Case("decode", 16, 4096, 32, 8, 128, headline=True), Case("decode", 16, 16384, 32, 8, 128),
            Case("decode", 16, 4096, 32, 8, 128, page=256)]


def backends_for(device) -> tuple[str, ...]:
    return harness.backends_for(device, GPU_BACKENDS, CPU_BACKENDS)


def _inputs(case: Case, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=case.dtype)

    b, hq, hk, d = case.batch, case.heads_q, case.heads_k, case.head_dim
    q, k_new, v_new = randn(b, 1, hq, d), randn(b, 1, hk, d), randn(b, 1, hk, d)
    k_dense, v_dense = randn(b, case.capacity, hk, d), randn(b, case.capacity, hk, d)
    table = None
    if case.page:
        per_seq = case.capacity // case.page
        table = torch.randperm(b * per_seq, generator=g).view(b, per_seq).int().to(device)
    return q, k_new, v_new, k_dense, v_dense, table


def _paged(dense: torch.Tensor, table: torch.Tensor, page: int) -> torch.Tensor:
    """The dense cache's rows laid out as pages: sequence b's key i at page table[b, i // page]."""
    b, cap, h, d = dense.shape
    pages = torch.empty(table.numel(), page, h, d, dtype=dense.dtype, device=dense.device)
    pages[table.long().flatten()] = dense.view(b, cap // page, page, h, d).flatten(0, 1)
    return pages


def make_op(backend: str, case: Case, device: torch.device, k_dense, v_dense, table) -> Callable:
    """``op(q, k_new, v_new, seqlens) -> out`` (batch, 1, heads, d), appending into its own cache."""
    if backend in ("triton", "torch"):
        if backend == "triton" and harness.triton_needs_interpreter(device):
            raise BackendUnavailable("Triton on CPU tensors needs TRITON_INTERPRET=1")
        from tokenforge.ops import attention_with_kvcache as fn
    elif backend == "flash_attn":
        fn = harness.peer_import("flash_attn", "flash_attn", "pip install flash-attn").flash_attn_with_kvcache
        if device.type != "cuda":
            raise BackendUnavailable("flash_attn runs on CUDA tensors only")
    elif backend == "sdpa":
        import torch.nn.functional as F

        kc, vc = k_dense.clone(), v_dense.clone()
        positions = torch.arange(case.capacity, device=device)

        def op(q, k_new, v_new, seqlens):
            rows = torch.arange(case.batch, device=device)
            kc[rows, seqlens.long()] = k_new[:, 0]
            vc[rows, seqlens.long()] = v_new[:, 0]
            mask = (positions[None] <= seqlens.long()[:, None])[:, None, None]  # (b, 1, 1, capacity)
            return F.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                                  attn_mask=mask, enable_gqa=True).transpose(1, 2)

        return op
    else:
        raise ValueError(f"unknown backend {backend!r}; known: {sorted(BACKEND_DESCRIPTIONS)}")
    kw = {} if backend == "flash_attn" else {"backend": backend}
    if case.page:
        kc, vc = _paged(k_dense, table, case.page), _paged(v_dense, table, case.page)
        return lambda q, k_new, v_new, seqlens: fn(q, kc, vc, k_new, v_new, cache_seqlens=seqlens,
                                                   block_table=table, causal=True, **kw)
    kc, vc = k_dense.clone(), v_dense.clone()
    return lambda q, k_new, v_new, seqlens: fn(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, causal=True, **kw)


def reference(q, k_new, v_new, k_dense, v_dense, seqlens) -> torch.Tensor:
    """fp32 attention of each sequence's one query over its cached keys and the new one."""
    out = []
    group = q.shape[2] // k_dense.shape[2]
    for b in range(q.shape[0]):
        n = int(seqlens[b])
        keys = torch.cat((k_dense[b, :n], k_new[b]), 0).float().repeat_interleave(group, 1)
        values = torch.cat((v_dense[b, :n], v_new[b]), 0).float().repeat_interleave(group, 1)
        scores = torch.einsum("hd,khd->hk", q[b, 0].float(), keys) / q.shape[-1] ** 0.5
        out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), values))
    return torch.stack(out)[:, None]


def prepare(case: Case, backend: str, device) -> Prepared:
    device = torch.device(device)
    q, k_new, v_new, k_dense, v_dense, table = _inputs(case, device)
    seqlens = case.lengths(device)
    op = harness.first_call(lambda: make_op(backend, case, device, k_dense, v_dense, table), device)
    out = harness.first_call(lambda: op(q, k_new, v_new, seqlens), device)
    errs = {"out": harness.rel_err(out.detach(), reference(q, k_new, v_new, k_dense, v_dense, seqlens))}
    return Prepared(case, backend, device, lambda: op(q, k_new, v_new, seqlens), errs, harness.tolerance(case.dtype))


def make_record(prep: Prepared, stats: dict, copy_gbps: Optional[float]) -> dict:
    case = prep.case
    dims = {"batch": case.batch, "capacity": case.capacity, "heads_q": case.heads_q, "heads_k": case.heads_k,
            "head_dim": case.head_dim, "page": case.page}
    return harness.make_record(prep, stats, op=OP, dims=dims, impl=BACKEND_DESCRIPTIONS.get(prep.backend, prep.backend),
                               nbytes=case.bytes(), copy_gbps=copy_gbps)
