"""tokenforge.fp8.quantize / dequantize: every backend bit-exact against the torch reference (the
cast is deterministic round-to-nearest-even, so nothing less is acceptable), round-trip error
within the fp8 format's precision, and the documented amax = 0 / inf / nan / saturation rules."""

import pytest
from compile_gate import GATE_ARCHS
import torch
from device_params import DEVICES, HAS_CUDA, kernel_backends

from tokenforge import fp8
from tokenforge.fp8.quantize import FLT_MIN, quantize_reference
from tokenforge.testing import rel_error

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
SCALINGS = ["tensorwise", "rowwise", "colwise"]
# Round-trip bound: RNE to m mantissa bits is <= 2^-(m+1) relative per element for normal values;
# in norm (Gaussian data, amax-based scale) it is well under that. e4m3: 2^-4, e5m2: 2^-3.
ROUNDTRIP = {torch.float8_e4m3fn: 2.0 ** -4, torch.float8_e5m2: 2.0 ** -3}


def assert_bits_equal(data, ref):
    a, b = data.cpu().view(torch.uint8), ref.cpu().view(torch.uint8)
    nan = torch.isnan(data.cpu().float()) & torch.isnan(ref.cpu().float())
    bad = (a != b) & ~nan
    assert not bad.any(), f"{int(bad.sum())} fp8 codes differ, e.g. {a[bad][:5].tolist()} vs {b[bad][:5].tolist()}"


def assert_scales_equal(scale, ref):
    assert scale.shape == ref.shape and scale.dtype == torch.float32
    assert torch.equal(scale.cpu().nan_to_num(-1.0, 3e38, -3e38), ref.cpu().nan_to_num(-1.0, 3e38, -3e38))


def backends_for(device, scaling):
    out = kernel_backends(device)
    return out + ["torch"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("power_of_two", [False, True])
def test_matches_reference_bit_exactly(device, dtype, scaling, power_of_two):
    shapes = [(1, 1), (17, 129), (64, 300)] if device == "cpu" else [(4096, 4096), (8192, 1000), (3, 70000)]
    for x_dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in shapes:
            # extreme, varied magnitudes per column: subnormal fp8 results and saturation both occur
            mags = torch.logspace(-6, 6, shape[1]) if x_dtype != torch.float16 else torch.logspace(-3, 3, shape[1])
            x = (torch.randn(shape) * mags).to(x_dtype).to(device)
            ref_data, ref_scale = quantize_reference(x, dtype, scaling, power_of_two)
            for backend in backends_for(device, scaling):
                data, scale = fp8.quantize(x, dtype, scaling, power_of_two, backend=backend)
                assert data.dtype == dtype and data.shape == x.shape
                assert_bits_equal(data, ref_data)
                assert_scales_equal(scale, ref_scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_round_trip_error_and_scale_shapes(device, dtype, scaling):
    R, C = (48, 80) if device == "cpu" else (4096, 4096)
    x = torch.randn(R, C, device=device, dtype=torch.bfloat16)
    for backend in backends_for(device, scaling):
        data, scale = fp8.quantize(x, dtype, scaling, backend=backend)
        expected = {"tensorwise": (), "rowwise": (R, 1), "colwise": (1, C)}[scaling]
        assert tuple(scale.shape) == expected
        assert rel_error(fp8.dequantize(data, scale), x.double()) < ROUNDTRIP[dtype]
        # scale is the dequantization factor: the largest element maps to (about) FP8_MAX
        assert (data.float().abs().amax() - fp8.fp8_max(dtype)).abs() <= fp8.fp8_max(dtype) * 2.0 ** -3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_special_values(device, scaling):
    """amax 0 -> scale 1, zero data; a nan group -> nan scale; an inf group -> inf scale; other
    groups untouched; subnormal amax -> FLT_MIN scale, no inf/0."""
    x = torch.randn(32, 48, device=device)
    x[0] = 0.0
    x[:, 0] = 0.0
    x[5, 7] = float("nan")
    x[9, 11] = float("inf")
    x[12] = x[12] * 1e-40
    for backend in backends_for(device, scaling):
        data, scale = fp8.quantize(x, torch.float8_e4m3fn, scaling, backend=backend)
        ref_data, ref_scale = quantize_reference(x, torch.float8_e4m3fn, scaling)
        assert_bits_equal(data, ref_data)
        assert_scales_equal(scale, ref_scale)
        if scaling == "tensorwise":
            assert torch.isnan(scale)
        elif scaling == "rowwise":
            assert scale[0].item() == 1.0 and (data[0].float() == 0).all()
            assert torch.isnan(scale[5]) and torch.isinf(scale[9])
            assert scale[12].item() == pytest.approx(max(FLT_MIN, x[12].abs().max().item() / 448), rel=1e-6)
            ok = [i for i in range(32) if i not in (5, 9)]
            assert torch.isfinite(fp8.dequantize(data[ok], scale[ok])).all()
        else:
            assert scale[0, 0].item() == 1.0
            assert torch.isnan(scale[0, 7]) and torch.isinf(scale[0, 11])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP8)
def test_saturation_and_power_of_two(device, dtype):
    x = torch.randn(16, 32, device=device) * 1e4
    for backend in backends_for(device, "rowwise"):
        data, scale = fp8.quantize(x, dtype, "rowwise", power_of_two=True, backend=backend)
        m, e = torch.frexp(scale.cpu())
        assert (m == 0.5).all(), "power-of-two scales must be exact powers of two"
        assert (data.float().abs() <= fp8.fp8_max(dtype)).all()
        assert torch.isfinite(data.float()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_nd_inputs(device):
    x = torch.randn(40, 64, device=device, dtype=torch.bfloat16)
    for backend in backends_for(device, "colwise"):
        for view in (x.t(), x[:, ::2], x[::3]):
            for scaling in SCALINGS:
                d, s = fp8.quantize(view, scaling=scaling, backend=backend)
                rd, rs = quantize_reference(view, scaling=scaling)
                assert_bits_equal(d, rd)
                assert_scales_equal(s, rs)
    x3 = torch.randn(2, 5, 48, device=device)
    for backend in backends_for(device, "rowwise"):
        d, s = fp8.quantize(x3, scaling="rowwise", backend=backend)
        assert d.shape == x3.shape and s.shape == (2, 5, 1)
        assert_bits_equal(d, quantize_reference(x3, scaling="rowwise")[0])


# Block shapes exercised everywhere; every shape the kernel takes is in the sweep below. Blockwise
# runs in the Triton kernel (the CUDA extension refuses it: test_blockwise_refused_by_cuda).
BLOCKS = [(1, 128), (128, 128), (128, 1), (32, 64), (1, 32), (256, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("power_of_two", [False, True])
def test_blockwise_matches_reference_bit_exactly(device, dtype, power_of_two):
    """Awkward sizes (edge blocks cut short on both sides), magnitudes that vary along both axes."""
    shapes = [(1, 1), (130, 300), (257, 129)] if device == "cpu" else [(4096, 4096), (8191, 1000)]
    for x_dtype in (torch.float32, torch.bfloat16):
        for shape in shapes:
            mags = torch.logspace(-5, 5, shape[1])[torch.randperm(shape[1])]
            x = (torch.randn(shape) * mags * torch.logspace(-2, 2, shape[0])[:, None]).to(x_dtype).to(device)
            for block in BLOCKS:
                ref_data, ref_scale = quantize_reference(x, dtype, "blockwise", power_of_two, block)
                expected = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
                assert tuple(ref_scale.shape) == expected
                for backend in ["triton"]:
                    data, scale = fp8.quantize(x, dtype, "blockwise", power_of_two, block=block, backend=backend)
                    assert data.dtype == dtype and data.shape == x.shape, block
                    assert_bits_equal(data, ref_data)
                    assert_scales_equal(scale, ref_scale)


def test_blockwise_every_block_shape_the_kernel_takes():
    from tokenforge.kernels.fp8_quantize import block_shapes

    x = torch.randn(300, 260) * torch.logspace(-3, 3, 260)
    for backend in ["triton"]:
        for block in block_shapes():
            data, scale = fp8.quantize(x, scaling="blockwise", block=block, backend=backend)
            ref_data, ref_scale = quantize_reference(x, scaling="blockwise", block=block)
            assert_bits_equal(data, ref_data)
            assert_scales_equal(scale, ref_scale)


def _block_view(t, block):
    """(R, C) -> (blocks_r, blocks_c, br * bc) with the edge blocks zero-padded."""
    (R, C), (br, bc) = t.shape, block
    nr, nc = -(-R // br), -(-C // bc)
    t = torch.nn.functional.pad(t, (0, nc * bc - C, 0, nr * br - R))
    return t.view(nr, br, nc, bc).permute(0, 2, 1, 3).reshape(nr, nc, br * bc)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [(1, 128), (128, 128), (128, 1)])
def test_blockwise_sqnr_per_block_on_mixed_magnitudes(device, block):
    """Every block at its own magnitude, 1e-4 .. 1e4 across the blocks (shuffled): every block
    keeps e4m3's SQNR against float64 (each block against itself), while the next coarser scaling
    (rowwise for (1, 128), colwise for (128, 1), tensorwise for (128, 128)) flushes the small
    blocks and fails that floor, so a block-scale mix-up (wrong block, transposed grid, a row's
    scale for all its blocks) cannot pass."""
    R, C = (384, 512) if device == "cpu" else (4096, 4096)
    nr, nc = -(-R // block[0]), -(-C // block[1])
    mags = torch.logspace(-4, 4, nr * nc, dtype=torch.float64)[torch.randperm(nr * nc)].view(nr, nc)
    mags = mags.repeat_interleave(block[0], 0)[:R].repeat_interleave(block[1], 1)[:, :C]
    x = (torch.randn(R, C, dtype=torch.float64) * mags).to(device)
    exact = _block_view(x.cpu(), block)
    x = x.float()

    def worst_block_db(y):
        err = _block_view(y.double().cpu(), block) - exact
        return (-20 * torch.log10(err.norm(dim=-1) / exact.norm(dim=-1))).min().item()

    for backend in ["triton", "torch"]:
        data, scale = fp8.quantize(x, scaling="blockwise", block=block, backend=backend)
        assert worst_block_db(fp8.dequantize(data, scale)) >= 25, backend
    coarse = {(1, 128): "rowwise", (128, 1): "colwise", (128, 128): "tensorwise"}[block]
    data, scale = fp8.quantize(x, scaling=coarse, backend="torch")
    assert worst_block_db(fp8.dequantize(data, scale)) < 25


@pytest.mark.parametrize("device", DEVICES)
def test_blockwise_special_values_and_nd(device):
    """amax 0 -> scale 1 and zero data for that block only; a nan in a block -> that block's scale
    nan, an inf -> inf; the neighbours keep finite scales. (1, n) blocks take N-D inputs."""
    x = torch.randn(256, 384, device=device)
    x[:128, :128] = 0.0
    x[3, 200] = float("nan")
    x[200, 300] = float("inf")
    for backend in ["triton"] + ["torch"]:
        data, scale = fp8.quantize(x, scaling="blockwise", block=(128, 128), backend=backend)
        assert scale.shape == (2, 3)
        assert scale[0, 0].item() == 1.0 and (data[:128, :128].float() == 0).all()
        assert torch.isnan(scale[0, 1]) and torch.isinf(scale[1, 2])
        assert torch.isfinite(scale[torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1])]).all()
        d1, s1 = fp8.quantize(x, scaling="blockwise", block=(1, 128), backend=backend)
        assert s1[0, 0].item() == 1.0 and torch.isnan(s1[3, 1]) and torch.isinf(s1[200, 2])
        assert torch.isfinite(s1[3, 0]) and torch.isfinite(s1[3, 2])
    x3 = torch.randn(2, 5, 200, device=device)
    for backend in ["triton"] + ["torch"]:
        d, s = fp8.quantize(x3, scaling="blockwise", block=(1, 64), backend=backend)
        assert d.shape == x3.shape and s.shape == (2, 5, 4)
        rd, rs = quantize_reference(x3.reshape(10, 200), scaling="blockwise", block=(1, 64))
        assert_bits_equal(d.reshape(10, 200), rd)
        assert_scales_equal(s.reshape(10, 4), rs)
        assert rel_error(fp8.dequantize(d, s), x3.double()) < ROUNDTRIP[torch.float8_e4m3fn]


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_blockwise_refused_by_cuda():
    with pytest.raises(Exception, match="blockwise scaling runs in the Triton kernel"):
        fp8.quantize(torch.randn(128, 128, device="cuda"), scaling="blockwise", backend="cuda")


def test_bad_inputs():
    x = torch.randn(4, 16)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fp8.quantize(x.to(torch.int32))
    with pytest.raises(TypeError, match="float8_e4m3fn or torch.float8_e5m2"):
        fp8.quantize(x, torch.float16)
    with pytest.raises(ValueError, match="scaling must be one of"):
        fp8.quantize(x, scaling="blocks")
    with pytest.raises(ValueError, match="block .* is not supported"):
        fp8.quantize(x, scaling="blockwise", block=(1, 100))
    with pytest.raises(ValueError, match="block .* is not supported"):
        fp8.quantize(x, scaling="blockwise", block=(256, 256))
    with pytest.raises(TypeError, match="block must be a"):
        fp8.quantize(x, scaling="blockwise", block=128)
    with pytest.raises(ValueError, match="spans rows, so x must be 2-D"):
        fp8.quantize(torch.randn(2, 3, 128), scaling="blockwise", block=(128, 128))
    with pytest.raises(ValueError, match="for scaling='blockwise' only"):
        fp8.quantize(x, scaling="rowwise", block=(1, 128))
    with pytest.raises(ValueError, match="colwise scaling needs a 2-D"):
        fp8.quantize(torch.randn(2, 3, 4), scaling="colwise")
    with pytest.raises(TypeError, match="must be float8"):
        fp8.dequantize(x, torch.ones(()))


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_quantize_no_host_sync():
    x = torch.randn(4096, 4096, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        fp8.quantize(x, scaling="tensorwise", backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _gate_types(soft):
    types = dict(X="*bf16", DATA="*u8" if soft else "*fp8e4nv", SCALE="*fp32", PARTIAL="*fp32", OFFS="*i32")
    types["DATA_T"] = types["DATA"]  # the per-expert column kernel's transposed output
    types.update({n: "i32" for n in ("R", "C", "T", "stride_xr", "stride_xc", "num_partials", "scale_cols")})
    return types


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", GATE_ARCHS)
def test_quantize_kernels_compile_without_spills(arch):
    from compile_gate import TARGETS, compile_kernel, ptxas_report, spill_bytes

    from tokenforge.kernels import fp8_quantize as kq

    soft = arch == "sm_80"  # sm_80 has no fp8 convert: the launcher uses the software encoder
    headline = {("_quantize_rows_kernel", kq.rows_config(4096)["BLOCK_N"]), ("_quantize_tensor_kernel", 16),
                ("_quantize_blocks_kernel", (1, 128)), ("_quantize_blocks_kernel", (128, 128)),
                ("_quantize_expert_cols_kernel", kq.expert_cols_config()["BLOCK_N"])}

    def size(name, cfg):
        if name == "_quantize_blocks_kernel":
            return cfg["BLOCK_R"], cfg["BLOCK_C"]
        return cfg.get("BLOCK_P", cfg.get("BLOCK_N"))

    for name, cfg in kq.all_configs():
        cfg = dict(cfg)
        warps = cfg.pop("num_warps")
        # Every config once (e4m3); the format/power-of-two variants at the headline configs only
        # (they change a few scalar instructions, not the register footprint).
        variants = [(torch.float8_e4m3fn, False)]
        if (name, size(name, cfg)) in headline:
            variants += [(torch.float8_e4m3fn, True), (torch.float8_e5m2, False), (torch.float8_e5m2, True)]
        for dtype, pow2 in variants:
            consts = dict(cfg)
            if name != "_amax_partial_kernel":
                consts.update(kq._format_constexprs(dtype, pow2, soft))
            types = _gate_types(soft)
            if not soft and dtype == torch.float8_e5m2:
                types["DATA"] = types["DATA_T"] = "*fp8e5"
            compiled = compile_kernel(getattr(kq, name), types, consts, warps, TARGETS[arch],
                                      unaligned_args=("R", "C", "T", "stride_xc", "num_partials", "scale_cols"))
            report = ptxas_report(compiled.asm["ptx"], arch)
            assert spill_bytes(report) == 0, f"{name} {cfg} spills on {arch}:\n{report}"
            if not soft and name != "_amax_partial_kernel":
                assert "cvt.rn.satfinite" in compiled.asm["ptx"], "expected the hardware fp8 convert on sm_90"
