"""RMSNorm: every kernel backend against the float64 torch reference, forward and both gradients."""

import pytest
import torch
from device_params import DEVICES, HAS_CUDA, kernel_backends

import tokenforge
from tokenforge import backends, kernels
from tokenforge.ops.rms_norm import rms_norm, rms_norm_reference
from tokenforge.testing import TOLERANCE, PoisonEmpty, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _reference_grads(x, w, dy, eps, dtype=torch.float64):
    """y, dx, dw of the torch reference with inputs cast to ``dtype`` (float64: the oracle)."""
    xr = x.detach().to(dtype).requires_grad_()
    wr = w.detach().to(dtype).requires_grad_() if w is not None else None
    y = rms_norm_reference(xr, wr, eps)
    y.backward(dy.to(dtype))
    return y, xr.grad, (wr.grad if wr is not None else None)


def _tolerance(x, w):
    """The tolerance of the least precise operand (a bf16 weight rounds dw, a bf16 x rounds dx)."""
    return max(TOLERANCE[x.dtype], TOLERANCE[w.dtype] if w is not None else 0.0)


def _errors(x, w, dy, eps, y, dx, dw):
    """Relative errors of y, dx, dw against the float64 reference.

    dx = rstd * (g - xhat * mean(g * xhat)) subtracts two terms of size |rstd * g| that nearly
    cancel when a row is short (for n=1 exactly up to eps), so any fp32 implementation, PyTorch's
    included, loses relative accuracy there. dx's error is therefore measured against the size of
    those terms, ||rstd * g||, which equals ||dx|| up to a factor sqrt(1 - 1/n) on long rows."""
    ref_y, ref_dx, ref_dw = _reference_grads(x, w, dy, eps)
    xd = x.detach().double()
    g = dy.double() * (w.detach().double() if w is not None else 1.0)
    terms = g * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    dx_err = (dx.detach().double() - ref_dx).norm().item() / max(terms.norm().item(), 1e-300)
    if not torch.isfinite(dx).all():
        dx_err = float("inf")
    errs = {"y": rel_error(y, ref_y), "dx": dx_err}
    if w is not None:
        assert dw is not None and dw.dtype == w.dtype
        # dw sums dy * xhat over rows; a sum of random-signed terms can land near zero by chance
        # (most visibly when n is 1 and dw is a single number), so the error is also allowed
        # relative to the sum's typical size, the root of the summed squares.
        xhat = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
        products = (dy.double() * xhat).reshape(-1, x.shape[-1])
        typical = products.pow(2).sum(0).sqrt().norm().item()
        diff = (dw.detach().double() - ref_dw).norm().item()
        errs["dw"] = diff / max(ref_dw.norm().item(), typical, 1e-300) if torch.isfinite(dw).all() else float("inf")
    return errs


def check_against_reference(x, w, backend, eps=1e-6, dy=None):
    """Run rms_norm on ``backend`` forward and backward and compare with float64."""
    x = x.detach().requires_grad_()
    if w is not None:
        w = w.detach().requires_grad_()
    y = rms_norm(x, w, eps, backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape
    if dy is None:
        dy = torch.randn_like(y)
    y.backward(dy)
    tol = _tolerance(x, w)
    errs = _errors(x, w, dy, eps, y, x.grad, w.grad if w is not None else None)
    for name, err in errs.items():
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({backend}, {tuple(x.shape)}, {x.dtype})"


# ---------------------------------------------------------------------------------------------
# The grid: awkward row counts and widths, every dtype, every kernel backend of the device.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 127, 129])
@pytest.mark.parametrize("n", [1, 17, 1000, 4096])
def test_grid(device, dtype, rows, n):
    for backend in kernel_backends(device):
        x = torch.randn(rows, n, device=device, dtype=dtype)
        w = torch.randn(n, device=device, dtype=dtype)
        check_against_reference(x, w, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", [(3, 8192), (2, 9000), (3, 16384), (2, 20000)])
def test_long_rows(device, dtype, rows, n):
    """Rows past the register-resident limits take the chunked kernels."""
    for backend in kernel_backends(device):
        x = torch.randn(rows, n, device=device, dtype=dtype)
        w = torch.randn(n, device=device, dtype=dtype)
        check_against_reference(x, w, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)], ids=str)
def test_mixed_weight_dtype(device, x_dtype, w_dtype):
    """Mixed precision keeps fp32 weights beside bf16 activations: y in x's dtype, dw in w's."""
    for backend in kernel_backends(device):
        x = torch.randn(37, 300, device=device, dtype=x_dtype)
        w = torch.randn(300, device=device, dtype=w_dtype)
        check_against_reference(x, w, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_weight(device, dtype):
    for backend in kernel_backends(device):
        check_against_reference(torch.randn(65, 513, device=device, dtype=dtype), None, backend)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_non_contiguous(device):
    for backend in kernel_backends(device):
        # 4-D input, permuted so rows are not evenly strided: needs a copy.
        x = torch.randn(2, 5, 3, 96, device=device).permute(1, 0, 2, 3)
        check_against_reference(x, torch.randn(96, device=device), backend)
        # Row-strided view (every row padded): read in place through the row stride.
        x = torch.randn(33, 160, device=device)[:, :130]
        check_against_reference(x, torch.randn(130, device=device), backend)
        # Transposed: the normalised dim is not the contiguous one.
        x = torch.randn(64, 40, device=device, dtype=torch.bfloat16).t()
        check_against_reference(x, torch.randn(64, device=device, dtype=torch.bfloat16), backend)
        # Non-contiguous weight and an expanded (stride-0) upstream gradient.
        w = torch.randn(192, device=device)[::2]
        x = torch.randn(7, 96, device=device)
        check_against_reference(x, w, backend, dy=torch.randn(96, device=device).expand(7, 96))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_magnitudes(device, dtype, scale):
    """Squares of large fp16 values overflow fp16 and of small ones underflow: fp32 math must not."""
    for backend in kernel_backends(device):
        x = (torch.randn(9, 777, device=device) * scale).to(dtype)
        # dx scales like dy / scale and dw like dy: keep both inside fp16's range.
        dy = (torch.randn(9, 777, device=device) * min(scale, 1.0)).to(dtype)
        check_against_reference(x, torch.randn(777, device=device, dtype=dtype), backend, eps=1e-12, dy=dy)


@pytest.mark.parametrize("device", DEVICES)
def test_eps_is_used(device):
    for backend in kernel_backends(device):
        x = torch.randn(4, 64, device=device) * 1e-3
        check_against_reference(x, torch.randn(64, device=device), backend, eps=0.5)


# ---------------------------------------------------------------------------------------------
# Launchers called directly with NaN-poisoned allocations: every output element must be written.
# ---------------------------------------------------------------------------------------------


def _launcher(backend):
    if backend == "triton":
        from tokenforge.kernels import rms_norm as launcher
    else:
        from tokenforge.cuda import rms_norm as launcher
    return launcher


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,n", [(1, 1), (5, 17), (129, 1000), (3, 9000), (2, 20000)])
@pytest.mark.parametrize("has_weight", [True, False])
def test_launchers_write_every_output(device, rows, n, has_weight):
    for backend in kernel_backends(device):
        launcher = _launcher(backend)
        x = torch.randn(rows, n, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, device=device, dtype=torch.float32) if has_weight else None
        dy = torch.randn(rows, n, device=device, dtype=torch.bfloat16)
        with PoisonEmpty():
            y, rstd = launcher.rms_norm_forward(x, w, 1e-6)
            dx, dw = launcher.rms_norm_backward(dy, x, w, rstd)
        errs = _errors(x, w, dy, 1e-6, y, dx, dw)
        assert max(errs.values()) <= _tolerance(x, w), errs
        assert rel_error(rstd, torch.rsqrt(x.double().pow(2).mean(-1) + 1e-6)) < 1e-5
        if has_weight:
            assert dw.dtype == w.dtype
        else:
            assert dw is None


# ---------------------------------------------------------------------------------------------
# CUDA at real sizes (skipped without a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("rows,n", [(16384, 4096), (4096, 8192), (2048, 16384), (8192, 1024), (1000, 20000), (3, 65536)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_real_sizes(rows, n, dtype):
    for backend in kernel_backends("cuda"):
        if backends.why_not("rms_norm", backend, torch.empty(1, n, device="cuda", dtype=dtype), None):
            continue  # e.g. a width past the CUDA extension's limit; refusals are tested below
        x = torch.randn(rows, n, device="cuda", dtype=dtype)
        w = torch.randn(n, device="cuda", dtype=dtype)
        check_against_reference(x, w, backend)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_cuda_auto_picks_a_kernel():
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    name, why = backends.explain("rms_norm", x, None)
    assert name in ("triton", "cuda"), why


# ---------------------------------------------------------------------------------------------
# Dispatch and refusals
# ---------------------------------------------------------------------------------------------


def test_cpu_auto_backend_is_triton_under_interpreter(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    x = torch.randn(2, 8)
    expected = "triton" if kernels.INTERPRETED else "torch"
    assert backends.choose("rms_norm", x, None) == expected
    # float64 is beyond the kernels: the reference runs, and stays exact.
    x64 = torch.randn(3, 8, dtype=torch.float64)
    assert backends.choose("rms_norm", x64, None) == "torch"
    assert torch.equal(rms_norm(x64, None), rms_norm_reference(x64, None))


def test_env_var_forces_backend(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.explain("rms_norm", x, None) == ("torch", f"forced by {backends.ENV_VAR}=torch")
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(backends.BackendUnavailableError, match="backend 'cuda' was requested"):
        rms_norm(x, None)
    monkeypatch.setenv(backends.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        rms_norm(x, None)


def test_forced_backend_that_cannot_run_is_an_error():
    x64 = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        rms_norm(x64, None, backend="triton")
    with pytest.raises(backends.BackendUnavailableError, match="CUDA"):
        rms_norm(torch.randn(3, 8), None, backend="cuda")


def test_width_limit_is_a_clear_error():
    from tokenforge.kernels.rms_norm import MAX_N

    x = torch.empty(1, MAX_N + 1)
    with pytest.raises(backends.BackendUnavailableError, match=f"{MAX_N + 1} > {MAX_N}.*backend='torch'"):
        rms_norm(x, None, backend="triton")


@pytest.mark.parametrize(
    "make_args,exc,match",
    [
        (lambda: (torch.randint(0, 5, (3, 8)), None), TypeError, "floating-point.*x.float"),
        (lambda: (torch.randn(3, 8), torch.ones(8, dtype=torch.int32)), TypeError, "weight must be floating"),
        (lambda: (torch.randn(3, 8), torch.randn(7)), ValueError, r"weight has shape \(7,\) but must be \(8,\)"),
        (lambda: (torch.randn(3, 8), torch.randn(2, 8)), ValueError, "must be"),
        (lambda: (torch.randn(3, 8), torch.randn(8, device="meta")), ValueError, "same device"),
        (lambda: (torch.tensor(1.0), None), ValueError, "at least one dimension"),
        (lambda: (torch.randn(3, 0), None), ValueError, "at least 1"),
        (lambda: ([1.0, 2.0], None), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(make_args, exc, match):
    x, w = make_args()
    with pytest.raises(exc, match=match):
        rms_norm(x, w)


@pytest.mark.parametrize("eps", [-1.0, float("nan"), "1e-6"])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        rms_norm(torch.randn(2, 4), None, eps)


def test_empty_batch():
    x = torch.randn(0, 16, requires_grad=True)
    y = rms_norm(x, torch.ones(16))
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


# ---------------------------------------------------------------------------------------------
# nn.RMSNorm: a drop-in for torch.nn.RMSNorm
# ---------------------------------------------------------------------------------------------


def test_module_state_dict_round_trip():
    ours, theirs = tokenforge.nn.RMSNorm(48), torch.nn.RMSNorm(48)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(48))
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight)
    theirs.load_state_dict(tokenforge.nn.RMSNorm(48).state_dict())
    assert torch.equal(theirs.weight, torch.ones(48))


@pytest.mark.parametrize("shape", [(32,), (4, 8)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-6, None])
def test_module_matches_torch(shape, affine, eps):
    theirs = torch.nn.RMSNorm(shape, eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            theirs.weight.copy_(torch.randn(shape))
    ours = tokenforge.nn.RMSNorm.from_torch(theirs, backend="triton" if kernels.INTERPRETED else None)
    x = torch.randn(5, 3, *shape)
    assert rel_error(ours(x), theirs(x)) < 1e-5
    assert ours.weight is theirs.weight
    assert repr(ours).startswith("RMSNorm(")


def test_module_refuses_wrong_trailing_shape():
    with pytest.raises(ValueError, match="does not end with normalized_shape"):
        tokenforge.nn.RMSNorm(16)(torch.randn(3, 15))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)], ids=str)
def test_offset_is_gemmas_norm(device, x_dtype, w_dtype):
    """offset=1: (x_hat * (1 + w)) in fp32, then x's dtype; forward and both grads against float64,
    rows of very different scales (the per-row bound), dweight in the weight's dtype."""
    for backend in kernel_backends(device):
        x = (torch.randn(37, 300, device=device) * torch.logspace(-3, 3, 37, device=device)[:, None]).to(x_dtype)
        w = (torch.randn(300, device=device) * 0.1).to(w_dtype)
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = rms_norm(xr, wr, 1e-6, offset=1.0, backend=backend)
        dy = torch.randn_like(y)
        y.backward(dy)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w64)
        ref.backward(dy.double())
        tol = _tolerance(x, w)
        assert y.dtype == x_dtype and wr.grad.dtype == w_dtype
        assert rel_error(y, ref) <= tol
        assert rel_error(xr.grad, x64.grad) <= tol
        assert rel_error(wr.grad, w64.grad) <= tol
        assert torch.equal(rms_norm_reference(x.double(), w.double(), 1e-6, 1.0), ref.detach())


def test_offset_module_and_refusals():
    m = tokenforge.nn.RMSNorm(16, offset=1.0)
    assert torch.equal(m.weight.detach(), torch.zeros(16))  # identity scale: 1 + 0
    x = torch.randn(3, 16)
    assert rel_error(m(x), rms_norm_reference(x, None, 1e-6)) <= 1e-6
    assert "offset=1.0" in repr(m)
    # No weight: offset has nothing to shift (Gemma's norm without an affine weight, Liger's too).
    for mode in ("gemma", "llama", "none"):
        assert rel_error(rms_norm(x, None, offset=1.0, casting_mode=mode), rms_norm_reference(x, None)) <= 1e-6
    assert rel_error(tokenforge.nn.RMSNorm(16, offset=1.0, elementwise_affine=False)(x), rms_norm_reference(x, None)) <= 1e-6
    with pytest.raises(ValueError, match="offset must be a float"):
        rms_norm(x, torch.ones(16), offset="1")


@pytest.mark.parametrize("casting_mode", ["gemma", "llama", "none"])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_casting_modes(casting_mode, weight_dtype, offset):
    """Liger-Kernel's casting modes, each against its formula written out here (output dtype,
    values, gradients): gemma all fp32 rounded once; llama x_hat rounded to x's dtype then times
    the weight in the promoted dtype; none every step in x's dtype."""
    x = torch.randn(9, 200, dtype=torch.bfloat16) * 3
    w = (torch.randn(200) * 0.3 + (1 - offset)).to(weight_dtype)
    eps = 1e-6

    def formula(x, w):
        if casting_mode == "gemma":
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (w.float() + offset)).to(x.dtype)
        if casting_mode == "llama":
            xf = x.float()
            return (w + offset) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (w.to(x.dtype) + offset)

    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    ours = rms_norm(xa, wa, eps, offset=offset, casting_mode=casting_mode, backend="triton")
    ref = formula(xb, wb)
    assert ours.dtype == ref.dtype
    g = torch.randn_like(ref)
    ours.backward(g)
    ref.backward(g)
    # bf16 results a rounding or two apart (the interpreter truncates where torch rounds; measured
    # <= 5.6e-3 over 20 seeds for outputs and both gradients); "none" runs that very formula.
    tol = TOLERANCE[torch.bfloat16] if casting_mode != "none" else 0.0
    assert rel_error(ours, ref) <= tol
    assert rel_error(xa.grad, xb.grad) <= tol
    assert rel_error(wa.grad, wb.grad) <= tol
    m = tokenforge.nn.RMSNorm(200, offset=offset, casting_mode=casting_mode, dtype=weight_dtype, backend="triton")
    with torch.no_grad():
        m.weight.copy_(w)
    assert rel_error(m(x), ref.detach()) <= tol
    if casting_mode != "gemma":
        assert f"casting_mode='{casting_mode}'" in repr(m)
    with pytest.raises(ValueError, match="casting_mode must be one of"):
        rms_norm(x, w, casting_mode="fp32")
