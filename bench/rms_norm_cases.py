"""RMSNorm benchmark cases: shapes, backends, inputs, the float64 reference and the record fields
(the shared flow is bench/harness.py).

Shared by the pytest-benchmark file (bench/test_bench_rms_norm.py) and the plain-script runner
(bench/rms_norm_demo.py), so both time exactly the same thing.

Backends compared (``BACKENDS``, baselines first so a kernel's ratios are known when it runs):

    eager    tokenforge.ops.rms_norm_reference, plain PyTorch, run eagerly
    compile  torch.compile(tokenforge.ops.rms_norm_reference, dynamic=False), per shape
    native   torch.nn.functional.rms_norm
    triton   tokenforge.ops.rms_norm(backend="triton")
    cuda     tokenforge.ops.rms_norm(backend="cuda")   (the CUDA C++ extension)
    torch    tokenforge.ops.rms_norm(backend="torch")  (CPU runs only: the CPU fallback path)

Passes: ``fwd`` (y = rms_norm(x, w), inputs not requiring grad) and ``fwd_bwd`` (forward, then
``torch.autograd.grad(y, (x, w), dy)``; dx and dw, no accumulation into .grad).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import bandwidth as bw
import harness
from harness import BackendUnavailable, Prepared

OP = "rms_norm"
EPS = 1e-6
PASSES = ("fwd", "fwd_bwd")

# (rows, n). The first is the headline: a LLaMA-7B-like hidden size over 16k tokens.
HEADLINE_SHAPE = (16384, 4096)
GPU_SHAPES = [(16384, 4096), (4096, 8192), (8192, 2048), (32768, 1024)]
CPU_SHAPES = [(64, 256)]

BASELINES = ("eager", "compile", "native")
TOKENFORGE_BACKENDS = ("triton", "cuda", "torch")
GPU_BACKENDS = ("eager", "compile", "native", "triton", "cuda")
CPU_BACKENDS = ("eager", "compile", "native", "torch", "triton", "cuda")

BACKEND_DESCRIPTIONS = {
    "eager": "tokenforge.ops.rms_norm_reference (plain PyTorch, eager)",
    "compile": "torch.compile(tokenforge.ops.rms_norm_reference, dynamic=False)",
    "native": "torch.nn.functional.rms_norm",
    "triton": "tokenforge.ops.rms_norm(backend='triton')",
    "cuda": "tokenforge.ops.rms_norm(backend='cuda') (CUDA C++ extension)",
    "torch": "tokenforge.ops.rms_norm(backend='torch')",
}


@dataclass(frozen=True)
class Case(harness.CaseId):
    pass_: str  # "fwd" or "fwd_bwd"
    rows: int
    n: int
    dtype: torch.dtype
    headline: bool = False  # fwd+bwd, bf16, first shape of the set (16384x4096 on GPU; 64x256 on CPU)

    @property
    def shape(self) -> str:
        return f"{self.rows}x{self.n}"

    def bytes(self) -> int:
        """Minimum bytes moved (bandwidth.rms_norm_fwd_bytes / rms_norm_fwd_bwd_bytes); the
        weight has x's dtype in these benchmarks."""
        eb = bw.dtype_bytes(self.dtype)
        if self.pass_ == "fwd":
            return bw.rms_norm_fwd_bytes(self.rows, self.n, eb)
        return bw.rms_norm_fwd_bwd_bytes(self.rows, self.n, eb)


def cases(device) -> list[Case]:
    """Cases in run order: the headline first, then the rest of its shape, then the other shapes."""
    device = torch.device(device)
    out: list[Case] = []
    if harness.sizes_mode(device) == "full":
        hr, hn = HEADLINE_SHAPE
        out += [Case("fwd_bwd", hr, hn, torch.bfloat16, headline=True), Case("fwd", hr, hn, torch.bfloat16),
                Case("fwd_bwd", hr, hn, torch.float32), Case("fwd", hr, hn, torch.float32)]
        for rows, n in GPU_SHAPES:
            if (rows, n) == HEADLINE_SHAPE:
                continue
            out += [Case("fwd_bwd", rows, n, torch.bfloat16), Case("fwd", rows, n, torch.bfloat16)]
    else:
        for i, (rows, n) in enumerate(CPU_SHAPES):
            for dtype in (torch.bfloat16, torch.float32):
                head = i == 0 and dtype == torch.bfloat16
                out += [Case("fwd_bwd", rows, n, dtype, headline=head), Case("fwd", rows, n, dtype)]
    return out


def backends_for(device) -> tuple[str, ...]:
    return harness.backends_for(device, GPU_BACKENDS, CPU_BACKENDS)


# ---------------------------------------------------------------------------------------------
# The functions being timed
# ---------------------------------------------------------------------------------------------


def _reference() -> Callable:
    from tokenforge import ops

    return ops.rms_norm_reference


def static_unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device``, when that is known without trying; else None."""
    if device.type != "cuda":
        if backend == "cuda":
            return "the CUDA extension needs a CUDA device"
        if backend == "triton" and harness.triton_needs_interpreter(device):
            return "Triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter)"
    return None


def make_op(backend: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``op(x, w) -> y`` for one backend."""
    if backend in TOKENFORGE_BACKENDS:
        from tokenforge import ops

        def op(x, w):
            return ops.rms_norm(x, w, EPS, backend=backend)

        return op
    if backend == "eager":
        ref = _reference()
        return lambda x, w: ref(x, w, EPS)
    if backend == "compile":
        ref = _reference()
        # A fresh dynamo cache for every case: a shape- and dtype-specialised graph each time,
        # never the recompile limit, never a silent fall back to eager.
        torch._dynamo.reset()
        compiled = torch.compile(ref, dynamic=False)
        return lambda x, w: compiled(x, w, EPS)
    if backend == "native":
        f = torch.nn.functional.rms_norm
        return lambda x, w: f(x, (x.shape[-1],), w, EPS)
    raise ValueError(f"unknown backend {backend!r}; known: {sorted(BACKEND_DESCRIPTIONS)}")


def reference64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """RMSNorm in float64, written out here (independent of tokenforge): the correctness oracle."""
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


def make_inputs(case: Case, device: torch.device):
    """Fresh random x, weight, dy (never zeros or ones): x, dy ~ N(0, 1), w ~ 1 + 0.1 N(0, 1)."""
    x = torch.randn(case.rows, case.n, device=device, dtype=torch.float32).to(case.dtype)
    w = (1.0 + 0.1 * torch.randn(case.n, device=device, dtype=torch.float32)).to(case.dtype)
    dy = torch.randn(case.rows, case.n, device=device, dtype=torch.float32).to(case.dtype)
    return x, w, dy


def prepare(case: Case, backend: str, device) -> Prepared:
    """Build inputs and the timed function, run it once (compiles, loads the extension) and check
    it against :func:`reference64`.

    Raises :class:`BackendUnavailable` when the backend cannot run here (a static reason, or
    tokenforge's BackendUnavailableError); any other error propagates and fails the benchmark.
    """
    device = torch.device(device)
    reason = static_unavailable_reason(backend, device)
    if reason:
        raise BackendUnavailable(reason)
    x, w, dy = make_inputs(case, device)
    xg = x.detach().requires_grad_(True)
    wg = w.detach().requires_grad_(True)

    def first():
        op = make_op(backend)  # inside the first call: a backend that cannot load is unavailable
        if case.pass_ == "fwd":
            return op, op(x, w), None, None
        y = op(xg, wg)
        return (op, y, *torch.autograd.grad(y, (xg, wg), dy))

    op, y, dx, dw = harness.first_call(first, device)

    tol = harness.tolerance(case.dtype)
    if case.pass_ == "fwd":
        errs = {"y": harness.rel_err(y, reference64(x, w))}
        del y

        def fn():
            return op(x, w)
    else:
        xd = x.double().requires_grad_(True)
        wd = w.double().requires_grad_(True)
        yd = reference64(xd, wd)
        dxd, dwd = torch.autograd.grad(yd, (xd, wd), dy.double())
        errs = {"y": harness.rel_err(y.detach(), yd.detach()), "dx": harness.rel_err(dx, dxd),
                "dw": harness.rel_err(dw, dwd)}
        del xd, wd, yd, dxd, dwd, y, dx, dw

        def fn():
            out = op(xg, wg)
            return torch.autograd.grad(out, (xg, wg), dy)

    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Prepared(case, backend, device, fn, errs, tol)


def measure(prep: Prepared, copy_gbps: Optional[float] = None, timer_kwargs: Optional[dict] = None) -> dict:
    """Time ``prep.fn`` (bandwidth.time_fn) and return the record stored in the JSON's extra_info."""
    stats = bw.time_fn(prep.fn, prep.device, **(timer_kwargs or {}))
    return make_record(prep, stats, copy_gbps)


def make_record(prep: Prepared, stats: dict, copy_gbps: Optional[float]) -> dict:
    case = prep.case
    return harness.make_record(prep, stats, op=OP, dims={"rows": case.rows, "n": case.n},
                               impl=BACKEND_DESCRIPTIONS.get(prep.backend, prep.backend),
                               nbytes=case.bytes(), copy_gbps=copy_gbps)
