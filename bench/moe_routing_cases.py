"""MoE routing benchmark cases (tokenforge.ops.moe_routing): ``moe_route`` (router logits -> top-k
experts, weights and scores), ``moe_permute`` (token rows into expert order) and ``moe_unpermute``
(back, with the weighted combine over each token's k slots), forward and forward+backward, run as

    eager    tokenforge's torch backend: softmax/sigmoid, topk and gather ops for the router;
             index_select gathers, the combine over a materialised (T, k, D) fp32 copy (what a
             plain PyTorch MoE layer does)
    compile  torch.compile of that torch backend, dynamic=False, per shape
    triton   the Triton kernels (tokenforge.kernels.moe_route, tokenforge.kernels.moe_permute)

Every backend computes the same function. Oracles in float64: the permutation ops written out
here from the indices; the router's weights and scores recomputed in float64 for the experts the
backend chose (a near-tie may flip a choice between precisions; that is not an error of the
weights), its backward through both. Minimum bytes (the rows; indices are noise next to them): the
permutation reads T rows and writes T*k, its backward the reverse; the combine reads T*k rows and
writes T, its backward reads dOut (T) and the T*k rows (for the weights' gradient) and writes T*k;
the router reads the logits and writes the fp32 scores, its backward reads the logits and the
scores' gradient and writes the logits' gradient. Reported as GB/s and as a fraction of the copy
bandwidth measured in the same run. Tiny on CPU. Never asserts a speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import bandwidth as bw
import harness
from harness import BackendUnavailable, Prepared

OPS = ("moe_route", "moe_permute", "moe_unpermute")
PASSES = ("fwd_bwd", "fwd")
BACKENDS = ("eager", "compile", "triton")
BASELINES = ("eager", "compile")
# The router's options in every case: DeepSeek-V3's (sigmoid scores, a selection bias, 8 groups keep 4,
# normalised, scaled by 2.5), groups only where the experts split into 8.
ROUTE = dict(score="sigmoid", normalize=True, scaling=2.5)


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
        return f"{self.op.removeprefix('moe_')}-{self.name}"  # route-... / permute-... / unpermute-...

    @property
    def groups(self) -> dict:
        return dict(n_groups=8, topk_groups=4) if self.experts % 8 == 0 and self.experts >= 64 else {}

    def bytes(self) -> int:
        eb = bw.dtype_bytes(self.dtype)
        t, tk = self.tokens, self.tokens * self.top_k
        if self.op == "moe_route":
            fwd, bwd = t * self.experts * (eb + 4), t * self.experts * (eb + 4 + eb)
        elif self.op == "moe_permute":
            fwd, bwd = (t + tk) * self.dim * eb, (tk + t) * self.dim * eb
        else:
            fwd, bwd = (tk + t) * self.dim * eb, (t + 2 * tk) * self.dim * eb
        return fwd if self.pass_ == "fwd" else fwd + bwd


def cases(op: str, device) -> list[Case]:
    if harness.sizes_mode(device) == "full":
        shapes = [("ds-64e-top8-16k", 16384, 4096, 8, 64, True), ("mixtral-8e-top2-16k", 16384, 4096, 2, 8, False)]
        if op == "moe_route":  # the router's cost is in the expert count: DeepSeek-V3's 256 too
            shapes.append(("ds-v3-256e-top8-16k", 16384, 7168, 8, 256, False))
    else:
        shapes = [("tiny", 24, 64, 2, 4, True)]
    return [Case(op, p, name, t, d, k, e, headline=head and p == "fwd_bwd")
            for name, t, d, k, e, head in shapes for p in PASSES]


def _op(case: Case, backend: str):
    """fn(leaf, extra) -> the outputs that carry gradients, as a tuple."""
    from tokenforge.ops import moe_permute, moe_route, moe_unpermute

    if case.op == "moe_route":
        def route(logits, bias):
            w, _, s = moe_route(logits, case.top_k, bias=bias, **ROUTE, **case.groups, backend=backend)
            return w, s
        return route
    if case.op == "moe_permute":
        return lambda x, ids: (moe_permute(x, ids, case.experts, backend=backend)[0],)
    return lambda ys, order_w: (moe_unpermute(ys, order_w[0], order_w[1], backend=backend),)


def make_op(case: Case, backend: str, device: torch.device):
    if backend == "triton" and harness.triton_needs_interpreter(device):
        raise BackendUnavailable("Triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter)")
    if backend == "eager":
        return _op(case, "torch")
    if backend == "compile":
        torch._dynamo.reset()  # a fresh, shape-specialised graph per case
        return torch.compile(_op(case, "torch"), dynamic=False)
    if backend == "triton":
        return _op(case, "triton")
    raise ValueError(f"unknown backend {backend!r}")


def reference64(case: Case, leaves64, ids, order, bias, chosen):
    """The op in float64: rows of every (token, slot) in expert order, the weighted sum of each
    token's k rows, or the router's weights (for the ``chosen`` experts) and scores."""
    k = case.top_k
    if case.op == "moe_route":
        scores = torch.sigmoid(leaves64[0])
        w = scores.gather(1, chosen)
        return w / w.sum(-1, keepdim=True) * ROUTE["scaling"], scores
    if case.op == "moe_permute":
        return (leaves64[0][order // k],)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    slots = leaves64[0][pos].view(case.tokens, k, case.dim)
    return ((slots * leaves64[1][..., None]).sum(1),)


def prepare(case: Case, backend: str, device) -> Prepared:
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, case.experts, (case.tokens, case.top_k), generator=g).to(device)
    order = torch.sort(ids.reshape(-1), stable=True).indices
    bias = (torch.randn(case.experts, generator=g) * 0.01).to(device)
    if case.op == "moe_route":
        inputs = [torch.randn(case.tokens, case.experts, generator=g).to(device, case.dtype)]
        extra = bias
        grads = [torch.randn(case.tokens, case.top_k, generator=g).to(device),
                 torch.randn(case.tokens, case.experts, generator=g).to(device)]
    elif case.op == "moe_permute":
        inputs = [torch.randn(case.tokens, case.dim, generator=g).to(device, case.dtype)]
        extra = ids
        grads = [torch.randn(case.tokens * case.top_k, case.dim, generator=g).to(device, case.dtype)]
    else:
        inputs = [torch.randn(case.tokens * case.top_k, case.dim, generator=g).to(device, case.dtype),
                  torch.rand(case.tokens, case.top_k, generator=g).add_(0.05).to(device)]
        extra = None
        grads = [torch.randn(case.tokens, case.dim, generator=g).to(device, case.dtype)]
    leaves = [t.detach().requires_grad_(True) for t in inputs]

    def call(op, ts):
        if case.op == "moe_unpermute":
            return op(ts[0], (order, ts[1]))
        return op(ts[0], extra)

    def first():
        op = make_op(case, backend, device)  # inside the first call: a backend that cannot load is unavailable
        if case.pass_ == "fwd":
            return op, call(op, inputs), None
        outs = call(op, leaves)
        return op, outs, torch.autograd.grad(outs, leaves, grads)

    op, outs, dins = harness.first_call(first, device)
    chosen = None
    if case.op == "moe_route":
        from tokenforge.ops import moe_route

        chosen = moe_route(inputs[0], case.top_k, bias=bias, **ROUTE, **case.groups,
                           backend="triton" if backend == "triton" else "torch")[1]
    leaves64 = [t.detach().double().requires_grad_(True) for t in inputs]
    refs = reference64(case, leaves64, ids, order, bias, chosen)
    errs = {f"out{i}": harness.rel_err(o.detach(), r.detach()) for i, (o, r) in enumerate(zip(outs, refs))}
    if case.pass_ == "fwd_bwd":
        ref_dins = torch.autograd.grad(refs, leaves64, [d.double() for d in grads])
        errs.update({f"d{i}": harness.rel_err(d, r) for i, (d, r) in enumerate(zip(dins, ref_dins))})
    del outs

    if case.pass_ == "fwd":
        def fn():
            return call(op, inputs)
    else:
        def fn():
            return torch.autograd.grad(call(op, leaves), leaves, grads)
    return Prepared(case, backend, device, fn, errs, harness.tolerance(case.dtype))


def make_record(prep: Prepared, stats: dict, copy_gbps) -> dict:
    case = prep.case
    return harness.make_record(prep, stats, op=case.op,
                               dims={"tokens": case.tokens, "dim": case.dim, "top_k": case.top_k,
                                     "experts": case.experts},
                               nbytes=case.bytes(), copy_gbps=copy_gbps)
