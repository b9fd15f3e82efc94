"""Grouped matmul (tokenforge.ops.grouped_mm, kernels/grouped_mm.py): forward, dA and dB against the
float64 loop over experts for awkward expert loads (empty experts, one expert taking every token,
one-row experts, T not a multiple of any tile), every dtype the kernel takes, strided inputs, the
persistent walk with fewer programs than work items, int64 row offsets, bad input, and the
sm_90 / sm_80 compile gate."""

from __future__ import annotations

import re

import pytest
import torch
from device_params import DEVICES

from tokenforge.ops import grouped_mm, grouped_mm_reference
from tokenforge.testing import TOLERANCE, rel_error


def _offs(counts, device):
    return torch.cumsum(torch.tensor(counts), 0).to(torch.int32).to(device)


# (tokens per expert, K, N): CPU sizes cut every interpreter tile (16 x 32 x 32) with tails;
# GPU sizes are MoE-shaped (DeepSeek-V3-like expert width, 64 experts).
CPU_CASES = {
    "awkward": ([0, 21, 1, 33, 0, 7], 40, 37),
    "one-expert-takes-all": ([0, 0, 53, 0], 24, 50),
    "all-empty-but-last": ([0, 0, 0, 5], 8, 8),
    "single-expert": ([19], 33, 17),
}
GPU_CASES = {
    "moe-64": ([int(c) for c in torch.randint(0, 600, (64,), generator=torch.Generator().manual_seed(0))], 2048, 1408),
    "skewed": ([8192] + [0] * 14 + [3], 7168, 2048),
}


def _cases(device):
    return CPU_CASES if device == "cpu" else GPU_CASES


def check_against_reference(a, b, offs, counts, tol=None, backend="triton"):
    """grouped_mm on a kernel backend (Triton unless told) against the float64 loop: out and dA norm-wise and per row,
    dB per expert (one expert's wrong gradient must fail), an empty expert's dB exactly zero.
    a, b require grad; ``tol`` defaults to the input dtype's (tests/test_fuzz.py and
    tests/test_gpu_configs_on_cpu.py call this too)."""
    out = grouped_mm(a, b, offs, backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)
    a64 = a.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    ref = grouped_mm_reference(a64, b64, offs)
    ref.backward(grad.double())
    tol = TOLERANCE[a.dtype] if tol is None else tol
    assert out.dtype == a.dtype and out.shape == ref.shape
    assert rel_error(out, ref) <= tol, "out"
    if sum(counts):
        assert rel_error(a.grad, a64.grad) <= tol, "dA"
    for e, count in enumerate(counts):
        if count == 0:
            assert torch.count_nonzero(b.grad[e]) == 0, f"dB[{e}] of an empty expert"
        else:
            assert rel_error(b.grad[e], b64.grad[e]) <= tol, f"dB[{e}]"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_loop_forward_and_backward(device, dtype):
    for name, (counts, k, n) in _cases(device).items():
        torch.manual_seed(hash(name) % 1000)
        offs = _offs(counts, device)
        t = sum(counts)
        a = torch.randn(t, k, device=device, dtype=dtype, requires_grad=True)
        b = (torch.randn(len(counts), k, n, device=device) / k ** 0.5).to(dtype).requires_grad_()
        check_against_reference(a, b, offs, counts)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the poisoned expert's own rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_descriptor_path(dtype):
    """Layouts TMA takes (unit-stride rows, 16-byte row strides) run the forward from tensor
    descriptors (the interpreter runs them; on a GPU, sm_90+): K and N with tails past the
    interpreter's 32-wide boxes (zero-filled), T past the last box, awkward experts; a 3-D weight
    box never reads the next expert's rows (an inf there stays out of this expert's outputs)."""
    from tokenforge.kernels import INTERPRETED
    from tokenforge.kernels import grouped_mm as kgm

    if not INTERPRETED:
        pytest.skip("CPU tensors run the descriptors only in the interpreter")
    counts, k, n = [0, 21, 1, 33, 0, 7], 40, 48
    offs = _offs(counts, "cpu")
    a = torch.randn(sum(counts), k, dtype=dtype, requires_grad=True)
    b = (torch.randn(len(counts), k, n) / k ** 0.5).to(dtype).requires_grad_()
    assert kgm.tma_layout(a.detach(), b.detach()) == "plain"
    assert kgm.tma_layout(a.detach(), b.detach().transpose(1, 2)) == "trans_b"  # dA's b^T
    check_against_reference(a, b, offs, counts)  # dA through the transposed descriptor
    # nn.Linear-style expert weights stored (E, N, K): the forward reads them transposed.
    b_nk = (torch.randn(len(counts), n, k) / k ** 0.5).to(dtype)
    b_t = b_nk.transpose(1, 2).requires_grad_()
    assert kgm.tma_layout(a.detach(), b_t.detach()) == "trans_b"
    check_against_reference(a.detach().requires_grad_(), b_t, offs, counts)
    poisoned = b.detach().clone()
    poisoned[2] = float("inf")  # expert 2 (one row); expert 1's boxes end at its own K
    out = grouped_mm(a.detach(), poisoned, offs, backend="triton")
    rows = torch.arange(out.shape[0])
    mine = (rows < 21)  # expert 1's rows
    assert torch.isfinite(out[mine]).all()
    assert rel_error(out[mine], grouped_mm_reference(a.detach().double(), b.detach().double(), offs)[mine]) \
        <= TOLERANCE[dtype]


def _fp8_operands(counts, k, n, device, a_dtype=torch.float8_e4m3fn):
    """Tokens at magnitudes 1e-3 .. 1e3 quantized rowwise, each expert's weight colwise."""
    from tokenforge import fp8

    t = sum(counts)
    x = torch.randn(t, k, device=device) * torch.logspace(-3, 3, max(t, 1), device=device)[:t, None]
    w = torch.randn(len(counts), k, n, device=device) * torch.logspace(-1, 1, len(counts), device=device)[:, None, None]
    a, sa = fp8.quantize(x, a_dtype, scaling="rowwise", backend="torch")
    parts = [fp8.quantize(w[e], scaling="colwise", backend="torch") for e in range(len(counts))]
    return a, torch.stack([d for d, _ in parts]), sa, torch.stack([s for _, s in parts])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("a_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_matches_the_dequantized_loop(device, a_dtype):
    """grouped_mm_fp8 against the float64 loop over experts on the dequantized operands, per row (one
    wrong row or expert scale fails), fp32 and bf16 out, b (E, K, N) and (E, N, K)-stored; an
    expert's scales swapped for another's fails."""
    from tokenforge.ops import grouped_mm_fp8, grouped_mm_fp8_reference

    cases = {"awkward": ([0, 21, 1, 33, 0, 7], 48, 64), "one-takes-all": ([0, 0, 53, 0], 32, 48)} if device == "cpu" \
        else {"moe-64": (GPU_CASES["moe-64"][0], 2048, 1408), "skewed": ([8192] + [0] * 14 + [3], 7168, 2048)}
    for name, (counts, k, n) in cases.items():
        offs = _offs(counts, device)
        a, b, sa, sb = _fp8_operands(counts, k, n, device, a_dtype)
        ref = grouped_mm_fp8_reference(a, b, offs, sa.double(), sb.double(), torch.float64)
        live = ref.norm(dim=1) > 0

        def worst_row(out):
            return ((out.double() - ref).norm(dim=1)[live] / ref.norm(dim=1)[live]).max().item()

        for bb in (b, b.transpose(1, 2).contiguous().transpose(1, 2)):
            assert worst_row(grouped_mm_fp8(a, bb, offs, sa, sb, out_dtype=torch.float32)) <= 1e-5, name
            out = grouped_mm_fp8(a, bb, offs, sa.reshape(-1), sb.reshape(len(counts), n))
            assert out.dtype == torch.bfloat16 and worst_row(out) <= 2.0 ** -7, name
        busy = [e for e, c in enumerate(counts) if c]
        if len(busy) > 1:
            swapped = sb.clone()
            swapped[[busy[0], busy[1]]] = sb[[busy[1], busy[0]]]
            assert worst_row(grouped_mm_fp8(a, b, offs, sa, swapped, out_dtype=torch.float32)) > 1e-2, name


def _fp8_block_operands(counts, k, n, device):
    """Tokens whose 128-wide K blocks sit at magnitudes 1e-3 .. 1e3 quantized in 1x128 blocks, each
    expert's weight (its 128x128 blocks at 1e-2 .. 1e2, experts 1e-1 .. 1e1 apart) in 128x128
    blocks: one scale per row or per whole weight would flush the small blocks, another expert's
    scales are off by a factor."""
    from tokenforge import fp8

    t, kb, nb = sum(counts), -(-k // 128), n // 128
    x = torch.randn(t, k, device=device) * torch.logspace(-3, 3, kb, device=device).repeat_interleave(128)[:k]
    mags = torch.logspace(-2, 2, kb * nb, device=device).reshape(kb, nb)
    w = torch.randn(len(counts), k, n, device=device) * mags.repeat_interleave(128, 0)[:k].repeat_interleave(128, 1) \
        * torch.logspace(-1, 1, len(counts), device=device)[:, None, None]
    a, sa = fp8.quantize(x, scaling="blockwise", block=(1, 128), backend="torch")
    parts = [fp8.quantize(w[e], scaling="blockwise", block=(128, 128), backend="torch") for e in range(len(counts))]
    return a, torch.stack([d for d, _ in parts]), sa, torch.stack([s for _, s in parts])


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_blockwise_matches_the_dequantized_loop(device):
    """Blockwise scales (DeepSeek-V3's 1x128 tokens, 128x128 weight blocks) against the float64 loop
    on the dequantized operands, per row, fp32 and bf16 out, b (E, K, N) and (E, N, K)-stored, a K
    tail block (K = 208) on CPU; dA's layout (b^T with transposed block scales, by strides); a
    weight block's scale moved to the next K block, or an expert's swapped, fails."""
    from tokenforge.ops import grouped_mm_fp8, grouped_mm_fp8_reference

    cases = {"awkward": ([0, 21, 1, 133, 0, 7], 208, 256), "one-takes-all": ([0, 0, 53, 0], 256, 128)} \
        if device == "cpu" else {"moe-64": (GPU_CASES["moe-64"][0], 2048, 1408),
                                 "skewed": ([8192] + [0] * 14 + [3], 7168, 2048)}
    for name, (counts, k, n) in cases.items():
        offs = _offs(counts, device)
        a, b, sa, sb = _fp8_block_operands(counts, k, n, device)
        ref = grouped_mm_fp8_reference(a, b, offs, sa.double(), sb.double(), torch.float64)
        live = ref.norm(dim=1) > 0

        def worst_row(out, ref=ref, live=live):
            return ((out.double() - ref).norm(dim=1)[live] / ref.norm(dim=1)[live]).max().item()

        for bb in (b, b.transpose(1, 2).contiguous().transpose(1, 2)):
            assert worst_row(grouped_mm_fp8(a, bb, offs, sa, sb, out_dtype=torch.float32)) <= 1e-5, name
            out = grouped_mm_fp8(a, bb, offs, sa, sb)
            assert out.dtype == torch.bfloat16 and worst_row(out) <= 2.0 ** -7, name
        if k % 128 == 0:  # dA = dOut @ b^T: b^T and its block scales transposed by strides
            d, sd = a[:, :n].contiguous(), sa[:, : n // 128].contiguous()
            ref_t = grouped_mm_fp8_reference(d, b.transpose(1, 2), offs, sd.double(), sb.transpose(1, 2).double(),
                                             torch.float64)
            got = grouped_mm_fp8(d, b.transpose(1, 2), offs, sd, sb.transpose(1, 2), out_dtype=torch.float32)
            assert worst_row(got, ref_t, ref_t.norm(dim=1) > 0) <= 1e-5, name
        if sb.shape[1] > 1:
            shifted = sb.clone()
            shifted[:, 1] = sb[:, 0]
            assert worst_row(grouped_mm_fp8(a, b, offs, sa, shifted, out_dtype=torch.float32)) > 1e-2, name
        busy = [e for e, c in enumerate(counts) if c]
        if len(busy) > 1:
            swapped = sb.clone()
            swapped[[busy[0], busy[1]]] = sb[[busy[1], busy[0]]]
            assert worst_row(grouped_mm_fp8(a, b, offs, sa, swapped, out_dtype=torch.float32)) > 1e-2, name


def test_fp8_bad_input_gets_a_clear_error():
    from tokenforge.ops import grouped_mm_fp8

    a, b, sa, sb = _fp8_operands([5, 11], 32, 16, "cpu")
    offs = _offs([5, 11], "cpu")
    cases = [
        ((a.float(), b, offs, sa, sb), TypeError, "float8_e4m3fn/float8_e5m2"),
        ((a, b, offs, sa[:3], sb), ValueError, "one scale per token row"),
        ((a, b, offs, sa, sb[:, :, :8]), ValueError, "one scale per expert and output column"),
        ((a, b, offs, sa.double(), sb), TypeError, "float32"),
        ((a[:, :24], b[:, :24], offs, sa, sb), ValueError, "multiples of 16"),
        ((a, b, offs.long(), sa, sb), ValueError, "int32"),
        ((a, b, _offs([5, 10], "cpu"), sa, sb), ValueError, "offs[-1]"),
    ]
    for args, exc, words in cases:
        with pytest.raises(exc, match=re.escape(words)):
            grouped_mm_fp8(*args)
    a, b, sa, sb = _fp8_block_operands([5, 11], 256, 128, "cpu")
    blockwise = [
        ((a, b, offs, sa[:, :1], sb), ValueError, "one scale per token and 128 of K"),
        ((a, b, offs, sa, sb[:, :1]), ValueError, "or (2, 2, N / 128) per 128x128 block"),
        ((a, b, offs, sa[:, 0], sb), ValueError, "one scale per token and 128 of K"),
        ((a[:, :144], b[:, :144, :], offs, sa[:, :1], sb), ValueError, "one scale per token and 128 of K"),
    ]
    for args, exc, words in blockwise:
        with pytest.raises(exc, match=re.escape(words)):
            grouped_mm_fp8(*args)


def test_cuda_backend_refuses_cleanly_without_a_gpu():
    """backend='cuda' (the CUTLASS sm_90a kernel) on CPU tensors, and the raw entry point with bad
    arguments or no device, raise errors that say what to do."""
    from tokenforge.backends import BackendUnavailableError

    a, b, offs = torch.randn(8, 16), torch.randn(2, 16, 16), _offs([3, 5], "cpu")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors only"):
        grouped_mm(a, b, offs, backend="cuda")
    import tokenforge.cuda as tf_cuda

    if not tf_cuda.is_available() or tf_cuda.get_extension().grouped_mm_sm90_unavailable():
        pytest.skip("tokenforge._C without the CUTLASS grouped GEMM (test_extension says whether that is right)")
    ext = tf_cuda.get_extension()
    args = dict(a_ptr=256, b_ptr=256, out_ptr=256, offs_ptr=256, workspace_ptr=256, workspace_bytes=1 << 20,
                experts=4, tokens=64, n=64, k=64, lda=64, ldb_k=64, ldb_n=1, stride_be=4096, ldo=64, kind=0, stream=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        ext.grouped_mm_sm90(**{**args, "n": 60})
    with pytest.raises(ValueError, match="unit stride along K or along N"):
        ext.grouped_mm_sm90(**{**args, "ldb_n": 2})
    with pytest.raises(ValueError, match="experts"):
        ext.grouped_mm_sm90(**{**args, "experts": 0})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            ext.grouped_mm_sm90(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_backend_on_hopper():
    """On an H100/H200 the CUTLASS grouped GEMM (bf16) matches the float64 loop forward, dA (the
    K-major b^T kernel) and dB (the M-major wgrad kernel, zeros for empty experts) on MoE-shaped
    and skewed loads, per row as well as in norm; and takes (E, N, K)-stored weights as a view."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUTLASS grouped GEMM is built for sm_90a")
    import tokenforge.cuda as tf_cuda

    assert tf_cuda.is_available() and not tf_cuda.get_extension().grouped_mm_sm90_unavailable()
    for name, (counts, k, n) in GPU_CASES.items():
        torch.manual_seed(hash(name) % 1000)
        offs = _offs(counts, "cuda")
        a = torch.randn(sum(counts), k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = (torch.randn(len(counts), k, n, device="cuda") / k ** 0.5).to(torch.bfloat16).requires_grad_()
        check_against_reference(a, b, offs, counts, backend="cuda")
        out = grouped_mm(a.detach(), b.detach(), offs, backend="cuda").double()
        ref = grouped_mm_reference(a.detach().double(), b.detach().double(), offs)
        rows = ((out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30))[ref.norm(dim=1) > 0]
        assert rows.max().item() <= TOLERANCE[torch.bfloat16], name
        b_nk = b.detach().transpose(1, 2).contiguous()  # weights stored (E, N, K)
        viewed = grouped_mm(a.detach(), b_nk.transpose(1, 2), offs, backend="cuda").double()
        assert rel_error(viewed, ref) <= TOLERANCE[torch.bfloat16], name


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    """a as a column slice of a wider tensor and b stored (E, N, K) and viewed transposed (the
    layout nn.Linear-style expert weights have): strides are honoured, no copy needed."""
    counts, k, n = [5, 0, 30, 12], 24, 40
    offs = _offs(counts, device)
    wide = torch.randn(sum(counts), 2 * k, device=device)
    a = wide[:, 3:3 + k].detach().requires_grad_()
    b_nk = torch.randn(len(counts), n, k, device=device, requires_grad=True)
    b = b_nk.transpose(1, 2)
    assert not a.is_contiguous() and not b.is_contiguous()
    out = grouped_mm(a, b, offs, backend="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    a64, b64 = a.detach().double().requires_grad_(), b_nk.detach().double().requires_grad_()
    ref = grouped_mm_reference(a64, b64.transpose(1, 2), offs)
    ref.backward(grad.double())
    assert rel_error(out, ref) <= 1e-5
    assert rel_error(a.grad, a64.grad) <= 1e-5
    assert rel_error(b_nk.grad, b64.grad) <= 1e-5


def test_persistent_walk_covers_every_tile_with_few_programs(monkeypatch):
    """Three programs (the interpreter's persistent grid) walk 4 experts x 3 row tiles x 2 column
    tiles, and one program alone walks them all: every row is written exactly once."""
    from tokenforge.kernels import grouped_mm as kgm

    if not kgm.INTERPRETED:
        pytest.skip("interpreter-only: the program count is the interpreter's")
    counts, k, n = [40, 3, 0, 48], 16, 64
    offs = _offs(counts, "cpu")
    a = torch.randn(sum(counts), k)
    b = torch.randn(len(counts), k, n)
    ref = grouped_mm_reference(a.double(), b.double(), offs)
    for programs in (1, 3):
        monkeypatch.setattr(kgm, "INTERPRETER_PROGRAMS", programs)
        out = torch.full((sum(counts), n), float("nan"))
        kgm.grouped_mm_forward(a, b, offs, out)
        assert rel_error(out, ref) <= 1e-5, programs


def test_row_offsets_are_64_bit():
    """Row index x row stride past 2^31 with both fitting int32 (Triton types them i32): a strided
    view of 3 rows with row stride 2^30 + 64, so the third row starts past element 2^31, read and
    written through the interpreter (int32 offsets would wrap and read the wrong memory)."""
    from tokenforge.kernels import grouped_mm as kgm

    if not kgm.INTERPRETED:
        pytest.skip("interpreter-only")
    k, n = 16, 8
    stride = 2**30 + 64
    storage = torch.empty(2 * stride + k, dtype=torch.bfloat16)  # 4 GiB of address space, 3 rows touched
    a = torch.as_strided(storage, (3, k), (stride, 1))
    for r in range(3):
        a[r] = float(r + 1)
    b = torch.ones(2, k, n, dtype=torch.bfloat16)
    out_storage = torch.empty(2 * stride + n, dtype=torch.bfloat16)
    out = torch.as_strided(out_storage, (3, n), (stride, 1))
    kgm.grouped_mm_forward(a, b, _offs([1, 2], "cpu"), out)
    for r in range(3):
        assert torch.equal(out[r], torch.full((n,), 16.0 * (r + 1), dtype=torch.bfloat16)), r
    db = torch.empty(2, k, n, dtype=torch.bfloat16)
    kgm.grouped_mm_wgrad(a, out, _offs([1, 2], "cpu"), db)
    assert torch.equal(db[1], torch.full((k, n), 2 * 32.0 + 3 * 48.0, dtype=torch.bfloat16))


def test_empty_shapes():
    offs = _offs([0, 0], "cpu")
    a = torch.randn(0, 8, requires_grad=True)
    b = torch.randn(2, 8, 4, requires_grad=True)
    out = grouped_mm(a, b, offs)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert torch.count_nonzero(b.grad) == 0


@pytest.mark.parametrize("case, exc, words", [
    ("offs-not-monotone", ValueError, ["offs", "non-decreasing"]),
    ("offs-last-not-T", ValueError, ["offs[-1]", "rows"]),
    ("offs-int64", TypeError, ["offs", "int32"]),
    ("offs-wrong-length", ValueError, ["offs", "one entry per expert"]),
    ("k-mismatch", ValueError, ["K"]),
    ("dtype-mismatch", TypeError, ["dtype"]),
    ("int-inputs", TypeError, ["dtype"]),
    ("a-3d", ValueError, ["a", "2-D"]),
    ("b-2d", ValueError, ["b", "3-D"]),
])
def test_bad_input_gets_a_clear_error(case, exc, words):
    a, b, offs = torch.randn(10, 8), torch.randn(3, 8, 4), _offs([3, 3, 4], "cpu")
    if case == "offs-not-monotone":
        offs = torch.tensor([5, 3, 10], dtype=torch.int32)
    elif case == "offs-last-not-T":
        offs = torch.tensor([3, 6, 9], dtype=torch.int32)
    elif case == "offs-int64":
        offs = offs.long()
    elif case == "offs-wrong-length":
        offs = offs[:2]
    elif case == "k-mismatch":
        b = torch.randn(3, 9, 4)
    elif case == "dtype-mismatch":
        b = b.double()
    elif case == "int-inputs":
        a, b = a.int(), b.int()
    elif case == "a-3d":
        a = a[None]
    elif case == "b-2d":
        b = b[0]
    with pytest.raises(exc) as info:
        grouped_mm(a, b, offs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_check_offs_false_skips_the_host_check():
    """With check_offs=False an invalid offs is not read on the host: no error, no fault."""
    a, b = torch.randn(10, 8), torch.randn(3, 8, 4)
    out = grouped_mm(a, b, torch.tensor([3, 6, 9], dtype=torch.int32), check_offs=False, backend="torch")
    assert out.shape == (10, 4) and torch.count_nonzero(out[9]) == 0


def test_custom_op_is_registered_and_traceable():
    """torch.compile sees tokenforge::grouped_mm (fake tensors give the output shape)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, b = torch.empty(12, 8, dtype=torch.bfloat16), torch.empty(3, 8, 5, dtype=torch.bfloat16)
        offs = torch.empty(3, dtype=torch.int32)
        assert torch.ops.tokenforge.grouped_mm(a, b, offs, "triton").shape == (12, 5)
        assert torch.ops.tokenforge.grouped_mm_wgrad(a, torch.empty(12, 5, dtype=torch.bfloat16), offs,
                                                     "triton").shape == (3, 8, 5)


@pytest.mark.compile_gate
def test_kernels_compile_for_hopper_and_ampere():
    """Every GPU config of both kernels compiles for sm_90 with wgmma and for sm_80, no spills
    (the fp8 ones, rowwise and blockwise, for sm_90)."""
    from compile_gate import TARGETS, compile_kernel, ptxas_report, spill_bytes, uses_wgmma

    from tokenforge.kernels import grouped_mm as kgm

    types = {
        "_grouped_mm_kernel": dict(A="*bf16", B="*bf16", OFFS="*i32", OUT="*bf16", E="i32", N="i32", K="i32",
                                   stride_am="i32", stride_be="i32", stride_bk="i32", stride_om="i32"),
        "tma": lambda c: dict(A=f"tensordesc<bf16[{c['BLOCK_M']}, {c['BLOCK_K']}]>",
                              B=(f"tensordesc<bf16[1, {c['BLOCK_N']}, {c['BLOCK_K']}]>" if c["TRANS_B"] else
                                 f"tensordesc<bf16[1, {c['BLOCK_K']}, {c['BLOCK_N']}]>"), OFFS="*i32", OUT="*bf16",
                              E="i32", N="i32", K="i32", stride_am="i32", stride_be="i32", stride_bk="i32",
                              stride_om="i32"),
        "_grouped_mm_wgrad_kernel": dict(A="*bf16", DOUT="*bf16", OFFS="*i32", DB="*bf16", N="i32", K="i32",
                                         stride_am="i32", stride_dm="i32", stride_be="i32", stride_bk="i32"),
    }
    unit = {"_grouped_mm_kernel": dict(stride_ak=1, stride_bn=1, stride_on=1),
            "_grouped_mm_wgrad_kernel": dict(stride_ak=1, stride_dn=1, stride_bn=1)}
    for name, cfg in kgm.all_configs():
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        tma = cfg.get("TMA", False)
        scaled = cfg.get("SCALED", False)
        cfg.setdefault("BLOCKWISE", False)
        for arch, target in TARGETS.items():
            if (tma or scaled) and arch != "sm_90":
                continue  # tensor descriptors are the sm_90 path (sm_80 takes pointer loads); fp8 needs sm_89+
            # fp8: e4m3 tokens (the forward) and e5m2 gradients (dA = dOut @ b^T, dB = a^T @ dOut in fp8 training)
            for a_fp8 in (("fp8e4nv", "fp8e5") if scaled else (None,)):
                arg_types = types["tma"](cfg) if tma else types[name]
                constexprs = dict(cfg, **unit[name])
                if name == "_grouped_mm_kernel" and scaled:  # fp8 a and K-major b, fp32 scales, bf16 out
                    arg_types = {k: v.replace("bf16", a_fp8 if k == "A" else "fp8e4nv") if k in ("A", "B") else v
                                 for k, v in arg_types.items()}
                    arg_types.update(SA="*fp32", SB="*fp32", stride_sbe="i32")
                    if cfg["BLOCKWISE"]:  # scale_a (T, K/128), scale_b (E, K/128, N/128) by strides
                        arg_types.update(stride_sam="i32", stride_sak="i32", stride_sbk="i32", stride_sbn="i32")
                    else:
                        constexprs.update(stride_sam=0, stride_sak=0, stride_sbk=0, stride_sbn=0)
                    if not tma:
                        arg_types["stride_bn"] = arg_types.pop("stride_bk")
                        constexprs.pop("stride_bn")
                        constexprs["stride_bk"] = 1
                elif scaled:  # the fp8 dB: token-major fp8 a^T (e4m3) and dOut^T (e4m3 / e5m2), bf16 dB
                    arg_types = dict(A="*fp8e4nv", DOUT=f"*{a_fp8}", OFFS="*i32", DB="*bf16", N="i32", K="i32",
                                     stride_ak="i32", stride_dn="i32", stride_be="i32", stride_bk="i32",
                                     SA="*fp32", SB="*fp32")
                    constexprs = dict(cfg, stride_am=1, stride_dm=1, stride_bn=1)
                elif name == "_grouped_mm_kernel":
                    constexprs.update(SA=None, SB=None, stride_sbe=0, SCALED=False, stride_sam=0, stride_sak=0,
                                      stride_sbk=0, stride_sbn=0)
                else:
                    constexprs.update(SA=None, SB=None, SCALED=False)
                compiled = compile_kernel(getattr(kgm, name), arg_types, constexprs, warps, target,
                                          num_stages=stages, unaligned_args=("E", "N", "K"))
                if arch == "sm_90":
                    assert uses_wgmma(compiled), f"{name} {cfg}: no wgmma on sm_90"
                    if scaled:
                        kind = {"fp8e4nv": "e4m3", "fp8e5": "e5m2"}[a_fp8]
                        pair = f"{kind}\\.e4m3" if name == "_grouped_mm_kernel" else f"e4m3\\.{kind}"
                        assert re.search(rf"wgmma\.mma_async\S*\.{pair}", compiled.asm["ptx"]), \
                            f"{name} {cfg} {a_fp8}: no FP8 wgmma"
                    ptx = compiled.asm["ptx"]
                    if tma:  # the tiles come in by the copy engine, not by thread loads
                        assert "cp.async.bulk.tensor" in ptx, f"{name} {cfg}: no TMA load on sm_90"
                report = ptxas_report(compiled.asm["ptx"], arch)
                assert spill_bytes(report) == 0, f"{name} {cfg} {a_fp8 or ''} spills on {arch}:\n{report}"
