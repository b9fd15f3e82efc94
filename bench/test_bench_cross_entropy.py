"""Cross-entropy and fused linear cross-entropy microbenchmarks (pytest-benchmark): fwd+bwd time and
peak memory, every backend.

    pytest bench/test_bench_cross_entropy.py --benchmark-json=bench.json
    pytest bench/test_bench_cross_entropy.py -k linear          # the fused linear CE only

Cases (GPU; a tiny version of each on CPU):

    cross_entropy         fwd_bwd  logits 16384 x 128256 bf16 (and 8192 x 32000)
                          loss = op(logits, target); torch.autograd.grad(loss, logits)
    linear_cross_entropy  fwd_bwd  tokens 16384, hidden 4096, vocab 128256, bf16
                          loss = op(hidden, weight, target); grads of hidden and weight

Backends: ``eager`` (F.cross_entropy, and for the fused op F.linear + F.cross_entropy), ``compile``
(torch.compile of the same), ``liger`` (Liger-Kernel's functional ops, when importable), ``triton``
(tokenforge), ``torch`` (tokenforge's CPU fallback; CPU runs only), and for the fused op
``vocab_parallel`` (``vocab_parallel_linear_cross_entropy`` on a group of one rank: the whole head on
this device, so its time against ``triton`` is the price of the split kernels and the per-chunk
combine; a tensor-parallel group divides the head's work by its size on top of that).

Each test: fresh random inputs; one call checked against a reference (float64 on CPU; fp32 on the
GPU, where float64 logits of the big cases would take 16 GB); then the median time from
bandwidth.time_fn and the peak memory of one call above what the inputs hold
(``torch.cuda.max_memory_allocated``), in ``benchmark.extra_info`` (``peak_mib``). The byte floor
counts reading the logits and writing their gradient once (cross_entropy), or hidden + weight read
and their gradients written (fused: compute-bound, so ``%copy`` means little there; see ``tflops``).
Benchmarks never assert a speed; a wrong result fails the test after its timing is recorded.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bandwidth as bw  # noqa: E402
import harness  # noqa: E402
from harness import BackendUnavailable as Unavailable  # noqa: E402

DEVICE = bw.bench_device()
FULL = (os.environ.get("TOKENFORGE_BENCH_SIZES", "").strip().lower() or
        ("full" if DEVICE.type == "cuda" else "tiny")) == "full"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Case:
    op: str          # "cross_entropy" or "linear_cross_entropy"
    tokens: int
    vocab: int
    hidden: int = 0  # linear_cross_entropy only
    dtype: torch.dtype = torch.bfloat16
    headline: bool = False

    @property
    def shape(self) -> str:
        return f"{self.tokens}x{self.hidden}x{self.vocab}" if self.hidden else f"{self.tokens}x{self.vocab}"

    @property
    def id(self) -> str:
        return f"fwd_bwd-{self.shape}-{bw.dtype_name(self.dtype)}"

    def bytes(self) -> int:
        eb = bw.dtype_bytes(self.dtype)
        if self.op == "cross_entropy":
            return 2 * self.tokens * self.vocab * eb + self.tokens * 8
        return 2 * (self.tokens + self.vocab) * self.hidden * eb + self.tokens * 8

    def flops(self) -> int:
        # Three (tokens x hidden x vocab) matmuls: logits, grad_hidden, grad_weight.
        return 3 * 2 * self.tokens * self.hidden * self.vocab if self.hidden else 0


if FULL:
    CASES = [Case("cross_entropy", 16384, 128256, headline=True), Case("cross_entropy", 8192, 32000),
             Case("linear_cross_entropy", 16384, 128256, 4096, headline=True)]
else:
    CASES = [Case("cross_entropy", 16, 1000, headline=True), Case("cross_entropy", 16, 1000, dtype=torch.float32),
             Case("linear_cross_entropy", 64, 500, 32, headline=True)]

BACKENDS = ("eager", "compile", "liger", "triton") + (() if DEVICE.type == "cuda" else ("torch",))



# ---------------------------------------------------------------------------------------------
# The functions being timed: op(*inputs) -> loss
# ---------------------------------------------------------------------------------------------


def _eager_ce(logits, target):
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def _eager_linear_ce(hidden, weight, target):
    return F.cross_entropy(F.linear(hidden, weight), target, ignore_index=IGNORE_INDEX)


def make_op(case: Case, backend: str):
    fused = case.op == "linear_cross_entropy"
    if backend == "eager":
        return _eager_linear_ce if fused else _eager_ce
    if backend == "compile":
        torch._dynamo.reset()
        return torch.compile(_eager_linear_ce if fused else _eager_ce, dynamic=False)
    if backend == "liger":
        liger = harness.peer_import("liger_kernel.transformers.functional", "liger_kernel",
                                    "pip install liger-kernel (bench/fetch_peers.sh)")
        liger_cross_entropy = liger.liger_cross_entropy
        liger_fused_linear_cross_entropy = liger.liger_fused_linear_cross_entropy
        if DEVICE.type != "cuda":
            raise Unavailable("Liger-Kernel needs a CUDA device")
        if fused:
            return lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX)
        # Liger writes the gradient over its input: give it a copy so the next call sees logits.
        return lambda x, t: liger_cross_entropy(x.clone(), t, ignore_index=IGNORE_INDEX)
    if backend in ("triton", "torch"):
        from tokenforge import backends
        from tokenforge.ops.cross_entropy import cross_entropy
        from tokenforge.ops.linear_cross_entropy import linear_cross_entropy

        reason = backends.triton_unsupported_reason(DEVICE) if backend == "triton" else None
        if reason:
            raise Unavailable(reason)

        if fused:
            return lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX, backend=backend)
        return lambda x, t: cross_entropy(x, t, ignore_index=IGNORE_INDEX, backend=backend)
    if backend == "vocab_parallel":
        from tokenforge import backends
        from tokenforge.ops.vocab_parallel_cross_entropy import vocab_parallel_linear_cross_entropy

        reason = backends.triton_unsupported_reason(DEVICE)
        if reason:
            raise Unavailable(reason)
        group = _group_of_one()
        return lambda h, w, t: vocab_parallel_linear_cross_entropy(h, w, t, group=group, ignore_index=IGNORE_INDEX,
                                                                   backend="triton")
    raise ValueError(f"unknown backend {backend!r}")


_OWN_GROUP = []  # the 1-rank group this module started, destroyed at the end of the session


def _group_of_one():
    """A process group of this process alone (gloo: with one rank the op calls no collective)."""
    import tempfile

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
        _OWN_GROUP.append(dist.group.WORLD)
    if dist.get_world_size() != 1:
        raise Unavailable("the vocab_parallel case runs on a group of one rank; this process is in a larger one")
    return dist.group.WORLD


@pytest.fixture(scope="module", autouse=True)
def _destroy_own_group():
    yield
    if _OWN_GROUP:
        import torch.distributed as dist

        dist.destroy_process_group()
        _OWN_GROUP.clear()


def make_inputs(case: Case):
    """Fresh random inputs (never zeros); 5% of the targets ignored."""
    target = torch.randint(0, case.vocab, (case.tokens,), device=DEVICE)
    target[torch.rand(case.tokens, device=DEVICE) < 0.05] = IGNORE_INDEX
    if case.op == "cross_entropy":
        return [(torch.randn(case.tokens, case.vocab, device=DEVICE) * 2).to(case.dtype).requires_grad_()], target
    hidden = torch.randn(case.tokens, case.hidden, device=DEVICE).to(case.dtype).requires_grad_()
    weight = (torch.randn(case.vocab, case.hidden, device=DEVICE) / case.hidden ** 0.5).to(case.dtype).requires_grad_()
    return [hidden, weight], target


def reference(case: Case, leaves, target):
    """Loss and gradients of the unfused computation in float64 (CPU) or fp32 (GPU)."""
    dtype = torch.float64 if DEVICE.type != "cuda" else torch.float32
    ref_leaves = [x.detach().to(dtype).requires_grad_() for x in leaves]
    if case.op == "cross_entropy":
        loss = F.cross_entropy(ref_leaves[0], target, ignore_index=IGNORE_INDEX)
    else:
        loss = F.cross_entropy(F.linear(*ref_leaves), target, ignore_index=IGNORE_INDEX)
    grads = torch.autograd.grad(loss, ref_leaves)
    return [loss.detach(), *grads]


def rel_err(out, ref) -> float:
    if out is None or tuple(out.shape) != tuple(ref.shape):
        return float("inf")
    num = (out.double() - ref.double()).norm().item()
    den = ref.double().norm().item()
    err = num / den if den > 0 else num
    return err if err == err and err != float("inf") else float("inf")


def peak_mib(fn) -> float:
    """Peak memory of one call above what was allocated before it (CUDA), in MiB."""
    if DEVICE.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / bw.MiB


def _params():
    for case in CASES:
        for backend in BACKENDS + (("vocab_parallel",) if case.op == "linear_cross_entropy" else ()):
            marks = [pytest.mark.headline] if case.headline else []
            yield pytest.param(case, backend, id=f"{case.id}-{backend}", marks=marks)


@pytest.mark.parametrize("case,backend", list(_params()))
def test_cross_entropy(benchmark, bench_recorder, request, case, backend):
    benchmark.group = f"{case.op} {case.id}"
    try:
        op = make_op(case, backend)
    except Unavailable as exc:
        bench_recorder.skip(request.node.nodeid, str(exc))
        pytest.skip(f"unavailable: {exc}")
    leaves, target = make_inputs(case)

    def fn():
        loss = op(*leaves, target)
        return loss, torch.autograd.grad(loss, leaves)

    try:
        loss, grads = harness.first_call(fn, DEVICE)
    except Unavailable as exc:
        bench_recorder.skip(request.node.nodeid, str(exc))
        pytest.skip(f"unavailable: {exc}")
    ref = reference(case, leaves, target)
    names = ["loss"] + (["dlogits"] if case.op == "cross_entropy" else ["dhidden", "dweight"])
    errs = {n: rel_err(o, r) for n, o, r in zip(names, [loss.detach(), *grads], ref)}
    del loss, grads, ref
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    tol = 2e-2 if case.dtype != torch.float32 else 1e-4  # sanity bound; tests/ check precisely
    correct = all(e <= tol for e in errs.values())

    quick = bool(getattr(benchmark, "disabled", False))
    peak = peak_mib(fn)
    stats = bw.time_fn(fn, DEVICE, **(bw.QUICK_TIMER if quick else {}))
    med = stats["median_ms"]
    nbytes = case.bytes()
    rec = {"op": case.op, "pass": "fwd_bwd", "shape": case.shape, "dtype": bw.dtype_name(case.dtype),
           "backend": backend, "device": DEVICE.type, "headline": case.headline, **stats,
           "bytes": nbytes, "gbps": nbytes / (med * 1e-3) / bw.GB if med > 0 else float("nan"),
           "peak_mib": peak, "rel_err": errs, "tol": tol, "correct": correct,
           "meaningful": DEVICE.type == "cuda"}
    if case.flops():
        rec["tflops"] = case.flops() / (med * 1e-3) / 1e12 if med > 0 else float("nan")
    if bench_recorder.copy_gbps:
        rec["fraction_of_copy"] = rec["gbps"] / bench_recorder.copy_gbps
        rec["floor_ms"] = nbytes / (bench_recorder.copy_gbps * bw.GB) * 1e3
    if quick:
        rec["timer"] += " [quick: --benchmark-disable]"
    bench_recorder.record(benchmark, rec, baselines=("eager", "compile"))
    benchmark.pedantic(bw.synchronized(fn, DEVICE), rounds=3 if quick or DEVICE.type != "cuda" else 10,
                       iterations=1, warmup_rounds=1)
    if not correct:
        pytest.fail(f"{backend} computed a wrong result for {case.op} {case.id}: "
                    + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + f" (tolerance {tol:.0e})")
