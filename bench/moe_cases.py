"""MoE layer benchmark cases (issue 14's layer goal): one Hugging Face sparse-MoE block (Qwen3-MoE's:
softmax top-k router, SwiGLU experts stored as 3-D tensors), forward and forward+backward, run as

    hf_eager        transformers' Python loop over experts (experts_implementation "eager")
    hf_grouped      transformers' own grouped path (experts_implementation "grouped_mm"), where this
                    transformers has it and it runs here
    triton          the same block after ``tokenforge.patch``: the loop replaced by tokenforge's grouped
                    GEMMs (+ fused SwiGLU), the router untouched
    triton_fp8      ``tokenforge.patch(block, fp8="rowwise")``: the expert GEMMs in fp8 (all three)
    triton_fp8_blockwise  ``fp8="blockwise"``: the same on 1x128 / 128x128 / 128-token blocks (widths
                    multiples of 128: the GPU cases; the CPU's tiny block is too narrow)

Every backend computes the same function of the same weights. The oracle is that block in float64
with the routing the bf16 router chose (a near-tie top-k choice may flip between precisions; that
flip is not an error of the expert GEMMs): out, dx, the router's and the experts' weight gradients.
The fp8 backend is held to fp8's 20 dB floor (``FP8_TOL``). FLOPs: 6 x routed rows x hidden x
expert width forward (three projections), 3x that forward+backward; ``fraction_of_matmul`` is
against one dense bf16 matmul measured in the same run. Tiny on CPU. Never asserts a speed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

import bandwidth as bw
import harness
from harness import BackendUnavailable, CaseId, Prepared

OP = "moe_layer"
BACKENDS = ("hf_eager", "hf_grouped", "triton", "triton_fp8", "triton_fp8_blockwise")
FP8_RECIPES = {"triton_fp8": "rowwise", "triton_fp8_blockwise": "blockwise"}
BASELINES = ("hf_eager", "hf_grouped")
FP8_TOL = 0.1  # 20 dB; the bf16 backends get harness.tolerance (a layer is several bf16 roundings deep)


@dataclass(frozen=True)
class Case(CaseId):
    name: str
    tokens: int
    dim: int
    inter: int  # expert width
    experts: int
    top_k: int
    pass_: str = "fwdbwd"
    headline: bool = False
    dtype: torch.dtype = torch.bfloat16

    def flops(self) -> float:
        fwd = 6.0 * self.tokens * self.top_k * self.dim * self.inter
        return fwd if self.pass_ == "fwd" else 3 * fwd


def cases(device) -> list[Case]:
    if harness.sizes_mode(device) == "full":
        base = [Case("ds-64e-top8-16k", 16384, 4096, 1536, 64, 8, headline=True),  # the goal shape
                Case("mixtral-8e-top2-16k", 16384, 4096, 14336, 8, 2)]
    else:
        base = [Case("tiny", 24, 32, 32, 4, 2, headline=True)]
    return [Case(c.name, c.tokens, c.dim, c.inter, c.experts, c.top_k, pass_=p, headline=c.headline and p == "fwdbwd")
            for c in base for p in ("fwdbwd", "fwd")]


def _block(case: Case, device, implementation: str):
    transformers = harness.peer_import("transformers", "transformers", "pip install 'tokenforge[hf]'")
    config_cls = getattr(transformers, "Qwen3MoeConfig", None)
    try:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError as exc:
        raise BackendUnavailable(f"this transformers has no Qwen3-MoE block ({exc})") from exc
    if config_cls is None:
        raise BackendUnavailable("this transformers has no Qwen3MoeConfig")
    cfg = config_cls(hidden_size=case.dim, moe_intermediate_size=case.inter, num_experts=case.experts,
                     num_experts_per_tok=case.top_k, norm_topk_prob=True, hidden_act="silu")
    if implementation != "eager":
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        if implementation not in ALL_EXPERTS_FUNCTIONS:
            raise BackendUnavailable(f"this transformers has no experts_implementation {implementation!r}")
    cfg._experts_implementation = implementation
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(cfg)
    if not hasattr(block.experts, "gate_up_proj"):
        raise BackendUnavailable("this transformers' Qwen3-MoE experts are not 3-D tensors (transformers < 5)")
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, case.dim ** -0.5)
    return block.to(device=device, dtype=case.dtype)


def _oracle(block, x, dout):
    """(out, dx, d router weight, d gate_up_proj, d down_proj) in float64 with the routing the
    block's own (bf16) router chose."""
    with torch.no_grad():
        _, _, chosen = block.gate(x.reshape(-1, x.shape[-1]))
    b64 = copy.deepcopy(block).double()
    b64.experts.config._experts_implementation = "eager"
    experts = type(b64.experts).forward  # the class's: transformers' loop, not a patched instance forward
    x64 = x.detach().double().requires_grad_()
    h = x64.reshape(-1, x.shape[-1])
    probs = torch.softmax(h @ b64.gate.weight.t(), dim=-1)
    weights = probs.gather(1, chosen)
    weights = weights / weights.sum(-1, keepdim=True)
    out = experts(b64.experts, h, chosen, weights).reshape(x.shape)
    grads = torch.autograd.grad(out, (x64, b64.gate.weight, b64.experts.gate_up_proj, b64.experts.down_proj),
                                dout.double())
    return (out.detach(), *grads)


def prepare(case: Case, backend: str, device) -> Prepared:
    import tokenforge

    device = torch.device(device)
    if backend.startswith("triton") and harness.triton_needs_interpreter(device):
        raise BackendUnavailable("Triton on CPU tensors needs TRITON_INTERPRET=1")
    if backend in FP8_RECIPES and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise BackendUnavailable("FP8 tensor cores need sm_89+")
    if backend == "triton_fp8_blockwise" and (case.dim % 128 or case.inter % 128):
        raise BackendUnavailable(f"blockwise experts need widths multiples of 128, this case is {case.dim} x {case.inter}")
    if backend == "hf_grouped" and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9):
        raise BackendUnavailable("transformers' grouped_mm experts run torch._grouped_mm: bf16 on CUDA sm_90+ only")
    block = _block(case, device, "grouped_mm" if backend == "hf_grouped" else "eager")
    if backend.startswith("triton"):
        recipe = FP8_RECIPES.get(backend, False)
        report = tokenforge.patch(block, fp8=recipe, attention=False, rms_norm=False, rope=False, swiglu=False,
                                  cross_entropy=False)
        if not any(line.startswith("moe: ") for line in report.patched):
            raise BackendUnavailable(f"tokenforge.patch left the experts alone: {report.skipped}")
        if recipe and not any(f"grouped_mm_float8 ({recipe})" in line for line in report.patched):
            raise RuntimeError(f"tokenforge.patch did not put the experts in fp8 {recipe}: {report}")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, case.tokens, case.dim, generator=g).to(device, case.dtype)
    dout = torch.randn(1, case.tokens, case.dim, generator=g).to(device, case.dtype)
    if case.pass_ == "fwdbwd":
        x.requires_grad_()
    params = (block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj)

    def fn():
        out = block(x)
        if case.pass_ == "fwdbwd":
            x.grad = None
            for p in params:
                p.grad = None
            out.backward(dout)
        return out

    out = harness.first_call(fn, device)
    ref = _oracle(block, x.detach(), dout)
    errs = {"out": harness.rel_err(out.detach().double(), ref[0])}
    if case.pass_ == "fwdbwd":
        for name, got, want in zip(("dx", "d_router", "d_gate_up", "d_down"), (x.grad, *[p.grad for p in params]),
                                   ref[1:]):
            errs[name] = harness.rel_err(got.double(), want)
    return Prepared(case, backend, device, fn, errs, FP8_TOL if backend in FP8_RECIPES else harness.tolerance(case.dtype))


def make_record(prep: Prepared, stats: dict) -> dict:
    case = prep.case
    return harness.make_record(prep, stats, op=OP, dims={"tokens": case.tokens, "hidden": case.dim,
                                                         "expert_width": case.inter, "experts": case.experts,
                                                         "top_k": case.top_k},
                               flops=case.flops(), matmul_tflops=bw.matmul_tflops(prep.device))
