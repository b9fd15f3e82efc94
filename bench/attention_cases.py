"""Attention benchmark cases: shapes, backends, inputs, the fp32 reference and the record fields
(the shared flow is bench/harness.py).

Backends (baselines first, so a kernel's ratios are known when it runs):

    sdpa_flash       F.scaled_dot_product_attention under SDPBackend.FLASH_ATTENTION   (CUDA)
    sdpa_efficient   ... EFFICIENT_ATTENTION                                           (CUDA)
    sdpa_cudnn       ... CUDNN_ATTENTION                                               (CUDA)
    sdpa             F.scaled_dot_product_attention, default choice                    (CPU runs)
    flash_attn       flash_attn.flash_attn_func, when installed
    triton           tokenforge.ops.attention(backend="triton"), deterministic=False (the default: a
                     one-pass backward with fp32 atomics for dq where it fits, sm_90 d<=64)
    triton_deterministic  the same with deterministic=True (the two-pass backward, bitwise
                     reproducible); fwd_bwd only (the forward does not change)
    cuda             tokenforge.ops.attention(backend="cuda"): CUDA C++ (sm_90a, bf16, d64/d128)

TFLOP/s follow flash_attn's convention: 4 * b * h * sq * sk * d for the forward, halved when causal;
the backward counts 2.5x the forward (so fwd+bwd is 3.5x). ``fraction_of_matmul`` compares with a
large bf16 torch.matmul measured in the same run (the dense tensor-core rate actually reachable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import bandwidth as bw
import harness
from harness import BackendUnavailable, Prepared

OP = "attention"
PASSES = ("fwd", "fwd_bwd")
BASELINES = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa", "flash_attn")
GPU_BACKENDS = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash_attn", "triton", "triton_deterministic", "cuda")
CPU_BACKENDS = ("sdpa", "triton", "triton_deterministic")
HEADS_TOKENS = 16 * 16384  # batch * seqlen held constant on the GPU: batch = 16384 // seqlen (x16 heads)


@dataclass(frozen=True)
class Case(harness.CaseId):
    pass_: str
    batch: int
    seqlen: int
    heads: int
    head_dim: int
    causal: bool
    dtype: torch.dtype = torch.bfloat16
    headline: bool = False
    dropout: float = 0.0  # attention dropout_p (every backend draws its own mask)

    @property
    def shape(self) -> str:
        return (f"b{self.batch}-s{self.seqlen}-h{self.heads}-d{self.head_dim}" + ("-causal" if self.causal else "")
                + (f"-drop{self.dropout:g}" if self.dropout else ""))

    def flops(self) -> float:
        f = 4.0 * self.batch * self.heads * self.seqlen * self.seqlen * self.head_dim
        if self.causal:
            f /= 2
        return f * (3.5 if self.pass_ == "fwd_bwd" else 1.0)


def cases(device) -> list[Case]:
    """The headline (fwd bf16 d128 causal 16k) first, then seqlen 1k/4k/8k/16k x d 64/128 x causal."""
    if harness.sizes_mode(device) == "tiny":
        return [Case("fwd_bwd", 1, 64, 2, 64, True, headline=True), Case("fwd", 1, 64, 2, 64, False),
                Case("fwd_bwd", 1, 64, 2, 64, True, dropout=0.1)]
    out = [Case("fwd", 1, 16384, 16, 128, True, headline=True), Case("fwd_bwd", 1, 16384, 16, 128, True),
           # attention dropout (fine-tuning recipes, nanoGPT's char model): the Philox mask's cost
           Case("fwd_bwd", 4, 4096, 16, 128, True, dropout=0.1)]
    for seqlen in (1024, 4096, 8192, 16384):
        for d in (128, 64):
            for causal in (True, False):
                for p in PASSES:
                    c = Case(p, max(1, 16384 // seqlen), seqlen, 2048 // d, d, causal)
                    if (c.pass_, c.seqlen, c.head_dim, c.causal) not in {(o.pass_, o.seqlen, o.head_dim, o.causal)
                                                                          for o in out}:
                        out.append(c)
    return out


def backends_for(device) -> tuple[str, ...]:
    return harness.backends_for(device, GPU_BACKENDS, CPU_BACKENDS)


def make_op(backend: str, device: torch.device, dropout: float = 0.0) -> Callable:
    """``op(q, k, v, causal) -> out`` in (b, s, h, d) layout, with attention dropout ``dropout``."""
    import torch.nn.functional as F

    if backend in ("triton", "triton_deterministic"):
        if harness.triton_needs_interpreter(device):
            raise BackendUnavailable("Triton on CPU tensors needs TRITON_INTERPRET=1")
        from tokenforge.ops.attention import attention

        deterministic = backend == "triton_deterministic"
        return lambda q, k, v, causal: attention(q, k, v, dropout, causal=causal, deterministic=deterministic,
                                                 backend="triton")
    if backend == "cuda":
        if device.type != "cuda":
            raise BackendUnavailable("the CUDA C++ attention needs an sm_90 GPU")
        if dropout:
            raise BackendUnavailable("the CUDA C++ attention has no dropout")
        from tokenforge.ops.attention import attention

        return lambda q, k, v, causal: attention(q, k, v, causal=causal, backend="cuda")
    if backend == "flash_attn":
        flash_attn_func = harness.peer_import("flash_attn", "flash_attn", "pip install flash-attn").flash_attn_func
        return lambda q, k, v, causal: flash_attn_func(q, k, v, dropout, causal=causal)
    if backend.startswith("sdpa"):
        kind = backend[len("sdpa_"):] if backend != "sdpa" else None
        if kind is not None and device.type != "cuda":
            raise BackendUnavailable(f"SDPA's {kind} backend needs CUDA")

        def op(q, k, v, causal):
            args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            if kind is None:
                return F.scaled_dot_product_attention(*args, dropout_p=dropout, is_causal=causal).transpose(1, 2)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                     "cudnn": SDPBackend.CUDNN_ATTENTION}[kind]
            with sdpa_kernel([which]):
                try:
                    return F.scaled_dot_product_attention(*args, dropout_p=dropout, is_causal=causal).transpose(1, 2)
                except RuntimeError as exc:
                    # torch's own word that this SDPA backend does not take these inputs here
                    # (e.g. cuDNN missing from the build); any other error is a failure.
                    if "No available kernel" in str(exc):
                        raise BackendUnavailable(f"SDPA {kind}: {str(exc).splitlines()[0]}"[:300]) from exc
                    raise

        return op
    raise ValueError(f"unknown backend {backend!r}")


def prepare(case: Case, backend: str, device) -> Prepared:
    """Inputs, one checked call, and the timed closure. Correctness: against SDPA in fp32 on the
    same inputs (the float64 oracle is too big at these sizes; the test suite does that). With
    dropout, tokenforge's kernels against the fp32 reference dropping with their own mask (batch
    entry 0); the baselines' masks are their own random numbers, so their results are not checked
    (their libraries' tests do that), only timed."""
    device = torch.device(device)
    if backend == "triton_deterministic" and case.pass_ == "fwd":
        raise BackendUnavailable("deterministic changes the backward only; the forward is triton's")
    op = make_op(backend, device, case.dropout)
    b, s, h, d = case.batch, case.seqlen, case.heads, case.head_dim
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=case.dtype) for _ in range(3))
    dout = torch.randn(b, s, h, d, device=device, dtype=case.dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def first():
        if case.pass_ == "fwd":
            return op(q, k, v, case.causal), None
        out = op(qg, kg, vg, case.causal)
        return out, torch.autograd.grad(out, (qg, kg, vg), dout)

    torch.manual_seed(0)  # the seed the first call's dropout draws (tokenforge takes it from this generator)
    out, grads = harness.first_call(first, device)
    peak = torch.cuda.max_memory_allocated(device) - base_mem if device.type == "cuda" else None
    if case.dropout:
        errs = _dropout_errors(case, backend, q, k, v, dout, out, grads) if backend.startswith("triton") else {}
        del out, grads
        return Prepared(case, backend, device, _timed(case, op, (q, k, v), (qg, kg, vg), dout), errs,
                        harness.tolerance(case.dtype), {"peak_mem_bytes": peak})

    # Reference: fp32 math on a slice of heads (SDPA's math/efficient path in fp32).
    import torch.nn.functional as F

    hs = slice(0, min(h, 2))
    q32, k32, v32 = (t[:, :, hs].float().transpose(1, 2).requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=case.causal)
    errs = {"out": harness.rel_err(out[:, :, hs].detach(), ref.transpose(1, 2))}
    if case.pass_ == "fwd_bwd":
        rg = torch.autograd.grad(ref, (q32, k32, v32), dout[:, :, hs].float().transpose(1, 2))
        for name, g, r in zip(("dq", "dk", "dv"), grads, rg):
            errs[name] = harness.rel_err(g[:, :, hs], r.transpose(1, 2))
    del ref, out
    return Prepared(case, backend, device, _timed(case, op, (q, k, v), (qg, kg, vg), dout), errs,
                    harness.tolerance(case.dtype), {"peak_mem_bytes": peak})


def _timed(case: Case, op: Callable, inputs, leaves, dout) -> Callable:
    """The timed closure: the forward, or forward + backward into the leaves' gradients."""
    if case.pass_ == "fwd":
        return lambda: op(*inputs, case.causal)

    def fn():
        o = op(*leaves, case.causal)
        return torch.autograd.grad(o, leaves, dout)

    return fn


def _dropout_errors(case: Case, backend: str, q, k, v, dout, out, grads) -> dict:
    """Relative errors of tokenforge's dropout call against the fp32 reference dropping the same
    entries (:func:`tokenforge.ops.attention.dropout_keep_reference`), on batch entry 0."""
    from tokenforge.ops.attention import _dropout_seed, attention_reference, dropout_threshold

    torch.manual_seed(0)
    seed = int(_dropout_seed(q.device))
    leaves = [t[:1].float().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, causal=case.causal, dropout=(seed, dropout_threshold(case.dropout)))
    errs = {"out": harness.rel_err(out[:1].detach(), ref.detach())}
    if case.pass_ == "fwd_bwd":
        ref_grads = torch.autograd.grad(ref, leaves, dout[:1].float())
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            errs[name] = harness.rel_err(g[:1], r)
    return errs


def make_record(prep: Prepared, stats: dict, matmul: Optional[float]) -> dict:
    return harness.make_record(prep, stats, op=OP, flops=prep.case.flops(), matmul_tflops=matmul)
