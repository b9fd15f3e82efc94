"""MoE routing kernel (tokenforge.kernels.moe_route behind tokenforge.ops.moe_route): the chosen
experts, weights and scores, and the gradient of the logits through both the weights and the scores,
against the op written out in float64, token by token, with a per-row bound as well as the
norm-wise one; softmax and sigmoid, selection bias, group-limited routing (DeepSeek-V3's 8 groups
keep 4), normalize on and off, scaling, expert counts that are not powers of two, token counts that
are not multiples of a block, bad input, and the compile gate."""

from __future__ import annotations

import pytest
import torch
from compile_gate import TARGETS, compile_kernel, jit_function, ptxas_report, spill_bytes
from device_params import DEVICES, HAS_CUDA

from tokenforge.ops import moe_route
from tokenforge.testing import TOLERANCE, assert_rel_close, rel_error

CASES = [  # tokens, experts, top_k, n_groups, topk_groups, score, bias, normalize, scaling
    (37, 16, 3, 1, 1, "softmax", False, False, 1.0),
    (37, 16, 3, 4, 2, "sigmoid", True, True, 2.5),
    (9, 256, 8, 8, 4, "sigmoid", True, True, 2.5),     # DeepSeek-V3's routing
    (130, 10, 4, 1, 1, "softmax", True, True, 1.0),    # 10 experts pad to 16; 130 tokens: a partial block
    (5, 6, 1, 3, 1, "softmax", False, True, 1.0),      # top-1 within the best of 3 groups
    (4, 8, 2, 8, 3, "sigmoid", False, False, 0.5),     # groups of one expert
]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _route64(logits64, k, score, bias, n_groups, topk_groups, normalize, scaling):
    """The op in float64, one token at a time: (weights, experts, scores), differentiable."""
    scores = torch.softmax(logits64, -1) if score == "softmax" else torch.sigmoid(logits64)
    per = logits64.shape[1] // n_groups
    weights, chosen = [], []
    for t in range(logits64.shape[0]):
        sel = scores[t].detach() + (bias.double() if bias is not None else 0)
        allowed = list(range(logits64.shape[1]))
        if n_groups > 1:
            top2 = [sorted(sel[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(n_groups)]
            best = sorted(range(n_groups), key=lambda g: (-sum(top2[g]), g))[:topk_groups]
            allowed = [i for i in allowed if i // per in best]
        experts = sorted(allowed, key=lambda i: (-float(sel[i]), i))[:k]
        w = scores[t, experts]
        if normalize:
            w = w / w.sum()
        weights.append(w * scaling)
        chosen.append(experts)
    return torch.stack(weights), torch.tensor(chosen), scores


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,experts,k,n_groups,topk_groups,score,with_bias,normalize,scaling", CASES)
def test_route_matches_float64(device, dtype, tokens, experts, k, n_groups, topk_groups, score, with_bias, normalize,
                               scaling):
    logits = (torch.randn(tokens, experts, device=device) * 2).to(dtype).requires_grad_()
    bias = (torch.randn(experts, device=device) * 0.3) if with_bias else None
    kw = dict(score=score, n_groups=n_groups, topk_groups=topk_groups, normalize=normalize, scaling=scaling)
    w, e, s = moe_route(logits, k, bias=bias, backend="triton", **kw)
    logits64 = logits.detach().double().cpu().requires_grad_()
    w64, e64, s64 = _route64(logits64, k, score, None if bias is None else bias.cpu(), n_groups, topk_groups,
                             normalize, scaling)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert w.dtype == compute and s.dtype == compute and e.dtype == torch.int64
    # The logits are the kernel's own (rounded) inputs, so the choice is the same unless two
    # selection scores tie to within float rounding: random logits make that vanishingly rare.
    assert torch.equal(e.cpu(), e64), "chosen experts (largest first) differ"
    tol = 1e-12 if dtype == torch.float64 else TOLERANCE[torch.float32]  # fp32 math whatever the logits
    assert_rel_close(w.detach(), w64.detach(), tol, "weights")
    assert_rel_close(s.detach(), s64.detach(), tol, "scores")
    dw, ds = torch.randn_like(w), torch.randn_like(s)
    (dl,) = torch.autograd.grad((w * dw).sum() + (s * ds).sum(), logits, retain_graph=True)
    (dl64,) = torch.autograd.grad((w64 * dw.double().cpu()).sum() + (s64 * ds.double().cpu()).sum(), logits64,
                                  retain_graph=True)
    grad_tol = 1e-12 if dtype == torch.float64 else TOLERANCE[dtype]
    assert dl.dtype == dtype
    assert_rel_close(dl, dl64, grad_tol, "d logits (weights and scores)")
    # The weights alone (the scores unused: no (T, E) gradient comes back for them).
    (dl_w,) = torch.autograd.grad((w * dw).sum(), logits)
    (dl64_w,) = torch.autograd.grad((w64 * dw.double().cpu()).sum(), logits64)
    if k == 1 and normalize:  # the one weight is s / s = 1: no gradient but rounding's (~1e-10 fp32, 1e-17 float64)
        assert dl_w.double().abs().max() < 1e-6 and dl64_w.abs().max() < 1e-12
    else:
        assert_rel_close(dl_w, dl64_w, grad_tol, "d logits (weights)")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_logits_and_torch_backend_agree(device):
    """Logits that are a column slice of a wider tensor; the kernel and the torch backend agree."""
    wide = torch.randn(21, 40, device=device, requires_grad=True)
    logits = wide[:, 3:35]
    a = moe_route(logits, 4, score="sigmoid", n_groups=4, topk_groups=2, backend="triton")
    b = moe_route(logits, 4, score="sigmoid", n_groups=4, topk_groups=2, backend="torch")
    assert torch.equal(a[1], b[1])
    assert rel_error(a[0], b[0]) <= 1e-5 and rel_error(a[2], b[2]) <= 1e-5
    ga = torch.autograd.grad(a[0].square().sum() + a[2].square().sum(), wide)[0]
    gb = torch.autograd.grad(b[0].square().sum() + b[2].square().sum(), wide)[0]
    assert rel_error(ga, gb) <= 1e-5


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("experts,k,n_groups,topk_groups,score", [(256, 8, 8, 4, "sigmoid"), (128, 8, 1, 1, "softmax"),
                                                                  (384, 8, 1, 1, "sigmoid")])
def test_cuda_real_sizes(experts, k, n_groups, topk_groups, score):
    """16k tokens at DeepSeek-V3 / Qwen3-MoE / Kimi K2 router sizes, bf16 logits, against the torch
    backend run on the same logits in float64 (same choice wherever no two scores tie)."""
    logits = torch.randn(16384, experts, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(experts, device="cuda") * 0.01
    kw = dict(score=score, bias=bias, n_groups=n_groups, topk_groups=topk_groups, normalize=True, scaling=2.5)
    w, e, s = moe_route(logits, k, backend="triton", **kw)
    logits64 = logits.detach().double().requires_grad_()
    w64, e64, s64 = moe_route(logits64, k, backend="torch", **kw)
    same = (e == e64).all(1)
    assert same.float().mean() > 0.999, "more than 0.1% of tokens chose other experts"
    assert_rel_close(w[same].detach(), w64[same].detach(), 1e-5, "weights")
    dw = torch.randn_like(w)
    (dl,) = torch.autograd.grad((w * dw).sum() + s.sum(), logits)
    (dl64,) = torch.autograd.grad((w64 * dw.double()).sum() + s64.sum(), logits64)
    assert_rel_close(dl[same], dl64[same], 1e-2, "d logits")


@pytest.mark.parametrize("call,words", [
    (lambda: moe_route(torch.randn(3, 8), 65, backend="triton"), "top_k must be an int in [1, experts=8]"),
    (lambda: moe_route(torch.randn(3, 80), 65, backend="triton"), "top_k 65 (max 64)"),
    (lambda: moe_route(torch.randn(2, 5000), 2, backend="triton"), "5000 experts > 4096"),
    (lambda: moe_route(torch.randn(3, 8).long(), 2, backend="triton"), "floating-point (tokens, experts)"),
])
def test_bad_input_gets_a_clear_error(call, words):
    from device_params import INTERPRETING

    if ("max 64" in words or "4096" in words) and not INTERPRETING:
        pytest.skip("the Triton backend's own limits: on CPU tensors it needs the interpreter")
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        call()
    assert words in str(info.value)


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", list(TARGETS))
def test_configs_compile_without_spills(arch):
    from tokenforge.kernels import moe_route as kernels

    types = {"LOGITS": "*bf16", "BIAS": "*fp32", "W": "*fp32", "IDX": "*i64", "SCORES": "*fp32", "DW": "*fp32",
             "DSCORES": "*fp32", "DLOGITS": "*bf16", "T": "i32", "E": "i32", "top_k": "i32", "group_size": "i32",
             "topk_groups": "i32", "scaling": "fp32", "stride_l": "i32", "stride_s": "i32", "stride_ds": "i32",
             "stride_dl": "i32"}
    for name, config in kernels.all_configs():
        config = dict(config)
        num_warps = config.pop("num_warps")
        kernel = getattr(kernels, name)
        names = jit_function(kernel).arg_names
        compiled = compile_kernel(kernel, {n: t for n, t in types.items() if n in names}, config, num_warps,
                                  TARGETS[arch], unaligned_args=("T", "E", "top_k", "group_size", "topk_groups",
                                                                 "scaling"))
        report = ptxas_report(compiled.asm["ptx"], arch)
        assert spill_bytes(report) == 0, f"{name} {config} spills on {arch}:\n{report}"


def test_custom_ops_pass_opcheck():
    from device_params import INTERPRETING

    if not INTERPRETING:
        pytest.skip("the custom ops wrap the kernel backend; it runs on CPU only under TRITON_INTERPRET=1")
    logits = torch.randn(7, 16, dtype=torch.bfloat16)
    bias = torch.randn(16)
    checks = ("test_schema", "test_faketensor")
    args = (logits, bias, 3, True, 4, 2, True, 2.5, "triton")
    torch.library.opcheck(torch.ops.tokenforge.moe_route_fwd, args, test_utils=checks)
    w, e, s = torch.ops.tokenforge.moe_route_fwd(*args)
    torch.library.opcheck(torch.ops.tokenforge.moe_route_bwd, (logits, torch.randn_like(w), e, torch.randn_like(s),
                                                               True, True, 2.5, "triton"), test_utils=checks)
    torch.library.opcheck(torch.ops.tokenforge.moe_route_bwd, (logits, torch.randn_like(w), e, None, False, False,
                                                               1.0, "triton"), test_utils=checks)
