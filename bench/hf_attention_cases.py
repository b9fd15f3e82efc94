"""Hugging Face attention benchmark cases: one decoder layer's attention as transformers calls it
(query (b, heads, s, d) views, the layer's mask), forward + backward, on the batches a fine-tuning
run feeds it: right-padded documents (Trainer with a padding collator) and documents packed into
one row (DataCollatorWithFlattening). The shared flow is bench/harness.py.

Backends (baselines first, so our ratios are known when it runs):

    sdpa_mask   transformers' "sdpa" implementation with the dense boolean mask it builds for
                these batches ((b, 1, s, s): causal and padding, or causal within each document);
                the mask is built once, outside the timing, as transformers builds it once per forward
    flash_attn  transformers' "flash_attention_2" path (unpad, flash_attn_varlen_func, pad), when
                flash_attn is installed (CUDA)
    tokenforge  tokenforge.hf_attention.hf_attention_forward, what a patched model runs: the padded
                rows read in place (attention_padded), the packed ones as attention_varlen documents
    tokenforge_unpadded  (padded training case only) the same kernel behind FlashAttention-2's
                integration's flow: the live rows of q, k, v gathered, attention_varlen, the output
                scattered back; what reading in place saves is the gap to ``tokenforge``

The FLOPs counted are the useful ones: causal attention within each document (flash_attn's
convention, 2 * h * d * n^2 per document of n tokens forward, 3.5x that forward + backward), so
time spent on padding or across documents shows as a lower rate. The decoding step (pass
``decode``: one query per left-padded sequence, no autograd, as generate() runs it) is memory-bound:
its floor is reading the live keys and values once, at the copy bandwidth measured in the run. tokenforge's unpadding plan
(which rows are live; one host sync) is built once per forward and shared by every layer; it is
built before the timing, as the layers after the first find it, and its own cost is recorded as
``plan_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import bandwidth as bw
import harness
from harness import BackendUnavailable, Prepared

OP = "hf_attention"
BASELINES = ("sdpa_mask", "flash_attn")
GPU_BACKENDS = ("sdpa_mask", "flash_attn", "tokenforge")
CPU_BACKENDS = ("sdpa_mask", "tokenforge")

UNPADDED = "tokenforge_unpadded"
BACKEND_DESCRIPTIONS = {
    UNPADDED: "gather the live rows, tokenforge attention_varlen, scatter the output (FA2's integration flow)",
    "sdpa_mask": "transformers sdpa_attention_forward with its dense boolean (b, 1, s, s) mask",
    "flash_attn": "transformers flash_attention_2 path: unpad, flash_attn_varlen_func, pad",
    "tokenforge": "tokenforge.hf_attention.hf_attention_forward (padded rows in place, packed as varlen documents)",
}


@dataclass(frozen=True)
class Case(harness.CaseId):
    pass_: str
    batch_kind: str  # "padded": rows right-padded to seqlen; "packed": one row of documents
    batch: int
    seqlen: int
    heads_q: int
    heads_k: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    headline: bool = False

    @property
    def shape(self) -> str:
        return f"{self.batch_kind}-b{self.batch}-s{self.seqlen}-h{self.heads_q}kv{self.heads_k}-d{self.head_dim}"

    def documents(self) -> list[list[int]]:
        """Document lengths per row. Padded: one document a row, lengths evenly spread over
        [seqlen / 4, seqlen]. Packed: one row of documents with lengths cycling through
        seqlen / 16, / 4, / 8, / 2 (and the remainder), filling it exactly."""
        if self.batch_kind == "padded":
            step = (self.seqlen - self.seqlen // 4) / max(self.batch - 1, 1)
            return [[int(self.seqlen // 4 + i * step)] for i in range(self.batch)]
        sizes, left, i = [], self.seqlen, 0
        cycle = (16, 4, 8, 2)
        while left:
            n = min(left, max(1, self.seqlen // cycle[i % len(cycle)]))
            sizes.append(n)
            left -= n
            i += 1
        return [sizes]

    def flops(self) -> float:
        """Useful causal FLOPs (flash_attn's convention), forward + backward; a decoding step's one
        query per sequence against its live keys."""
        per_token_pair = 2.0 * self.heads_q * self.head_dim
        if self.pass_ == "decode":
            return sum(2 * per_token_pair * n for row in self.documents() for n in row)
        fwd = sum(per_token_pair * n * n for row in self.documents() for n in row)
        return fwd * (3.5 if self.pass_ == "fwd_bwd" else 1.0)

    def bytes(self) -> int:
        """A decoding step's floor: every live key and value read once."""
        live = sum(n for row in self.documents() for n in row)
        return 2 * live * self.heads_k * self.head_dim * torch.finfo(self.dtype).bits // 8


def cases(device) -> list[Case]:
    """Llama-3-8B's attention (32 q / 8 kv heads, d128): 8 right-padded rows of 4k, 16k tokens
    packed into one row, and a decoding step of 16 left-padded sequences over a 4k cache (what
    generate() does in RL rollouts and evaluation)."""
    if harness.sizes_mode(device) == "tiny":
        return [Case("fwd_bwd", "padded", 2, 64, 4, 2, 32, headline=True), Case("fwd_bwd", "packed", 1, 64, 4, 2, 32),
                Case("decode", "padded", 2, 64, 4, 2, 32)]
    return [Case("fwd_bwd", "padded", 8, 4096, 32, 8, 128, headline=True),
            Case("fwd_bwd", "packed", 1, 16384, 32, 8, 128), Case("decode", "padded", 16, 4096, 32, 8, 128)]


def backends_for(device, case: Optional[Case] = None) -> tuple[str, ...]:
    """The backends of ``case`` (every case's without one): the padded training case adds
    tokenforge_unpadded, the gather-and-scatter flow that in-place reading replaced."""
    names = harness.backends_for(device, GPU_BACKENDS, CPU_BACKENDS)
    if case is not None and case.batch_kind == "padded" and case.pass_ == "fwd_bwd":
        names = (*names, UNPADDED)
    return names


class _Layer(torch.nn.Module):
    """What transformers' attention functions read from the attention module."""

    is_causal = True

    def __init__(self, case: Case):
        super().__init__()
        self.num_key_value_groups = case.heads_q // case.heads_k


def _batch_inputs(case: Case, device):
    """(2-D padding mask or None, position ids or None, (b, 1, s, s) bool mask SDPA gets, live (b, s))."""
    docs = case.documents()
    s = case.seqlen
    j = torch.arange(s, device=device)
    causal = j[None, :] <= j[:, None]
    if case.batch_kind == "padded":
        lengths = torch.tensor([row[0] for row in docs], device=device)
        if case.pass_ == "decode":  # generate() pads on the left; the one query sees every live key
            live = j[None, :] >= s - lengths[:, None]
            return live, None, live[:, None, None, :], torch.ones(case.batch, 1, dtype=torch.bool, device=device)
        live = j[None, :] < lengths[:, None]
        dense = causal[None] & live[:, None, :]
        return live, None, dense[:, None], live
    ids = torch.repeat_interleave(torch.arange(len(docs[0]), device=device), torch.tensor(docs[0], device=device))
    positions = torch.cat([torch.arange(n, device=device) for n in docs[0]])[None]
    dense = causal[None] & (ids[None, :, None] == ids[None, None, :])
    return None, positions, dense[:, None], torch.ones(1, s, dtype=torch.bool, device=device)


def make_op(backend: str, case: Case, device: torch.device, mask2d, positions, dense) -> Callable:
    """``op(q, k, v) -> out`` (b, s, heads, d), transformers' attention-function call."""
    layer = _Layer(case)
    if backend == "sdpa_mask":
        sdpa = harness.peer_import("transformers.integrations.sdpa_attention", "transformers",
                                   "pip install transformers").sdpa_attention_forward
        return lambda q, k, v: sdpa(layer, q, k, v, dense)[0]
    if backend == "flash_attn":
        if device.type != "cuda":
            raise BackendUnavailable("flash_attn runs on CUDA tensors only")
        harness.peer_import("flash_attn", "flash_attn", "pip install flash-attn")
        utils = harness.peer_import("transformers.modeling_flash_attention_utils", "transformers",
                                    "pip install transformers")
        return lambda q, k, v: utils._flash_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask2d, q.shape[2], is_causal=True,
            position_ids=positions, attn_implementation="flash_attention_2")
    if backend == "tokenforge":
        if case.dtype in (torch.bfloat16, torch.float16) and harness.triton_needs_interpreter(device):
            raise BackendUnavailable("Triton on CPU tensors needs TRITON_INTERPRET=1")
        from tokenforge.hf_attention import hf_attention_forward

        return lambda q, k, v: hf_attention_forward(layer, q, k, v, mask2d, position_ids=positions)[0]
    if backend == UNPADDED:
        if harness.triton_needs_interpreter(device):
            raise BackendUnavailable("Triton on CPU tensors needs TRITON_INTERPRET=1")
        from tokenforge.hf_attention import _plan_from_mask, _rows
        from tokenforge.ops import attention_varlen

        plan = _plan_from_mask(mask2d)  # built once, outside the timing, as the plan of ``tokenforge``

        def unpadded(q, k, v):
            b, _, s, _ = q.shape
            live = [_rows(t.transpose(1, 2), plan.rows) for t in (q, k, v)]
            out = attention_varlen(*live, plan.cu, plan.cu, plan.longest, plan.longest, causal=True)
            return out.new_zeros(b * s, *out.shape[1:]).index_copy(0, plan.rows, out).view(b, s, *out.shape[1:])

        return unpadded
    raise ValueError(f"unknown backend {backend!r}; known: {sorted(BACKEND_DESCRIPTIONS)}")


def _plan_ms(mask2d, positions, device) -> Optional[float]:
    """The cost of tokenforge's unpadding plan, built once per forward (a fresh tensor each time,
    so nothing is reused)."""
    from tokenforge import hf_attention

    if mask2d is not None:
        return bw.time_fn(lambda: hf_attention._plan_from_mask(mask2d.clone()), device)["median_ms"]
    return bw.time_fn(lambda: hf_attention._plan_from_positions(positions.clone()), device)["median_ms"]


def prepare(case: Case, backend: str, device) -> Prepared:
    """Inputs, one checked call, the timed closure. Correctness: against SDPA in fp32 with the
    same dense mask on a slice of heads, live rows only (the padding rows are 0 in both, but only
    live rows are anyone's output)."""
    import torch.nn.functional as F

    device = torch.device(device)
    mask2d, positions, dense, live = _batch_inputs(case, device)
    op = harness.first_call(lambda: make_op(backend, case, device, mask2d, positions, dense), device)
    if case.pass_ == "decode":
        return _prepare_decode(case, backend, device, op, mask2d, dense)
    b, s = case.batch, case.seqlen
    g = torch.Generator(device="cpu").manual_seed(0)

    def leaf(heads):  # transformers' layout: (b, s, heads, d) projections viewed as (b, heads, s, d)
        x = torch.randn(b, s, heads, case.head_dim, generator=g).to(device=device, dtype=case.dtype)
        return x.transpose(1, 2).detach().requires_grad_()

    q, k, v = leaf(case.heads_q), leaf(case.heads_k), leaf(case.heads_k)
    dout = torch.randn(b, s, case.heads_q, case.head_dim, generator=g).to(device=device, dtype=case.dtype)
    dout = dout * live[:, :, None, None]  # padding rows are not scored: no gradient comes back to them
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    def fwd_bwd():
        out = op(q, k, v)
        return out, torch.autograd.grad(out, (q, k, v), dout)

    out, grads = harness.first_call(fwd_bwd, device)
    peak = torch.cuda.max_memory_allocated(device) - base_mem if device.type == "cuda" else None

    # Reference: the first kv head and the q heads it serves (transformers' repeat_kv order), fp32.
    group = case.heads_q // case.heads_k
    q32, k32, v32 = (t[:, :n].float().detach().requires_grad_() for t, n in ((q, group), (k, 1), (v, 1)))
    ref = F.scaled_dot_product_attention(q32, k32.expand(-1, group, -1, -1), v32.expand(-1, group, -1, -1),
                                         attn_mask=dense)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout[:, :, :group].float().transpose(1, 2))
    rows = live.reshape(-1)

    def live_rows(t):  # (b, heads, s, d) -> the live rows, (live, heads, d)
        return t.transpose(1, 2).reshape(b * s, t.shape[1], -1)[rows]

    errs = {"out": harness.rel_err(live_rows(out[:, :, :group].detach().transpose(1, 2)), live_rows(ref.detach()))}
    for name, got, want in zip(("dq", "dk", "dv"), (grads[0][:, :group], grads[1][:, :1], grads[2][:, :1]),
                               ref_grads):
        errs[name] = harness.rel_err(got, want)
    del out, grads, ref
    extra = {"peak_mem_bytes": peak}
    if backend == "tokenforge":
        extra["plan_ms"] = _plan_ms(mask2d, positions, device)
    return Prepared(case, backend, device, lambda: torch.autograd.grad(op(q, k, v), (q, k, v), dout), errs,
                    harness.tolerance(case.dtype), extra)


def _prepare_decode(case: Case, backend: str, device, op, mask2d, dense) -> Prepared:
    """A decoding step under no_grad: one query per sequence (transformers' (b, heads, 1, d) view)
    over a (b, kv heads, seqlen, d) cache as transformers' DynamicCache holds it. Correctness: SDPA
    in fp32 with the same mask on the first kv head's query heads."""
    import torch.nn.functional as F

    b, s, d = case.batch, case.seqlen, case.head_dim
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(b, 1, case.heads_q, d, generator=g).to(device=device, dtype=case.dtype).transpose(1, 2)
    k, v = (torch.randn(b, case.heads_k, s, d, generator=g).to(device=device, dtype=case.dtype) for _ in range(2))
    with torch.no_grad():
        out = harness.first_call(lambda: op(q, k, v), device)
        group = case.heads_q // case.heads_k
        ref = F.scaled_dot_product_attention(q[:, :group].float(), k[:, :1].float().expand(-1, group, -1, -1),
                                             v[:, :1].float().expand(-1, group, -1, -1), attn_mask=dense)
    errs = {"out": harness.rel_err(out[:, :, :group], ref.transpose(1, 2))}
    extra = {"plan_ms": _plan_ms(mask2d, None, device)} if backend == "tokenforge" else {}

    def step():
        with torch.no_grad():
            return op(q, k, v)

    return Prepared(case, backend, device, step, errs, harness.tolerance(case.dtype), extra)


def make_record(prep: Prepared, stats: dict, matmul: Optional[float], copy_gbps: Optional[float] = None) -> dict:
    case = prep.case
    dims = {"batch_kind": case.batch_kind, "batch": case.batch, "seqlen": case.seqlen, "heads_q": case.heads_q,
            "heads_k": case.heads_k, "head_dim": case.head_dim,
            "live_tokens": sum(n for row in case.documents() for n in row)}
    impl = BACKEND_DESCRIPTIONS.get(prep.backend, prep.backend)
    if case.pass_ == "decode":  # memory-bound: the live keys and values against the copy bandwidth
        return harness.make_record(prep, stats, op=OP, dims=dims, impl=impl, nbytes=case.bytes(), copy_gbps=copy_gbps)
    return harness.make_record(prep, stats, op=OP, dims=dims, impl=impl, flops=case.flops(), matmul_tflops=matmul)
