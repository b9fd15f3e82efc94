"""MoE token permutation kernels (tokenforge.kernels.moe_permute behind tokenforge.ops.moe_permute /
moe_unpermute): rows into expert order and back with the weighted combine, forward and every
gradient against float64 written out here, with a per-row bound as well as the norm-wise one;
awkward sizes (k = 1, odd k, k above a power of two, rows wider than one tile, empty experts),
strided inputs, a row offset past 2^31 elements, reproducibility, bad input, and the compile gate
of every config the launchers pick."""

from __future__ import annotations

import pytest
import torch
from compile_gate import TARGETS, compile_kernel, jit_function, ptxas_report, spill_bytes
from device_params import DEVICES, HAS_CUDA

from tokenforge.ops import moe_permute, moe_unpermute
from tokenforge.testing import TOLERANCE, assert_rel_close, rel_error

CASES = [  # tokens, dim, k, experts
    (23, 40, 3, 5),
    (1, 64, 1, 4),
    (17, 300, 8, 8),   # k = 8: the tile is 8 x 256, a row is two chunks
    (9, 33, 5, 3),     # k = 5 pads to 8 slots; more slots than experts, so experts repeat per token
    (12, 16, 2, 64),   # most experts get no token
]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
ROW_TOL = {**TOLERANCE, torch.float64: 1e-12}  # fp32: dweights are fp32 dot products over a row


def _expected_gather(x64, experts):
    """(x_sorted, order) in float64 from a loop: rows of every (token, slot), stably by expert."""
    tokens, k = experts.shape
    slots = sorted(range(tokens * k), key=lambda s: (int(experts.reshape(-1)[s]), s))
    return torch.stack([x64[s // k] for s in slots]), torch.tensor(slots)


def _expected_combine(y64, order, w64):
    """out[t] = sum_j w[t, j] * y of slot t*k+j, in float64 from a loop."""
    tokens, k = w64.shape
    pos = {int(s): i for i, s in enumerate(order)}
    return torch.stack([sum(w64[t, j] * y64[pos[t * k + j]] for j in range(k)) for t in range(tokens)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,dim,k,experts", CASES)
def test_permute_matches_float64(device, dtype, tokens, dim, k, experts):
    x = torch.randn(tokens, dim, device=device).to(dtype).requires_grad_()
    ids = torch.randint(0, experts, (tokens, k), device=device)
    xs, offs, order, counts = moe_permute(x, ids, experts, backend="triton")
    want, want_order = _expected_gather(x.detach().double().cpu(), ids.cpu())
    assert torch.equal(order.cpu(), want_order)
    assert torch.equal(xs.detach().double().cpu(), want), "a copy must move the bits unchanged"
    assert torch.equal(counts.cpu(), torch.bincount(ids.reshape(-1).cpu(), minlength=experts))
    assert offs.dtype == torch.int32 and torch.equal(offs.cpu().long(), counts.cpu().cumsum(0))
    # Backward: dx[t] = sum of its k rows' gradients.
    g = torch.randn_like(xs)
    (dx,) = torch.autograd.grad(xs, x, g)
    g64 = g.double().cpu()
    pos = {int(s): i for i, s in enumerate(want_order)}
    dx64 = torch.stack([sum(g64[pos[t * k + j]] for j in range(k)) for t in range(tokens)])
    assert_rel_close(dx.cpu(), dx64, ROW_TOL[dtype], "dx")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,dim,k,experts", CASES)
def test_unpermute_matches_float64(device, dtype, tokens, dim, k, experts):
    ids = torch.randint(0, experts, (tokens, k), device=device)
    order = torch.sort(ids.reshape(-1), stable=True).indices
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ys = torch.randn(tokens * k, dim, device=device).to(dtype).requires_grad_()
    w = torch.rand(tokens, k, device=device, dtype=w_dtype).add_(0.1).requires_grad_()
    out = moe_unpermute(ys, order, w, backend="triton")
    assert out.dtype == dtype and out.shape == (tokens, dim)
    ys64, w64 = ys.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    want = _expected_combine(ys64, order.cpu(), w64)
    assert_rel_close(out.detach().cpu(), want.detach(), ROW_TOL[dtype], "out")
    g = torch.randn_like(out)
    dys, dw = torch.autograd.grad(out, (ys, w), g)
    dys64, dw64 = torch.autograd.grad(want, (ys64, w64), g.double().cpu())
    assert dys.dtype == dtype and dw.dtype == w_dtype
    assert_rel_close(dys.cpu(), dys64, ROW_TOL[dtype], "d y_sorted")
    assert_rel_close(dw.cpu(), dw64, ROW_TOL[dtype], "d weights")
    # Weights that need no gradient take the scatter without the dot products: same dy.
    (dys_only,) = torch.autograd.grad(moe_unpermute(ys, order, w.detach(), backend="triton"), ys, g)
    assert torch.equal(dys_only, dys)


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_and_gradcheck(device):
    """unpermute(permute(x)) with weights w is x * sum(w); gradcheck of the composition in float64."""
    x = torch.randn(5, 6, device=device, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 4, (5, 3), device=device)
    w = torch.rand(5, 3, device=device, dtype=torch.float64, requires_grad=True)
    xs, _, order, _ = moe_permute(x, ids, 4, backend="triton")
    assert torch.allclose(moe_unpermute(xs, order, w, backend="triton"), x * w.sum(1, keepdim=True), rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, ww: moe_unpermute(moe_permute(a, ids, 4, backend="triton")[0] ** 2, order, ww, backend="triton"),
        (x, w))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_and_bitwise_repeat(device):
    """Rows with a row stride (a slice of a wider tensor) are read in place; two runs agree bitwise."""
    wide = torch.randn(13, 96, device=device, dtype=torch.bfloat16)
    x = wide[:, 8:72]
    ids = torch.randint(0, 6, (13, 4), device=device)
    xs, _, order, _ = moe_permute(x, ids, 6, backend="triton")
    assert torch.equal(xs, x.index_select(0, order // 4))
    ys_wide = torch.randn(52, 80, device=device, dtype=torch.bfloat16)
    ys = ys_wide[:, :64]
    w = torch.rand(13, 4, device=device)
    a = moe_unpermute(ys, order, w, backend="triton")
    b = moe_unpermute(ys.contiguous(), order, w, backend="triton")
    assert torch.equal(a, b)
    ref = moe_unpermute(ys, order, w, backend="torch")
    assert rel_error(a, ref) <= 1e-2


@pytest.mark.parametrize("device", DEVICES[:1])
def test_row_offsets_past_2_31_elements(device):
    """A token row and a slot row that start past element 2^31 of their storage: int64 row offsets."""
    dim = 64
    big = torch.empty(2 ** 31 + 4 * dim, dtype=torch.bfloat16, device=device)
    x = big.as_strided((2, dim), (2 ** 31, 1))  # row 1 starts at element 2^31
    x[0].copy_(torch.randn(dim))
    x[1].copy_(torch.randn(dim))
    ids = torch.tensor([[1, 0], [0, 1]], device=device)
    xs, _, order, _ = moe_permute(x, ids, 2, backend="triton")
    assert torch.equal(xs, torch.stack([x[int(s) // 2] for s in order]))
    ys = big.as_strided((4, dim), (2 ** 29 + dim, 1))  # row 3 starts past 2^31 too
    w = torch.rand(2, 2, device=device)
    got = moe_unpermute(ys, order, w, backend="triton")
    want = _expected_combine(ys.double().cpu(), order.cpu(), w.double().cpu())
    assert_rel_close(got.cpu(), want, 1e-2, "out")
    del big


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_cuda_real_sizes():
    """DeepSeek-like routing (16k tokens, hidden 4096, top-8 of 64 experts) on the GPU: the copy is
    bitwise, the combine and both gradients within bf16 rounding of float64, row by row."""
    tokens, dim, k, experts = 16384, 4096, 8, 64
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, experts, (tokens, k), device="cuda")
    xs, _, order, _ = moe_permute(x, ids, experts, backend="triton")
    assert torch.equal(xs, x.detach().index_select(0, order // k))
    g = torch.randn_like(xs)
    (dx,) = torch.autograd.grad(xs, x, g)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device="cuda"))
    want_dx = g.double().index_select(0, inverse).view(tokens, k, dim).sum(1)
    assert_rel_close(dx, want_dx, 1e-2, "dx")
    del xs, g, dx, want_dx
    ys = torch.randn(tokens * k, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(tokens, k, device="cuda", requires_grad=True)
    out = moe_unpermute(ys, order, w, backend="triton")
    dout = torch.randn_like(out)
    dys, dw = torch.autograd.grad(out, (ys, w), dout)
    ys64 = ys.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    slots = ys64.index_select(0, inverse).view(tokens, k, dim)
    want = (slots * w64[..., None]).sum(1)
    assert_rel_close(out, want.detach(), 1e-2, "out")
    want_dys, want_dw = torch.autograd.grad(want, (ys64, w64), dout.double())
    assert_rel_close(dys, want_dys, 1e-2, "d y_sorted")
    assert_rel_close(dw, want_dw, 1e-5, "d weights")


def test_layer_uses_the_kernels_and_torch_backend_agrees():
    """The MoE layer's rows move on the kernels with backend='triton' and by index_select with
    'torch': same output and gradients to fp32 rounding."""
    from device_params import INTERPRETING

    from tokenforge.nn import MoE

    if not INTERPRETING:
        pytest.skip("CPU interpreter case")
    layer = MoE(16, 12, num_experts=4, top_k=2, backend="triton")
    ref = MoE(16, 12, num_experts=4, top_k=2, backend="torch")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 7, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(xa).square().sum().backward()
    ref(xb).square().sum().backward()
    assert rel_error(xa.grad, xb.grad) <= 1e-5
    for (name, p), (_, q) in zip(layer.named_parameters(), ref.named_parameters()):
        assert rel_error(p.grad, q.grad) <= 1e-5, name


@pytest.mark.parametrize("call,words", [
    (lambda: moe_unpermute(torch.randn(6, 4), torch.arange(6), torch.rand(2, 2)), "y_sorted must be (tokens * k"),
    (lambda: moe_unpermute(torch.randn(4, 4), torch.arange(5), torch.rand(2, 2)), "order must be"),
    (lambda: moe_unpermute(torch.randn(4, 4), torch.arange(4), torch.ones(2, 2, dtype=torch.long)), "weights must"),
    (lambda: moe_permute(torch.randn(3, 4), torch.zeros(3, 2), 2), "int32 or int64"),
    (lambda: moe_permute(torch.randn(3, 4), torch.zeros(4, 2, dtype=torch.long), 2), "x must be (tokens, dim)"),
    (lambda: moe_permute(torch.randn(3, 4), torch.zeros(3, 65, dtype=torch.long), 2, backend="triton"), "top-k 65"),
])
def test_bad_input_gets_a_clear_error(call, words):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=None) as info:
        call()
    assert words in str(info.value)


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", list(TARGETS))
def test_configs_compile_without_spills(arch):
    from tokenforge.kernels import moe_permute as kernels

    for name, config in kernels.all_configs():
        config = dict(config)
        num_warps = config.pop("num_warps")
        kernel = getattr(kernels, name)
        types = {"SRC": "*bf16", "INVERSE": "*i64", "W": "*fp32", "DST": "*bf16", "Y": "*bf16", "DW": "*fp32",
                 "OUT": "*bf16", "k": "i32", "D": "i32", "stride_src": "i32", "stride_dst": "i32", "stride_y": "i32",
                 "stride_out": "i32"}
        names = jit_function(kernel).arg_names
        compiled = compile_kernel(kernel, {n: t for n, t in types.items() if n in names}, config, num_warps,
                                  TARGETS[arch], unaligned_args=("k",))
        report = ptxas_report(compiled.asm["ptx"], arch)
        assert spill_bytes(report) == 0, f"{name} {config} spills on {arch}:\n{report}"


def test_custom_ops_pass_opcheck():
    from device_params import INTERPRETING

    if not INTERPRETING:
        pytest.skip("the custom ops wrap the kernel backend; it runs on CPU only under TRITON_INTERPRET=1")
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    inverse = torch.randperm(10)
    w = torch.rand(5, 2)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.tokenforge.moe_scatter, (x, inverse, None, 2, "triton"), test_utils=checks)
    ys = torch.ops.tokenforge.moe_scatter(x, inverse, w, 2, "triton")
    torch.library.opcheck(torch.ops.tokenforge.moe_combine, (ys, inverse, w, 5, "triton"), test_utils=checks)
    torch.library.opcheck(torch.ops.tokenforge.moe_combine_bwd, (x, ys, inverse, w, "triton"), test_utils=checks)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_tokens(backend):
    from device_params import INTERPRETING

    if backend == "triton" and not INTERPRETING:
        pytest.skip("CPU interpreter case")
    x = torch.randn(0, 8, requires_grad=True)
    xs, offs, order, counts = moe_permute(x, torch.zeros(0, 2, dtype=torch.long), 4, backend=backend)
    assert xs.shape == (0, 8) and offs.tolist() == [0, 0, 0, 0] and counts.sum() == 0
    out = moe_unpermute(xs, order, torch.rand(0, 2), backend=backend)
    assert out.shape == (0, 8)
