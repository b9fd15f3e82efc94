"""Newton-Schulz (tokenforge.ops.newton_schulz, kernels/newton_schulz.py): the fused GEMMs against
float64, the iteration against its float64 oracle, the singular-value band the docs promise on
random / ill-conditioned / rank-deficient inputs (fp32 and bf16, tall and wide), one launch per
matmul for a batch, 64-bit batch offsets, bad input, and the sm_90 / sm_80 compile gate."""

from __future__ import annotations

import pytest
import torch
from device_params import DEVICES, HAS_CUDA, INTERPRETING

from tokenforge.ops.newton_schulz import BAND, COEFFICIENTS, newton_schulz, newton_schulz_reference
from tokenforge.testing import rel_error

# bf16: each of 5 iterations rounds three products to bf16, and the polynomial's slope (up to 3.4
# at 0) amplifies earlier rounding: measured ~1.5e-2 against float64 for torch's own bf16 path.
NS_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


def _kns():
    from tokenforge.kernels import newton_schulz as kns

    return kns


def _sizes(device):
    # awkward sizes on CPU (tails of every tile); real Muon shapes on the GPU
    return [(1, 70, 150), (2, 65, 65), (2, 1, 5)] if device == "cpu" else [(1, 4096, 4096), (4, 768, 2304), (2, 1000, 3000)]


# ---------------------------------------------------------------------------------------------
# The two fused GEMMs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_d", [False, True])
def test_gram_kernel(device, dtype, with_d):
    kns = _kns()
    torch.manual_seed(0)
    b, m, k = (2, 150, 70) if device == "cpu" else (3, 1100, 2000)
    x = torch.randn(b, m, k, device=device).to(dtype)
    d = torch.randn(b, m, m, device=device)
    d = (d + d.mT).to(dtype)
    out = torch.empty(b, m, m, device=device, dtype=dtype)
    kns.gram(x, out, alpha=0.5, beta=-2.0 if with_d else 0.0, d=d if with_d else None)
    ref = 0.5 * x.double() @ x.double().mT + (-2.0 * d.double() if with_d else 0)
    assert rel_error(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    # off-diagonal tiles are the mirrored lower ones: exactly symmetric there
    blk = kns.config(m)["BLOCK"]
    if m > blk:
        assert torch.equal(out[:, blk:, :blk], out[:, :blk, blk:].mT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_kernel(device, dtype):
    kns = _kns()
    torch.manual_seed(1)
    b, m, k, n = (2, 100, 90, 130) if device == "cpu" else (2, 1000, 1000, 3000)
    a = torch.randn(b, m, k, device=device).to(dtype)
    bm = torch.randn(b, k, n, device=device).to(dtype)
    d = torch.randn(b, m, n, device=device).to(dtype)
    out = torch.empty(b, m, n, device=device, dtype=dtype)
    kns.gemm(a, bm, out, alpha=1.0, beta=3.4445, d=d)
    ref = a.double() @ bm.double() + 3.4445 * d.double()
    assert rel_error(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_one_wrong_row_is_caught(device):
    """The bound above is per row too: a single corrupted output row fails it."""
    kns = _kns()
    x = torch.randn(1, 64, 40, device=device)
    out = torch.empty(1, 64, 64, device=device)
    kns.gram(x, out)
    ref = x.double() @ x.double().mT
    assert rel_error(out, ref) < 1e-5
    out[0, 17] *= 1.01
    assert rel_error(out, ref) > 1e-5


@pytest.mark.skipif(not INTERPRETING, reason="a 4 GB strided view runs cheaply only under the interpreter")
def test_batch_offsets_past_2_31_elements():
    """The second matrix of a batch starting past element 2^31: int64 batch offsets."""
    kns = _kns()
    m, k = 8, 16
    stride = 2**31 + 64
    base = torch.empty(stride + m * k, dtype=torch.float32)  # untouched pages stay unallocated
    x = base.as_strided((2, m, k), (stride, k, 1))
    torch.manual_seed(2)
    x.copy_(torch.randn(2, m, k))
    obase = torch.empty(stride + m * m, dtype=torch.float32)
    out = obase.as_strided((2, m, m), (stride, m, 1))
    kns.gram(x, out)
    assert rel_error(out, x.double() @ x.double().mT) < 1e-5
    gbase = torch.empty(stride + m * k, dtype=torch.float32)
    gout = gbase.as_strided((2, m, k), (stride, k, 1))
    kns.gemm(out, x, gout, alpha=1.0, beta=2.0, d=x)
    assert rel_error(gout, out.double() @ x.double() + 2.0 * x.double()) < 1e-5


# ---------------------------------------------------------------------------------------------
# The iteration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_matches_float64(device, dtype):
    torch.manual_seed(3)
    for b, m, n in _sizes(device):
        g = torch.randn(b, m, n, device=device)
        out = newton_schulz(g, dtype=dtype, backend="triton")
        ref = newton_schulz(g.double(), dtype=torch.float64, backend="torch")
        assert out.dtype == dtype and out.shape == g.shape
        err = rel_error(out, ref)
        assert err < NS_TOL[dtype], f"{(b, m, n)} {dtype}: {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_tall_matrices_run_transposed(device):
    g = torch.randn(130, 70, device=device)
    out = newton_schulz(g, dtype=torch.float32, backend="triton")
    ref = newton_schulz(g.t().contiguous().double(), dtype=torch.float64, backend="torch").t()
    assert out.shape == (130, 70) and rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_batch_is_one_launch_per_matmul_and_batch_invariant(device, monkeypatch):
    kns = _kns()
    calls = []
    real_gram, real_gemm = kns.gram, kns.gemm
    monkeypatch.setattr(kns, "gram", lambda *a, **k: calls.append("gram") or real_gram(*a, **k))
    monkeypatch.setattr(kns, "gemm", lambda *a, **k: calls.append("gemm") or real_gemm(*a, **k))
    g = torch.randn(3, 70, 100, device=device)
    batched = newton_schulz(g, steps=2, dtype=torch.bfloat16, backend="triton")
    assert calls == ["gram", "gram", "gemm"] * 2
    for i in range(3):
        assert torch.equal(batched[i], newton_schulz(g[i], steps=2, dtype=torch.bfloat16, backend="triton"))


def _singular_values_along_input(g: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_in / ||G||_F, u_i^T O v_i): what each input singular direction became. The iteration is
    a matrix polynomial, so it keeps G's singular vectors; the map on values is not monotone, so
    sorted singular values would not pair up."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    along = torch.einsum("mi,mn,in->i", u, out.double(), vh)
    return s / g.double().norm(), along


def _inputs(kind: str, m: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(kind) % 1000)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    if kind == "random":
        return torch.randn(m, n, generator=g)
    if kind == "ill_conditioned":  # condition number 1e6
        s = torch.logspace(0, -6, r, dtype=torch.float64)
    else:  # rank_deficient: rank r // 3
        s = torch.zeros(r, dtype=torch.float64)
        s[: r // 3] = torch.rand(r // 3, generator=g, dtype=torch.float64) + 0.1
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.skipif(
    not (INTERPRETING or HAS_CUDA), reason="Triton needs the interpreter or a GPU")), "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)], ids=["wide", "tall"])
@pytest.mark.parametrize("kind", ["random", "ill_conditioned", "rank_deficient"])
def test_singular_values_in_documented_band(kind, shape, dtype, backend):
    device = "cuda" if HAS_CUDA and backend == "triton" and not INTERPRETING else "cpu"
    g = _inputs(kind, *shape)
    out = newton_schulz(g.to(device), dtype=dtype, backend=backend).cpu()
    rel, along = _singular_values_along_input(g, out)
    slack = BAND["bf16_slack"] if dtype == torch.bfloat16 else 0.0
    big = rel >= BAND["min_relative_singular_value"]
    assert big.any()
    assert along[big].min() >= BAND["low"] - slack, (kind, along[big].min())
    assert along[big].max() <= BAND["high"] + slack, (kind, along[big].max())
    # every direction of the input, small ones included, stays in [0, high]: nothing blows up or
    # flips sign. A null direction (rank-deficient input) in bf16 only holds amplified rounding
    # noise, of either sign (see BAND's docs): bounded in size, not in sign (measured -0.07 once).
    null = rel < 1e-6 if dtype == torch.bfloat16 else torch.zeros_like(rel, dtype=torch.bool)
    assert along.max() <= BAND["high"] + slack and along[~null].min() >= -(slack or 1e-5)
    assert not null.any() or along[null].abs().max() <= BAND["high"] + slack
    all_sv = torch.linalg.svdvals(out.double())
    assert all_sv.max() <= BAND["high"] + slack
    if kind == "rank_deficient" and dtype == torch.float32:
        # fp32 keeps the null space null: as many singular values above 1e-4 as the rank (bf16
        # rounding noise there is amplified like any small singular value: see BAND's docs)
        rank = min(shape) // 3
        assert int((all_sv > 1e-4).sum()) == rank, all_sv[rank - 2: rank + 2]


def test_band_is_what_the_polynomial_does():
    """The documented band is the scalar map's range: f^5 over [min_rel, 1] (exact math)."""
    a, b, c = COEFFICIENTS
    x = torch.logspace(-6, 0, 100001, dtype=torch.float64)
    y = x.clone()
    for _ in range(5):
        y = a * y + b * y**3 + c * y**5
    big = x >= BAND["min_relative_singular_value"]
    assert BAND["low"] <= y[big].min() and y[big].max() <= BAND["high"] and y.max() <= BAND["high"]
    assert (y >= 0).all()


def test_reference_follows_the_kernels_rounding_points():
    """newton_schulz_reference in float64 equals the textbook iteration."""
    g = torch.randn(2, 20, 30, dtype=torch.float64)
    x = g / g.norm(dim=(-2, -1), keepdim=True)
    a, b, c = COEFFICIENTS
    want = x.clone()
    for _ in range(5):
        gram = want @ want.mT
        want = a * want + (b * gram + c * gram @ gram) @ want
    assert rel_error(newton_schulz_reference(x, 5), want) < 1e-12


def test_zero_and_empty_inputs():
    assert torch.count_nonzero(newton_schulz(torch.zeros(8, 12), backend="torch")) == 0
    assert newton_schulz(torch.zeros(0, 12), backend="torch").shape == (0, 12)


@pytest.mark.parametrize("bad,match", [
    (dict(g=torch.randn(5)), "must be a matrix"),
    (dict(g=torch.randn(2, 3, 4, 5)), "conv weight"),
    (dict(g=torch.ones(3, 4, dtype=torch.int64)), "floating point"),
    (dict(steps=-1), "steps must be"),
    (dict(steps=2.5), "steps must be"),
    (dict(coefficients=(1.0, 2.0)), "three floats"),
    (dict(eps=0.0), "eps must be"),
    (dict(dtype=torch.int8), "dtype must be"),
])
def test_bad_input(bad, match):
    kw = dict(g=torch.randn(4, 6))
    kw.update(bad)
    g = kw.pop("g")
    with pytest.raises((ValueError, TypeError), match=match):
        newton_schulz(g, **kw)


# ---------------------------------------------------------------------------------------------
# Compile gate: every config compiles for Hopper with wgmma and no spills, and for sm_80.
# ---------------------------------------------------------------------------------------------


@pytest.mark.compile_gate
@pytest.mark.parametrize("kernel", ["gram", "gemm"])
def test_kernels_compile_for_hopper_and_ampere(kernel):
    from compile_gate import TARGETS, compile_kernel, ptxas_report, spill_bytes, uses_wgmma

    kns = _kns()
    for cfg in kns.all_configs():
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        if kernel == "gram":
            fn = kns._gram_kernel
            types = dict(X="*bf16", D="*bf16", OUT="*bf16", M="i32", K="i32", stride_xb="i64", stride_xm="i32",
                         stride_ob="i64", stride_om="i32", alpha="fp32", beta="fp32")
            consts = dict(cfg, HAS_D=True, UPCAST=False, IEEE=False, stride_xk=1, stride_on=1)
        else:
            fn = kns._gemm_kernel
            meta = kns._gemm_meta(dict(cfg, num_warps=warps, num_stages=stages))
            meta.pop("num_warps"), meta.pop("num_stages")
            types = dict(A="*bf16", B="*bf16", D="*bf16", OUT="*bf16", M="i32", N="i32", K="i32",
                         stride_ab="i64", stride_am="i32", stride_bb="i64", stride_bk="i32", stride_ob="i64",
                         stride_om="i32", alpha="fp32", beta="fp32")
            consts = dict(meta, HAS_D=True, UPCAST=False, IEEE=False, stride_ak=1, stride_bn=1, stride_on=1)
        for arch, target in TARGETS.items():
            compiled = compile_kernel(fn, types, consts, warps, target, num_stages=stages,
                                      unaligned_args=("M", "N", "K", "alpha", "beta"))
            if arch == "sm_90":
                assert uses_wgmma(compiled), f"{kernel} {cfg}: no wgmma on sm_90"
            report = ptxas_report(compiled.asm["ptx"], arch)
            assert spill_bytes(report) == 0, f"{kernel} {cfg} spills on {arch}:\n{report}"
