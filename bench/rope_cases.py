"""RoPE benchmark cases: shapes, backends, inputs, the float64 reference and the record fields
(used by bench/test_bench_rope.py; the shared flow is bench/harness.py).

Backends compared (baselines first, so a kernel's ratios are known when it runs):

    eager    tokenforge.ops.rope_reference, plain PyTorch, run eagerly
    compile  torch.compile(tokenforge.ops.rope_reference, dynamic=False), per shape
    liger    liger_kernel.transformers.rope.liger_rotary_pos_emb (if importable; "bhsd" only)
    triton   tokenforge.ops.rope(backend="triton")
    torch    tokenforge.ops.rope(backend="torch")  (CPU runs only: the CPU fallback path)

Passes: ``fwd`` (q_out, k_out = rope(q, k, cos, sin)) and ``fwd_bwd`` (forward, then
``torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))``). cos/sin are (1, seq, head_dim)
in q's dtype, what Hugging Face's LlamaRotaryEmbedding returns for training (position_ids
(1, seq)), half-split layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import bandwidth as bw
import harness
from harness import BackendUnavailable, Prepared

OP = "rope"
PASSES = ("fwd", "fwd_bwd")

# (batch, seq, q heads, kv heads, head_dim): LLaMA-3-8B's attention at 4 x 4096 tokens first.
HEADLINE_SHAPE = (4, 4096, 32, 8, 128)
GPU_SHAPES = [(4, 4096, 32, 8, 128), (8, 2048, 32, 32, 128)]
CPU_SHAPES = [(1, 16, 4, 2, 32)]

BASELINES = ("eager", "compile", "liger")
GPU_BACKENDS = ("eager", "compile", "liger", "triton")
CPU_BACKENDS = ("eager", "compile", "liger", "torch", "triton")

BACKEND_DESCRIPTIONS = {
    "eager": "tokenforge.ops.rope_reference (plain PyTorch, eager)",
    "compile": "torch.compile(tokenforge.ops.rope_reference, dynamic=False)",
    "liger": "liger_kernel.transformers.rope.liger_rotary_pos_emb",
    "triton": "tokenforge.ops.rope(backend='triton')",
    "torch": "tokenforge.ops.rope(backend='torch')",
}


def rope_bytes(batch: int, seq: int, heads_q: int, heads_k: int, head_dim: int, x_bytes: int,
               rot_dim: Optional[int] = None, cos_bytes: Optional[int] = None, cos_rows: Optional[int] = None) -> int:
    """Minimum bytes of one RoPE pass (forward, or the backward alone): read q, k and cos, sin once,
    write q_out, k_out (the backward reads dq_out, dk_out, cos, sin and writes dq, dk: the same)::

        2 * batch*seq*(heads_q + heads_k)*head_dim*x_bytes  +  2 * cos_rows*rot_dim*cos_bytes
            read q, k + write q_out, k_out                      read cos, sin

    ``cos_rows`` is seq for (1, seq, R) tables (the default), batch*seq for per-batch rows."""
    rot_dim = head_dim if rot_dim is None else rot_dim
    cos_bytes = x_bytes if cos_bytes is None else cos_bytes
    cos_rows = seq if cos_rows is None else cos_rows
    return 2 * batch * seq * (heads_q + heads_k) * head_dim * x_bytes + 2 * cos_rows * rot_dim * cos_bytes


@dataclass(frozen=True)
class Case(harness.CaseId):
    pass_: str  # "fwd" or "fwd_bwd"
    batch: int
    seq: int
    heads_q: int
    heads_k: int
    head_dim: int
    dtype: torch.dtype
    layout: str = "bhsd"
    headline: bool = False

    @property
    def shape(self) -> str:
        return f"{self.layout}:{self.batch}x{self.seq}x{self.heads_q}x{self.heads_k}x{self.head_dim}"

    def bytes(self) -> int:
        one = rope_bytes(self.batch, self.seq, self.heads_q, self.heads_k, self.head_dim, bw.dtype_bytes(self.dtype))
        return one if self.pass_ == "fwd" else 2 * one

    def shape_of(self, heads: int) -> tuple:
        if self.layout == "bshd":
            return (self.batch, self.seq, heads, self.head_dim)
        return (self.batch, heads, self.seq, self.head_dim)


def cases(device) -> list[Case]:
    """The headline (fwd+bwd, LLaMA-8B, bf16, Hugging Face's bhsd) first, then the rest."""
    out: list[Case] = []
    if harness.sizes_mode(device) == "full":
        for i, shape in enumerate(GPU_SHAPES):
            layouts = ("bhsd", "bshd") if i == 0 else ("bhsd",)
            for layout in layouts:
                for pass_ in ("fwd_bwd", "fwd"):
                    head = i == 0 and layout == "bhsd" and pass_ == "fwd_bwd"
                    out.append(Case(pass_, *shape, torch.bfloat16, layout, headline=head))
    else:
        for dtype in (torch.bfloat16, torch.float32):
            for pass_ in ("fwd_bwd", "fwd"):
                head = dtype == torch.bfloat16 and pass_ == "fwd_bwd"
                out.append(Case(pass_, *CPU_SHAPES[0], dtype, "bhsd", headline=head))
    return out


def backends_for(device) -> tuple[str, ...]:
    return harness.backends_for(device, GPU_BACKENDS, CPU_BACKENDS)


# ---------------------------------------------------------------------------------------------
# The functions being timed
# ---------------------------------------------------------------------------------------------


def static_unavailable_reason(backend: str, case: Case, device: torch.device) -> Optional[str]:
    if backend == "triton" and harness.triton_needs_interpreter(device):
        return "Triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter)"
    if backend == "liger":
        if case.layout != "bhsd":
            return "liger_rotary_pos_emb takes (batch, heads, seq, head_dim) only"
        try:
            harness.peer_import("liger_kernel.transformers.rope", "liger-kernel",
                                "pip install liger-kernel (bench/fetch_peers.sh)")
        except BackendUnavailable as exc:
            return str(exc)
        if device.type != "cuda":
            return "liger-kernel runs on CUDA tensors only"
    return None


def make_op(backend: str, layout: str) -> Callable:
    """``op(q, k, cos, sin) -> (q_out, k_out)`` for one backend."""
    from tokenforge.ops.rope import rope, rope_reference

    if backend in ("triton", "torch"):
        return lambda q, k, cos, sin: rope(q, k, cos, sin, layout=layout, backend=backend)
    if backend == "eager":
        return lambda q, k, cos, sin: rope_reference(q, k, cos, sin, layout=layout)
    if backend == "compile":
        # A fresh dynamo cache per case: a specialised graph, never the recompile limit.
        torch._dynamo.reset()
        compiled = torch.compile(rope_reference, dynamic=False)
        return lambda q, k, cos, sin: compiled(q, k, cos, sin, layout=layout)
    if backend == "liger":
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        return lambda q, k, cos, sin: liger_rotary_pos_emb(q, k, cos, sin)
    raise ValueError(f"unknown backend {backend!r}; known: {sorted(BACKEND_DESCRIPTIONS)}")


def reference64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Hugging Face's ``x * cos + rotate_half(x) * sin`` in float64, written out here (independent
    of tokenforge): the correctness oracle."""
    xd = x.double()
    c, s = (t.double()[:, :, None] if layout == "bshd" else t.double()[:, None] for t in (cos, sin))
    half = x.shape[-1] // 2
    return xd * c + torch.cat((-xd[..., half:], xd[..., :half]), dim=-1) * s


def make_inputs(case: Case, device: torch.device):
    """Fresh random q, k, dq_out, dk_out ~ N(0, 1) and Hugging Face LLaMA cos/sin (1, seq, head_dim)."""
    def randn(heads):
        return torch.randn(case.shape_of(heads), device=device, dtype=torch.float32).to(case.dtype)

    inv_freq = 500000.0 ** -(torch.arange(0, case.head_dim, 2, device=device, dtype=torch.float32) / case.head_dim)
    freqs = torch.arange(case.seq, device=device, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    cos, sin = emb.cos().to(case.dtype), emb.sin().to(case.dtype)
    return randn(case.heads_q), randn(case.heads_k), cos, sin, randn(case.heads_q), randn(case.heads_k)


def prepare(case: Case, backend: str, device) -> Prepared:
    """Build inputs and the timed function, run it once and check it against :func:`reference64`."""
    device = torch.device(device)
    reason = static_unavailable_reason(backend, case, device)
    if reason:
        raise BackendUnavailable(reason)
    q, k, cos, sin, dq_out, dk_out = make_inputs(case, device)
    qg, kg = q.detach().requires_grad_(True), k.detach().requires_grad_(True)

    def first():
        op = make_op(backend, case.layout)  # inside the first call: a backend that cannot load is unavailable
        if case.pass_ == "fwd":
            return op, op(q, k, cos, sin), None
        outs = op(qg, kg, cos, sin)
        return op, outs, torch.autograd.grad(outs, (qg, kg), (dq_out, dk_out))

    op, outs, grads = harness.first_call(first, device)

    errs = {"q_out": harness.rel_err(outs[0].detach(), reference64(q, cos, sin, case.layout)),
            "k_out": harness.rel_err(outs[1].detach(), reference64(k, cos, sin, case.layout))}
    if case.pass_ == "fwd_bwd":
        # The transpose of the rotation is the rotation by -theta.
        errs["dq"] = harness.rel_err(grads[0], reference64(dq_out, cos, -sin, case.layout))
        errs["dk"] = harness.rel_err(grads[1], reference64(dk_out, cos, -sin, case.layout))
        del grads
    del outs

    if case.pass_ == "fwd":
        def fn():
            return op(q, k, cos, sin)
    else:
        def fn():
            return torch.autograd.grad(op(qg, kg, cos, sin), (qg, kg), (dq_out, dk_out))

    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Prepared(case, backend, device, fn, errs, harness.tolerance(case.dtype))


def make_record(prep: Prepared, stats: dict, copy_gbps: Optional[float]) -> dict:
    case = prep.case
    dims = {"layout": case.layout, "batch": case.batch, "seq": case.seq, "heads_q": case.heads_q,
            "heads_k": case.heads_k, "head_dim": case.head_dim}
    return harness.make_record(prep, stats, op=OP, dims=dims, impl=BACKEND_DESCRIPTIONS.get(prep.backend, prep.backend),
                               nbytes=case.bytes(), copy_gbps=copy_gbps)
