"""Residual add + RMSNorm: the Triton kernels against the float64 torch reference, both outputs and
all three gradients (x, residual, weight, with gradient arriving through both outputs); the
rounding of h; launchers with NaN-poisoned outputs; refusals; the compile gate; torch.compile."""

import pytest
from compile_gate import GATE_ARCHS
import torch
from device_params import DEVICES, HAS_CUDA

from tokenforge import backends, kernels
from tokenforge.nn.add_rms_norm import AddRMSNorm
from tokenforge.ops.add_rms_norm import add_rms_norm, add_rms_norm_reference
from tokenforge.ops.rms_norm import rms_norm_reference
from tokenforge.testing import TOLERANCE, PoisonEmpty, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tolerance(*tensors):
    """The tolerance of the least precise operand."""
    return max(TOLERANCE[t.dtype] for t in tensors if t is not None)


def _errors(x, r, w, dy, dh, eps, y, h, dx, dr, dw, offset=0.0):
    """Relative errors of y, h, dx, dresidual, dw against float64 autograd of the reference.

    As in tests/test_rms_norm.py: the norm's dx subtracts two terms of size |rstd * g| that nearly
    cancel on short rows, so the gradients' error is measured against the size of those terms plus
    dh (what the exact gradient is made of); dw, a sum of random-signed terms, also against the
    root of its summed squares."""
    xd, rd = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_() if w is not None else None
    ref_y, ref_h = add_rms_norm_reference(xd, rd, wd, eps, offset)
    grads = torch.autograd.grad((ref_y, ref_h), [t for t in (xd, rd, wd) if t is not None],
                                (dy.double(), dh.double() if dh is not None else torch.zeros_like(ref_h)))
    hd = ref_h.detach()
    rstd = torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps)
    g = dy.double() * (wd.detach() + offset if w is not None else 1.0)
    scale = (g * rstd).norm().item() + (dh.double().norm().item() if dh is not None else 0.0)
    errs = {"y": rel_error(y, ref_y), "h": rel_error(h, ref_h)}
    for name, out, ref in (("dx", dx, grads[0]), ("dresidual", dr, grads[1])):
        errs[name] = (out.double() - ref).norm().item() / scale if torch.isfinite(out).all() else float("inf")
    if w is not None:
        assert dw is not None and dw.dtype == w.dtype
        typical = (dy.double() * hd * rstd).reshape(-1, x.shape[-1]).pow(2).sum(0).sqrt().norm().item()
        diff = (dw.double() - grads[2]).norm().item()
        errs["dw"] = diff / max(grads[2].norm().item(), typical, 1e-300) if torch.isfinite(dw).all() else float("inf")
    return errs


def check(x, r, w, eps=1e-6, dy=None, dh="random", backend="triton", offset=0.0):
    x, r = x.detach().requires_grad_(), r.detach().requires_grad_()
    if w is not None:
        w = w.detach().requires_grad_()
    y, h = add_rms_norm(x, r, w, eps, offset=offset, backend=backend)
    assert y.shape == h.shape == x.shape and y.dtype == x.dtype and h.dtype == r.dtype
    dy = torch.randn_like(y) if dy is None else dy
    dh = torch.randn_like(h) if isinstance(dh, str) else dh
    if dh is None:
        y.backward(dy)  # h unused downstream: only the norm's gradient flows back
    else:
        torch.autograd.backward((y, h), (dy, dh))
    assert x.grad.dtype == x.dtype and r.grad.dtype == r.dtype
    errs = _errors(x, r, w, dy, dh, eps, y, h, x.grad, r.grad, w.grad if w is not None else None, offset)
    tol = _tolerance(x, r, w)
    for name, err in errs.items():
        assert err <= tol, f"{name}: {err:.2e} > {tol:.0e} ({tuple(x.shape)}, {x.dtype}, {r.dtype})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 17, 129])
@pytest.mark.parametrize("n", [64, 96, 1000, 4096])
def test_grid(device, dtype, rows, n):
    t = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    check(t(rows, n), t(rows, n), t(n))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", [(3, 8192), (2, 9000), (2, 20000)])
def test_long_rows(device, dtype, rows, n):
    """Past the register-resident limits: the chunked kernels."""
    t = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    check(t(rows, n), t(rows, n), t(n))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,r_dtype,w_dtype", [
    (torch.bfloat16, torch.bfloat16, torch.float32), (torch.float16, torch.float16, torch.float32),
    (torch.float32, torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float16)], ids=str)
@pytest.mark.parametrize("n", [300, 9000])
def test_mixed_dtypes(device, x_dtype, r_dtype, w_dtype, n):
    """fp32 weights beside bf16 activations, and an fp32 residual stream beside bf16 sublayers."""
    check(torch.randn(5, n, device=device, dtype=x_dtype), torch.randn(5, n, device=device, dtype=r_dtype),
          torch.randn(n, device=device, dtype=w_dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("n", [300, 9000])
def test_offset_is_gemmas_norm(device, x_dtype, w_dtype, n):
    """offset=1 (Gemma's residual stream): y = x_hat * (1 + w) in fp32, against float64 with rows of
    very different scales (each row's error is bounded on its own by the norm-wise check of a row
    scaled 1e-3 next to one scaled 1e3), weights near 0 as Gemma initialises them."""
    scales = torch.logspace(-3, 3, 7, device=device)[:, None]
    x = (torch.randn(7, n, device=device) * scales).to(x_dtype)
    r = (torch.randn(7, n, device=device) * scales).to(x_dtype)
    w = (torch.randn(n, device=device) * 0.1).to(w_dtype)
    for row in range(7):  # one row at a time: a wrong row cannot hide behind the others' norm
        check(x[row:row + 1], r[row:row + 1], w, offset=1.0)
    check(x, r, w, offset=1.0)


@pytest.mark.parametrize("casting_mode", ["gemma", "llama", "none"])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_casting_modes(casting_mode, weight_dtype, offset):
    """rms_norm's casting modes on the residual stream, each against its formula written out here
    (Liger-Kernel's fused add-norm references): h = x + residual as stored, then gemma all fp32
    rounded once; llama x_hat rounded to x's dtype then times the weight in the promoted dtype; none
    every step in the stream's dtype. Outputs, dtypes and the three gradients; and the module."""
    x, r = torch.randn(9, 200, dtype=torch.bfloat16) * 3, torch.randn(9, 200, dtype=torch.bfloat16)
    w = (torch.randn(200) * 0.3 + (1 - offset)).to(weight_dtype)
    eps = 1e-6

    def formula(x, r, w):
        h = x + r
        if casting_mode == "none":
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (w.to(h.dtype) + offset), h
        hf = h.float()
        x_hat = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
        if casting_mode == "gemma":
            return (x_hat * (w.float() + offset)).to(h.dtype), h
        return (w + offset) * x_hat.to(h.dtype), h

    ins = [(x.clone().requires_grad_(), r.clone().requires_grad_(), w.clone().requires_grad_()) for _ in range(2)]
    ours = add_rms_norm(*ins[0], eps, offset=offset, casting_mode=casting_mode, backend="triton")
    ref = formula(*ins[1])
    assert [t.dtype for t in ours] == [t.dtype for t in ref]
    g = [torch.randn_like(t) for t in ref]
    torch.autograd.backward(ours, g)
    torch.autograd.backward(ref, g)
    # bf16 results a rounding or two apart (the interpreter truncates where torch rounds, h
    # included); "none" runs that very formula on h as the kernel stored it.
    tol = TOLERANCE[torch.bfloat16]
    for a, b in zip(list(ours) + [t.grad for t in ins[0]], list(ref) + [t.grad for t in ins[1]]):
        assert rel_error(a, b) <= tol
    m = AddRMSNorm(200, offset=offset, casting_mode=casting_mode, dtype=weight_dtype, backend="triton")
    with torch.no_grad():
        m.weight.copy_(w)
    assert rel_error(m(x, r)[0], ref[0].detach()) <= tol
    if casting_mode != "gemma":
        assert f"casting_mode='{casting_mode}'" in repr(m)
    if offset:
        assert "offset=1.0" in repr(m)
    # No weight: offset has nothing to shift; every mode is x_hat (in its own rounding).
    y_none, _ = add_rms_norm(x, r, None, eps, offset=offset, casting_mode=casting_mode, backend="triton")
    assert rel_error(y_none, rms_norm_reference((x + r).double(), None, eps)) <= tol


def test_module_offset_initialises_to_identity():
    m = AddRMSNorm(16, offset=1.0)
    assert torch.equal(m.weight.detach(), torch.zeros(16))  # 1 + 0
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    assert rel_error(m(x, r)[0], rms_norm_reference(x + r, None, 1e-6)) <= 1e-6
    with pytest.raises(ValueError, match="casting_mode must be one of"):
        AddRMSNorm(16, casting_mode="fp32")
    with pytest.raises(ValueError, match="offset must be a float"):
        add_rms_norm(x, r, None, offset="1")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [513, 20000])
def test_no_weight_and_unused_residual_output(device, dtype, n):
    t = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    check(t(9, n), t(9, n), None)
    check(t(9, n), t(9, n), t(n), dh=None)
    check(t(9, n), t(9, n), None, dh=None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [96, 20000])
def test_rounding_matches_unfused(device, dtype, n):
    """h is rounded to the storage dtype before the norm, exactly like the unfused code."""
    x, r = torch.randn(17, n, device=device, dtype=dtype), torch.randn(17, n, device=device, dtype=dtype) * 8
    w = torch.randn(n, device=device, dtype=dtype)
    y, h = add_rms_norm(x, r, w, backend="triton")
    if dtype == torch.bfloat16 and device == "cpu" and kernels.INTERPRETED:
        # Triton's interpreter converts fp32 to bf16 by truncation (the GPU rounds to nearest even),
        # so on CPU h may sit one bf16 ulp below the correctly rounded sum, never further.
        ulp = torch.finfo(dtype).eps * (x + r).float().abs()
        assert ((h.float() - (x + r).float()).abs() <= ulp).all()
    else:
        assert torch.equal(h, x + r)
    # y is the norm of h as stored, up to y's own rounding (half an ulp; a whole one under the
    # interpreter's truncating bf16 conversion).
    assert rel_error(y, rms_norm_reference(h.double(), w.double())) <= torch.finfo(dtype).eps


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    # 4-D permuted (copied into rows), a row-strided view (read in place), transposed bf16.
    x = torch.randn(2, 5, 3, 96, device=device).permute(1, 0, 2, 3)
    check(x, torch.randn(5, 2, 3, 96, device=device), torch.randn(96, device=device))
    check(torch.randn(33, 160, device=device)[:, :130], torch.randn(33, 300, device=device)[:, 7:137],
          torch.randn(130, device=device))
    x = torch.randn(64, 40, device=device, dtype=torch.bfloat16).t()
    check(x, torch.randn(40, 64, device=device, dtype=torch.bfloat16), torch.randn(64, device=device, dtype=torch.bfloat16))
    # Non-contiguous weight and expanded (stride-0) upstream gradients of both outputs.
    check(torch.randn(7, 96, device=device), torch.randn(7, 96, device=device), torch.randn(192, device=device)[::2],
          dy=torch.randn(96, device=device).expand(7, 96), dh=torch.randn(96, device=device).expand(7, 96))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_magnitudes(device, dtype, scale):
    """Squares of large fp16 values overflow fp16 and of small ones underflow: fp32 math must not."""
    # Clamped at 3 sigma so x + residual stays inside fp16's range (unclamped 1e4-scale tails
    # overflow the true sum to inf in about 2% of draws).
    x = (torch.randn(9, 777, device=device).clamp(-3, 3) * scale).to(dtype)
    r = (torch.randn(9, 777, device=device).clamp(-3, 3) * scale).to(dtype)
    dy = (torch.randn(9, 777, device=device) * min(scale, 1.0)).to(dtype)
    dh = (torch.randn(9, 777, device=device) / max(scale, 1.0)).to(dtype)
    check(x, r, torch.randn(777, device=device, dtype=dtype), eps=1e-12, dy=dy, dh=dh)


# ---------------------------------------------------------------------------------------------
# Launchers called directly with NaN-poisoned allocations: every output element must be written.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,n", [(1, 1), (5, 17), (129, 1000), (3, 9000), (2, 20000)])
@pytest.mark.parametrize("has_weight,has_dh", [(True, True), (False, False)])
def test_launchers_write_every_output(device, rows, n, has_weight, has_dh):
    from tokenforge.kernels import add_rms_norm as launcher

    t = lambda dtype=torch.bfloat16: torch.randn(rows, n, device=device, dtype=dtype)  # noqa: E731
    x, r, dy = t(), t(torch.float32), t()
    dh = t(torch.float32) if has_dh else None
    w = torch.randn(n, device=device) if has_weight else None
    with PoisonEmpty():
        y, h, rstd = launcher.add_rms_norm_forward(x, r, w, 1e-6)
        dx, dr, dw = launcher.add_rms_norm_backward(dy, dh, h, w, rstd, x.dtype)
    assert (y.dtype, h.dtype, dx.dtype, dr.dtype) == (x.dtype, r.dtype, x.dtype, r.dtype)
    errs = _errors(x, r, w, dy, dh, 1e-6, y, h, dx, dr, dw)
    assert max(errs.values()) <= TOLERANCE[torch.bfloat16], errs
    assert rel_error(rstd, torch.rsqrt(h.double().pow(2).mean(-1) + 1e-6)) < 1e-5
    assert (dw is None) == (not has_weight)


# ---------------------------------------------------------------------------------------------
# CUDA at real sizes (skipped without a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("rows,n", [(16384, 4096), (4096, 8192), (2048, 16384), (1000, 20000), (3, 65536)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_real_sizes(rows, n, dtype):
    t = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
    check(t(rows, n), t(rows, n), t(n))


# ---------------------------------------------------------------------------------------------
# Dispatch and refusals
# ---------------------------------------------------------------------------------------------


def test_backend_choice_and_float64(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    x = torch.randn(2, 8)
    assert backends.choose("add_rms_norm", x, x, None) == ("triton" if kernels.INTERPRETED else "torch")
    x64 = torch.randn(3, 8, dtype=torch.float64)
    y, h = add_rms_norm(x64, x64, None)
    assert torch.equal(h, x64 + x64) and torch.equal(y, rms_norm_reference(x64 + x64, None))
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        add_rms_norm(x64, x64, None, backend="triton")


def test_width_limit_is_a_clear_error():
    from tokenforge.kernels.add_rms_norm import MAX_N

    x = torch.empty(1, MAX_N + 1)
    with pytest.raises(backends.BackendUnavailableError, match=f"{MAX_N + 1} > {MAX_N}.*backend='torch'"):
        add_rms_norm(x, x, None, backend="triton")


@pytest.mark.parametrize(
    "make_args,exc,match",
    [
        (lambda: (torch.randint(0, 5, (3, 8)), torch.randn(3, 8), None), TypeError, "x must be a floating-point.*x.float"),
        (lambda: (torch.randn(3, 8), torch.ones(3, 8, dtype=torch.int64), None), TypeError, "residual must be a floating"),
        (lambda: (torch.randn(3, 8), torch.randn(3, 8), torch.ones(8, dtype=torch.int32)), TypeError, "weight must be floating"),
        (lambda: (torch.randn(3, 8), torch.randn(1, 8), None), ValueError, r"residual has \(1, 8\).*expand"),
        (lambda: (torch.randn(3, 8), torch.randn(3, 8), torch.randn(7)), ValueError, r"weight has shape \(7,\)"),
        (lambda: (torch.randn(3, 8), torch.randn(3, 8, device="meta"), None), ValueError, "same device"),
        (lambda: (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8, device="meta")), ValueError, "same device"),
        (lambda: (torch.tensor(1.0), torch.tensor(1.0), None), ValueError, "at least one dimension"),
        (lambda: (torch.randn(3, 0), torch.randn(3, 0), None), ValueError, "at least 1"),
        (lambda: ([1.0], torch.randn(1), None), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(make_args, exc, match):
    x, r, w = make_args()
    with pytest.raises(exc, match=match):
        add_rms_norm(x, r, w)


@pytest.mark.parametrize("eps", [-1.0, float("nan"), "1e-6"])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        add_rms_norm(torch.randn(2, 4), torch.randn(2, 4), None, eps)


def test_empty_batch():
    x = torch.randn(0, 16, requires_grad=True)
    y, h = add_rms_norm(x, torch.randn(0, 16), torch.ones(16))
    assert y.shape == h.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


# ---------------------------------------------------------------------------------------------
# nn.AddRMSNorm
# ---------------------------------------------------------------------------------------------


def test_module():
    ours, theirs = AddRMSNorm(48, backend="triton" if kernels.INTERPRETED else None), torch.nn.RMSNorm(48, eps=1e-6)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(48))
    ours.load_state_dict(theirs.state_dict())
    x, r = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    y, h = ours(x, r)
    assert rel_error(h, x + r) < 1e-6 and rel_error(y, theirs(x + r)) < 1e-5
    assert repr(ours) == "AddRMSNorm(48, eps=1e-06)"


# ---------------------------------------------------------------------------------------------
# torch.compile: custom ops with fake implementations, zero graph breaks
# ---------------------------------------------------------------------------------------------


def test_custom_ops_opcheck():
    if not kernels.INTERPRETED:
        pytest.skip("the custom ops wrap kernel backends; none runs on CPU without TRITON_INTERPRET=1")
    x, r, w = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(4, 16), torch.randn(16)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.tokenforge.add_rms_norm_fwd, (x, r, w, 1e-6, "triton"), test_utils=utils)
    torch.library.opcheck(torch.ops.tokenforge.add_rms_norm_fwd, (x, r, None, 1e-6, "triton"), test_utils=utils)
    y, h, rstd = torch.ops.tokenforge.add_rms_norm_fwd(x, r, w, 1e-6, "triton")
    torch.library.opcheck(torch.ops.tokenforge.add_rms_norm_bwd, (torch.randn_like(y), torch.randn_like(h), h, w, rstd,
                                                                  "bfloat16", "triton"), test_utils=utils)
    torch.library.opcheck(torch.ops.tokenforge.add_rms_norm_bwd, (torch.randn_like(y), None, h, None, rstd,
                                                                  "bfloat16", "triton"), test_utils=utils)


class _Block(torch.nn.Module):
    """Two pre-norm sublayers joined by the residual stream, the way a LLaMA block uses the op."""

    def __init__(self, dim, backend):
        super().__init__()
        self.norm1, self.norm2 = AddRMSNorm(dim, backend=backend), AddRMSNorm(dim, backend=backend)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, residual):
        y, residual = self.norm1(x, residual)
        y, residual = self.norm2(self.proj(y), residual)
        return y * 2 + residual


def test_fullgraph_compile_no_graph_breaks():
    torch._dynamo.reset()
    block = _Block(32, "triton" if kernels.INTERPRETED else None)
    with torch.no_grad():
        block.norm1.weight.copy_(torch.randn(32))
    x = torch.randn(3, 5, 32, requires_grad=True)
    r = torch.randn(3, 5, 32, requires_grad=True)
    explanation = torch._dynamo.explain(block)(x, r)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    eager = block(x, r)
    params = [x, r, *block.parameters()]
    eager_grads = torch.autograd.grad(eager.sum(), params)
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(x, r)
    grads = torch.autograd.grad(out.sum(), params)
    assert rel_error(out, eager) < 1e-6
    for g, ref in zip(grads, eager_grads):
        assert rel_error(g, ref) < 1e-6


# ---------------------------------------------------------------------------------------------
# Compile gate: every config the launchers can pick compiles for sm_90 / sm_80 without spills
# ---------------------------------------------------------------------------------------------


def _compile(name, config, x_dtype, r_dtype, w_dtype, arch, has_weight=True, has_dh=True, aligned=True):
    from compile_gate import TARGETS, TRITON_DTYPE, compile_kernel, emission_gate_types

    from tokenforge.kernels import add_rms_norm as k

    x, r, w = ("*" + TRITON_DTYPE[d] for d in (x_dtype, r_dtype, w_dtype))
    types = dict(X=x, Y=x, DY=x, DX=x, R=r, H=r, DH=r, DR=r, W=w, RSTD="*fp32", C="*fp32", DW_PARTIAL="*fp32", eps="fp32")
    types.update({s: "i32" for s in ("rows", "n", "stride_x", "stride_r", "stride_y", "stride_h", "stride_dy",
                                     "stride_dh", "stride_dx", "stride_dr")})
    config = dict(config)
    types.update(emission_gate_types(config, arch, getattr(k, name)))
    num_warps = config.pop("num_warps")
    constexprs = dict(config, HAS_WEIGHT=has_weight)
    if "bwd" in name:
        constexprs["HAS_DH"] = has_dh
    return compile_kernel(getattr(k, name), types, constexprs, num_warps, TARGETS[arch], aligned=aligned,
                          unaligned_args=("eps", "rows"))


def _all_configs():
    from tokenforge.kernels import add_rms_norm as k

    return k.all_configs()


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", GATE_ARCHS)
@pytest.mark.parametrize("name,config", _all_configs(),
                         ids=[f"{n}-{c.get('BLOCK_M', 1)}x{c['BLOCK_N']}w{c['num_warps']}{'-fp8g%d' % c['GROUP'] if c.get('EMIT_FP8') else ''}" for n, c in _all_configs()])
def test_configs_compile_without_spills(arch, name, config):
    from compile_gate import ptxas_report, spill_bytes

    # bf16 activations with an fp32 residual stream and weight: the widest live state.
    compiled = _compile(name, config, "bfloat16", "float32", "float32", arch)
    report = ptxas_report(compiled.asm["ptx"], arch)
    assert spill_bytes(report) == 0, f"{name} {config} spills on {arch}:\n{report}"


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", GATE_ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dtypes_compile(arch, dtype):
    """Each dtype at the headline width 4096, with and without weight / dh, aligned and not."""
    from tokenforge.kernels import add_rms_norm as k

    for name, cfg in (("_add_rms_norm_fwd_rows_kernel", k.fwd_rows_config(4096)),
                      ("_add_rms_norm_bwd_rows_kernel", k.bwd_rows_config(4096))):
        for flags in ((True, True, True), (False, False, False)):
            assert len(_compile(name, cfg, dtype, dtype, "float32", arch, *flags).asm["cubin"]) > 0
