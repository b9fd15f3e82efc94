"""Muon benchmark cases: the 5-step Newton-Schulz of tokenforge (Triton; its torch reference) vs
torch.optim.Muon's own iteration (``torch_muon``: three dense bf16 matmuls per step, per matrix),
on one 4096^2 matrix and on the hidden matrices of the 125m and 1b presets (batched by shape),
plus a whole Muon step on those matrices vs torch.optim.Muon. Tiny on CPU (proves the code runs).

FLOPs: ``flops`` counts what tokenforge's kernels execute (the symmetric products on the lower
triangle of tiles only), so ``fraction_of_matmul`` (vs a bf16 torch.matmul measured in the same
run) is the tensor-core utilisation; ``dense_flops`` is the 3-dense-matmul count torch's iteration
executes, and ``dense_tflops`` the rate on that convention. Never asserts a speed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

import bandwidth as bw
import harness
from harness import BackendUnavailable, CaseId, Prepared

OP = "newton_schulz"
STEPS = 5
BASELINES = ("torch_muon",)
BACKENDS = ("torch_muon", "torch", "triton")
NS_TOL = 4e-2  # bf16 iteration vs float64 (tests/test_newton_schulz.py explains the size)


def _hidden(n_layers, dim, kv_dim, ffn):
    return ((n_layers * 2, dim, dim), (n_layers * 2, kv_dim, dim), (n_layers * 2, ffn, dim), (n_layers, dim, ffn))


@dataclass(frozen=True)
class Case(CaseId):
    name: str
    groups: tuple  # ((count, rows, cols), ...): matrices of one shape are batched
    headline: bool = False
    dtype: torch.dtype = torch.bfloat16
    pass_: str = "ns5"

    @property
    def shape(self) -> str:
        return self.name

    def dense_flops(self) -> float:
        total = 0.0
        for count, r, c in self.groups:
            s, lng = min(r, c), max(r, c)
            total += count * STEPS * (4.0 * s * s * lng + 2.0 * s ** 3)
        return total

    def executed_flops(self, block: int) -> float:
        """The kernels' FLOPs: the two symmetric products cover tiles(tiles+1)/2 of tiles^2."""
        total = 0.0
        for count, r, c in self.groups:
            s, lng = min(r, c), max(r, c)
            tiles = -(-s // block)
            tri = tiles * (tiles + 1) / 2 / tiles ** 2
            total += count * STEPS * (2.0 * s * s * lng * tri + 2.0 * s ** 3 * tri + 2.0 * s * s * lng)
        return total


def cases(device) -> list[Case]:
    if harness.sizes_mode(device) == "full":
        return [Case("4096x4096", ((1, 4096, 4096),), headline=True),
                Case("125m", _hidden(12, 768, 768, 2048)),
                Case("1b", _hidden(16, 2048, 512, 8192))]
    return [Case("tiny", ((2, 64, 96),))]


def _torch_muon_ns():
    try:
        from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz
    except ImportError as exc:  # torch before 2.9 has no torch.optim.Muon
        raise BackendUnavailable(f"torch.optim.Muon's Newton-Schulz is not in this torch ({exc})") from exc
    return lambda g: _zeropower_via_newtonschulz(g, (DEFAULT_A, DEFAULT_B, DEFAULT_C), STEPS, EPS)


def _inputs(case: Case, device) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(count, r, c, generator=g).to(device) for count, r, c in case.groups]


def prepare(case: Case, backend: str, device) -> Prepared:
    from tokenforge.ops.newton_schulz import newton_schulz

    device = torch.device(device)
    if backend == "triton" and harness.triton_needs_interpreter(device):
        raise BackendUnavailable("Triton on CPU tensors needs TRITON_INTERPRET=1")
    batches = _inputs(case, device)
    if backend == "torch_muon":
        ns = _torch_muon_ns()

        def fn():
            return [torch.stack([ns(m) for m in batch]) for batch in batches]
    else:
        def fn():
            return [newton_schulz(batch, STEPS, backend=backend) for batch in batches]
    outs = harness.first_call(fn, device)
    # Correctness: the first matrix of each shape against the float64 iteration.
    errs = {}
    for (count, r, c), batch, out in zip(case.groups, batches, outs):
        ref = newton_schulz(batch[:1].double().cpu(), STEPS, dtype=torch.float64, backend="torch")
        errs[f"{r}x{c}"] = harness.rel_err(out[:1].float().cpu(), ref)
    return Prepared(case, backend, device, fn, errs, NS_TOL)


def make_record(prep: Prepared, stats: dict) -> dict:
    from tokenforge.kernels import newton_schulz as kns

    case = prep.case
    block = kns.config(max(min(r, c) for _, r, c in case.groups))["BLOCK"]
    executed = case.dense_flops() if prep.backend != "triton" else case.executed_flops(block)
    rec = harness.make_record(prep, stats, op=OP, dims={"matrices": sum(g[0] for g in case.groups)},
                              flops=executed, matmul_tflops=bw.matmul_tflops(prep.device))
    rec["dense_flops"] = case.dense_flops()
    if stats["median_ms"]:
        rec["dense_tflops"] = case.dense_flops() / (stats["median_ms"] * 1e-3) / 1e12
    return rec


# ---------------------------------------------------------------------------------------------
# A whole Muon step (momentum, Newton-Schulz, update) on a preset's hidden matrices
# ---------------------------------------------------------------------------------------------

STEP_BACKENDS = ("torch_muon", "tokenforge")


def step_cases(device) -> list[Case]:
    return [replace(c, pass_="step") for c in cases(device)]


def prepare_step(case: Case, backend: str, device) -> Prepared:
    from tokenforge.optim import Muon

    device = torch.device(device)
    if backend == "tokenforge" and harness.triton_needs_interpreter(device):
        raise BackendUnavailable("tokenforge's Muon on CPU tensors runs Triton only under TRITON_INTERPRET=1")
    params = [torch.nn.Parameter(m.float()) for batch in _inputs(case, device) for m in batch]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    if backend == "torch_muon":
        _torch_muon_ns()  # unavailable, not failed, on a torch without it
        opt = torch.optim.Muon(params, lr=0.02)
    else:
        opt = Muon(params, lr=0.02)
    harness.first_call(opt.step, device)
    return Prepared(case, backend, device, opt.step, {}, 0.0)
