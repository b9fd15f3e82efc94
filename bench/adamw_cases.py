"""AdamW benchmark cases: parameter lists of LLaMA-style models, optimizer modes, bytes per param.

One case = (model parameter list, mode). Timed call: ``opt.step()`` with fixed grads (the params
keep moving, as in training). Modes:

    torch_foreach  torch.optim.AdamW(foreach=True), fp32 params               (baseline)
    torch_fused    torch.optim.AdamW(fused=True), fp32 params                 (baseline)
    triton         tokenforge.optim.AdamW(backend="triton"), fp32 params
    cuda           tokenforge.optim.AdamW(backend="cuda"), fp32 params (CUDA C++)
    torch_bf16     torch.optim.AdamW(fused=True) on bf16 params, bf16 states  (baseline for SR)
    triton_master  tokenforge AdamW, bf16 params + fp32 master and moments
    triton_sr      tokenforge AdamW, bf16 params, stochastic rounding, bf16 moments
    triton_sr32    tokenforge AdamW, bf16 params, stochastic rounding, fp32 moments
    triton_q8      tokenforge AdamW(state_bits=8), fp32 params, 8-bit block-wise moments

Bytes per param per step (minimum traffic: each stream read once, each written once):
fp32 28 (p, m, v read + written, g read); bf16 master 28 (master, m, v 24 + g 2 + bf16 p written
2); SR with bf16 moments 14; SR with fp32 moments 22; torch on bf16 14; 8-bit moments 16 (+0.06
for the block scales). State memory per param (``state_bytes_per_param``): fp32 moments 8, bf16
master 12 (master + moments), SR 4 or 8, 8-bit 2.03.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import bandwidth as bw

OP = "adamw"
LR = 1e-4

BYTES_PER_PARAM = {"torch_foreach": 28, "torch_fused": 28, "triton": 28, "cuda": 28, "torch_bf16": 14,
                   "triton_master": 28, "triton_sr": 14, "triton_sr32": 22, "triton_q8": 16}
STATE_BYTES_PER_PARAM = {"torch_foreach": 8, "torch_fused": 8, "triton": 8, "cuda": 8, "torch_bf16": 4,
                         "triton_master": 12, "triton_sr": 4, "triton_sr32": 8, "triton_q8": 2 + 8 / 256}
BASELINES = ("torch_foreach", "torch_fused")
GPU_MODES = ("torch_foreach", "torch_fused", "triton", "cuda", "torch_bf16", "triton_master", "triton_sr",
             "triton_sr32", "triton_q8")
LOW_MODES = ("torch_bf16", "triton_master", "triton_sr", "triton_sr32")
CPU_MODES = ("torch_foreach", "triton", "triton_master", "triton_sr", "triton_q8")


from harness import BackendUnavailable  # noqa: E402  (one "not run here" for every benchmark)


def llama_param_shapes(vocab: int, hidden: int, inter: int, layers: int, kv_dim: int) -> list[tuple]:
    """Parameter shapes of a LLaMA-style decoder (untied embeddings, GQA k/v of width kv_dim)."""
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden),
                   (hidden,), (inter, hidden), (inter, hidden), (hidden, inter)]
    return shapes + [(hidden,), (vocab, hidden)]


MODELS = {
    # TinyLlama-1.1B's shapes: the "LLaMA-1B" parameter list of the issue.
    "llama1b": dict(vocab=32000, hidden=2048, inter=5632, layers=22, kv_dim=256),
    "llama10m": dict(vocab=8000, hidden=384, inter=1024, layers=4, kv_dim=128),
    "tiny": dict(vocab=128, hidden=64, inter=176, layers=2, kv_dim=32),
}


@dataclass(frozen=True)
class Case:
    model: str
    mode: str
    headline: bool = False

    @property
    def shapes(self) -> list[tuple]:
        return llama_param_shapes(**MODELS[self.model])

    @property
    def numel(self) -> int:
        total = 0
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            total += n
        return total

    @property
    def id(self) -> str:
        return f"{self.model}-{self.mode}"

    def bytes(self) -> int:
        return BYTES_PER_PARAM[self.mode] * self.numel


def sizes_mode(device) -> str:
    mode = os.environ.get("TOKENFORGE_BENCH_SIZES", "").strip().lower()
    if mode in ("full", "tiny"):
        return mode
    return "full" if torch.device(device).type == "cuda" else "tiny"


def cases(device) -> list[Case]:
    if sizes_mode(device) == "full":
        models = ["llama1b", "llama10m"]
        modes = GPU_MODES if torch.device(device).type == "cuda" else CPU_MODES
    else:
        models, modes = ["tiny"], CPU_MODES if torch.device(device).type != "cuda" else GPU_MODES
    return [Case(m, mode, headline=(m == "llama1b" and mode == "triton")) for m in models for mode in modes]


@dataclass
class Prepared:
    case: Case
    device: torch.device
    fn: Callable[[], object]
    rel_err: float
    correct: bool
    tol: float


def _make(mode: str, params: list, **kw):
    from tokenforge.optim import AdamW

    if mode == "torch_foreach":
        return torch.optim.AdamW(params, lr=LR, foreach=True)
    if mode in ("torch_fused", "torch_bf16"):
        return torch.optim.AdamW(params, lr=LR, fused=True)
    if mode in ("triton", "cuda"):
        return AdamW(params, lr=LR, backend=mode)
    if mode == "triton_master":
        return AdamW(params, lr=LR, backend="triton")
    if mode == "triton_q8":
        return AdamW(params, lr=LR, backend="triton", state_bits=8)
    if mode in ("triton_sr", "triton_sr32"):
        sdt = torch.bfloat16 if mode == "triton_sr" else torch.float32
        return AdamW(params, lr=LR, backend="triton", bf16_stochastic_rounding=True, sr_state_dtype=sdt)
    raise ValueError(mode)


def _params(case: Case, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for s in case.shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).mul_(0.02).to(device, dtype))
        p.grad = torch.randn(s, generator=g).mul_(1e-3).to(device, dtype)
        out.append(p)
    return out


def unavailable_reason(mode: str, device: torch.device) -> Optional[str]:
    from tokenforge import backends

    if mode in ("triton", "triton_master", "triton_sr", "triton_sr32", "triton_q8"):
        return backends.triton_unsupported_reason(device)
    if mode == "cuda":
        return backends.cuda_ext_unsupported_reason(device) or _cuda_entry_missing()
    if mode in ("torch_fused", "torch_bf16") and device.type != "cuda":
        return "torch's fused AdamW is benchmarked on CUDA only"
    return None


def _cuda_entry_missing() -> Optional[str]:
    from tokenforge.cuda import adamw as cadamw

    return cadamw._missing_entry()


def prepare(case: Case, device) -> Prepared:
    device = torch.device(device)
    reason = unavailable_reason(case.mode, device)
    if reason:
        raise BackendUnavailable(reason)
    low = case.mode in LOW_MODES
    dtype = torch.bfloat16 if low else torch.float32
    params = _params(case, device, dtype)
    opt = _make(case.mode, params)
    # Correctness: one step from the same start as torch's single-tensor AdamW in fp32 (small lists
    # only: the check doubles the memory).
    # Tolerances: fp32 one step 1e-6; bf16 params 1e-2 (bf16 rounding); 8-bit moments: the first
    # step's moments are exact up to one code step (~1%), relative to the params ~1e-4.
    rel, tol = 0.0, (1e-6 if not low and case.mode != "triton_q8" else 1e-2)
    if case.numel <= 200_000_000:
        ref = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
        for r, p in zip(ref, params):
            r.grad = p.grad.float()
        opt.step()
        torch.optim.AdamW(ref, lr=LR, foreach=False).step()
        num = sum(float((p.float() - r).double().pow(2).sum()) for p, r in zip(params, ref))
        den = sum(float(r.double().pow(2).sum()) for r in ref)
        rel = (num / den) ** 0.5
    return Prepared(case, device, opt.step, rel, rel <= tol, tol)


def measure(prep: Prepared, copy_gbps: Optional[float], timer_kwargs: Optional[dict] = None) -> dict:
    stats = bw.time_fn(prep.fn, prep.device, **(timer_kwargs or {}))
    case = prep.case
    med = stats["median_ms"]
    nbytes = case.bytes()
    gbps = nbytes / (med * 1e-3) / bw.GB if med > 0 else float("nan")
    rec = {
        # One comparison group per model: every mode's speedup is against torch's fp32 foreach/fused.
        "op": OP, "pass": "step", "shape": case.model, "dtype": "all-modes", "backend": case.mode,
        "param_dtype": "bf16" if case.mode in LOW_MODES else "fp32",
        "device": prep.device.type, "headline": case.headline, **stats,
        "params": case.numel, "bytes": nbytes, "bytes_per_param": BYTES_PER_PARAM[case.mode],
        "state_bytes_per_param": STATE_BYTES_PER_PARAM[case.mode],
        "params_per_s": case.numel / (med * 1e-3) if med > 0 else float("nan"), "gbps": gbps,
        "rel_err": {"params": prep.rel_err}, "tol": prep.tol, "correct": prep.correct,
        "meaningful": prep.device.type == "cuda",
    }
    if copy_gbps:
        rec["copy_gbps"] = copy_gbps
        rec["fraction_of_copy"] = gbps / copy_gbps
        rec["floor_ms"] = nbytes / (copy_gbps * bw.GB) * 1e3
    return rec
