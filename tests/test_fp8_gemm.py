"""tokenforge.fp8.scaled_mm against the float64 product of the dequantized operands.

Tolerance: fp8 x fp8 products are exact in fp32 and accumulate in fp32 (~K * 2^-24 relative), so
the error is one rounding to out_dtype: <= 2^-9 per element for bf16 on a GPU (RNE), bounded in
norm by 2^-8 (TOL). Triton's interpreter converts fp32 -> bf16/fp16 by truncation: up to one ulp,
2^-7 relative for bf16 (2^-10 for fp16), and about 3.3e-3 in norm for bf16, too close to 2^-8 =
3.9e-3 on a 16 x 16 output (one CI run in ~20 measured 3.95e-3): CPU cases are bounded by the
ulp itself (tol())."""

import pytest
import torch
from device_params import DEVICES, HAS_CUDA

from tokenforge import backends, fp8
from tokenforge.testing import rel_error

TOL = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 1e-5}
TRUNCATED_TOL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 1e-5}


def tol(out_dtype: torch.dtype, device) -> float:
    """The norm-wise bound for an output in out_dtype: one rounding on a GPU, one truncation (the
    interpreter's conversion) on the CPU."""
    return (TRUNCATED_TOL if torch.device(device).type == "cpu" else TOL)[out_dtype]


def pytest_generate_tests(metafunc):
    """Every test but the compile gate (which compiles both kernels itself) runs twice: through
    the persistent TMA kernel (the interpreter runs tensor descriptors; on a GPU it is the sm_90
    path) and through the pointer-load kernel."""
    if "kernel_path" in metafunc.fixturenames and metafunc.definition.get_closest_marker("compile_gate") is None:
        metafunc.parametrize("kernel_path", ["tma", "pointers"], indirect=True)


@pytest.fixture(autouse=True)
def kernel_path(request, monkeypatch):
    from tokenforge.kernels import fp8_gemm

    if getattr(request, "param", "tma") == "pointers":
        monkeypatch.setattr(fp8_gemm, "use_tma", lambda a, b: False)
    return getattr(request, "param", "tma")


def gemm_backends(device, a=None, b=None):
    """The backends to check a @ b on: Triton and torch everywhere; on a CUDA device also the
    CUTLASS sm_90a kernel wherever it takes the inputs (H100/H200, e4m3: test_cuda_backend_on_hopper
    fails if it does not run there)."""
    names = ["triton", "torch"]
    if device == "cuda" and (a is None or backends.why_not("fp8_scaled_mm", "cuda", a, b) is None):
        names.insert(1, "cuda")
    return names


def make(M, K, N, device, sa_rows, sb_cols, a_dtype=torch.float8_e4m3fn, b_dtype=torch.float8_e4m3fn):
    x = torch.randn(M, K, device=device)
    w = torch.randn(N, K, device=device) * 3
    a, sa = fp8.quantize(x, a_dtype, "rowwise" if sa_rows else "tensorwise", backend="torch")
    bt, sb = fp8.quantize(w, b_dtype, "rowwise" if sb_cols else "tensorwise", backend="torch")
    return a, bt.t(), sa, (sb.t() if sb_cols else sb)


def reference(a, b, sa, sb, bias=None):
    out = (a.double() * sa.double()) @ (b.double() * sb.double())
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sa_rows", [False, True])
@pytest.mark.parametrize("sb_cols", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scaled_mm_matches_dequantized_product(device, sa_rows, sb_cols, out_dtype):
    shapes = [(16, 16, 16), (48, 80, 112)] if device == "cpu" else [(4096, 4096, 4096), (16, 8192, 1024)]
    for M, K, N in shapes:
        a, b, sa, sb = make(M, K, N, device, sa_rows, sb_cols)
        bias = torch.randn(N, device=device).to(out_dtype if out_dtype != torch.float32 else torch.bfloat16)
        for backend in gemm_backends(device, a, b):
            for with_bias in (False, True):
                out = fp8.scaled_mm(a, b, sa, sb, out_dtype=out_dtype, bias=bias if with_bias else None, backend=backend)
                assert out.dtype == out_dtype and out.shape == (M, N)
                err = rel_error(out, reference(a, b, sa, sb, bias if with_bias else None))
                assert err <= tol(out_dtype, device), f"{backend} {M}x{K}x{N}: {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_formats_layouts_and_scale_shapes(device):
    """e5m2 x e4m3 (the dX GEMM), non-K-major b and a transposed a (the dW GEMM), (1,1) scales."""
    M, K, N = (32, 48, 64) if device == "cpu" else (2048, 4096, 1024)
    a, b, sa, sb = make(M, K, N, device, True, True, a_dtype=torch.float8_e5m2)
    for backend in gemm_backends(device, a, b):
        for aa, bb in ((a, b), (a.t().contiguous().t(), b.contiguous())):
            out = fp8.scaled_mm(aa, bb, sa, sb, backend=backend)
            assert rel_error(out, reference(a, b, sa, sb)) <= tol(torch.bfloat16, device)
        one = torch.full((1, 1), 0.5, device=device)
        out = fp8.scaled_mm(a, b, one, sb, backend=backend)
        assert rel_error(out, reference(a, b, one, sb)) <= tol(torch.bfloat16, device)


def make_blockwise(M, K, N, device, a_block, b_block, mags=None):
    """a = x (M, K) quantized with a_block ((1, 128) or (128, 128)); b = W.t() for a weight W (N, K)
    quantized with b_block along K ((128, 128) or (1, 128), i.e. (128, 1) blocks of b)."""
    x = torch.randn(M, K, device=device, dtype=torch.float64)
    if mags is not None:
        x = x * mags
    w = torch.randn(N, K, device=device) * 3
    a, sa = fp8.quantize(x.float(), scaling="blockwise", block=a_block, backend="torch")
    wq, sw = fp8.quantize(w, scaling="blockwise", block=b_block, backend="torch")
    return a, wq.t(), sa, sw.t()


def block_reference(a, b, sa, sb):
    from tokenforge.fp8.quantize import expand_block_scale

    (M, K), N = a.shape, b.shape[1]
    return (a.double() * expand_block_scale(sa.double(), M, K)) @ (b.double() * expand_block_scale(sb.double(), K, N))


A_BLOCKS = [(1, 128), (128, 128)]
B_BLOCKS = [(128, 128), (1, 128)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("a_block", A_BLOCKS)
@pytest.mark.parametrize("b_block", B_BLOCKS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_blockwise_scaled_mm_per_row_and_column(device, a_block, b_block, out_dtype):
    """Blockwise scales (DeepSeek-V3: activations (1, 128), weights (128, 128)) against the float64
    product of the dequantized operands, K not a multiple of 128 (a short last K block) and M, N
    with partial 128 blocks. Bounded per output row and per output column as well as in norm, so
    one wrong scale block (a row, a column, a K block) fails."""
    shapes = [(48, 208, 80), (144, 400, 160)] if device == "cpu" else [(4096, 4096, 4096), (272, 8192, 1040)]
    for M, K, N in shapes:
        a, b, sa, sb = make_blockwise(M, K, N, device, a_block, b_block)
        ref = block_reference(a, b, sa, sb)
        for backend in gemm_backends(device, a, b):
            out = fp8.scaled_mm(a, b, sa, sb, out_dtype=out_dtype, backend=backend)
            assert out.dtype == out_dtype and out.shape == (M, N)
            err = (out.double() - ref).abs()
            assert rel_error(out, ref) <= tol(out_dtype, device)
            row_err = (err.norm(dim=1) / ref.norm(dim=1)).max().item()
            col_err = (err.norm(dim=0) / ref.norm(dim=0)).max().item()
            # A row of bf16 outputs may all round the same way: one ulp (2^-7) bounds it.
            row_tol = 2.0 ** -7 if out_dtype == torch.bfloat16 else TOL[out_dtype]
            assert max(row_err, col_err) <= row_tol, f"{backend} {a_block} {b_block} {M}x{K}x{N}"


@pytest.mark.parametrize("device", DEVICES)
def test_blockwise_scaled_mm_catches_a_scale_mix_up(device):
    """Rows of a at magnitudes 1e-3 .. 1e3 in blocks of 128 along K: the blockwise product holds
    every row; the same data with one K block's scale swapped for its neighbour's, or with the
    scale grid read transposed, fails the per-row bound."""
    M, K, N = (64, 384, 48) if device == "cpu" else (1024, 4096, 1024)
    mags = torch.logspace(-3, 3, M * (K // 128), dtype=torch.float64)[torch.randperm(M * (K // 128))]
    mags = mags.view(M, K // 128).repeat_interleave(128, 1).to(device)
    a, b, sa, sb = make_blockwise(M, K, N, device, (1, 128), (128, 128), mags)
    ref = block_reference(a, b, sa, sb)

    def worst_row(out):
        return ((out.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()

    for backend in gemm_backends(device, a, b):
        assert worst_row(fp8.scaled_mm(a, b, sa, sb, out_dtype=torch.float32, backend=backend)) <= 1e-5
        swapped = sa.clone()
        swapped[:, [0, 1]] = sa[:, [1, 0]]
        assert worst_row(fp8.scaled_mm(a, b, swapped, sb, out_dtype=torch.float32, backend=backend)) > 1e-2
    mixed = sb.t().contiguous().t()  # same values, column-major: must read the same
    assert worst_row(fp8.scaled_mm(a, b, sa, mixed, out_dtype=torch.float32, backend="triton")) <= 1e-5


def test_bad_inputs():
    a = torch.randn(32, 32).to(torch.float8_e4m3fn)
    s = torch.ones(())
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8.scaled_mm(torch.randn(20, 32).to(torch.float8_e4m3fn), a, s, s)
    with pytest.raises(TypeError, match="float8_e4m3fn/float8_e5m2"):
        fp8.scaled_mm(torch.randn(32, 32, dtype=torch.bfloat16), a, s, s)
    with pytest.raises(ValueError, match="inner dims must match"):
        fp8.scaled_mm(a, torch.randn(48, 32).to(torch.float8_e4m3fn), s, s)
    with pytest.raises(ValueError, match="scale_a has shape"):
        fp8.scaled_mm(a, a, torch.ones(32), s)
    with pytest.raises(ValueError, match="scale_b has shape"):
        fp8.scaled_mm(a, a, s, torch.ones(32, 1))
    with pytest.raises(ValueError, match=r"scale_a has shape \(32, 2\).*blockwise \(1, 128\)"):
        fp8.scaled_mm(a, a, torch.ones(32, 2), s)
    with pytest.raises(ValueError, match=r"blockwise \(128, 128\)"):
        fp8.scaled_mm(a, a, s, torch.ones(2, 2))
    with pytest.raises(TypeError, match="scale_a must be float32"):
        fp8.scaled_mm(a, a, s.double(), s)
    with pytest.raises(ValueError, match="bias must be a tensor of shape"):
        fp8.scaled_mm(a, a, s, s, bias=torch.ones(16))
    with pytest.raises(TypeError, match="out_dtype"):
        fp8.scaled_mm(a, a, s, s, out_dtype=torch.int8)


def test_dispatch_is_registered_and_explained():
    assert "fp8_scaled_mm" in backends.registered_ops() and "fp8_quantize" in backends.registered_ops()
    a = torch.empty(16, 16, dtype=torch.float8_e4m3fn)
    name, why = backends.explain("fp8_scaled_mm", a, a)
    assert name in ("triton", "torch") and why
    assert fp8.torch_path(a, a, torch.ones(()), torch.ones(()), torch.bfloat16) == "emulation"


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_matches_torch_scaled_mm_on_gpu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need sm_89+")
    a, b, sa, sb = make(4096, 4096, 4096, "cuda", True, True)
    b = b.t().contiguous().t()
    ours = fp8.scaled_mm(a, b, sa, sb, backend="triton")
    theirs = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    assert rel_error(ours, theirs.double()) < 2.0 ** -8


def _cuda_gemm_built() -> bool:
    import tokenforge.cuda as tf_cuda

    return tf_cuda.is_available() and not tf_cuda.get_extension().fp8_gemm_sm90_unavailable()


def test_cuda_backend_refuses_cleanly_without_a_gpu():
    """backend='cuda' (the CUTLASS sm_90a kernel) on CPU tensors, and the raw entry point with no
    device, raise errors that say what to do; bad arguments are caught before the device is asked."""
    a = torch.randn(32, 32).to(torch.float8_e4m3fn)
    s = torch.ones(())
    with pytest.raises(backends.BackendUnavailableError, match="CUDA tensors only"):
        fp8.scaled_mm(a, a, s, s, backend="cuda")
    if not _cuda_gemm_built():
        pytest.skip("tokenforge._C without the CUTLASS FP8 GEMM (test_extension says whether that is right)")
    import tokenforge.cuda as tf_cuda

    ext = tf_cuda.get_extension()
    args = dict(a_ptr=256, b_ptr=256, d_ptr=256, scale_a_ptr=256, scale_b_ptr=256, bias_ptr=0, workspace_ptr=0,
                workspace_bytes=0, m=128, n=128, k=128, lda=128, ldb=128, ldd=128, blockwise=False, out_dtype=2,
                stream=0)
    with pytest.raises(ValueError, match="multiples of 16"):
        ext.fp8_gemm_sm90(**{**args, "k": 120, "lda": 120, "ldb": 120})
    with pytest.raises(ValueError, match="out dtype"):
        ext.fp8_gemm_sm90(**{**args, "out_dtype": 1})
    with pytest.raises(ValueError, match="16-byte aligned"):
        ext.fp8_gemm_sm90(**{**args, "a_ptr": 264})
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            ext.fp8_gemm_sm90(**args)
        with pytest.raises(RuntimeError, match="no CUDA device"):
            ext.fp8_gemm_sm90_workspace_size(128, 128, 128, False, 2)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_cuda_backend_on_hopper():
    """On an H100/H200 with the extension built the CUTLASS kernel takes e4m3 inputs (so every test
    above checks it too) and matches the Triton kernel and the float64 reference in every layout
    Float8Linear feeds it: forward (K-major), dgrad (b N-major), wgrad (a M-major, b N-major),
    tensorwise, rowwise and blockwise scales, with bias, bf16/fp16/fp32 out."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUTLASS FP8 GEMM is built for sm_90a")
    assert _cuda_gemm_built(), "tokenforge._C on this H100/H200 has no CUTLASS FP8 GEMM: reinstall with nvidia-cutlass"
    M, K, N = 2304, 4160, 1552
    a, b, sa, sb = make(M, K, N, "cuda", True, True)
    assert backends.why_not("fp8_scaled_mm", "cuda", a, b) is None
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    layouts = {"forward": (a, b), "dgrad": (a, b.contiguous()), "wgrad": (a.t().contiguous().t(), b.contiguous())}
    for name, (aa, bb) in layouts.items():
        for scales in ((sa, sb), (sa[:1, :1].reshape(()), sb[:, :1].reshape(1, 1))):
            ref = reference(a, b, *scales, bias)
            for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
                out = fp8.scaled_mm(aa, bb, *scales, bias=bias, out_dtype=out_dtype, backend="cuda")
                assert out.dtype == out_dtype and rel_error(out, ref) <= TOL[out_dtype], (name, out_dtype)
                rows = ((out.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
                assert rows <= 2.0 ** -7, (name, out_dtype, rows)
    a, b, sa, sb = make_blockwise(M, K, N, "cuda", (1, 128), (128, 128))
    out = fp8.scaled_mm(a, b, sa, sb, out_dtype=torch.float32, backend="cuda")
    triton_out = fp8.scaled_mm(a, b, sa, sb, out_dtype=torch.float32, backend="triton")
    ref = block_reference(a, b, sa, sb)
    assert ((out.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item() <= 1e-5
    assert rel_error(out, triton_out.double()) <= 1e-5


def test_launcher_passes_only_k_major_operands(monkeypatch, kernel_path):
    """Every layout Float8Linear uses (forward, dgrad, wgrad: M-major a, N-major b) reaches the
    kernel K-major, the one layout the compile gate below proves spill-free: as pointers with unit
    K strides, or as descriptors over a (M, K) and b^T (N, K) with unit inner strides."""
    from tokenforge.kernels import fp8_gemm

    seen = []
    real = fp8_gemm.scaled_mm

    class Spy:
        def __getitem__(self, grid):
            def launch(a, b, *args, **kw):
                if kernel_path == "tma":
                    seen.append((a.strides[1], b.strides[1]))
                else:
                    seen.append((a.stride(1), b.stride(0)))
            return launch

    monkeypatch.setattr(fp8_gemm, "_fp8_gemm_tma_kernel" if kernel_path == "tma" else "_fp8_gemm_kernel", Spy())
    M, K, N = 48, 80, 40
    x = torch.randn(M, K).to(torch.float8_e4m3fn)
    w = torch.randn(N, K).to(torch.float8_e4m3fn)
    one = torch.ones((), dtype=torch.float32)
    for a, b in ((x, w.t()), (x, w), (x.t().contiguous().t(), w.t()), (x.t().contiguous().t(), w.t().contiguous())):
        if a.shape[1] != b.shape[0]:
            b = b.t()
        real(a, b, one, one, None, torch.bfloat16)
    assert len(seen) == 4 and all(s == (1, 1) for s in seen), seen


def test_tma_path_is_taken_where_it_can_be():
    from tokenforge.kernels import fp8_gemm

    use_tma = fp8_gemm.tma_operands_ok  # the layout rule (use_tma adds the device check)
    a = torch.randn(32, 64).to(torch.float8_e4m3fn)
    b = torch.randn(48, 64).to(torch.float8_e4m3fn).t()
    assert use_tma(a, b)
    unaligned = torch.randn(32 * 64 + 1).to(torch.float8_e4m3fn)[1:].view(32, 64)  # base 1 byte off
    b_unaligned = torch.randn(48 * 64 + 1).to(torch.float8_e4m3fn)[1:].view(48, 64).t()
    assert not use_tma(unaligned, b) and not use_tma(a, b_unaligned)
    assert not use_tma(a[:, :0], b[:0])


@pytest.mark.compile_gate
@pytest.mark.parametrize("b_type", ["fp8e4nv", "fp8e5"])
def test_gemm_compiles_with_fp8_wgmma_on_sm90(b_type):
    """Gated at sm_90 only: FP8 dots need sm_89+, and sm_80 is served by the emulation. The
    launcher passes K-major operands only (test_launcher_passes_only_k_major_operands). Every
    config of both kernels: no spills, FP8 wgmma; the persistent kernel also loads by TMA
    (cp.async.bulk.tensor) and fits Hopper's 227 KB of shared memory."""
    from compile_gate import TARGETS, compile_kernel, ptxas_report, spill_bytes, uses_wgmma

    from tokenforge.kernels import fp8_gemm

    # all_configs pairs each tile config with the scale modes it is launched for: tensorwise /
    # rowwise (epilogue) and the blockwise pairings (scales in the K loop: a (1, 128) or
    # (128, 128), b (128, 1) or (128, 128)).
    scale_strides = ("stride_sam", "stride_sak", "stride_sbk", "stride_sbn")
    for name, cfg in fp8_gemm.all_configs():
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        types = dict(SA="*fp32", SB="*fp32", BIAS="*bf16", OUT="*bf16")
        types.update({n: "i32" for n in ("M", "N", "K", "stride_om", *scale_strides)})
        consts = dict(cfg, HAS_BIAS=True, UPCAST=False, stride_on=1)
        tma = name == "_fp8_gemm_tma_kernel"
        if tma:
            types.update(A=f"tensordesc<fp8e4nv[{cfg['BLOCK_M']}, {cfg['BLOCK_K']}]>",
                         B=f"tensordesc<{b_type}[{cfg['BLOCK_N']}, {cfg['BLOCK_K']}]>")
        else:
            types.update(A="*fp8e4nv", B=f"*{b_type}", stride_am="i32", stride_bn="i32")
            consts.update(stride_ak=1, stride_bk=1)
        compiled = compile_kernel(getattr(fp8_gemm, name), types, consts, warps, TARGETS["sm_90"],
                                  num_stages=stages, unaligned_args=("M", "N", *scale_strides))
        ptx = compiled.asm["ptx"]
        assert uses_wgmma(compiled) and "e4m3" in [l for l in ptx.splitlines() if "wgmma.mma_async" in l][0]
        report = ptxas_report(ptx, "sm_90")
        assert spill_bytes(report) == 0, f"{name} {cfg} spills:\n{report}"
        if tma:
            assert "cp.async.bulk.tensor" in ptx, f"{name} {cfg}: no TMA load"
            assert compiled.metadata.shared <= 227 * 1024, f"{name} {cfg}: {compiled.metadata.shared} B of shared memory"
