"""The GPU's code path, run on the CPU: each kernel under Triton's interpreter at the exact launch
config the GPU would pick (block sizes, warps, stages) and, where the interpreter allows it, with the
GPU's dot operands (fp16/fp8 dots run natively here; only a bf16 ``tl.dot`` must be upcast). The rest
of the suite runs small interpreter configs on purpose (many blocks at tiny sizes exercise tails
and the online softmax cheaply); these cases make sure the configs that ship are right too.

What still differs from the GPU, and why (each kernel module's docstring says the same):
- attention/fp8 GEMM: bf16 ``tl.dot`` is upcast to fp32 under the interpreter (it multiplies raw
  bit patterns otherwise); fp16 and fp8 cases here run the GPU's dots.
- fp8 quantize: the interpreter mis-rounds fp32 -> fp8 casts, so it uses the bit-exact software
  encoder there (the GPU casts natively; test_fp8_quantize checks both against one reference).
- Newton-Schulz: bf16 dots upcast as above; these cases run fp32 (IEEE dots, as on the GPU).
- multi-tensor optimizer helpers run as plain Python under the interpreter (a per-call cost of the
  interpreter, not an algorithm change); their GPU block size (2048) is forced below.
"""

from __future__ import annotations

import pytest
import torch
from device_params import INTERPRETING

from tokenforge import kernels
from tokenforge.testing import TOLERANCE, rel_error

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="the interpreter at GPU configs: CPU runs only")


@pytest.fixture
def gpu_attention_configs(monkeypatch):
    from tokenforge.kernels import attention as ak

    real = ak.candidates
    monkeypatch.setattr(ak, "candidates", lambda kernel, head_dim, arch="default", interpreted=None:
                        real(kernel, head_dim, arch, interpreted=False)[:1])
    monkeypatch.setattr(ak, "INTERPRETED", False)  # UPCAST off: fp16 dots as on the GPU
    return ak


@pytest.mark.parametrize("head_dim,causal", [(64, True), (128, False), (80, True)])
def test_attention_at_gpu_tiles(gpu_attention_configs, head_dim, causal):
    import test_attention as t

    ak = gpu_attention_configs
    cfg = ak.candidates("_attn_fwd", head_dim)[0]
    assert cfg["BLOCK_M"] >= 64 and cfg["num_warps"] >= 4, cfg  # really the GPU tile
    # Longer than one 128-row tile and not a multiple of it; GQA 2.
    q, k, v = t.make_qkv(1, 150, 150, 4, 2, head_dim, torch.float16, "cpu")
    t.run_and_check(q, k, v, causal=causal, window=(-1, -1) if causal else (40, 20))


@pytest.mark.parametrize("head_dim,deterministic", [(128, False), (64, False), (64, True)])
def test_attention_backward_at_hopper_tiles(gpu_attention_configs, monkeypatch, head_dim, deterministic):
    """The backward an sm_90 GPU runs: at d128 the two-pass 32x128 dk/dv and 128x64 dq tiles (64
    whole rows per warpgroup), at d64 the one-pass tile (dq by atomics) or, deterministic, the
    two-pass one; keys past one 128-key block and not a multiple of it, GQA 2, causal."""
    import test_attention as t

    ak = gpu_attention_configs
    monkeypatch.setattr(ak, "arch_family", lambda device: "sm_90")
    if head_dim == 128:
        assert ak.candidates("_attn_bwd_dkdv", 128, "sm_90")[0]["BLOCK_N"] == 128
        assert ak.candidates("_attn_bwd_dq", 128, "sm_90")[0]["BLOCK_M"] == 128
    q, k, v = t.make_qkv(1, 150, 150, 4, 2, head_dim, torch.float16, "cpu")
    t.run_and_check(q, k, v, causal=True, deterministic=deterministic)


def test_fp8_gemm_at_gpu_tiles(monkeypatch):
    from tokenforge import fp8
    from tokenforge.kernels import fp8_gemm

    monkeypatch.setattr(fp8_gemm, "INTERPRETED", False)
    for M, K, N in [(200, 256, 130), (2100, 128, 2050)]:  # SMALL (64x128x128) and LARGE (128x128x128)
        assert fp8_gemm.gemm_config(M, N, K)["BLOCK_K"] == 128
        x, w = torch.randn(M, K), torch.randn(N, K)
        a, sa = fp8.quantize(x, scaling="rowwise", backend="torch")
        b, sb = fp8.quantize(w, scaling="rowwise", backend="torch")
        out = fp8_gemm.scaled_mm(a, b.t(), sa, sb.t(), None, torch.float32)
        ref = (a.double() * sa.double()) @ (b.double() * sb.double()).t()
        assert rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("large", [False, True])
def test_newton_schulz_at_gpu_tiles(monkeypatch, large):
    """The GPU's 64- and 128-tiles (8 warps, 3 stages for the 128 ones) on 2x2 tiles with tails:
    the lower triangle, the mirrored store and the epilogues at the shipped block sizes."""
    from tokenforge.kernels import newton_schulz as kns
    from tokenforge.ops.newton_schulz import newton_schulz

    cfg = kns.LARGE if large else kns.SMALL
    monkeypatch.setattr(kns, "config", lambda m, interpreted=None: dict(cfg))
    m = cfg["BLOCK"] + 37
    g = torch.randn(m, m + 90)
    out = newton_schulz(g, steps=2, dtype=torch.float32, backend="triton")
    ref = newton_schulz(g.double(), steps=2, dtype=torch.float64, backend="torch")
    assert rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("mode", ["fp32", "master", "stochastic"])
def test_adamw_at_gpu_block_size(monkeypatch, mode):
    """2048-element programs: whole (unmasked, 16-byte aligned) chunks and a masked tail in one launch."""
    import test_adamw as t

    from tokenforge.kernels import multi_tensor
    from tokenforge.optim import AdamW

    monkeypatch.setattr(multi_tensor, "INTERPRETER_BLOCK", multi_tensor.BLOCK)
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    sizes = [2048 * 3, 2048 + 17, 5, 4096]
    ps = t._params(sizes, "cpu", dtype)
    qs = t._clone(ps)
    kw = dict(lr=1e-2, weight_decay=0.1, bf16_stochastic_rounding=mode == "stochastic", seed=5)
    a, b = AdamW(ps, backend="triton", **kw), AdamW(qs, backend="torch", **kw)
    for _ in range(3):
        t._set_grads(ps, qs)
        a.step()
        b.step()
    tables = next(iter(a._caches.values()))._tables
    assert tables.block == multi_tensor.BLOCK and tables.aligned
    for p, q in zip(ps, qs):
        if mode == "stochastic":  # same Philox bits; rare one-ulp flips from fp32 operation order
            assert (p != q).float().mean() <= 1e-3
        else:
            assert rel_error(p, q) <= (1e-6 if mode == "fp32" else TOLERANCE[torch.bfloat16])


def test_interpreter_flag_is_what_the_suite_thinks():
    assert kernels.INTERPRETED


@pytest.mark.parametrize("config", ["large", "small"])
def test_grouped_mm_at_gpu_tiles(monkeypatch, config):
    """The GPU's forward tiles (128 or 64 rows x 128 x 32) and the dB tiles (128 x 128, rows by 32)
    on experts that end inside a tile, one empty expert and column / K tails, forward and backward."""
    import test_grouped_mm as t

    from tokenforge.kernels import grouped_mm as kgm

    fwd = dict(kgm.FORWARD_CONFIGS[config])
    monkeypatch.setattr(kgm, "INTERPRETER_FORWARD", fwd)
    monkeypatch.setattr(kgm, "INTERPRETER_WGRAD", dict(kgm.WGRAD_CONFIG))
    counts = [fwd["BLOCK_M"] + 5, 0, 3, fwd["BLOCK_M"] - 1]
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    a = torch.randn(sum(counts), 70, requires_grad=True)
    b = torch.randn(len(counts), 70, 150, requires_grad=True)
    t.check_against_reference(a, b, offs, counts)
