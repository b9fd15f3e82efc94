"""The CUDA C++ attention (``backend="cuda"``, csrc/attention_sm90.cu, sm_90a only).

Here, without a GPU: the refusals (CPU tensors, the options the kernels do not do, bad arguments to
the raw entry points, no device) and the stride rules of the launcher. On an H100/H200: forward and
every gradient against float64 autograd of the reference, per row as well as norm-wise, at real
sizes (dense and varlen, GQA, causal, windows, tails, rectangular, SDPA's transposed views). The
binary itself (sm_90a, HGMMA, UTMALDG, mbarrier waits, no spills) is read back by
tests/test_extension.py::test_cutlass_binary_is_hopper_tma_and_wgmma.
"""

from __future__ import annotations

import pytest
import torch

from tokenforge.backends import BackendUnavailableError
from tokenforge.ops.attention import attention, attention_reference, attention_varlen, attention_varlen_reference

import tokenforge.cuda as tf_cuda
from tokenforge.cuda import attention as cuda_attention

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
BF16_TOL = 2e-2  # bf16 operands, fp32 accumulation: FlashAttention's own bar for bf16


def _ext_with_attention():
    if not tf_cuda.is_available() or not hasattr(tf_cuda.get_extension(), "attention_sm90_unavailable"):
        return None
    ext = tf_cuda.get_extension()
    return None if ext.attention_sm90_unavailable() else ext


def test_cuda_backend_refuses_cleanly_without_a_gpu():
    q = torch.randn(1, 64, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="CUDA tensors only"):
        attention(q, q, q, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors only"):
        cu = torch.tensor([0, 64], dtype=torch.int32)
        attention_varlen(q[0], q[0], q[0], cu, cu, 64, 64, backend="cuda")


@pytest.mark.parametrize("kwargs,match", [(dict(softcap=30.0, scale=0.1, deterministic=False), "softcap"),
                                          (dict(softcap=0.0, scale=-0.1, deterministic=False), "positive"),
                                          (dict(softcap=0.0, scale=0.1, deterministic=True), "atomics")])
def test_cuda_backend_refuses_what_it_does_not_do(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        cuda_attention.check_call(**kwargs)
    assert "backend='triton'" in str(err.value) or "deterministic=False" in str(err.value)


def test_launcher_strides_are_what_tma_reads():
    # (b, s, h, d) contiguous, an SDPA (b, h, s, d) view, a packed varlen (total, h, d), size-1 dims.
    t = torch.empty(2, 40, 4, 64)
    assert cuda_attention._strides(t) == [40 * 4 * 64, 4 * 64, 64]
    sdpa = torch.empty(2, 4, 40, 64).transpose(1, 2)
    assert cuda_attention._strides(sdpa) == [4 * 40 * 64, 64, 40 * 64]
    assert cuda_attention._strides(torch.empty(100, 8, 128)) == [100 * 8 * 128, 8 * 128, 128]  # one "batch"
    # a size-1 batch or head dim may carry any stride in torch; the launcher gives TMA a legal one
    odd = torch.empty(1, 40, 1, 64).as_strided((1, 40, 1, 64), (3, 64, 1, 1))
    assert cuda_attention._strides(odd) == [40 * 64, 64, 64]
    assert cuda_attention._tma_ready(odd) is odd
    # a row stride that is not a multiple of 8 elements is copied
    qkv = torch.empty(1, 10, 3 * 2 * 64 + 4)[..., :384].view(1, 10, 6, 64)
    assert not cuda_attention._tma_ready(qkv).data_ptr() == qkv.data_ptr()


def test_cuda_supports_says_why_not():
    q = torch.empty(1, 8, 2, 64, dtype=torch.bfloat16)
    assert "CUDA tensors" in cuda_attention.supports(q, q, q)


def test_entry_points_refuse_bad_arguments():
    """The raw extension entry points check their arguments before touching a device."""
    ext = _ext_with_attention()
    if ext is None:
        pytest.skip("tokenforge._C without the CUDA C++ attention (test_extension says whether that is right)")
    sizes = [1, 128, 128, 128, 128, 2, 2, 128]
    strides = [128 * 2 * 128, 256, 128] * 4 + [2 * 128, 128]
    args = dict(q_ptr=256, k_ptr=256, v_ptr=256, out_ptr=256, lse_ptr=256, cu_q_ptr=0, cu_k_ptr=0, sizes=sizes,
                strides=strides, scale=0.1, left=-1, right=0, stream=0)
    with pytest.raises(ValueError, match="head_dim must be 64 or 128"):
        ext.attention_sm90_forward(**{**args, "sizes": sizes[:7] + [96]})
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        ext.attention_sm90_forward(**{**args, "sizes": sizes[:5] + [3, 2, 128]})
    with pytest.raises(ValueError, match="multiples of 8"):
        ext.attention_sm90_forward(**{**args, "strides": [128 * 2 * 128, 250, 128] + strides[3:]})
    with pytest.raises(ValueError, match="positive"):
        ext.attention_sm90_forward(**{**args, "scale": -1.0})
    with pytest.raises(ValueError, match="both cu_seqlens"):
        ext.attention_sm90_forward(**{**args, "cu_q_ptr": 256})
    with pytest.raises(ValueError, match="16-byte aligned"):
        ext.attention_sm90_forward(**{**args, "q_ptr": 258})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            ext.attention_sm90_forward(**args)


# ---------------------------------------------------------------------------------------------
# On an H100/H200: against float64, per row and norm-wise
# ---------------------------------------------------------------------------------------------


def _rows_rel(got: torch.Tensor, ref: torch.Tensor, row_dims: int) -> torch.Tensor:
    """Per-row relative error: rows are everything but the last dim (one (token, head) each)."""
    got, ref = got.double().flatten(0, row_dims - 1), ref.double().flatten(0, row_dims - 1)
    scale = ref.norm(dim=-1).clamp_min(ref.norm() / ref.shape[0] ** 0.5 * 1e-3).clamp_min(1e-30)
    return (got - ref).norm(dim=-1) / scale


def _check(got: dict, ref: dict, row_dims: int, name: str):
    for key in got:
        g, r = got[key], ref[key]
        assert torch.isfinite(g).all(), f"{name} {key}: non-finite values"
        norm = ((g.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
        rows = _rows_rel(g, r, row_dims)
        assert norm <= BF16_TOL, f"{name} {key}: norm-wise {norm:.3e}"
        worst = rows.max().item()
        assert worst <= 4 * BF16_TOL, f"{name} {key}: worst row {worst:.3e} at {rows.argmax().item()}"


def _dense_case(b, sq, sk, hq, hkv, d, causal=False, window=(-1, -1), sdpa_layout=False, seed=0):
    torch.manual_seed(seed)
    if sdpa_layout:  # (b, h, s, d) storage seen as (b, s, h, d), as patch_sdpa passes it
        q = torch.randn(b, hq, sq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(b, hkv, sk, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(b, hkv, sk, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    else:
        q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = attention(q, k, v, causal=causal, window=window, return_lse=True, backend="cuda")
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, causal=causal, window=window, return_lse=True)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), "rows that see no key must have lse = +inf, and only those"
    assert (lse[seen] - ref_lse[seen]).abs().max().item() <= 1e-2
    return dict(out=out, dq=dq, dk=dk, dv=dv), dict(out=ref, dq=rq, dk=rk, dv=rv)


DENSE_CASES = {
    # name: (b, sq, sk, hq, hkv, d, causal, window, sdpa_layout)
    "d128-causal-4k-gqa": (1, 4096, 4096, 8, 2, 128, True, (-1, -1), False),
    "d64-full-2k": (2, 2048, 2048, 8, 8, 64, False, (-1, -1), False),
    "d128-tails-300x700": (3, 300, 700, 6, 2, 128, True, (-1, -1), False),
    "d64-rect-1000x200-causal": (2, 1000, 200, 4, 1, 64, True, (-1, -1), False),  # rows that see no key
    "d128-window-256": (1, 2048, 2048, 8, 2, 128, False, (256, 0), False),
    "d64-two-sided-window": (2, 777, 777, 4, 4, 64, False, (100, 37), False),
    "d128-sdpa-layout": (2, 1024, 1024, 8, 8, 128, True, (-1, -1), True),
    "d128-mqa-single-query-block": (4, 65, 4097, 16, 1, 128, False, (-1, -1), False),
}


@pytest.mark.skipif(not ON_HOPPER, reason="the CUDA C++ attention runs on sm_90 (H100/H200) only")
@pytest.mark.parametrize("name", sorted(DENSE_CASES))
def test_cuda_dense_matches_float64(name):
    b, sq, sk, hq, hkv, d, causal, window, sdpa_layout = DENSE_CASES[name]
    got, ref = _dense_case(b, sq, sk, hq, hkv, d, causal, window, sdpa_layout, seed=len(name))
    _check(got, ref, 3, name)


@pytest.mark.skipif(not ON_HOPPER, reason="the CUDA C++ attention runs on sm_90 (H100/H200) only")
@pytest.mark.parametrize("d,causal", [(128, True), (64, False)])
def test_cuda_varlen_matches_float64(d, causal):
    """Packed documents of awkward lengths (1, a block plus one, empty k-tail blocks...) incl. one
    longer than the rest; GQA 8/2."""
    torch.manual_seed(d)
    lens = [1, 129, 700, 64, 2049, 300, 17]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    total = sum(lens)
    q = torch.randn(total, 8, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, lse = attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=causal, return_lse=True, backend="cuda")
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_varlen_reference(q64, k64, v64, cu, cu, causal=causal, return_lse=True)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert (lse - ref_lse).abs().max().item() <= 1e-2
    _check(dict(out=out, dq=dq, dk=dk, dv=dv), dict(out=ref, dq=rq, dk=rk, dv=rv), 2, f"varlen-d{d}")


@pytest.mark.skipif(not ON_HOPPER, reason="the CUDA C++ attention runs on sm_90 (H100/H200) only")
def test_cuda_matches_triton_on_the_headline_shape():
    """bf16 d128 causal 8k: the CUDA and Triton forwards agree to bf16 rounding (a cheap second
    oracle at a size float64 autograd cannot afford)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8192, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    a = attention(q, k, v, causal=True, backend="cuda").double()
    b = attention(q, k, v, causal=True, backend="triton").double()
    rows = _rows_rel(a, b, 3)
    assert rows.max().item() <= 2e-2, rows.max().item()
