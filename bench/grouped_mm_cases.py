"""Grouped-GEMM (MoE expert matmul) benchmark cases: tokenforge's Triton and CUTLASS (cuda) grouped GEMMs vs the
per-expert loop (``torch_loop``: what an unpatched Mixtral-style model runs) and ``torch._grouped_mm``
(``torch_grouped``, PyTorch's own, where this torch and GPU run it), forward and forward+backward.

Shapes (bf16): Mixtral-8x7B's expert up-projection at 16k routed rows (8 experts, K 4096, N 14336),
64 routed experts at top-8 of 16k tokens (hidden 4096, expert ffn 1536: the issue's goal shape),
and a DeepSeek-V3-like expert-parallel shard (32 local experts, K 7168, N 2048, 32k routed rows)
with a skewed, uneven load (some experts empty). FLOPs: 2 T K N forward, 3x that forward+backward;
``fraction_of_matmul`` is against one dense bf16 torch.matmul measured in the same run. Tiny on CPU
(the code runs; its timings are noise). Never asserts a speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import bandwidth as bw
import harness
from harness import BackendUnavailable, CaseId, Prepared

OP = "grouped_mm"
BASELINES = ("torch_grouped", "torch_loop")
# triton: tokenforge.kernels.grouped_mm; cuda: the CUTLASS sm_90a kernel (csrc/grouped_mm_sm90.cu);
# triton_fp8: ops.grouped_mm_fp8 (forward only: tokens rowwise, experts colwise e4m3), its error
# taken against the dequantized operands (fp8's own rounding is the recipe's, not the kernel's);
# triton_fp8_train: tokenforge.fp8.grouped_mm_float8 on bf16 tensors, what an fp8 MoE training step
# runs (recipe rowwise: all three GEMMs in fp8, the per-call quantization of tokens, weights and
# gradients included),
# its error taken against the unquantized float64 product with fp8's 20 dB floor (FP8_TRAIN_TOL);
# triton_fp8_blockwise_train: the same with recipe blockwise (1x128 tokens and gradients, 128x128
# expert weight blocks, dB per 128 tokens: DeepSeek-V3's), on shapes whose K and N are multiples of 128.
BACKENDS = ("torch_loop", "torch_grouped", "triton", "cuda", "triton_fp8", "triton_fp8_train",
            "triton_fp8_blockwise_train")
TRAIN_RECIPES = {"triton_fp8_train": "rowwise", "triton_fp8_blockwise_train": "blockwise"}
TINY_BLOCKS = "tiny-blocks"  # the CPU run's case for the blockwise backend alone (K, N = 128)
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
FP8_TRAIN_TOL = 0.1


@dataclass(frozen=True)
class Case(CaseId):
    name: str
    counts: tuple  # rows per expert
    k: int
    n: int
    pass_: str = "fwd"
    headline: bool = False
    dtype: torch.dtype = torch.bfloat16

    def flops(self) -> float:
        return (2.0 if self.pass_ == "fwd" else 6.0) * sum(self.counts) * self.k * self.n


def _skewed(experts: int, rows: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(experts, generator=g) ** 3  # a few hot experts, some near empty
    weights[torch.randperm(experts, generator=g)[:3]] = 0.0
    counts = torch.floor(weights / weights.sum() * rows).long()
    counts[int(weights.argmax())] += rows - int(counts.sum())
    return tuple(int(c) for c in counts)


def _routed(experts: int, rows: int, seed: int = 0) -> tuple:
    """Rows per expert as a trained router spreads them: near-uniform, +-20%."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 + 0.4 * (torch.rand(experts, generator=g) - 0.5)
    counts = torch.floor(weights / weights.sum() * rows).long()
    counts[0] += rows - int(counts.sum())
    return tuple(int(c) for c in counts)


def cases(device) -> list[Case]:
    if harness.sizes_mode(device) == "full":
        base = [Case("mixtral-8e-16k", (2048,) * 8, 4096, 14336, headline=True),
                # issue 14's goal shape: 64 routed experts, top-8 of 16k tokens, hidden 4096, expert ffn 1536
                Case("ds-64e-top8-16k", _routed(64, 16384 * 8), 4096, 1536),
                Case("dsv3-ep32-32k", _skewed(32, 32768), 7168, 2048)]
    else:
        base = [Case("tiny", (5, 0, 17, 9), 32, 48)]
    out = [Case(c.name, c.counts, c.k, c.n, pass_=p, headline=c.headline and p == "fwd")
           for c in base for p in ("fwd", "fwdbwd")]
    if harness.sizes_mode(device) != "full":  # the smallest shape the blockwise recipe takes (interpreter time)
        out.append(Case(TINY_BLOCKS, (0, 130, 3), 128, 128))
    return out


def _torch_grouped(device):
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        raise BackendUnavailable("this torch has no torch._grouped_mm")
    if torch.device(device).type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        raise BackendUnavailable("torch._grouped_mm runs bf16 on CUDA sm_90+ only")
    return fn


def prepare(case: Case, backend: str, device) -> Prepared:
    from tokenforge.ops import grouped_mm, grouped_mm_reference

    device = torch.device(device)
    if backend.startswith("triton") and harness.triton_needs_interpreter(device):
        raise BackendUnavailable("Triton on CPU tensors needs TRITON_INTERPRET=1")
    if case.name == TINY_BLOCKS and backend != "triton_fp8_blockwise_train":
        raise BackendUnavailable(f"{TINY_BLOCKS} is the blockwise backend's CPU case; this backend runs 'tiny'")
    if backend == "cuda":
        from tokenforge.cuda import grouped_mm as cuda_grouped_mm

        probe = torch.empty(16, 16, device=device, dtype=case.dtype)
        reason = cuda_grouped_mm.supports(probe, probe.view(1, 16, 16))
        if reason:
            raise BackendUnavailable(reason)
    if backend == "triton_fp8":
        return _prepare_fp8(case, device)
    g = torch.Generator().manual_seed(0)
    offs = torch.cumsum(torch.tensor(case.counts), 0).to(torch.int32).to(device)
    a = torch.randn(sum(case.counts), case.k, generator=g).to(device, case.dtype)
    b = (torch.randn(len(case.counts), case.k, case.n, generator=g) / case.k ** 0.5).to(device, case.dtype)
    if case.pass_ == "fwdbwd":
        a.requires_grad_()
        b.requires_grad_()
    if backend == "torch_grouped":
        tg = _torch_grouped(device)
        run = lambda: tg(a, b, offs=offs)  # noqa: E731
    elif backend == "torch_loop":
        run = lambda: grouped_mm_reference(a, b, offs)  # noqa: E731
    elif backend in TRAIN_RECIPES:
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise BackendUnavailable("FP8 tensor cores need sm_89+")
        recipe = TRAIN_RECIPES[backend]
        if recipe == "blockwise" and (case.k % 128 or case.n % 128):
            raise BackendUnavailable(f"recipe blockwise takes K and N multiples of 128, this case is {case.k} x {case.n}")
        from tokenforge.fp8 import grouped_mm_float8

        run = lambda: grouped_mm_float8(a, b, offs, check_offs=False, recipe=recipe, backend="triton")  # noqa: E731
    else:
        run = lambda: grouped_mm(a, b, offs, check_offs=False, backend=backend)  # noqa: E731
    grad = torch.randn(sum(case.counts), case.n, generator=g).to(device, case.dtype)

    def fn():
        out = run()
        if case.pass_ == "fwdbwd":
            a.grad = b.grad = None
            out.backward(grad)
        return out

    out = harness.first_call(fn, device)
    # Correctness: every expert's rows (and dB) against float64 on a sample of experts.
    errs = {}
    with torch.no_grad():
        ref = grouped_mm_reference(a.detach().double(), b.detach().double(), offs)
    errs["out"] = harness.rel_err(out.detach().double(), ref)
    if case.pass_ == "fwdbwd":
        a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        grouped_mm_reference(a64, b64, offs).backward(grad.double())
        errs["dA"] = harness.rel_err(a.grad.double(), a64.grad)
        live = [e for e, c in enumerate(case.counts) if c][:4]
        for e in live:
            errs[f"dB[{e}]"] = harness.rel_err(b.grad[e].double(), b64.grad[e])
    return Prepared(case, backend, device, fn, errs, FP8_TRAIN_TOL if backend in TRAIN_RECIPES else TOL[case.dtype])


def _prepare_fp8(case: Case, device) -> Prepared:
    from tokenforge import fp8
    from tokenforge.ops import grouped_mm_fp8, grouped_mm_fp8_reference

    if case.pass_ != "fwd":
        raise BackendUnavailable("grouped_mm_fp8 is the forward on pre-quantized operands; fwd+bwd in fp8 "
                                 "is triton_fp8_train")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise BackendUnavailable("FP8 tensor cores need sm_89+")
    g = torch.Generator().manual_seed(0)
    offs = torch.cumsum(torch.tensor(case.counts), 0).to(torch.int32).to(device)
    x = torch.randn(sum(case.counts), case.k, generator=g).to(device, torch.bfloat16)
    w = torch.randn(len(case.counts), case.k, case.n, generator=g).to(device, torch.bfloat16)
    quant = dict(backend="torch") if device.type != "cuda" else {}
    a, sa = fp8.quantize(x, scaling="rowwise", **quant)
    parts = [fp8.quantize(w[e], scaling="colwise", **quant) for e in range(len(case.counts))]
    b = torch.stack([d.t().contiguous() for d, _ in parts]).transpose(1, 2)  # (E, N, K) stored: K-major
    sb = torch.stack([s for _, s in parts])

    def fn():
        return grouped_mm_fp8(a, b, offs, sa, sb, check_offs=False)

    out = harness.first_call(fn, device)
    ref = grouped_mm_fp8_reference(a, b, offs, sa.double(), sb.double(), torch.float64)
    return Prepared(case, "triton_fp8", device, fn, {"out": harness.rel_err(out.double(), ref)}, TOL[torch.bfloat16])


def make_record(prep: Prepared, stats: dict) -> dict:
    case = prep.case
    return harness.make_record(prep, stats, op=OP, dims={"tokens": sum(case.counts), "experts": len(case.counts),
                                                         "K": case.k, "N": case.n},
                               flops=case.flops(), matmul_tflops=bw.matmul_tflops(prep.device))
