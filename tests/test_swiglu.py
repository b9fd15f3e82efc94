"""SwiGLU (separate and packed gate/up, and the packed clamped forms: DeepSeek-V4's clamped SwiGLU,
GPT-OSS's GLU, halves or interleaved): the Triton kernels against the float64 torch reference,
forward and both gradients; launchers with NaN-poisoned outputs; refusals; the compile gate;
torch.compile; the LLaMA MLP module."""

import pytest
from compile_gate import GATE_ARCHS
import torch
from device_params import DEVICES, HAS_CUDA, kernel_backends

from tokenforge import backends, kernels
from tokenforge.nn.swiglu import SwiGLU
from tokenforge.ops.swiglu import (ACTIVATIONS, geglu, gated_reference, gpt_oss_glu, gpt_oss_glu_reference, split_gate_up, swiglu,
                                   swiglu_packed, swiglu_packed_reference, swiglu_reference)
from tokenforge.testing import ROW_SLACK, TOLERANCE, PoisonEmpty, rel_error, row_errors

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 17), (17, 96), (129, 1000), (1, 4096), (3, 5, 33), (2, 1, 7, 9), (31,), ()]


def tolerance(t: torch.Tensor) -> float:
    """TOLERANCE, except bf16 under the interpreter: y and dgate are rounded twice, as eager rounds
    them (act(g), then the product; dy * up, then times act'(g)), and the interpreter truncates
    fp32 -> bf16 (up to one ulp, 2^-7, each time) where a GPU rounds to nearest (half an ulp)."""
    if t.dtype == torch.bfloat16 and t.device.type == "cpu":
        return 2 * 2.0 ** -7
    return TOLERANCE[t.dtype]


def _reference(gate, up, dy):
    """y, dgate, dup of the torch reference in float64 (the oracle)."""
    g = gate.detach().double().requires_grad_()
    u = up.detach().double().requires_grad_()
    y = swiglu_reference(g, u)
    y.backward(dy.double())
    return y, g.grad, u.grad


def check_swiglu(gate, up, backend, dy=None):
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    y = swiglu(gate, up, backend=backend)
    assert y.shape == gate.shape and y.dtype == gate.dtype
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)
    ref_y, ref_dg, ref_du = _reference(gate, up, dy)
    tol = tolerance(gate)
    for name, out, ref in (("y", y, ref_y), ("dgate", gate.grad, ref_dg), ("dup", up.grad, ref_du)):
        assert out.dtype == gate.dtype
        err = rel_error(out, ref)
        assert err <= tol, f"{name}: {err:.2e} > {tol:.0e} ({backend}, {tuple(gate.shape)}, {gate.dtype})"


def check_packed(gate_up, backend, dy=None):
    gate_up = gate_up.detach().requires_grad_()
    y = swiglu_packed(gate_up, backend=backend)
    hidden = gate_up.shape[-1] // 2
    assert y.shape == (*gate_up.shape[:-1], hidden) and y.dtype == gate_up.dtype
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)
    ref = gate_up.detach().double().requires_grad_()
    ref_y = swiglu_packed_reference(ref)
    ref_y.backward(dy.double())
    tol = tolerance(gate_up)
    assert gate_up.grad.shape == gate_up.shape and gate_up.grad.dtype == gate_up.dtype
    assert rel_error(y, ref_y) <= tol
    assert rel_error(gate_up.grad, ref.grad) <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_grid(device, dtype, shape):
    for backend in kernel_backends(device):
        if backend != "triton":
            continue  # SwiGLU has no CUDA C++ kernel
        check_swiglu(torch.randn(shape, device=device, dtype=dtype) * 3,
                     torch.randn(shape, device=device, dtype=dtype), backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2), (17, 2 * 48), (129, 2 * 500), (2, 3, 2 * 33)], ids=str)
def test_packed_grid(device, dtype, shape):
    check_packed(torch.randn(shape, device=device, dtype=dtype) * 3, "triton")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    # Transposed: the last dim is not the contiguous one (copied into rows).
    g, u = torch.randn(64, 40, device=device).t(), torch.randn(64, 40, device=device).t()
    check_swiglu(g, u, "triton")
    # Row-strided views read in place, with different row strides for gate and up.
    check_swiglu(torch.randn(33, 160, device=device)[:, :130], torch.randn(33, 200, device=device)[:, 50:180], "triton")
    # 3-D permuted, bf16, and an expanded (stride-0) upstream gradient.
    g = torch.randn(5, 2, 96, device=device, dtype=torch.bfloat16).permute(1, 0, 2)
    u = torch.randn(2, 5, 96, device=device, dtype=torch.bfloat16)
    check_swiglu(g, u, "triton", dy=torch.randn(96, device=device, dtype=torch.bfloat16).expand(2, 5, 96))
    # Packed: a column slice of a wider buffer (row stride > 2*hidden) and a transposed buffer.
    check_packed(torch.randn(19, 300, device=device)[:, 10:210], "triton")
    check_packed(torch.randn(2 * 24, 11, device=device, dtype=torch.float16).t(), "triton")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saturated_sigmoid(device, dtype):
    """|gate| up to 1e4: exp(-gate) overflows fp32 for very negative gate; silu must go to 0, not NaN."""
    g = torch.randn(7, 300, device=device) * torch.logspace(-4, 4, 300, device=device)
    g = g.to(dtype)
    check_swiglu(g, torch.randn(7, 300, device=device, dtype=dtype), "triton",
                 dy=torch.randn(7, 300, device=device, dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("multipliers", [(0.5, 3.0), (1.7, 1.0), (1.0, 0.25)], ids=str)
def test_multipliers(device, dtype, multipliers):
    """gate_multiplier / down_multiplier (Falcon-H1's mlp_multipliers, Liger-Kernel's SiLUMul
    arguments): silu(gate * gm) * up * dm against float64, output and both gradients (the chain
    rule's gm included), per row too, on every backend; (1, 1) is the plain call bit for bit."""
    gm, dm = multipliers
    gate = torch.randn(33, 257, device=device).to(dtype)
    up, dy = torch.randn(33, 257, device=device).to(dtype), torch.randn(33, 257, device=device).to(dtype)
    g, u = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = torch.nn.functional.silu(g * gm) * u * dm
    ref.backward(dy.double())
    tol = tolerance(gate) * 2  # the multiplied gate and the multiplied output are rounded once more each
    for backend in kernel_backends(device):
        if backend == "cuda":
            continue  # swiglu has no CUDA C++ kernel
        a, b = gate.detach().requires_grad_(), up.detach().requires_grad_()
        y = swiglu(a, b, gate_multiplier=gm, down_multiplier=dm, backend=backend)
        assert y.dtype == dtype and y.shape == gate.shape
        y.backward(dy)
        for name, out, expect in (("y", y, ref), ("dgate", a.grad, g.grad), ("dup", b.grad, u.grad)):
            where = f"{backend} {dtype} {multipliers} {name}"
            assert rel_error(out, expect) <= tol, where
            assert max(row_errors(out, expect)) <= ROW_SLACK * tol, where
    assert torch.equal(swiglu(gate, up, gate_multiplier=1.0, down_multiplier=1.0, backend="triton"),
                       swiglu(gate, up, backend="triton"))
    for bad in (float("nan"), True, "2", None):
        with pytest.raises(ValueError, match="gate_multiplier must be a finite number"):
            swiglu(gate, up, gate_multiplier=bad)


def check_geglu(gate, up, approximate, dy=None):
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    y = geglu(gate, up, approximate, backend="triton")
    assert y.shape == gate.shape and y.dtype == gate.dtype
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)
    g, u = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = torch.nn.functional.gelu(g, approximate=approximate) * u
    ref.backward(dy.double())
    tol = tolerance(gate)
    for name, out, expect in (("y", y, ref), ("dgate", gate.grad, g.grad), ("dup", up.grad, u.grad)):
        err = rel_error(out, expect)
        assert err <= tol, f"geglu {approximate} {name}: {err:.2e} > {tol:.0e} ({tuple(gate.shape)}, {gate.dtype})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 17), (129, 1000), (3, 5, 33)], ids=str)
def test_geglu_grid(device, approximate, dtype, shape):
    """GeGLU (Gemma's MLP) on the same kernels: forward and both gradients against float64 F.gelu."""
    check_geglu(torch.randn(shape, device=device, dtype=dtype) * 3, torch.randn(shape, device=device, dtype=dtype),
                approximate)


def _round_as_kernel(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 x rounded to dtype the way the kernel's conversion does on x's device: to nearest even
    on a GPU, by truncation for bf16 under Triton's interpreter."""
    if dtype == torch.bfloat16 and x.device.type == "cpu" and kernels.INTERPRETED:
        return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return x.float().to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rounds_where_eager_rounds(device, activation, dtype):
    """In bf16/fp16 the kernels round where eager ``act(gate) * up`` and its autograd round:
    y = rnd(rnd(act(g)) * up), dup = rnd(dy * rnd(act(g))), dgate = rnd(rnd(dy * up) * act'(g)); so a
    patched model's MLP is the unpatched one's bit for bit, but for the rare element where two fp32
    evaluations of act differ by an ulp across a rounding boundary (allowed: 1 in 500; measured at
    most 1 in 850, bf16 tanh-GELU under the interpreter, whose truncation puts the boundary on
    values act(g) ~ g meets for large g). Not in GELU's negative tail (act(g) / g < 1/16,
    g < ~-1.5): there 1 + tanh / 1 + erf cancel in
    fp32, in torch's own kernels as in ours (torch's fp32 GELU, rounded to bf16, differs from the
    float64 one in 7% of a randn * 3 sample, all of them in that tail), so those elements are held
    to the norm-wise bound only. Rounding once instead (the more accurate y = rnd(act(g) * up))
    differs in far more elements, which the last assertion checks: the test tells the two apart."""
    torch.manual_seed(0)
    g = (torch.randn(64, 1000, device=device) * 3).to(dtype)
    u, dy = torch.randn(64, 1000, device=device).to(dtype), torch.randn(64, 1000, device=device).to(dtype)
    gr, ur = g.clone().requires_grad_(), u.clone().requires_grad_()
    if activation == "silu":
        y = swiglu(gr, ur, backend="triton")
    else:
        y = geglu(gr, ur, approximate="tanh" if activation == "gelu_tanh" else "none", backend="triton")
    y.backward(dy)
    g64 = g.double().requires_grad_()
    act64 = ACTIVATIONS[activation](g64)
    (slope64,) = torch.autograd.grad(act64.sum(), g64)
    act = _round_as_kernel(act64.float(), dtype).float()
    expected = {
        "y": _round_as_kernel(act * u.float(), dtype),
        "dup": _round_as_kernel(dy.float() * act, dtype),
        "dgate": _round_as_kernel(_round_as_kernel(dy.float() * u.float(), dtype).float() * slope64.float(), dtype),
    }
    conditioned = act64.detach() / g64.detach() >= 2.0 ** -4
    for name, out in (("y", y), ("dup", ur.grad), ("dgate", gr.grad)):
        differ = (out != expected[name])[conditioned].float().mean().item()
        assert differ <= 2e-3, f"{name}: {differ:.2%} of elements differ from eager's roundings"
        assert rel_error(out, expected[name]) <= 2 * torch.finfo(dtype).eps
    once = _round_as_kernel(act64.float() * u.float(), dtype)
    assert (once != y).float().mean().item() > 0.02
    if device == "cuda":
        # On a GPU, against eager itself: with libdevice's functions every element, tail included.
        ge, ue = g.clone().requires_grad_(), u.clone().requires_grad_()
        ye = ACTIVATIONS[activation](ge) * ue
        ye.backward(dy)
        for name, out, ref in (("y", y, ye), ("dup", ur.grad, ue.grad), ("dgate", gr.grad, ge.grad)):
            differ = (out != ref).float().mean().item()
            assert differ <= 1e-3, f"{name}: {differ:.3%} of elements differ from eager PyTorch's"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_geglu_saturated_and_one_wrong_row(device, approximate):
    """|gate| up to 1e4 (tanh's exp overflows: the limits, not NaN); a row with a different scale."""
    g = torch.randn(7, 300, device=device) * torch.logspace(-4, 4, 300, device=device)
    g[3] *= 1e-3  # one row far smaller than the rest: the per-row bound judges it on its own scale
    check_geglu(g, torch.randn(7, 300, device=device), approximate)


def test_geglu_packed_torch_reference_and_refusals():
    gu = torch.randn(4, 2 * 24, dtype=torch.float64)
    gate, up = gu.chunk(2, -1)
    assert torch.equal(swiglu_packed_reference(gu, "gelu_tanh"), gated_reference(gate, up, "gelu_tanh"))
    assert torch.allclose(geglu(gate, up, backend="torch"), torch.nn.functional.gelu(gate, approximate="tanh") * up)
    with pytest.raises(ValueError, match="approximate must be 'tanh' or 'none'"):
        geglu(gate, up, "erf")
    with pytest.raises(ValueError, match="geglu: gate has shape"):
        geglu(gate, up[:, :3])


def test_packed_backward_makes_no_copies():
    """The packed gradient is written by the kernel into its two halves: no cat, copy or clone."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if not kernels.INTERPRETED and not HAS_CUDA:
        pytest.skip("no kernel backend on this machine")
    device = "cuda" if HAS_CUDA else "cpu"

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    gate_up = torch.randn(6, 2 * 40, device=device, requires_grad=True)
    with Log() as log:
        y = swiglu_packed(gate_up, backend="triton")
        (dgu,) = torch.autograd.grad(y, gate_up, torch.randn_like(y))
    copies = [op for op in log.ops if any(k in op for k in ("cat", "copy", "clone", "contiguous", "stack"))]
    assert not copies, log.ops
    assert any("swiglu_packed_bwd" in op for op in log.ops), log.ops
    assert dgu.shape == gate_up.shape and dgu.is_contiguous()


# ---------------------------------------------------------------------------------------------
# Clamped forms (MoE experts' gates): swiglu_packed(limit=), gpt_oss_glu, halves or interleaved
# ---------------------------------------------------------------------------------------------

LIMIT, ALPHA = 7.0, 1.702  # GPT-OSS's swiglu_limit and alpha


def _clamped_op(form):
    """(op(gate_up, backend), float64 reference(gate_up)) of a clamped form."""
    name, interleaved = form
    if name == "gpt_oss":
        return (lambda gu, backend: gpt_oss_glu(gu, alpha=ALPHA, limit=LIMIT, interleaved=interleaved, backend=backend),
                lambda gu: gpt_oss_glu_reference(gu, ALPHA, LIMIT, interleaved))
    return (lambda gu, backend: swiglu_packed(gu, limit=LIMIT, interleaved=interleaved, backend=backend),
            lambda gu: swiglu_packed_reference(gu, limit=LIMIT, interleaved=interleaved))


CLAMPED_FORMS = [("silu", False), ("silu", True), ("gpt_oss", False), ("gpt_oss", True)]


def unit_roundoff(t: torch.Tensor) -> float:
    """The relative error of one rounding to t's dtype as the kernel rounds on t's device (bf16 under
    the interpreter truncates: a whole ulp); fp32's floored at 2^-22 for the exp / divide of sigmoid."""
    if t.dtype == torch.float32:
        return 2.0 ** -22
    bits = 7 if t.dtype == torch.bfloat16 else 10
    return 2.0 ** -bits if (t.dtype == torch.bfloat16 and t.device.type == "cpu") else 2.0 ** -(bits + 1)


def check_gpt_oss_glu(y, dgate_up, gate_up, dy, interleaved):
    """GPT-OSS's gate rounds like its eager code (gc * alpha, the sigmoid, gc * s, up + 1 and the
    product forward; five roundings back), so against float64 an element's error is bounded by
    first-order error propagation, not by a flat relative tolerance: rounding alpha * g (|ga| up to
    ~20) moves sigmoid by |ga| (1 - s) of its relative error, and the gradient's two paths into gate,
    rounded apart, cancel near g ~ -1 (a result far below its terms). Per element, with u the unit
    roundoff and 4x slack: |dy| <= 4u (5 + a) |y|, a = |ga| (1 - s); dup likewise of dy * glu;
    dgate <= 4u ((6 + a)(|T1| + |T2|) + |dglu| |ga| s) with T1 = dglu s, T2 = dglu g alpha s (1 - s)
    (the last term: 1 - s of a rounded s); plus, for fp16, an absolute floor of a few subnormal ulps
    carried through the products (sigmoid of a very negative g is subnormal there: no relative
    precision left). Clamped elements' gradients exactly 0. So a wrong element, or row, fails on its
    own scale at every size, the 1-element one too."""
    u = unit_roundoff(gate_up)
    info = torch.finfo(gate_up.dtype)
    subnormal_ulp = info.tiny * info.eps
    g, up = (t.double() for t in split_gate_up(gate_up.detach(), interleaved))
    gc, uc = g.clamp(max=LIMIT), up.clamp(-LIMIT, LIMIT)
    ga = ALPHA * gc
    s = torch.sigmoid(ga)
    a = ga.abs() * (1 - s)
    glu, d = gc * s, dy.double()
    y64 = (uc + 1) * glu
    dglu = d * (uc + 1)
    t1, t2 = dglu * s, dglu * gc * ALPHA * s * (1 - s)
    dgate64 = torch.where(g <= LIMIT, t1 + t2, 0.0)
    dup64 = torch.where(up.abs() <= LIMIT, d * glu, 0.0)
    floor = 8 * subnormal_ulp * (1 + ga.abs()) * (2 + uc.abs()) * (1 + d.abs())
    bounds = {
        "y": (y, y64, 4 * u * (5 + a) * y64.abs() + floor),
        "dgate": (split_gate_up(dgate_up, interleaved)[0], dgate64,
                  4 * u * ((6 + a) * (t1.abs() + t2.abs()) + dglu.abs() * ga.abs() * s) + floor),
        "dup": (split_gate_up(dgate_up, interleaved)[1], dup64, 4 * u * (5 + a) * dup64.abs() + floor),
    }
    for name, (out, ref, bound) in bounds.items():
        err = (out.double() - ref).abs()
        worst = (err - bound).max().item() if err.numel() else 0.0
        assert worst <= 0.0, f"{name}: an element {worst:.3g} past its bound ({gate_up.dtype}, {tuple(gate_up.shape)})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", CLAMPED_FORMS, ids=lambda f: f"{f[0]}-{'interleaved' if f[1] else 'halves'}")
@pytest.mark.parametrize("shape", [(1, 2), (17, 2 * 48), (129, 2 * 500), (2, 3, 2 * 33)], ids=str)
def test_clamped_forms_match_float64(device, dtype, form, shape):
    """Inputs of scale 6 against limit 7: a quarter of the elements clamped, on each side. Forward
    and the packed gradient against the float64 reference (norm-wise and per row; GPT-OSS's per
    element, check_gpt_oss_glu), and the gradient exactly 0 where the input was clamped (torch's
    clamp backward), nonzero elsewhere."""
    op, reference = _clamped_op(form)
    gu = (torch.randn(shape, device=device) * 6).to(dtype).requires_grad_()
    y = op(gu, None)
    assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    if form[0] == "gpt_oss":
        check_gpt_oss_glu(y, gu.grad, gu, dy, form[1])
    else:
        ref = gu.detach().double().requires_grad_()
        ref_y = reference(ref)
        ref_y.backward(dy.double())
        assert rel_error(y, ref_y) <= tolerance(gu)
        assert rel_error(gu.grad, ref.grad) <= tolerance(gu)
    gate, up = split_gate_up(gu.detach(), form[1])
    dgate, dup = split_gate_up(gu.grad, form[1])
    assert (dgate[gate > LIMIT] == 0).all() and (dup[up.abs() > LIMIT] == 0).all()
    inside = up.abs() < LIMIT
    if inside.sum() >= 32:  # not the 1-element shape, whose one up may be clamped
        assert (dup[inside] != 0).float().mean() > 0.9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", CLAMPED_FORMS, ids=lambda f: f"{f[0]}-{'interleaved' if f[1] else 'halves'}")
def test_clamped_forms_one_wrong_row_and_nan(device, form):
    """A row 1e-3 times the others' scale is judged on its own (the per-row bound); NaN stays NaN
    (torch.clamp keeps it) and its neighbours are unharmed."""
    op, reference = _clamped_op(form)
    gu = torch.randn(9, 2 * 70, device=device) * 6
    gu[4] *= 1e-3
    gu[7, 3] = float("nan")
    y = op(gu, "triton" if kernels.INTERPRETED or device == "cuda" else None)
    ref = reference(gu.double())
    assert torch.isnan(y[7]).sum() == 1 and torch.isnan(ref[7]).sum() == 1
    keep = torch.ones(9, dtype=torch.bool)
    keep[7] = False
    assert rel_error(y[keep], ref[keep]) <= TOLERANCE[torch.float32]
    assert (row_errors(y[keep], ref[keep]) <= TOLERANCE[torch.float32] * ROW_SLACK).all()


def _round_each(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _round_as_kernel(x, dtype).float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_gpt_oss_glu_rounds_where_eager_rounds(device, interleaved):
    """bf16: the kernel rounds after each of GPT-OSS's eager operations (gc * alpha, sigmoid, gc * s,
    up + 1, the product) and each autograd step back, so a patched GPT-OSS's expert activations are
    the unpatched ones: against that chain of roundings in fp32 (as the kernel's conversion rounds on
    this device), at most 1 in 500 elements differ (an fp32 exp an ulp apart across a rounding
    boundary); rounding only the output differs in far more. On a GPU, against eager itself."""
    torch.manual_seed(0)
    dtype = torch.bfloat16
    gu = (torch.randn(64, 2 * 500, device=device) * 4).to(dtype)
    dy = torch.randn(64, 500, device=device).to(dtype)
    leaf = gu.clone().requires_grad_()
    y = gpt_oss_glu(leaf, alpha=ALPHA, limit=LIMIT, interleaved=interleaved, backend="triton")
    y.backward(dy)
    gate, up = (t.float() for t in split_gate_up(gu, interleaved))
    gc, uc = gate.clamp(max=LIMIT), up.clamp(-LIMIT, LIMIT)
    s = _round_each(torch.sigmoid(_round_each(gc * ALPHA, dtype)), dtype)
    glu, up1 = _round_each(gc * s, dtype), _round_each(uc + 1, dtype)
    d = dy.float()
    dglu = _round_each(d * up1, dtype)
    dga = _round_each(_round_each(dglu * gc, dtype) * (1 - s) * s, dtype)
    dgate = _round_each(_round_each(dglu * s, dtype) + _round_each(dga * ALPHA, dtype), dtype) * (gate <= LIMIT)
    dup = _round_each(d * glu, dtype) * (up.abs() <= LIMIT)
    expected = {"y": _round_each(up1 * glu, dtype), "dgate": dgate, "dup": dup}
    got_dgate, got_dup = split_gate_up(leaf.grad, interleaved)
    for name, out in (("y", y), ("dgate", got_dgate), ("dup", got_dup)):
        differ = (out.float() != expected[name]).float().mean().item()
        assert differ <= 2e-3, f"{name}: {differ:.2%} of elements differ from eager's roundings"
    once = gpt_oss_glu_reference(gu.double(), ALPHA, LIMIT, interleaved).float().to(dtype)
    assert (once != y).float().mean().item() > 0.02
    if device == "cuda":
        ref_leaf = gu.clone().requires_grad_()
        ref_y = gpt_oss_glu_reference(ref_leaf, ALPHA, LIMIT, interleaved)
        ref_y.backward(dy)
        for name, out, ref in (("y", y, ref_y), ("dgate_up", leaf.grad, ref_leaf.grad)):
            differ = (out != ref).float().mean().item()
            assert differ <= 1e-3, f"{name}: {differ:.3%} of elements differ from eager PyTorch's"


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda gu: swiglu_packed(gu, limit=0.0), "swiglu_packed: limit must be a finite positive number"),
        (lambda gu: swiglu_packed(gu, limit=float("inf")), "limit must be a finite positive"),
        (lambda gu: gpt_oss_glu(gu, limit=-1.0), "gpt_oss_glu: limit must be a finite positive"),
        (lambda gu: gpt_oss_glu(gu, alpha=float("nan")), "gpt_oss_glu: alpha must be a finite number"),
        (lambda gu: gpt_oss_glu(gu, alpha=True), "alpha must be a finite number"),
        (lambda gu: gpt_oss_glu(gu[:, :7]), "gpt_oss_glu: the last dim of gate_up .* must be even"),
    ],
)
def test_clamped_forms_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(3, 8))


def test_clamped_forms_empty_and_float64_on_torch():
    assert gpt_oss_glu(torch.randn(0, 8)).shape == (0, 4)
    gu = torch.randn(5, 12, dtype=torch.float64) * 6
    gate, up = gu[:, 0::2].clamp(max=LIMIT), gu[:, 1::2].clamp(-LIMIT, LIMIT)
    assert torch.equal(gpt_oss_glu(gu), (up + 1) * (gate * torch.sigmoid(gate * ALPHA)))
    gate, up = gu[:, :6].clamp(max=3.0), gu[:, 6:].clamp(-3.0, 3.0)
    assert torch.equal(swiglu_packed(gu, limit=3.0), torch.nn.functional.silu(gate) * up)


# ---------------------------------------------------------------------------------------------
# Launchers called directly with NaN-poisoned allocations: every output element must be written.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,n", [(1, 1), (5, 17), (129, 1000), (3, 2500)])
def test_launchers_write_every_output(device, rows, n):
    from tokenforge.kernels import swiglu as launcher

    g = torch.randn(rows, n, device=device, dtype=torch.bfloat16)
    u = torch.randn(rows, n, device=device, dtype=torch.bfloat16)
    dy = torch.randn(rows, n, device=device, dtype=torch.bfloat16)
    with PoisonEmpty():
        y = launcher.swiglu_forward(g, u)
        dg, du = torch.empty_like(g), torch.empty_like(u)
        launcher.swiglu_backward(dy, g, u, dg, du)
        # Packed: both halves of one poisoned buffer.
        packed = torch.empty(rows, 2 * n, device=device, dtype=torch.bfloat16)
        launcher.swiglu_backward(dy, g, u, packed[:, :n], packed[:, n:])
    ref_y, ref_dg, ref_du = _reference(g, u, dy)
    for out, ref in ((y, ref_y), (dg, ref_dg), (du, ref_du), (packed, torch.cat([ref_dg, ref_du], 1))):
        assert rel_error(out, ref) <= tolerance(g)
    # Interleaved: the even and odd columns of one poisoned buffer, in and out (GPT-OSS's gate).
    gu = torch.stack([g, u], -1).reshape(rows, 2 * n) * 6
    with PoisonEmpty():
        y = launcher.swiglu_forward(gu[:, 0::2], gu[:, 1::2], activation="gpt_oss", limit=LIMIT, alpha=ALPHA)
        dgu = torch.empty(rows, 2 * n, device=device, dtype=torch.bfloat16)
        launcher.swiglu_backward(dy, gu[:, 0::2], gu[:, 1::2], dgu[:, 0::2], dgu[:, 1::2], activation="gpt_oss",
                                 limit=LIMIT, alpha=ALPHA)
    check_gpt_oss_glu(y, dgu, gu, dy, True)


# ---------------------------------------------------------------------------------------------
# CUDA at real sizes (skipped without a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("rows,n", [(16384, 14336), (4096, 11008), (3, 100003)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_real_sizes(rows, n, dtype):
    check_swiglu(torch.randn(rows, n, device="cuda", dtype=dtype), torch.randn(rows, n, device="cuda", dtype=dtype), "triton")
    check_packed(torch.randn(rows // 2 + 1, 2 * n, device="cuda", dtype=dtype), "triton")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_cuda_auto_picks_triton():
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    assert backends.choose("swiglu", x, x) == "triton"
    assert backends.choose("swiglu_packed", x) == "triton"


# ---------------------------------------------------------------------------------------------
# Dispatch and refusals
# ---------------------------------------------------------------------------------------------


def test_cpu_backend_choice_and_float64(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    x = torch.randn(2, 8)
    expected = "triton" if kernels.INTERPRETED else "torch"
    assert backends.choose("swiglu", x, x) == expected
    assert backends.choose("swiglu_packed", x) == expected
    g, u = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert backends.choose("swiglu", g, u) == "torch"
    assert torch.equal(swiglu(g, u), torch.nn.functional.silu(g) * u)
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        swiglu(g, u, backend="triton")
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        swiglu_packed(g, backend="triton")


@pytest.mark.parametrize(
    "make_args,exc,match",
    [
        (lambda: (torch.randint(0, 5, (3, 8)), torch.randn(3, 8)), TypeError, "gate must be a floating-point.*gate.float"),
        (lambda: (torch.randn(3, 8), torch.ones(3, 8, dtype=torch.int32)), TypeError, "up must be a floating-point"),
        (lambda: (torch.randn(3, 8), torch.randn(3, 7)), ValueError, r"shape \(3, 8\) but up has shape \(3, 7\).*swiglu_packed"),
        (lambda: (torch.randn(3, 8), torch.randn(8)), ValueError, "must match"),
        (lambda: (torch.randn(3, 8), torch.randn(3, 8, dtype=torch.float16)), TypeError, r"up.to\(gate.dtype\)"),
        (lambda: (torch.randn(3, 8), torch.randn(3, 8, device="meta")), ValueError, "same device"),
        (lambda: ([1.0], torch.randn(1)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(make_args, exc, match):
    gate, up = make_args()
    with pytest.raises(exc, match=match):
        swiglu(gate, up)


@pytest.mark.parametrize(
    "gate_up,exc,match",
    [
        (torch.randint(0, 5, (3, 8)), TypeError, "floating-point"),
        (torch.randn(3, 7), ValueError, "must be even"),
        (torch.tensor(1.0), ValueError, "at least one dimension"),
    ],
)
def test_packed_bad_inputs(gate_up, exc, match):
    with pytest.raises(exc, match=match):
        swiglu_packed(gate_up)


def test_empty():
    g = torch.randn(0, 16, requires_grad=True)
    y = swiglu(g, torch.randn(0, 16))
    assert y.shape == (0, 16)
    y.sum().backward()
    assert g.grad.shape == (0, 16)
    assert swiglu_packed(torch.randn(4, 0)).shape == (4, 0)


# ---------------------------------------------------------------------------------------------
# nn.SwiGLU: a LLaMA MLP whose state_dict maps onto Hugging Face's LlamaMLP
# ---------------------------------------------------------------------------------------------


def test_module_matches_reference_mlp():
    backend = "triton" if kernels.INTERPRETED else None
    mlp = SwiGLU(48, 136, backend=backend)
    assert list(mlp.state_dict()) == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    x = torch.randn(2, 5, 48, requires_grad=True)
    out = mlp(x)
    ref = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert out.shape == (2, 5, 48)
    assert rel_error(out, ref) < 1e-5
    (dx,) = torch.autograd.grad(out.sum(), x)
    (ref_dx,) = torch.autograd.grad(ref.sum(), x)
    assert rel_error(dx, ref_dx) < 1e-5
    with_bias = SwiGLU(8, 16, bias=True)
    assert "gate_proj.bias" in with_bias.state_dict()
    assert repr(mlp).startswith("SwiGLU(") and "dim=48, hidden_dim=136" in repr(mlp)


def test_module_loads_hf_llama_mlp():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=88, hidden_act="silu")
    theirs = LlamaMLP(cfg)
    ours = SwiGLU(32, 88)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 32)
    assert rel_error(ours(x), theirs(x)) < 1e-5


# ---------------------------------------------------------------------------------------------
# torch.compile: custom ops with fake implementations, zero graph breaks
# ---------------------------------------------------------------------------------------------


def test_custom_ops_opcheck():
    if not kernels.INTERPRETED:
        pytest.skip("the custom ops wrap kernel backends; none runs on CPU without TRITON_INTERPRET=1")
    g, u, dy = torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 16)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.tokenforge.swiglu_fwd, (g, u, "triton"), test_utils=utils)
    torch.library.opcheck(torch.ops.tokenforge.swiglu_bwd, (dy, g, u, "triton"), test_utils=utils)
    torch.library.opcheck(torch.ops.tokenforge.swiglu_packed_fwd, (torch.randn(4, 32), "triton"), test_utils=utils)
    torch.library.opcheck(torch.ops.tokenforge.swiglu_packed_bwd, (dy, torch.randn(4, 32), "triton"), test_utils=utils)
    form = ("gpt_oss", LIMIT, ALPHA, True)
    torch.library.opcheck(torch.ops.tokenforge.swiglu_packed_fwd, (torch.randn(4, 32) * 6, "triton", *form),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.tokenforge.swiglu_packed_bwd, (dy, torch.randn(4, 32) * 6, "triton", *form),
                          test_utils=utils)


def test_fullgraph_compile_no_graph_breaks():
    torch._dynamo.reset()
    backend = "triton" if kernels.INTERPRETED else None

    def f(x, gu):
        return swiglu(x, x * 2, backend=backend).sum(-1, keepdim=True) + swiglu_packed(gu, backend=backend)

    x = torch.randn(3, 5, 16, requires_grad=True)
    gu = torch.randn(3, 5, 32, requires_grad=True)
    explanation = torch._dynamo.explain(f)(x, gu)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    eager = f(x, gu)
    eager_grads = torch.autograd.grad(eager.sum(), (x, gu))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, gu)
    grads = torch.autograd.grad(out.sum(), (x, gu))
    assert rel_error(out, eager) < 1e-6
    for g, ref in zip(grads, eager_grads):
        assert rel_error(g, ref) < 1e-6


# ---------------------------------------------------------------------------------------------
# Compile gate: every config the launchers can pick compiles for sm_90 / sm_80 without spills
# ---------------------------------------------------------------------------------------------


def _compile(name, config, dtype, arch, aligned=True):
    from compile_gate import TARGETS, TRITON_DTYPE, compile_kernel, emission_gate_types

    from tokenforge.kernels import swiglu as swiglu_kernels

    t = "*" + TRITON_DTYPE[dtype]
    types = {k: t for k in ("G", "U", "Y", "DY", "DG", "DU")}
    types.update({k: "i32" for k in ("rows", "n", "stride_g", "stride_u", "stride_y", "stride_dy", "stride_dg", "stride_du",
                                     "stride_scale")})
    types.update(limit="fp32", alpha="fp32")
    config = dict({"CLAMP": False, "COL_STRIDE": 1}, **config)  # the launchers' defaults where a config names none
    types.update(emission_gate_types(config, arch, getattr(swiglu_kernels, name)))
    num_warps = config.pop("num_warps")
    return compile_kernel(getattr(swiglu_kernels, name), types, config, num_warps, TARGETS[arch],
                          aligned=aligned, unaligned_args=("rows",))


def _all_configs():
    from tokenforge.kernels import swiglu as swiglu_kernels

    return swiglu_kernels.all_configs()


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", GATE_ARCHS)
@pytest.mark.parametrize("name,config", _all_configs(),
                         ids=[f"{n}-{c['ACTIVATION']}{'-clamp-cs%d' % c['COL_STRIDE'] if c.get('CLAMP') else ''}"
                              f"-{c['BLOCK_M']}x{c['BLOCK_N']}w{c['num_warps']}{'-fp8g%d' % c['GROUP'] if c.get('EMIT_FP8') else ''}"
                              for n, c in _all_configs()])
def test_configs_compile_without_spills(arch, name, config):
    from compile_gate import ptxas_report, spill_bytes

    compiled = _compile(name, config, "bfloat16", arch)
    report = ptxas_report(compiled.asm["ptx"], arch)
    assert spill_bytes(report) == 0, f"{name} {config} spills on {arch}:\n{report}"


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", GATE_ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dtypes_compile(arch, dtype):
    """Every dtype at the headline width, aligned (vectorised) and unaligned (odd hidden sizes)."""
    import re

    from tokenforge.kernels import swiglu as swiglu_kernels

    for name in ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"):
        for aligned in (True, False):
            compiled = _compile(name, dict(swiglu_kernels.tile_config(14336), ACTIVATION="silu", LIBDEVICE=True), dtype,
                                arch, aligned)
            assert len(compiled.asm["cubin"]) > 0
            if aligned and dtype == "bfloat16":
                assert re.search(r"ld\.global(\.\w+)*\.v4", compiled.asm["ptx"]), "expected 128-bit loads"


def test_every_width_maps_to_a_gated_config():
    from tokenforge.kernels import swiglu as swiglu_kernels

    gated = {(n, tuple(sorted(c.items()))) for n, c in _all_configs()}
    for n in [1, 2, 15, 16, 17, 100, 1000, 1024, 1025, 4096, 14336, 100003]:
        cfg = tuple(sorted(dict(swiglu_kernels.tile_config(n), ACTIVATION="gelu_tanh", LIBDEVICE=True).items()))
        assert ("_swiglu_fwd_kernel", cfg) in gated and ("_swiglu_bwd_kernel", cfg) in gated, n
        for (activation, clamp), col_stride in ((f, c) for f in swiglu_kernels.CLAMPED_FORMS for c in (1, 2)):
            cfg = tuple(sorted(dict(swiglu_kernels.tile_config(n), ACTIVATION=activation, LIBDEVICE=True, CLAMP=clamp,
                                    COL_STRIDE=col_stride).items()))
            assert ("_swiglu_fwd_kernel", cfg) in gated and ("_swiglu_bwd_kernel", cfg) in gated, (n, activation)
