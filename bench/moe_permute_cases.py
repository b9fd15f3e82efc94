"""MoE token permutation benchmark cases: ``moe_permute`` (token rows into expert order) and
``moe_unpermute`` (back, with the weighted combine over each token's k slots), forward and
forward+backward, run as

    eager    tokenforge's torch backend: index_select gathers, the combine over a materialised
             (T, k, D) fp32 copy (what a plain PyTorch MoE layer does)
    compile  torch.compile of that torch backend, dynamic=False, per shape
    triton   the Triton kernels (tokenforge.kernels.moe_permute)

Every backend computes the same function; the oracle is the op in float64 written out here.
Minimum bytes (the rows; indices and weights are noise next to them): the permutation reads T rows
and writes T*k, its backward the reverse; the combine reads T*k rows and writes T, its backward
reads dOut (T) and the T*k rows (for the weights' gradient) and writes T*k. Reported as GB/s and as
a fraction of the copy bandwidth measured in the same run. Tiny on CPU. Never asserts a speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import bandwidth as bw
import harness
from harness import BackendUnavailable, Prepared

OPS = ("moe_permute", "moe_unpermute")
PASSES = ("fwd_bwd", "fwd")
BACKENDS = ("eager", "compile", "triton")
BASELINES = ("eager", "compile")


@dataclass(frozen=True)
class Case(harness.CaseId):
    op: str
    pass_: str
    name: str
    tokens: int
    dim: int
    top_k: int
    experts: int
    dtype: torch.dtype = torch.bfloat16
    headline: bool = False

    @property
    def shape(self) -> str:
        return f"{self.op.removeprefix('moe_')}-{self.name}"  # permute-... / unpermute-...: one id space for both ops

    def bytes(self) -> int:
        row = self.dim * bw.dtype_bytes(self.dtype)
        t, tk = self.tokens, self.tokens * self.top_k
        if self.op == "moe_permute":
            fwd, bwd = (t + tk) * row, (tk + t) * row
        else:
            fwd, bwd = (tk + t) * row, (t + 2 * tk) * row
        return fwd if self.pass_ == "fwd" else fwd + bwd


def cases(op: str, device) -> list[Case]:
    if harness.sizes_mode(device) == "full":
        shapes = [("ds-64e-top8-16k", 16384, 4096, 8, 64, True), ("mixtral-8e-top2-16k", 16384, 4096, 2, 8, False)]
    else:
        shapes = [("tiny", 24, 64, 2, 4, True)]
    return [Case(op, p, name, t, d, k, e, headline=head and p == "fwd_bwd")
            for name, t, d, k, e, head in shapes for p in PASSES]


def _torch_op(op: str):
    from tokenforge.ops import moe_permute, moe_unpermute

    if op == "moe_permute":
        return lambda x, ids, experts: moe_permute(x, ids, experts, backend="torch")[0]
    return lambda ys, order, w: moe_unpermute(ys, order, w, backend="torch")


def make_op(op: str, backend: str, device: torch.device):
    from tokenforge.ops import moe_permute, moe_unpermute

    if backend == "triton" and harness.triton_needs_interpreter(device):
        raise BackendUnavailable("Triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter)")
    if backend == "eager":
        return _torch_op(op)
    if backend == "compile":
        torch._dynamo.reset()  # a fresh, shape-specialised graph per case
        return torch.compile(_torch_op(op), dynamic=False)
    if backend == "triton":
        if op == "moe_permute":
            return lambda x, ids, experts: moe_permute(x, ids, experts, backend="triton")[0]
        return lambda ys, order, w: moe_unpermute(ys, order, w, backend="triton")
    raise ValueError(f"unknown backend {backend!r}")


def reference64(case: Case, x, ids, order, w):
    """The op in float64 from indices alone: rows of every (token, slot) in expert order, or the
    weighted sum of each token's k rows."""
    k = case.top_k
    if case.op == "moe_permute":
        return x.double()[order // k]
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    slots = x.double()[pos].view(case.tokens, k, case.dim)
    return (slots * w.double()[..., None]).sum(1)


def prepare(case: Case, backend: str, device) -> Prepared:
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, case.experts, (case.tokens, case.top_k), generator=g).to(device)
    order = torch.sort(ids.reshape(-1), stable=True).indices
    rows = case.tokens if case.op == "moe_permute" else case.tokens * case.top_k
    x = torch.randn(rows, case.dim, generator=g).to(device, case.dtype)
    w = torch.rand(case.tokens, case.top_k, generator=g).add_(0.05).to(device)
    dout_rows = case.tokens * case.top_k if case.op == "moe_permute" else case.tokens
    dout = torch.randn(dout_rows, case.dim, generator=g).to(device, case.dtype)
    permute = case.op == "moe_permute"
    leaves = [x.detach().requires_grad_(True)] + ([] if permute else [w.detach().requires_grad_(True)])

    def call(op, rows, weights):
        return op(rows, ids, case.experts) if permute else op(rows, order, weights)

    def first():
        op = make_op(case.op, backend, device)  # inside the first call: a backend that cannot load is unavailable
        if case.pass_ == "fwd":
            return op, call(op, x, w), None
        out = call(op, leaves[0], None if permute else leaves[1])
        return op, out, torch.autograd.grad(out, leaves, dout)

    op, out, grads = harness.first_call(first, device)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = reference64(case, leaves64[0], ids, order, None if permute else leaves64[1])
    errs = {"out": harness.rel_err(out.detach(), ref.detach())}
    if case.pass_ == "fwd_bwd":
        ref_grads = torch.autograd.grad(ref, leaves64, dout.double())
        errs.update({f"d{i}": harness.rel_err(d, r) for i, (d, r) in enumerate(zip(grads, ref_grads))})
    del out

    if case.pass_ == "fwd":
        def fn():
            return call(op, x, w)
    else:
        def fn():
            return torch.autograd.grad(call(op, leaves[0], None if permute else leaves[1]), leaves, dout)
    return Prepared(case, backend, device, fn, errs, harness.tolerance(case.dtype))


def make_record(prep: Prepared, stats: dict, copy_gbps) -> dict:
    case = prep.case
    return harness.make_record(prep, stats, op=case.op,
                               dims={"tokens": case.tokens, "dim": case.dim, "top_k": case.top_k,
                                     "experts": case.experts},
                               nbytes=case.bytes(), copy_gbps=copy_gbps)
