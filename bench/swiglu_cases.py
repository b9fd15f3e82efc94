"""SwiGLU, GPT-OSS's clamped GLU and residual+RMSNorm benchmark cases: shapes, backends, inputs, the
float64 reference and the record fields (the shared flow is bench/harness.py).

Used by bench/test_bench_swiglu.py and bench/test_bench_add_rms_norm.py. ``gpt_oss_glu`` times
GPT-OSS's expert gate on its packed, interleaved (rows, 2n) grouped-GEMM output: rows = tokens x
top-k (8192 x 4), n = its expert width 2880, limit 7 and alpha 1.702; eager is GPT-OSS's own
_apply_gate code. Backends (baselines first, so the kernels' speedups are known when they run):

    eager    the op's tokenforge reference (plain PyTorch), eager
    compile  torch.compile of that reference, dynamic=False, per shape
    liger    liger_kernel's LigerSiLUMulFunction (SwiGLU only; skipped unless importable)
    triton   the tokenforge op with backend="triton"
    torch    the tokenforge op with backend="torch" (CPU runs only)

Passes: ``fwd`` (inputs not requiring grad) and ``fwd_bwd`` (forward, then torch.autograd.grad of
every output with random upstream gradients into every input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import bandwidth as bw
import harness
from harness import BackendUnavailable, Prepared

PASSES = ("fwd", "fwd_bwd")
GPU_BACKENDS = ("eager", "compile", "liger", "triton")
CPU_BACKENDS = ("eager", "compile", "liger", "torch", "triton")
BASELINES = ("eager", "compile", "liger")


def swiglu_bytes(pass_: str, rows: int, n: int, eb: int) -> int:
    """Minimum traffic: forward reads gate, up and writes y (3 tensors of rows*n); the backward
    reads dy, gate, up and writes dgate, dup (5 more). The packed forms move the same."""
    return (3 if pass_ == "fwd" else 8) * rows * n * eb


def add_rms_norm_bytes(pass_: str, rows: int, n: int, eb: int, wb: Optional[int] = None) -> int:
    """Minimum traffic: forward reads x, residual, w and writes y, h and the fp32 rstd; the backward
    reads dy, dh, h, w, rstd and writes dx, dresidual, dw."""
    wb = eb if wb is None else wb
    fwd = 4 * rows * n * eb + n * wb + rows * bw.RSTD_BYTES
    bwd = 5 * rows * n * eb + 2 * n * wb + rows * bw.RSTD_BYTES
    return fwd if pass_ == "fwd" else fwd + bwd


@dataclass(frozen=True)
class Case(harness.CaseId):
    op: str  # "swiglu", "gpt_oss_glu" or "add_rms_norm"
    pass_: str
    rows: int
    n: int
    dtype: torch.dtype
    headline: bool = False

    @property
    def shape(self) -> str:
        return f"{self.rows}x{self.n}"

    def bytes(self) -> int:
        f = add_rms_norm_bytes if self.op == "add_rms_norm" else swiglu_bytes
        return f(self.pass_, self.rows, self.n, bw.dtype_bytes(self.dtype))


HEADLINE = {"swiglu": (16384, 14336), "gpt_oss_glu": (32768, 2880), "add_rms_norm": (16384, 4096)}
MORE_GPU_SHAPES = {"swiglu": [(4096, 11008)], "gpt_oss_glu": [(8192, 2880)], "add_rms_norm": [(4096, 8192), (32768, 1024)]}
GPT_OSS_LIMIT, GPT_OSS_ALPHA = 7.0, 1.702
CPU_SHAPE = (64, 256)


def cases(op: str, device) -> list[Case]:
    if harness.sizes_mode(device) == "tiny":
        r, n = CPU_SHAPE
        return [Case(op, "fwd_bwd", r, n, torch.bfloat16, headline=True), Case(op, "fwd", r, n, torch.bfloat16),
                Case(op, "fwd_bwd", r, n, torch.float32), Case(op, "fwd", r, n, torch.float32)]
    r, n = HEADLINE[op]
    out = [Case(op, "fwd_bwd", r, n, torch.bfloat16, headline=True), Case(op, "fwd", r, n, torch.bfloat16)]
    for r, n in MORE_GPU_SHAPES[op]:
        out += [Case(op, "fwd_bwd", r, n, torch.bfloat16), Case(op, "fwd", r, n, torch.bfloat16)]
    return out


def backends_for(device) -> tuple[str, ...]:
    return harness.backends_for(device, GPU_BACKENDS, CPU_BACKENDS)


# ---------------------------------------------------------------------------------------------
# What is timed: fn(*inputs) -> tuple of outputs
# ---------------------------------------------------------------------------------------------


def _reference(op: str) -> Callable:
    from tokenforge.ops.add_rms_norm import add_rms_norm_reference
    from tokenforge.ops.swiglu import gpt_oss_glu_reference, swiglu_reference

    if op == "swiglu":
        return lambda g, u: (swiglu_reference(g, u),)
    if op == "gpt_oss_glu":
        return lambda gu: (gpt_oss_glu_reference(gu, GPT_OSS_ALPHA, GPT_OSS_LIMIT, True),)
    return lambda x, r, w: add_rms_norm_reference(x, r, w, 1e-6)


def make_op(op: str, backend: str, device: torch.device) -> Callable:
    if backend == "triton" and harness.triton_needs_interpreter(device):
        raise BackendUnavailable("Triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter)")
    if backend == "eager":
        return _reference(op)
    if backend == "compile":
        torch._dynamo.reset()  # a fresh, shape-specialised graph per case
        return torch.compile(_reference(op), dynamic=False)
    if backend == "liger":
        if op != "swiglu":
            raise BackendUnavailable("Liger-Kernel is compared for SwiGLU only (it has no GPT-OSS gate)")
        LigerSiLUMulFunction = harness.peer_import("liger_kernel.ops.swiglu", "liger_kernel",
                                                   "pip install liger-kernel (bench/fetch_peers.sh)").LigerSiLUMulFunction
        if device.type != "cuda":
            raise BackendUnavailable("Liger-Kernel runs on CUDA only")
        return lambda g, u: (LigerSiLUMulFunction.apply(g, u),)
    if backend in ("triton", "torch"):
        from tokenforge.ops.add_rms_norm import add_rms_norm
        from tokenforge.ops.swiglu import gpt_oss_glu, swiglu

        if op == "swiglu":
            return lambda g, u: (swiglu(g, u, backend=backend),)
        if op == "gpt_oss_glu":
            return lambda gu: (gpt_oss_glu(gu, alpha=GPT_OSS_ALPHA, limit=GPT_OSS_LIMIT, backend=backend),)
        return lambda x, r, w: add_rms_norm(x, r, w, 1e-6, backend=backend)
    raise ValueError(f"unknown backend {backend!r}")


def make_inputs(case: Case, device):
    """Fresh random inputs (never zeros or ones) and upstream gradients, one per output."""
    t = lambda scale=1.0: (torch.randn(case.rows, case.n, device=device) * scale).to(case.dtype)  # noqa: E731
    if case.op == "swiglu":
        return (t(2.0), t()), (t(),)
    if case.op == "gpt_oss_glu":  # scale 4 against limit 7: some of both halves clamped
        packed = (torch.randn(case.rows, 2 * case.n, device=device) * 4).to(case.dtype)
        return (packed,), (t(),)
    w = (1.0 + 0.1 * torch.randn(case.n, device=device)).to(case.dtype)
    return (t(), t(), w), (t(), t())


def reference64(op: str, inputs):
    """The op in float64, written out here (independent of tokenforge): the correctness oracle."""
    if op == "swiglu":
        g, u = inputs
        return (torch.nn.functional.silu(g) * u,)
    if op == "gpt_oss_glu":
        (gu,) = inputs
        g, u = gu[:, 0::2].clamp(max=GPT_OSS_LIMIT), gu[:, 1::2].clamp(-GPT_OSS_LIMIT, GPT_OSS_LIMIT)
        return ((u + 1) * g * torch.sigmoid(GPT_OSS_ALPHA * g),)
    x, r, w = inputs
    h = x + r
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w, h


def prepare(case: Case, backend: str, device) -> Prepared:
    """Inputs, the timed function, one checked call against float64 (raises BackendUnavailable)."""
    device = torch.device(device)
    inputs, grads = make_inputs(case, device)
    leaves = [t.detach().requires_grad_(True) for t in inputs]

    def first():
        op = make_op(case.op, backend, device)  # inside the first call: a backend that cannot load is unavailable
        if case.pass_ == "fwd":
            return op, op(*inputs), None
        outs = op(*leaves)
        return op, outs, torch.autograd.grad(outs, leaves, grads)

    op, outs, dins = harness.first_call(first, device)

    leaves64 = [t.detach().double().requires_grad_(True) for t in inputs]
    refs = reference64(case.op, leaves64)
    errs = {f"out{i}": harness.rel_err(o.detach(), r.detach()) for i, (o, r) in enumerate(zip(outs, refs))}
    if case.pass_ == "fwd_bwd":
        ref_dins = torch.autograd.grad(refs, leaves64, [g.double() for g in grads])
        errs.update({f"d{i}": harness.rel_err(d, r) for i, (d, r) in enumerate(zip(dins, ref_dins))})
    del outs
    tol = harness.tolerance(case.dtype)
    if case.op == "gpt_oss_glu" and case.dtype != torch.float32:
        tol *= 2  # eager's five roundings, kept by the kernel (tests/test_swiglu.py: check_gpt_oss_glu)

    if case.pass_ == "fwd":
        def fn():
            return op(*inputs)
    else:
        def fn():
            return torch.autograd.grad(op(*leaves), leaves, grads)
    return Prepared(case, backend, device, fn, errs, tol)


def make_record(prep: Prepared, stats: dict, copy_gbps: Optional[float]) -> dict:
    case = prep.case
    return harness.make_record(prep, stats, op=case.op, dims={"rows": case.rows, "n": case.n},
                               nbytes=case.bytes(), copy_gbps=copy_gbps)
