"""Fused attention: the Triton kernels against a float64 reference (out, lse, dq, dk, dv), dense.

On CPU the kernels run under Triton's interpreter with small tiles (several blocks per sequence, so
tails, block skipping and the online softmax across blocks are exercised) over a representative
subset of the issue's grid; on CUDA the full grid runs at real sizes. Varlen: test_attention_varlen.py.
"""

from __future__ import annotations

import math

import pytest
from compile_gate import GATE_ARCHS
import torch
from device_params import DEVICES, HAS_CUDA

from tokenforge import backends, kernels
from tokenforge.ops.attention import attention, attention_reference, attention_varlen, attention_varlen_reference
from tokenforge.testing import TOLERANCE, PoisonEmpty, rel_error

LOWP = [torch.float16, torch.bfloat16]


def _finite_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """rel_error over the entries where ref is finite; the others must match exactly (lse = +inf
    for rows that see no key)."""
    fin = torch.isfinite(ref)
    assert torch.equal(out.detach().cpu()[~fin.cpu()].double(), ref.detach().cpu()[~fin.cpu()].double()), \
        "rows that see no key must have lse = +inf"
    return rel_error(out[fin], ref[fin]) if fin.any() else 0.0


def _cancelling_terms(q, k, v, dout, kw, rows: bool = False):
    """Norms of the two terms whose difference gives dq and dk, (P * D) @ K and (P * D)^T @ Q times
    the scale, with D = rowsum(dout * out), in float64.

    ds = P * (dP - D) subtracts two terms that nearly cancel when a row sees few keys (for one key
    exactly: softmax over one score has zero gradient). D is formed from the stored low-precision
    out, as in every FlashAttention backward, so dq and dk carry an error of the size of these terms
    times the unit roundoff even when the true gradient is ~0; their error is measured against
    max(||ref||, ||terms||), as test_rms_norm.py does for its dx."""
    q64, k64, v64, do64 = (t.detach().double() for t in (q, k, v, dout))
    out = attention_reference(q64, k64, v64, **{**kw, "return_lse": True})[0]  # [0]: out, whatever kw asks
    delta = (do64 * out).sum(-1)  # (b, sq, hq)
    scale = kw["softmax_scale"] or 1 / math.sqrt(q.shape[-1])
    group = q.shape[2] // k.shape[2]
    from tokenforge.ops.attention import _fold_causal, _keep_mask

    kk = k64.repeat_interleave(group, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q64, kk) * scale
    if kw["softcap"]:
        s = kw["softcap"] * torch.tanh(s / kw["softcap"])
    keep = _keep_mask(q.shape[1], k.shape[1], _fold_causal(kw["causal"], kw["window"]), q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    pd = p * delta.transpose(1, 2)[..., None]
    term_q = scale * torch.einsum("bhqk,bkhd->bqhd", pd, kk)
    term_k = scale * torch.einsum("bhqk,bqhd->bkhd", pd, q64)
    if rows:  # per (token, head) row: dq's (b, sq, hq) and dk's (b, sk, hkv), the group summed
        b_, sk, hq, d = term_k.shape
        return term_q.norm(dim=-1), term_k.reshape(b_, sk, hq // group, group * d).norm(dim=-1)
    return term_q.norm().item(), term_k.norm().item()


def _grad_error(out, ref, floor: float) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    diff = (out.detach().double().cpu() - ref.detach().double().cpu()).norm().item()
    denom = max(ref.norm().item(), floor)
    return diff / denom if denom > 0 else (0.0 if diff == 0 else float("inf"))


def run_and_check(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, softmax_scale=None, backend="triton",
                  dout=None, check_lowp_bound=True, deterministic=False):
    """Forward + backward through ``attention`` vs float64 autograd of the reference.

    Bound, FlashAttention style: each of out, dq, dk, dv is within TOLERANCE[dtype] of float64 and
    within 2x (+ a 1e-3 atol in relative terms) of the error of the reference computed entirely in
    the input's low precision. lse (fp32) is checked at 1e-4 relative: the scores' rounding in
    the fp16/bf16 operands is the only error there."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = attention(q, k, v, causal=causal, window=window, softcap=softcap, softmax_scale=softmax_scale,
                         return_lse=True, backend=backend, deterministic=deterministic)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    if dout is None:
        dout = torch.randn_like(out)
    out.backward(dout)
    kw = dict(causal=causal, window=window, softcap=softcap, softmax_scale=softmax_scale, return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, **kw)
    ref.backward(dout.double())
    floor_q, floor_k = _cancelling_terms(q, k, v, dout, kw)
    errs = {"out": rel_error(out, ref), "lse": _finite_rel(lse, ref_lse),
            "dq": _grad_error(q.grad, q64.grad, floor_q), "dk": _grad_error(k.grad, k64.grad, floor_k),
            "dv": rel_error(v.grad, v64.grad)}
    tol = TOLERANCE[q.dtype]
    assert errs["lse"] <= 1e-4, errs
    for name in ("out", "dq", "dk", "dv"):
        assert errs[name] <= tol, f"{name}: {errs[name]:.3e} > {tol:.0e}; all: {errs}"
    if check_lowp_bound:
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        low = attention_reference(ql, kl, vl, upcast=False, **kw)[0]
        low.backward(dout)
        low_errs = {"out": rel_error(low, ref), "dq": _grad_error(ql.grad, q64.grad, floor_q),
                    "dk": _grad_error(kl.grad, k64.grad, floor_k), "dv": rel_error(vl.grad, v64.grad)}
        # The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest): a p of 1 - 1e-7 is
        # stored as 1 - 2^-8, so two bf16 ulps (2^-7) of slack there, 1e-3 elsewhere.
        slack = 2.0 ** -7 if kernels.INTERPRETED and q.dtype == torch.bfloat16 else 1e-3
        for name, low_err in low_errs.items():
            assert errs[name] <= 2 * low_err + slack, f"{name}: {errs[name]:.3e} vs low-precision torch {low_err:.3e}"
    return errs


def make_qkv(batch, sq, sk, hq, hkv, d, dtype, device):
    q = torch.randn(batch, sq, hq, d, device=device, dtype=dtype)
    k = torch.randn(batch, sk, hkv, d, device=device, dtype=dtype)
    v = torch.randn(batch, sk, hkv, d, device=device, dtype=dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# The grid. CPU: a representative subset (each case is a few tenths of a second interpreted);
# CUDA: the issue's full grid.
# ---------------------------------------------------------------------------------------------

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window, softcap)
CPU_CASES = [
    (1, 1, 1, 1, 1, 32, False, (-1, -1), 0.0),
    (1, 1, 129, 4, 1, 64, True, (-1, -1), 0.0),       # decode-like: one query, MQA
    (3, 17, 17, 2, 2, 32, True, (-1, -1), 0.0),
    (1, 64, 64, 4, 2, 80, False, (-1, -1), 0.0),      # GQA 2, non-power-of-two head dim
    (1, 129, 64, 4, 1, 64, True, (-1, -1), 0.0),      # causal with sq > sk: leading rows see nothing
    (1, 64, 129, 2, 1, 128, True, (-1, -1), 0.0),     # causal bottom-right with sk > sq
    (3, 17, 64, 8, 2, 32, False, (-1, -1), 0.0),      # GQA 4, batch 3
    (1, 129, 129, 2, 2, 32, False, (16, 8), 0.0),     # sliding window both sides
    (1, 64, 129, 2, 1, 64, True, (20, -1), 0.0),      # causal + left window (Mistral-style)
    (1, 129, 17, 2, 2, 32, False, (-1, 3), 0.0),      # right-only window, sq > sk
    (1, 64, 64, 2, 2, 64, False, (-1, -1), 30.0),     # softcap (Gemma 2 uses 50 for attention)
    (1, 64, 64, 4, 1, 32, True, (-1, -1), 2.0),       # softcap small enough to bend the scores
    (1, 17, 17, 2, 1, 256, True, (-1, -1), 0.0),      # the largest head dim
]


def _case_id(c):
    b, sq, sk, hq, hkv, d, causal, window, cap = c
    return (f"b{b}-q{sq}-k{sk}-h{hq}/{hkv}-d{d}" + ("-causal" if causal else "")
            + (f"-win{window[0]}_{window[1]}" if window != (-1, -1) else "") + (f"-cap{cap:g}" if cap else ""))


@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_grid_cpu(case, dtype):
    if dtype == torch.bfloat16 and case[5] in (80, 256):
        pytest.skip("bf16 is covered at the other head dims; keeps the interpreted suite small")
    b, sq, sk, hq, hkv, d, causal, window, cap = case
    run_and_check(*make_qkv(b, sq, sk, hq, hkv, d, dtype, "cpu"), causal=causal, window=window, softcap=cap)


@pytest.mark.parametrize("head_dim", [40, 96, 136, 192, 248])
def test_non_power_of_two_head_dims(head_dim):
    """Every head dim pads its block to a power of two with masked lanes."""
    run_and_check(*make_qkv(1, 17, 33, 2, 1, head_dim, torch.float16, "cpu"), causal=True)


def test_softmax_scale_and_large_scores():
    """An explicit scale and scores in the hundreds: the online max must keep exp in range."""
    q, k, v = make_qkv(1, 33, 40, 2, 2, 32, torch.float16, "cpu")
    run_and_check(q * 4, k * 4, v, softmax_scale=1.0)
    run_and_check(q, k, v, softmax_scale=0.01)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (64, 129), (129, 64), (300, 300), (1, 300), (300, 17)])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 256])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 2), (8, 1)], ids=lambda h: f"{h[0]}/{h[1]}")
def test_grid_cuda(dtype, batch, sq, sk, head_dim, heads):
    q, k, v = make_qkv(batch, sq, sk, heads[0], heads[1], head_dim, dtype, "cuda")
    for causal, window, cap in [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0), (False, (32, 16), 0.0),
                                (True, (-1, -1), 20.0)]:
        run_and_check(q, k, v, causal=causal, window=window, softcap=cap)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("seqlen,head_dim,causal", [(4096, 128, True), (2048, 64, False), (8192, 128, True),
                                                    (1024, 256, False)])
def test_cuda_real_sizes(seqlen, head_dim, causal):
    q, k, v = make_qkv(2, seqlen, seqlen, 16, 4, head_dim, torch.bfloat16, "cuda")
    run_and_check(q, k, v, causal=causal)


# ---------------------------------------------------------------------------------------------
# Layouts: SDPA's (b, h, s, d) transposed views, strided and expanded tensors.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    n = 1 if device == "cpu" else 8
    # (b, h, s, d) storage seen as (b, s, h, d): what patch_sdpa passes, read in place.
    q = torch.randn(2, 4, 40 * n, 64, device=device, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(2, 2, 33 * n, 64, device=device, dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(2, 2, 33 * n, 64, device=device, dtype=torch.bfloat16).transpose(1, 2)
    run_and_check(q, k, v, causal=True)
    # Slices of a packed qkv projection (row stride 3 * heads * d) and an expanded dout.
    qkv = torch.randn(1, 21 * n, 3, 2, 32, device=device, dtype=torch.float16)
    q, k, v = qkv.unbind(2)
    dout = torch.randn(1, 1, 2, 32, device=device, dtype=torch.float16).expand(1, 21 * n, 2, 32)
    run_and_check(q, k, v, dout=dout)
    # Head dim not unit-stride: copied once, still right.
    q = torch.randn(1, 17, 2, 64, device=device, dtype=torch.float16)[..., ::2]
    k = torch.randn(1, 9, 1, 64, device=device, dtype=torch.float16)[..., ::2]
    v = torch.randn(1, 9, 1, 64, device=device, dtype=torch.float16)[..., ::2]
    run_and_check(q, k, v)


@pytest.mark.parametrize("sq,sk,causal,window", [(97, 97, True, (-1, -1)), (40, 97, True, (-1, -1)),
                                                 (97, 97, False, (20, 0)), (97, 61, False, (9, 7)),
                                                 (97, 97, False, (-1, -1)), (33, 97, True, (30, -1))])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_interior_key_blocks_skip_the_mask(monkeypatch, sq, sk, causal, window, tma):
    """Many key blocks per query block (the interpreter's 32 x 16 tiles): the forward runs the
    blocks every row sees whole without mask math, and the diagonal / window edges / tail with it;
    the split must not let a masked key in or keep a visible one out (forward and every gradient
    against float64)."""
    from tokenforge.kernels import attention as ak

    if not tma:
        monkeypatch.setattr(ak, "tma_usable", lambda *tensors: False)
    q, k, v = make_qkv(1, sq, sk, 2, 1, 32, torch.bfloat16, "cpu")
    run_and_check(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_reads_by_tma_or_pointers(monkeypatch, tma):
    """Dense Q/K/V/O (and the Q/dO blocks the backward's dk/dv pass streams) with TMA-legal strides
    go through tensor descriptors (the interpreter runs them; on a GPU, sm_90+); the pointer loads stay for
    varlen, sm_80 and other strides. Both paths, causal and windowed, with a seqlen_k tail and a
    head dim below the block (zero-filled), one-pass and two-pass backward, and SDPA's transposed
    (b, h, s, d) views."""
    from tokenforge.kernels import attention as ak

    if not kernels.INTERPRETED:
        pytest.skip("CPU tensors run the descriptors only in the interpreter")
    assert ak.TMA_MAX_BLOCK_D == 128  # the gate compiles the descriptor path up to this block
    q, k, v = make_qkv(2, 45, 53, 4, 2, 40, torch.bfloat16, "cpu")
    assert ak.tma_usable(k, v)
    if not tma:
        monkeypatch.setattr(ak, "tma_usable", lambda *tensors: False)
    run_and_check(q, k, v, causal=True)
    run_and_check(q, k, v, causal=True, deterministic=True)
    run_and_check(q, k, v, window=(9, 3))
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # (b, h, s, d) storage
    assert ak.tma_usable(kt, vt) == tma
    run_and_check(qt, kt, vt, causal=True)


def test_fully_masked_rows_are_zero_and_gradients_finite():
    """Causal with seqlen_q > seqlen_k: the first sq - sk queries see no key (flash_attn gives them
    0 and lse = +inf); nothing may turn into NaN, forward or backward."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 40, 8, 2, 1, 32, torch.float16, "cpu"))
    out, lse = attention(q, k, v, causal=True, return_lse=True, backend="triton")
    assert torch.all(out[:, :32] == 0) and torch.all(lse[:, :, :32] == float("inf"))
    assert torch.isfinite(lse[:, :, 32:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :32] == 0)


# ---------------------------------------------------------------------------------------------
# Determinism and every output written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_is_bitwise_reproducible(device):
    n = 1 if device == "cpu" else 16
    q, k, v = make_qkv(2, 33 * n, 47 * n, 4, 1, 64, torch.bfloat16, device)
    dout = torch.randn_like(q)
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = attention(qq, kk, vv, causal=True, deterministic=True, backend="triton")
        out.backward(dout)
        grads.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [(2, 70, 70, 4, 2, 64, True, (-1, -1)), (1, 45, 97, 4, 1, 32, False, (9, 7)),
                                  (3, 97, 40, 2, 2, 64, True, (-1, -1)), (1, 64, 64, 8, 2, 64, False, (-1, -1))],
                         ids=["causal-gqa", "window-mqa-d32", "rect-empty-rows", "full"])
def test_one_pass_and_two_pass_backward_match_float64(device, case):
    """deterministic=False takes the one-pass backward where it runs (dk, dv and dq's share in one
    pass over the key blocks, dq by atomics; the interpreter always), deterministic=True the
    two-pass one: both against float64 autograd, norm-wise with run_and_check's bounds (incl. the
    cancelling-terms floor of causal dq) and per row."""
    from tokenforge.kernels import attention as ak

    b, sq, sk, hq, hkv, d, causal, window = case
    n = 1 if device == "cpu" else 8
    q, k, v = make_qkv(b, sq * n, sk * n, hq, hkv, d, torch.bfloat16, device)
    dout = torch.randn_like(q)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=causal, window=window)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert ak.fused_backward_runs(d, q.device) == (device == "cpu" or ak.arch_family(q.device) == "sm_90")
    kw = dict(causal=causal, window=window, softcap=0.0, softmax_scale=None)
    floor_q, floor_k = (f.cpu() for f in _cancelling_terms(q, k, v, dout, kw, rows=True))
    # The same computation entirely in bf16 (torch): a row may be no worse than 3x its worst row
    # (2x failed once in ~200 seeds: 0.032 vs 0.027 on a key row of rect-empty-rows that one query
    # alone sees, where dk is one term of ds = p (dp - delta), delta read from the bf16 output;
    # seed 3409276909). A wrong row is off by ~1.
    ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
    low_grads = torch.autograd.grad(attention_reference(ql, kl, vl, causal=causal, window=window, upcast=False),
                                    (ql, kl, vl), dout)

    def row_errors(g, r, floor):
        g, r = g.detach().double().cpu(), r.detach().cpu()
        denom = r.norm(dim=-1) if floor is None else torch.maximum(r.norm(dim=-1), floor)
        denom = denom.clamp_min(r.norm() / r[..., 0].numel() ** 0.5 * 1e-3)  # all-zero rows: no keys
        return (g - r).norm(dim=-1) / denom

    for deterministic in (False, True):
        run_and_check(q, k, v, causal=causal, window=window, dout=dout, deterministic=deterministic)
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = attention(qq, kk, vv, causal=causal, window=window, deterministic=deterministic, backend="triton")
        grads = torch.autograd.grad(out, (qq, kk, vv), dout)
        for name, g, r, low, floor in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads, (floor_q, floor_k, None)):
            rows, low_rows = row_errors(g, r, floor), row_errors(low, r, floor)
            bound = max(2 * TOLERANCE[torch.bfloat16], 3 * low_rows.max().item())
            assert rows.max().item() <= bound, (name, deterministic, rows.argmax().item(), rows.max().item(), bound)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sq,sk,causal", [(1, 1, False), (17, 40, True), (65, 33, True), (33, 65, False)])
def test_launchers_write_every_output(device, sq, sk, causal):
    from tokenforge.kernels import attention as launcher

    q, k, v = make_qkv(2, sq, sk, 4, 2, 48, torch.float16, device)
    win = (-1, 0) if causal else (-1, -1)
    scale = 1 / math.sqrt(48)
    with PoisonEmpty():
        out, lse = launcher.attention_forward(q, k, v, None, None, sq, sk, scale, win, 0.0)
        dout = torch.randn_like(out)
        dq, dk, dv = launcher.attention_backward(dout, q, k, v, out, lse, None, None, sq, sk, scale, win, 0.0)
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()
    assert not torch.isnan(lse).any()
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal)
    assert rel_error(out, ref) < TOLERANCE[torch.float16]


# ---------------------------------------------------------------------------------------------
# Dispatch and refusals
# ---------------------------------------------------------------------------------------------


def test_cpu_auto_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    q, k, v = make_qkv(1, 8, 8, 2, 2, 32, torch.float16, "cpu")
    assert backends.choose("attention", q, k, v) == ("triton" if kernels.INTERPRETED else "torch")


def test_fp32_runs_on_the_reference_and_triton_refuses_it():
    q, k, v = make_qkv(1, 9, 9, 2, 1, 32, torch.float32, "cpu")
    assert backends.choose("attention", q, k, v) == "torch"
    out = attention(q, k, v, causal=True)
    assert out.dtype == torch.float32
    assert rel_error(out, attention_reference(q.double(), k.double(), v.double(), causal=True)) < 1e-5
    with pytest.raises(backends.BackendUnavailableError, match="bfloat16"):
        attention(q, k, v, backend="triton")
    # float64 on the reference is the oracle itself.
    q64, k64, v64 = q.double(), k.double(), v.double()
    assert torch.equal(attention(q64, k64, v64), attention_reference(q64, k64, v64))


@pytest.mark.parametrize("head_dim", [1, 12, 36, 100, 250])
def test_any_head_dim_up_to_256_runs_padded(head_dim):
    """flash_attn takes any head dim <= 256: one the kernel has no tile for is zero-padded to the next
    it has (zero columns add nothing to q.k, give zero output columns) and sliced back; the scale
    stays 1/sqrt(true d). Forward and every gradient against float64."""
    from tokenforge.ops.attention import kernel_head_dim

    assert kernel_head_dim(head_dim) % 8 == 0 and kernel_head_dim(head_dim) >= max(32, head_dim)
    q, k, v = make_qkv(1, 13, 13, 4, 2, head_dim, torch.bfloat16, "cpu")
    run_and_check(q, k, v, causal=True)
    q, k, v = make_qkv(1, 9, 9, 2, 2, head_dim, torch.float16, "cpu")
    run_and_check(q, k, v, window=(3, 2), softmax_scale=0.3)


def test_head_dim_past_256_is_a_clear_error():
    q, k, v = make_qkv(1, 4, 4, 1, 1, 264, torch.float16, "cpu")
    with pytest.raises(backends.BackendUnavailableError, match="head_dim 264.*backend='torch'"):
        attention(q, k, v, backend="triton")
    # The reference runs any head dim (auto on CPU falls back to it).
    assert attention(q.float(), k.float(), v.float()).shape == q.shape


def test_flash_attn_keywords():
    """Code written for flash_attn_func / flash_attn_varlen_func runs: its positional order
    (dropout_p, softmax_scale, causal), window_size, return_attn_probs (dropout itself:
    test_attention_dropout.py); bad values are refused with what to do."""
    q, k, v = make_qkv(2, 11, 11, 4, 2, 32, torch.bfloat16, "cpu")
    ours = attention(q, k, v, causal=True, window=(4, 0), softmax_scale=0.2, return_lse=True)
    ported = attention(q, k, v, 0.0, 0.2, True, window_size=(4, 0), return_attn_probs=True)
    assert len(ported) == 3 and ported[2] is None
    assert torch.equal(ported[0], ours[0]) and torch.equal(ported[1], ours[1])
    assert torch.equal(attention(q, k, v, 0.0, None, True), attention(q, k, v, causal=True))
    for kwargs, match in ((dict(dropout_p=1.5), r"dropout_p must be a float in \[0, 1\)"),
                          (dict(alibi_slopes=torch.ones(3)), r"alibi_slopes must be a float32 tensor of shape \(4,\)"),
                          (dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), "alibi_slopes must be a float32"),
                          (dict(window=(2, 0), window_size=(3, 0)), "disagree")):
        with pytest.raises(ValueError, match=match):
            attention(q, k, v, **kwargs)
    # window_size in the forms flash_attn takes: its own tests pass torch.randint(0, seqlen_k, (2,)).
    import numpy as np

    for form in (torch.tensor([4, 0]), [torch.tensor(4), torch.tensor(0)], (np.int64(4), np.int32(0)), [4, 0]):
        out = attention(q, k, v, 0.0, 0.2, True, window_size=form, return_attn_probs=True)
        assert torch.equal(out[0], ours[0]) and torch.equal(out[1], ours[1])
    for bad in (torch.tensor([4.0, 0.0]), torch.tensor([True, False]), (True, 0), (4, 0, 1), torch.tensor([1, 2, 3]),
                (2.5, 0), "4,0"):
        with pytest.raises(ValueError, match=r"window must be \(left, right\) ints >= -1"):
            attention(q, k, v, window_size=bad)
    # varlen, positionally as flash_attn_varlen_func.
    from tokenforge.ops import attention_varlen

    cu = torch.tensor([0, 5, 11], dtype=torch.int32)
    qv, kv, vv = (t.reshape(22, *t.shape[2:])[:11] for t in (q, k, v))
    a = attention_varlen(qv, kv, vv, cu, cu, 6, 6, 0.0, None, True, (2, 0))
    b = attention_varlen(qv, kv, vv, cu, cu, 6, 6, causal=True, window=(2, 0))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="dropout_p"):
        attention_varlen(qv, kv, vv, cu, cu, 6, 6, 1.5)
    # flash_attn_varlen_func's block_table: None is accepted (its tests pass it); pages: test below.
    assert torch.equal(attention_varlen(qv, kv, vv, cu, cu, 6, 6, causal=True, window=(2, 0), block_table=None), b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_varlen_paged_kv_cache(backend):
    """flash_attn_varlen_func's block_table: k/v as (num_blocks, page, hkv, d) pages, document b's
    key i at page block_table[b, i // page], slot i % page (flash_attn's test layout: shuffled pages,
    more pages than used). Same output and lse as the keys gathered by hand into contiguous rows,
    and the gradient lands on exactly the pages that were read (unused pages get zero)."""
    from tokenforge.ops import attention_varlen

    torch.manual_seed(5)
    page, hq, hkv, d, dtype = 4, 4, 2, 32, torch.bfloat16
    lengths_q, lengths_k = [3, 0, 6, 5], [7, 0, 12, 4]  # an empty document; partial last pages
    blocks_per_doc, num_blocks = 3, 15
    k_pages = torch.randn(num_blocks, page, hkv, d, dtype=dtype, requires_grad=True)
    v_pages = torch.randn(num_blocks, page, hkv, d, dtype=dtype, requires_grad=True)
    block_table = torch.randperm(num_blocks, dtype=torch.int32)[:4 * blocks_per_doc].view(4, blocks_per_doc)
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, d, dtype=dtype, requires_grad=True)
    rows = [int(block_table[b, i // page]) * page + i % page for b, n in enumerate(lengths_k) for i in range(n)]
    k_rows = k_pages.detach().flatten(0, 1)[rows].requires_grad_()
    v_rows = v_pages.detach().flatten(0, 1)[rows].requires_grad_()
    kwargs = dict(causal=True, return_lse=True, backend=backend)
    out, lse = attention_varlen(q, k_pages, v_pages, cu_q, cu_k, 6, 12, block_table=block_table, **kwargs)
    ref_out, ref_lse = attention_varlen(q, k_rows, v_rows, cu_q, cu_k, 6, 12, **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    dout = torch.randn_like(out)
    dq, dk_pages, dv_pages = torch.autograd.grad(out, (q, k_pages, v_pages), dout)
    ref_dq, dk_rows, dv_rows = torch.autograd.grad(ref_out, (q, k_rows, v_rows), dout)
    torch.testing.assert_close(dq, ref_dq, rtol=0, atol=0)
    for got, per_row in ((dk_pages, dk_rows), (dv_pages, dv_rows)):
        want = torch.zeros_like(got).flatten(0, 1).index_add_(0, torch.tensor(rows), per_row).view_as(got)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    unused = sorted(set(range(num_blocks)) - {r // page for r in rows})
    assert unused and dk_pages[unused].abs().max() == 0
    # refused with what is wrong
    args = (q, k_pages, v_pages, cu_q, cu_k, 6, 12)
    for table, match in ((block_table.float(), "block_table must be an int32"),
                         (block_table[:3], "cu_seqlens_k must be an int32 tensor of batch \\+ 1 = 4"),
                         (block_table[:, :2], "at most block_table.shape\\[1\\] x page_size = 8"),
                         (block_table + num_blocks, "outside 0..14")):
        with pytest.raises(ValueError, match=match):
            attention_varlen(*args, block_table=table)
    with pytest.raises(ValueError, match="paged caches"):
        attention_varlen(q, k_rows, v_rows, cu_q, cu_k, 6, 12, block_table=block_table)


ALIBI_CASES = [  # batch, seqlen_q, seqlen_k, heads, kv heads, head dim, causal, window, slopes per batch entry
    (2, 37, 37, 4, 2, 64, True, (-1, -1), False),
    (2, 20, 45, 2, 1, 32, False, (-1, -1), True),   # more keys than queries: the bias is bottom-right aligned
    (1, 33, 17, 2, 2, 64, True, (8, 0), False),     # rows past the keys' end see nothing
    (1, 50, 50, 2, 2, 128, False, (5, 7), True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("case", ALIBI_CASES, ids=lambda c: f"{c[1]}x{c[2]}-h{c[3]}kv{c[4]}-d{c[5]}-{'causal' if c[6] else 'full'}"
                         f"-w{c[7][0]}_{c[7][1]}")
def test_alibi_matches_float64(device, deterministic, case):
    """flash_attn's ALiBi: -slope * |i + sk - sq - j| added to every score, slopes (heads,) or
    (batch, heads), forward and every gradient against float64, one-pass and two-pass backward; the
    bias must matter (the same call without it is far off)."""
    b, sq, sk, hq, hkv, d, causal, window, per_batch = case
    q, k, v = (t.requires_grad_() for t in make_qkv(b, sq, sk, hq, hkv, d, torch.bfloat16, device))
    slopes = torch.rand((b, hq) if per_batch else (hq,), device=device) * 0.5 + 0.25  # large enough to matter at 8 keys
    out = attention(q, k, v, causal=causal, window=window, alibi_slopes=slopes, deterministic=deterministic)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=causal, window=window, alibi_slopes=slopes.double())
    tol = TOLERANCE[torch.bfloat16]
    assert rel_error(out, ref) <= tol
    assert rel_error(attention(q.detach(), k.detach(), v.detach(), causal=causal, window=window), ref) > 10 * tol
    g = torch.randn_like(out)
    for name, got, want in zip("qkv", torch.autograd.grad(out, (q, k, v), g),
                               torch.autograd.grad(ref, (q64, k64, v64), g.double())):
        assert rel_error(got, want) <= tol, f"d{name}"


def test_alibi_paper_slopes_and_module():
    from tokenforge.nn import Attention
    from tokenforge.ops.attention import alibi_slopes

    assert torch.equal(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    # 12 heads: the 8-head sequence, then the odd terms of the 16-head one (2^-0.5, 2^-1.5, ...).
    assert torch.allclose(alibi_slopes(12)[8:], torch.tensor([2.0 ** -(i + 0.5) for i in range(4)]))
    with pytest.raises(ValueError, match="positive int"):
        alibi_slopes(0)
    q, k, v = make_qkv(1, 12, 12, 4, 2, 32, torch.bfloat16, "cpu")
    module = Attention(causal=True, alibi_slopes=alibi_slopes(4))
    assert "alibi" in repr(module) and "alibi_slopes" not in module.state_dict()
    assert torch.equal(module(q, k, v), attention(q, k, v, causal=True, alibi_slopes=alibi_slopes(4)))


def test_alibi_bad_input_and_torch_backend():
    q, k, v = make_qkv(2, 9, 9, 4, 2, 32, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match=r"alibi_slopes must be a float32 tensor of shape \(4,\) or \(2, 4\)"):
        attention(q, k, v, alibi_slopes=torch.ones(2, 2))
    slopes = torch.rand(2, 4)
    ours = attention(q, k, v, causal=True, alibi_slopes=slopes, backend="torch")
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, alibi_slopes=slopes.double())
    assert rel_error(ours, ref) <= TOLERANCE[torch.bfloat16]


SINK_CASES = [  # batch, seqlen_q, seqlen_k, heads, kv heads, head dim, causal, window
    (2, 37, 37, 4, 2, 64, True, (-1, -1)),
    (1, 20, 45, 2, 1, 40, True, (8, 0)),     # head dim zero-padded for the kernel; rows past the window's keys
    (2, 16, 16, 2, 2, 64, False, (-1, -1)),
    (1, 33, 17, 2, 2, 128, True, (-1, -1)),  # the first 16 rows see no key: only the sink (out 0, lse = sink)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("case", SINK_CASES, ids=lambda c: f"{c[1]}x{c[2]}-h{c[3]}kv{c[4]}-d{c[5]}-"
                         f"{'causal' if c[6] else 'full'}-w{c[7][0]}_{c[7][1]}")
def test_sinks_match_float64(device, deterministic, case):
    """Attention sinks (GPT-OSS): one logit per head in every row's softmax, with no value. Output,
    lse and the gradients of q, k, v and the sinks (a bf16 parameter's, given back in bf16) against
    float64, every row; the sinks must matter (the same call without them is far off)."""
    b, sq, sk, hq, hkv, d, causal, window = case
    q, k, v = (t.requires_grad_() for t in make_qkv(b, sq, sk, hq, hkv, d, torch.bfloat16, device))
    sinks = (torch.rand(hq, device=device) * 2 + 2).to(torch.bfloat16).requires_grad_()  # 10-50% of a row
    out, lse = attention(q, k, v, causal=causal, window=window, sinks=sinks, deterministic=deterministic,
                         return_lse=True)
    q64, k64, v64, s64 = (t.detach().double().requires_grad_() for t in (q, k, v, sinks))
    ref, ref_lse = attention_reference(q64, k64, v64, causal=causal, window=window, sinks=s64, return_lse=True)
    tol = TOLERANCE[torch.bfloat16]
    assert rel_error(out, ref) <= tol
    assert rel_error(lse, ref_lse) <= 1e-5
    assert rel_error(attention(q.detach(), k.detach(), v.detach(), causal=causal, window=window), ref) > 10 * tol
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, sinks), g)
    want = torch.autograd.grad(ref, (q64, k64, v64, s64), g.double())
    assert got[3].dtype == torch.bfloat16
    for name, a, w in zip(("dq", "dk", "dv", "dsinks"), got, want):
        # dsinks sums rounded bf16 outputs over every row of a head: 4x the elementwise bound
        assert rel_error(a, w) <= (4 * tol if name == "dsinks" else tol), name


@pytest.mark.parametrize("device", DEVICES)
def test_sinks_varlen_and_torch_backend(device):
    """attention_varlen's sinks (an empty document: lse = its sink) and the torch backend's, vs float64."""
    cu = torch.tensor([0, 5, 5, 30, 41], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(41, h, 64, device=device).to(torch.bfloat16).requires_grad_() for h in (4, 2, 2))
    sinks = torch.randn(4, device=device, requires_grad=True)
    q64, k64, v64, s64 = (t.detach().double().requires_grad_() for t in (q, k, v, sinks))
    ref, ref_lse = attention_varlen_reference(q64, k64, v64, cu, cu, causal=True, sinks=s64, return_lse=True)
    g = torch.randn(ref.shape, device=device, dtype=torch.float64)
    want = torch.autograd.grad(ref, (q64, k64, v64, s64), g)
    tol = TOLERANCE[torch.bfloat16]
    for backend in ("triton", "torch"):
        out, lse = attention_varlen(q, k, v, cu, cu, 25, 25, causal=True, sinks=sinks, return_lse=True,
                                    backend=backend)
        assert rel_error(out, ref) <= tol and rel_error(lse, ref_lse) <= 1e-5, backend
        got = torch.autograd.grad(out, (q, k, v, sinks), g.to(out.dtype))
        for name, a, w in zip(("dq", "dk", "dv", "dsinks"), got, want):
            assert rel_error(a, w) <= (4 * tol if name == "dsinks" else tol), (backend, name)


def test_sinks_module():
    """nn.Attention(sink_heads=hq): a learned sinks parameter (zeros at init) that gets its gradient."""
    from tokenforge.nn import Attention

    q, k, v = make_qkv(2, 12, 12, 4, 2, 32, torch.bfloat16, "cpu")
    module = Attention(causal=True, sink_heads=4)
    assert "sinks" in dict(module.named_parameters()) and "sink_heads=4" in repr(module)
    out = module(q, k, v)
    assert torch.equal(out, attention(q, k, v, causal=True, sinks=torch.zeros(4)))
    out.float().square().sum().backward()
    assert module.sinks.grad is not None and bool(module.sinks.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="sink_heads must be a positive int"):
        Attention(sink_heads=4, dropout=0.1)


def test_sinks_bad_input():
    q, k, v = make_qkv(2, 9, 9, 4, 2, 32, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match=r"sinks must be a floating-point tensor of shape \(4,\)"):
        attention(q, k, v, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match=r"sinks must be a floating-point tensor"):
        attention(q, k, v, sinks=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="dropout_p > 0"):
        attention(q, k, v, dropout_p=0.1, sinks=torch.zeros(4))
    with pytest.raises(ValueError, match="return_attn_probs"):
        attention(q, k, v, return_attn_probs=True, sinks=torch.zeros(4))


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_packed_layouts(device):
    """flash_attn's packed entry points read q/k/v in place from one qkv (or kv) tensor and give the
    separate tensors' results, forward and gradient (the gradient packed the same way)."""
    from tokenforge.ops import (attention_kvpacked, attention_qkvpacked, attention_varlen_kvpacked,
                                attention_varlen_qkvpacked, attention_varlen)

    qkv = torch.randn(2, 19, 3, 2, 32, device=device).to(torch.bfloat16).requires_grad_()
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(2))
    out = attention_qkvpacked(qkv, 0.0, None, True, window_size=(5, 0))
    ref = attention(q, k, v, causal=True, window=(5, 0))
    assert rel_error(out, ref) <= 1e-6
    g = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, g)
    dq, dk, dv = torch.autograd.grad(ref, (q, k, v), g)
    assert dqkv.shape == qkv.shape and rel_error(dqkv, torch.stack((dq, dk, dv), 2)) <= 1e-6
    kv = torch.stack((k.detach(), v.detach()), 2)
    assert rel_error(attention_kvpacked(q.detach(), kv, causal=True), attention(q, k, v, causal=True)) <= 1e-6
    cu = torch.tensor([0, 7, 19], dtype=torch.int32, device=device)
    flat = qkv.detach()[0]  # (19, 3, 2, 32): two documents of 7 and 12 tokens
    a = attention_varlen_qkvpacked(flat, cu, 12, causal=True)
    b = attention_varlen(*flat.unbind(1), cu, cu, 12, 12, causal=True)
    assert rel_error(a, b) <= 1e-6
    c = attention_varlen_kvpacked(flat[:, 0], flat[:, 1:], cu, cu, 12, 12, causal=True)
    assert rel_error(c, b) <= 1e-6
    with pytest.raises(ValueError, match="3 at dim -3"):
        attention_qkvpacked(torch.randn(2, 5, 2, 2, 32, device=device))
    with pytest.raises(ValueError, match="2 at dim -3"):
        attention_varlen_kvpacked(flat[:, 0], flat, cu, cu, 12, 12)


def _qkv(b=1, sq=4, sk=4, hq=2, hkv=2, d=32, dtype=torch.float16):
    return make_qkv(b, sq, sk, hq, hkv, d, dtype, "cpu")


@pytest.mark.parametrize(
    "make,kwargs,exc,match",
    [
        (lambda: _qkv(hq=3, hkv=2), {}, ValueError, r"heads_q \(3\) must be a multiple of heads_kv \(2\)"),
        (lambda: (*_qkv()[:2], torch.randn(1, 5, 2, 32, dtype=torch.float16)), {}, ValueError, "same shape"),
        (lambda: (_qkv()[0], *_qkv(d=64)[1:]), {}, ValueError, "head_dim of q"),
        (lambda: (_qkv()[0], *_qkv(b=2)[1:]), {}, ValueError, "batch"),
        (lambda: tuple(torch.randint(0, 3, (1, 4, 2, 32)) for _ in range(3)), {}, TypeError, "floating point"),
        (lambda: (_qkv()[0].float(), *_qkv()[1:]), {}, TypeError, "share a dtype"),
        (lambda: (_qkv()[0][0], *_qkv()[1:]), {}, ValueError, "4-D"),
        (lambda: (_qkv()[0], _qkv()[1].to("meta"), _qkv()[2]), {}, ValueError, "one device"),
        (lambda: _qkv(), {"window": (-2, 0)}, ValueError, "window"),
        (lambda: _qkv(), {"window": (4,)}, ValueError, "window"),
        (lambda: _qkv(), {"softcap": -1.0}, ValueError, "softcap"),
        (lambda: _qkv(), {"softmax_scale": float("nan")}, ValueError, "softmax_scale"),
        (lambda: _qkv(), {"causal": 1}, TypeError, "causal"),
        (lambda: _qkv(sk=0), {}, ValueError, "seqlen_k must be at least 1"),
        (lambda: ([1.0], *_qkv()[1:]), {}, TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(make, kwargs, exc, match):
    q, k, v = make()
    with pytest.raises(exc, match=match):
        attention(q, k, v, **kwargs)


@pytest.mark.skipif(kernels.INTERPRETED, reason="outside the interpreter, CPU tensors cannot run Triton")
def test_cpu_tensor_outside_interpreter_is_a_clear_error():
    with pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET"):
        attention(*_qkv(), backend="triton")


def test_empty_batch():
    q, k, v = (t.requires_grad_() for t in make_qkv(0, 5, 5, 2, 1, 32, torch.float16, "cpu"))
    out = attention(q, k, v, causal=True)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape


# ---------------------------------------------------------------------------------------------
# torch.compile: custom ops with exact fake implementations, fullgraph, zero graph breaks
# ---------------------------------------------------------------------------------------------


def test_custom_ops_pass_opcheck():
    if not kernels.INTERPRETED:
        pytest.skip("the custom ops wrap the kernel backend; it runs on CPU only under TRITON_INTERPRET=1")
    q, k, v = make_qkv(1, 17, 9, 4, 2, 32, torch.float16, "cpu")
    args = (q, k, v, None, None, 17, 9, 0.2, -1, 0, 0.0, "triton")
    torch.library.opcheck(torch.ops.tokenforge.attention_fwd, args, test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.tokenforge.attention_fwd(*args)
    bargs = (torch.randn_like(out), q, k, v, out, lse, None, None, 17, 9, 0.2, -1, 0, 0.0, True, "triton")
    torch.library.opcheck(torch.ops.tokenforge.attention_bwd, bargs, test_utils=("test_schema", "test_faketensor"))
    # a padded batch read in place (attention_padded): a start and a count per sequence
    starts_q, used_q = torch.tensor([3], dtype=torch.int32), torch.tensor([12], dtype=torch.int32)
    starts_k, used_k = torch.tensor([1], dtype=torch.int32), torch.tensor([7], dtype=torch.int32)
    args = (q, k, v, starts_q, starts_k, 12, 7, 0.2, -1, 0, 0.0, "triton", None, 0.0, None, used_k, used_q)
    torch.library.opcheck(torch.ops.tokenforge.attention_fwd, args, test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.tokenforge.attention_fwd(*args)
    bargs = (torch.randn_like(out), q, k, v, out, lse, starts_q, starts_k, 12, 7, 0.2, -1, 0, 0.0, True, "triton",
             None, 0.0, None, used_q, used_k)
    torch.library.opcheck(torch.ops.tokenforge.attention_bwd, bargs, test_utils=("test_schema", "test_faketensor"))


def test_fullgraph_compile_of_self_attention_on_one_tensor():
    """attention(x, x, x) and attention_varlen(x, x, x): one tensor as q, k and v (which dynamo
    refuses to pass twice to an autograd.Function) compiles fullgraph: the eager output bit for bit,
    and x's gradient (dq + dk + dv, summed by autograd in an order of its own) to fp16 rounding."""
    if not kernels.INTERPRETED:
        pytest.skip("the custom ops wrap the kernel backend; it runs on CPU only under TRITON_INTERPRET=1")
    torch._dynamo.reset()
    x = torch.randn(1, 9, 2, 32, dtype=torch.float16, requires_grad=True)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    for f in (lambda x: attention(x, x, x, causal=True) * 2,
              lambda x: attention_varlen(x[0], x[0], x[0], cu, cu, 5, 5, causal=True) * 2):
        eager = f(x)
        (eager_grad,) = torch.autograd.grad(eager.float().sum(), x)
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        (grad,) = torch.autograd.grad(out.float().sum(), x)
        assert torch.equal(out, eager) and rel_error(grad, eager_grad) <= 2e-3


def test_fullgraph_compile_matches_eager():
    backend = "triton" if kernels.INTERPRETED else None
    torch._dynamo.reset()

    def f(q, k, v):
        return attention(q, k, v, causal=True, window=(8, -1), softcap=10.0, backend=backend) * 2

    q, k, v = (t.requires_grad_() for t in make_qkv(1, 20, 20, 2, 1, 32, torch.float16, "cpu"))
    eager = f(q, k, v)
    eager.float().sum().backward()
    eager_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    explanation = torch._dynamo.explain(f)(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    out.float().sum().backward()
    assert torch.equal(out, eager)
    for t, ref in zip((q, k, v), eager_grads):
        assert torch.equal(t.grad, ref)


# ---------------------------------------------------------------------------------------------
# Compile gate: every config the launchers can pick compiles for sm_90 and sm_80, no spills;
# the matmul kernels use wgmma on sm_90.
# ---------------------------------------------------------------------------------------------


def _attention_arg_types(dtype: str) -> dict:
    from compile_gate import TRITON_DTYPE

    t = {n: "*" + TRITON_DTYPE[dtype] for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    t.update(LSE="*fp32", DELTA="*fp32", DQ_ACC="*fp32", CU_Q="*i32", CU_K="*i32", qk_scale="fp32", softcap="fp32",
             ALIBI="*fp32", SEED="*i64", DROP_THRESHOLD="i64", drop_scale="fp32", SEQUSED_Q="*i32",
             SEQUSED_K="*i32", SINKS="*fp32")
    return t


def compile_attention(name, config, arch, dtype="bfloat16", group=2, varlen=False, left=False, right=True,
                      softcap=False, head_i64=False, fold=False, tma=False, alibi=False, dropout=False,
                      seqused_q=False, seqused_k=False, sinks=False):
    import inspect

    from compile_gate import TARGETS, compile_kernel

    from tokenforge.kernels import attention as ak

    kernel = getattr(ak, ak.KERNEL_OF.get(name, name))
    params = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
    config = dict(config)
    num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages", None)
    flags = dict(GROUP=group, IS_VARLEN=varlen, HAS_LEFT=left, HAS_RIGHT=right, HAS_SOFTCAP=softcap, UPCAST=False,
                 HEAD_I64=head_i64, FOLD=fold, TMA=tma, ATOMIC_DQ=config.pop("ATOMIC_DQ", False), HAS_ALIBI=alibi,
                 HAS_DROPOUT=dropout, HAS_SEQUSED_Q=seqused_q, HAS_SEQUSED_K=seqused_k, HAS_SINKS=sinks)
    constexprs = dict(config, **{k: val for k, val in flags.items() if k in params})
    types = _attention_arg_types(dtype)
    if tma:  # the launcher's tensor descriptors: Q, K, V, O in the forward; Q and dO in the dk/dv pass
        from compile_gate import TRITON_DTYPE

        box = f"tensordesc<{TRITON_DTYPE[dtype]}[1, {config['BLOCK_N']}, 1, {config['BLOCK_D']}]>"
        q_box = f"tensordesc<{TRITON_DTYPE[dtype]}[1, {config['BLOCK_M']}, 1, {config['BLOCK_D']}]>"
        types.update(Q=q_box, O=q_box, DO=q_box)
        if name == "_attn_fwd":
            types.update(K=box, V=box)
    for p in params:  # strides, sizes and window bounds: 32-bit ints
        if p not in types and p not in constexprs:
            types[p] = "i32"
    unaligned = ("qk_scale", "softcap", "SEQ_Q", "SEQ_K", "HEAD_DIM", "HEADS", "KV_HEADS", "WIN_LEFT", "WIN_RIGHT",
                 "N_BLOCKS")
    return compile_kernel(kernel, types, constexprs, num_warps, TARGETS[arch], unaligned_args=unaligned,
                          num_stages=num_stages)


def _gate_configs():
    """(target, kernel, config): every config a launcher can pick on each gated target."""
    from tokenforge.kernels import attention as ak

    return [(arch, n, c) for arch in GATE_ARCHS for n, c in ak.all_configs(arch)]


def _hopper_configs():
    """(kernel, config): what the launchers can pick on sm_90 (for the sm_90-only checks)."""
    from tokenforge.kernels import attention as ak

    return ak.all_configs("sm_90")


def _config_id(name, c):
    return f"{name}-d{c['BLOCK_D']}-{c.get('BLOCK_M')}x{c.get('BLOCK_N', 0)}w{c['num_warps']}s{c.get('num_stages', 0)}"


GATE_CONFIGS = _gate_configs()
HOPPER_CONFIGS = _hopper_configs()


def _gate_fused():
    from tokenforge.kernels import attention as ak

    return ak.fused_configs()


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch,name,config", GATE_CONFIGS, ids=[f"{a}-{_config_id(n, c)}" for a, n, c in GATE_CONFIGS])
def test_configs_compile_without_spills(arch, name, config):
    from compile_gate import ptxas_report, spill_bytes, uses_wgmma

    compiled = compile_attention(name, config, arch)
    report = ptxas_report(compiled.asm["ptx"], arch)
    assert spill_bytes(report) == 0, f"{name} {config} spills on {arch}:\n{report}"
    if arch == "sm_90" and name != "_attn_bwd_preprocess" and config["BLOCK_D"] in (64, 128):
        assert uses_wgmma(compiled), f"{name} {config} does not use wgmma on sm_90"


_FWD_TMA = [(n, c) for n, c in HOPPER_CONFIGS if n == "_attn_fwd" and c["BLOCK_D"] <= 128]


@pytest.mark.compile_gate
@pytest.mark.parametrize("name,config", _FWD_TMA, ids=[_config_id(n, c) for n, c in _FWD_TMA])
def test_forward_tma_compiles_to_bulk_tensor_loads(name, config):
    """Every forward config the launcher gives descriptors (head dim blocks up to
    TMA_MAX_BLOCK_D = 128), on sm_90: TMA loads of Q, K, V (cp.async.bulk.tensor) feeding wgmma
    and a TMA store of O, no spills; causal and the all-features dense variant."""
    import re

    from compile_gate import ptxas_report, spill_bytes, uses_wgmma

    if "sm_90" not in GATE_ARCHS:
        pytest.skip("tensor descriptors are the sm_90 path")
    for kw in (dict(), dict(group=4, left=True, right=True, softcap=True)):
        compiled = compile_attention(name, config, "sm_90", tma=True, **kw)
        ptx = compiled.asm["ptx"]
        assert "cp.async.bulk.tensor" in ptx, (config, kw)
        # O leaves by a TMA store too (shared -> global), not by per-thread stores
        assert re.search(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared", ptx), (config, kw)
        assert spill_bytes(ptxas_report(ptx, "sm_90")) == 0, (config, kw)
        if config["BLOCK_D"] in (64, 128):
            assert uses_wgmma(compiled), (config, kw)


def _bwd_tma_configs():
    from tokenforge.kernels import attention as ak

    return [(n, c) for n, c in HOPPER_CONFIGS + [("_attn_bwd_fused", c) for c in _gate_fused()]
            if n in ("_attn_bwd_dkdv", "_attn_bwd_fused") and ak.bwd_tma_config(c)]


_BWD_TMA = _bwd_tma_configs()


@pytest.mark.compile_gate
@pytest.mark.parametrize("name,config", _BWD_TMA, ids=[_config_id(n, c) for n, c in _BWD_TMA])
def test_backward_tma_compiles_to_bulk_tensor_loads(name, config):
    """The dk/dv pass (two-pass and one-pass) with descriptors on sm_90: the streamed Q/dO blocks by
    TMA (cp.async.bulk.tensor), wgmma, no spills; causal and the all-features variant."""
    from compile_gate import ptxas_report, spill_bytes, uses_wgmma

    if "sm_90" not in GATE_ARCHS:
        pytest.skip("tensor descriptors are the sm_90 path")
    for kw in (dict(), dict(group=4, left=True, right=True, softcap=True)):
        compiled = compile_attention(name, config, "sm_90", tma=True, **kw)
        ptx = compiled.asm["ptx"]
        assert "cp.async.bulk.tensor" in ptx, (name, config, kw)
        assert spill_bytes(ptxas_report(ptx, "sm_90")) == 0, (name, config, kw, ptxas_report(ptx, "sm_90"))
        if config["BLOCK_D"] in (64, 128):
            assert uses_wgmma(compiled), (name, config, kw)


@pytest.mark.compile_gate
@pytest.mark.parametrize("config", _gate_fused(), ids=lambda c: f"d{c['BLOCK_D']}-{c['BLOCK_M']}x{c['BLOCK_N']}w{c['num_warps']}")
def test_one_pass_backward_is_wgmma_shaped_on_hopper(config):
    """The one-pass backward (dk/dv kernel with ATOMIC_DQ) on sm_90: no spills, every GEMM a
    wgmma of at least n32 (no n16 tiles), dq's share added by fp32 global atomics; dense, and with
    varlen + windows + softcap + GQA 4; int64 head offsets too."""
    import re

    from compile_gate import ptxas_report, spill_bytes, uses_wgmma

    if "sm_90" not in GATE_ARCHS:
        pytest.skip("the one-pass backward is the sm_90 path")
    for kw in (dict(), dict(group=4, varlen=True, left=True, right=True, softcap=True), dict(head_i64=True, fold=True)):
        compiled = compile_attention("_attn_bwd_fused", config, "sm_90", **kw)
        ptx = compiled.asm["ptx"]
        assert spill_bytes(ptxas_report(ptx, "sm_90")) == 0, (config, kw)
        assert uses_wgmma(compiled), (config, kw)
        widths = {int(n) for n in re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16", ptx)}
        assert widths and min(widths) >= 32, (config, kw, sorted(widths))
        assert re.search(r"\b(red|atom)\.global(\.\w+)*\.add\.f32", ptx), (config, kw)  # e.g. red.global.gpu.relaxed.add.f32


def _hopper_wgmma_configs():
    from tokenforge.kernels import attention as ak

    return [(n, c) for bd in (32, 64, 128) for n in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")
            for c in ak.candidates(n, bd, "sm_90", interpreted=False)]


_HOPPER_WGMMA = _hopper_wgmma_configs()


@pytest.mark.compile_gate
@pytest.mark.parametrize("name,config", _HOPPER_WGMMA, ids=[_config_id(n, c) for n, c in _HOPPER_WGMMA])
def test_hopper_tiles_are_wgmma_shaped(name, config):
    """Every forward and two-pass backward tile an sm_90 GPU can pick (fixed or tuning candidate) up
    to d128 issues wgmma of n32 or wider: no m64n16, which a 64-row tile split across two warpgroups
    gives (half the work per instruction). d256 has no wgmma-shaped tile that fits the registers."""
    import re

    if "sm_90" not in GATE_ARCHS:
        pytest.skip("sm_90 is not in this gate run")
    ptx = compile_attention(name, config, "sm_90").asm["ptx"]
    widths = {int(n) for n in re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16", ptx)}
    assert widths and min(widths) >= 32, (name, config, sorted(widths))


@pytest.mark.compile_gate
@pytest.mark.parametrize("name", ["_attn_bwd_dkdv", "_attn_bwd_dq"])
def test_hopper_d128_backward_fits_registers(name):
    """The two-pass backward sm_90 runs at d128 by default, in the variants training uses: no spills
    dense (pointers; for dk/dv also Q/dO by TMA with GQA, windows and softcap), with int64 head
    offsets and a folded grid, and for dq in every feature. The dk/dv pointer path with a sliding
    window on varlen, or softcap, sits at 255 registers: triton 3.6 spills 16-24 B there (the newest
    none), which bwd_config takes over one pipeline stage (every Q/dO load's latency exposed)."""
    from compile_gate import ptxas_report, spill_bytes

    from tokenforge.kernels import attention as ak

    if "sm_90" not in GATE_ARCHS:
        pytest.skip("sm_90 is not in this gate run")
    config = ak._FIXED[name](128, interpreted=False, arch="sm_90")
    clean = [dict(), dict(group=4, varlen=True, right=True), dict(head_i64=True, fold=True)]
    near = [dict(group=4, varlen=True, left=True, right=True), dict(group=4, left=True, right=True, softcap=True)]
    if name == "_attn_bwd_dkdv":
        clean.append(dict(tma=True, group=4, left=True, right=True, softcap=True))
    else:
        clean += near + [dict(group=4, varlen=True, left=True, right=True, softcap=True)]
        near = []
    for kw, bound in [(kw, 0) for kw in clean] + [(kw, 32) for kw in near]:
        compiled = compile_attention(name, config, "sm_90", **kw)
        assert spill_bytes(ptxas_report(compiled.asm["ptx"], "sm_90")) <= bound, (name, config, kw)


@pytest.mark.compile_gate
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kvcache_read_in_place_compiles(head_dim):
    """The forward attention_with_kvcache runs on a dense cache read where it is (varlen with a key
    count per sequence, HAS_SEQUSED_K), at the fixed config of every gated target: no spills, wgmma
    on sm_90; causal GQA 4, and with a window, softcap and ALiBi."""
    from compile_gate import ptxas_report, spill_bytes, uses_wgmma

    from tokenforge.kernels import attention as ak

    for arch in GATE_ARCHS:
        config = ak.fwd_config(head_dim, interpreted=False, arch=arch)
        for kw in (dict(), dict(left=True, softcap=True, alibi=True)):
            compiled = compile_attention("_attn_fwd", config, arch, group=4, varlen=True, seqused_k=True, **kw)
            assert spill_bytes(ptxas_report(compiled.asm["ptx"], arch)) == 0, (arch, config, kw)
            if arch == "sm_90":
                assert uses_wgmma(compiled), (config, kw)


@pytest.mark.compile_gate
@pytest.mark.parametrize("name", ["_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq",
                                  "_attn_bwd_fused"])
def test_padded_in_place_compiles(name):
    """attention_padded's kernels (dense, a start and a count per sequence for q and k:
    HAS_SEQUSED_Q/_K) at the fixed config of every gated target and d64/d128, causal GQA 4 and with
    a window and softcap: they spill no more than the gathered varlen call they replace (pointer
    loads both), and the GEMM kernels issue wgmma on sm_90."""
    from compile_gate import ptxas_report, spill_bytes, uses_wgmma

    from tokenforge.kernels import attention as ak

    for arch in GATE_ARCHS:
        for hd in (64, 128):
            if name == "_attn_bwd_preprocess":
                config = ak.preprocess_config(hd)
            elif name == "_attn_bwd_fused" and (arch != "sm_90" or ak.block_d(hd) not in ak.FUSED_TILES):
                continue
            else:
                config = ak._FIXED[name](hd, interpreted=False, arch=arch)
            for kw in (dict(group=4), dict(group=4, left=True, softcap=True)):
                padded = compile_attention(name, config, arch, seqused_q=True, seqused_k=True, **kw)
                gathered = compile_attention(name, config, arch, varlen=True, **kw)
                spills = [spill_bytes(ptxas_report(c.asm["ptx"], arch)) for c in (padded, gathered)]
                assert spills[0] <= spills[1], (name, arch, hd, kw, spills)
                if arch == "sm_90" and name != "_attn_bwd_preprocess":
                    assert uses_wgmma(padded), (name, hd, kw)


@pytest.mark.compile_gate
@pytest.mark.parametrize("head_dim", [64, 128])
def test_sinks_compile(head_dim):
    """The forward with attention sinks (the only kernel they change) at the fixed config of every
    gated target: dense (by TMA descriptors on sm_90, cp.async.bulk.tensor in the PTX) and varlen
    with a window and softcap, GQA 4; no spills, wgmma on sm_90."""
    from compile_gate import ptxas_report, spill_bytes, uses_wgmma

    from tokenforge.kernels import attention as ak

    for arch in GATE_ARCHS:
        config = ak.fwd_config(head_dim, interpreted=False, arch=arch)
        for kw in (dict(tma=arch == "sm_90"), dict(varlen=True, left=True, softcap=True)):
            compiled = compile_attention("_attn_fwd", config, arch, group=4, sinks=True, **kw)
            assert spill_bytes(ptxas_report(compiled.asm["ptx"], arch)) == 0, (arch, config, kw)
            if arch == "sm_90":
                assert uses_wgmma(compiled), (config, kw)
                assert ("cp.async.bulk.tensor" in compiled.asm["ptx"]) == kw.get("tma", False), kw


@pytest.mark.compile_gate
@pytest.mark.parametrize("name", ["_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_fused"])
def test_alibi_compiles(name):
    """The ALiBi variant of every fixed config (dense and varlen + windows + softcap + GQA 4; the
    descriptor path where sm_90 takes it) on each gated architecture. No spills, except: the d128
    dk/dv pass on sm_90 with pointer loads (varlen, or layouts TMA cannot take) sits at 255
    registers, where triton 3.6 spills 40 B dense and 112 B with every feature (the newest none;
    dense TMA, what training layouts take, none under both); on sm_80 with every feature, d64 dk/dv
    and d128 dq spill 24-76 B."""
    import triton
    from compile_gate import ptxas_report, spill_bytes

    old = triton.__version__.startswith("3.6")
    for arch, hd, config, kw in fixed_config_variants(name):
        report = ptxas_report(compile_attention(name, config, arch, alibi=True, **kw).asm["ptx"], arch)
        bound = 0
        if name == "_attn_bwd_dkdv" and hd == 128 and arch == "sm_90" and old and not kw.get("tma"):
            bound = 128
        if arch == "sm_80" and kw.get("softcap") and (name, hd) in (("_attn_bwd_dkdv", 64), ("_attn_bwd_dq", 128)):
            bound = 96
        assert spill_bytes(report) <= bound, (name, hd, arch, kw, report)


def fixed_config_variants(name: str):
    """(target, head dim, fixed config, compile_attention flags) for a feature's compile check: the
    fixed config of ``name`` at d64/128/256 on each gated target, dense, with every other feature
    (varlen + both windows + softcap + GQA 4), and by descriptors where sm_90 takes them."""
    from tokenforge.kernels import attention as ak

    for arch in GATE_ARCHS:
        for hd in (64, 128, 256):
            if name == "_attn_bwd_fused" and (arch != "sm_90" or ak.block_d(hd) not in ak.FUSED_TILES):
                continue
            config = ak._FIXED[name](hd, interpreted=False, arch=arch)
            variants = [dict(), dict(group=4, varlen=True, left=True, right=True, softcap=True)]
            if arch == "sm_90" and hd <= 128 and name != "_attn_bwd_dq":
                variants.append(dict(tma=True))
            for kw in variants:
                yield arch, hd, config, kw


@pytest.mark.compile_gate
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"])
def test_every_feature_compiles(dtype, name):
    """Varlen + both window sides + softcap + GQA 4 (the most code) at head dims 64 and 256,
    plus the unmasked dense MHA variant, on both architectures, without spills."""
    from compile_gate import ptxas_report, spill_bytes

    for arch, _, config in [(a, n, c) for a, n, c in GATE_CONFIGS if n == name and c["BLOCK_D"] in (64, 256)]:
        for kw in (dict(group=4, varlen=True, left=True, right=True, softcap=True),
                   dict(group=1, right=False)):
            compiled = compile_attention(name, config, arch, dtype=dtype, **kw)
            assert spill_bytes(ptxas_report(compiled.asm["ptx"], arch)) == 0, (name, config, arch, kw)


def test_every_head_dim_maps_to_a_gated_config():
    from tokenforge.kernels import attention as ak

    for target, families in (("sm_90", ("sm_90", "default")), ("sm_80", ("sm_80", "default"))):
        gated = {(n, tuple(sorted(c.items()))) for n, c in ak.all_configs(target)}
        for d in range(32, 257, 8):
            for arch in families:
                for name, fn in (("_attn_fwd", ak.fwd_config), ("_attn_bwd_dkdv", ak.bwd_config),
                                 ("_attn_bwd_dq", ak.dq_config)):
                    assert (name, tuple(sorted(fn(d, interpreted=False, arch=arch).items()))) in gated, (target, name, d)
            assert ("_attn_bwd_preprocess", tuple(sorted(ak.preprocess_config(d).items()))) in gated


def test_cpu_grid_covers_the_issue_axes():
    """The CPU subset still touches every axis of the issue's grid at least once."""
    seqlens = {c[1] for c in CPU_CASES} | {c[2] for c in CPU_CASES}
    assert {1, 17, 64, 129} <= seqlens
    assert {32, 64, 80, 128, 256} <= {c[5] for c in CPU_CASES}
    assert {1, 2, 4} <= {c[3] // c[4] for c in CPU_CASES} and any(c[4] == 1 for c in CPU_CASES)
    assert {1, 3} <= {c[0] for c in CPU_CASES}
    assert any(c[6] for c in CPU_CASES) and any(c[7] != (-1, -1) for c in CPU_CASES) and any(c[8] for c in CPU_CASES)


# ---------------------------------------------------------------------------------------------
# Real sizes on the CPU: 64-bit head offsets, launch grids within CUDA's limits (issue 12)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not kernels.INTERPRETED, reason="a 4 GB strided view runs cheaply only under the interpreter")
def test_head_offsets_past_2_31_elements():
    """patch_sdpa passes (B, H, S, D) views through, so stride_h = S * D and h * stride_h passes
    2^31 at 128 heads x 128k tokens x d128. Here the head stride fits in 32 bits (so Triton types it
    i32) and the third head of q, k and v starts past element 2^31 (untouched pages of the views'
    storage are never allocated)."""
    torch.manual_seed(0)
    s, d, h = 40, 64, 3
    stride_h = 2**30 + 64

    def far_view():
        base = torch.empty(stride_h * (h - 1) + s * d, dtype=torch.float16)
        view = base.as_strided((1, s, h, d), (stride_h * h, d, stride_h, 1))
        view.copy_(torch.randn(1, s, h, d, dtype=torch.float16))
        return view

    q, k, v = far_view(), far_view(), far_view()
    run_and_check(q, k, v, causal=True)


@pytest.mark.compile_gate
@pytest.mark.parametrize("name,config", HOPPER_CONFIGS, ids=[_config_id(n, c) for n, c in HOPPER_CONFIGS])
def test_int64_head_offsets_compile_on_hopper(name, config):
    """The HEAD_I64 + FOLD variant (tensors reaching past 2^31 elements, batch x heads past 65535)
    at every config: no spills on sm_90 (on sm_80 the backward kernels sit at 255 registers and
    may spill a few bytes there)."""
    from compile_gate import ptxas_report, spill_bytes

    if "sm_90" not in GATE_ARCHS:
        pytest.skip("sm_90 is not in this gate run")
    compiled = compile_attention(name, config, "sm_90", head_i64=True, fold=True)
    assert spill_bytes(ptxas_report(compiled.asm["ptx"], "sm_90")) == 0


def test_wide_tensors_turn_on_int64_head_offsets():
    from tokenforge.kernels import attention as ak

    assert not ak._head_i64(torch.empty(2, 4096, 32, 128))
    far = torch.empty_strided((1, 8, 3, 64), (0, 64, 2**30 + 64, 1), device="meta")
    assert ak._head_i64(far)


def test_launch_grids_stay_within_cuda_limits(monkeypatch):
    """2048 packed documents x 32 heads = 65536 (batch x head) programs: past axis 1's 65535 every
    kernel launches on one folded axis (2^31 - 1); below it, (blocks, batch x heads)."""
    from tokenforge.kernels import attention as ak

    grids = []

    class Spy:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids.append((self.name, tuple(grid)))
            return lambda *a, **k: None

    for name in ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        monkeypatch.setattr(ak, name, Spy(name))
    monkeypatch.setattr(ak, "_select", lambda kernel, d, device, key, launch: ak.candidates(kernel, d)[0])
    docs, heads, d = 2048, 32, 64
    cu = torch.arange(0, 2 * docs + 1, 2, dtype=torch.int32)
    q = torch.zeros(2 * docs, heads, d, dtype=torch.float16)
    out, lse = ak.attention_forward(q, q, q, cu, cu, 2, 2, 0.125, (-1, 0), 0.0)
    ak.attention_backward(out, q, q, q, out, lse, cu, cu, 2, 2, 0.125, (-1, 0), 0.0)
    assert {n for n, _ in grids} == {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"}
    for name, grid in grids:
        assert len(grid) == 1 and grid[0] >= docs * heads and grid[0] < 2**31, (name, grid)
    grids.clear()
    small = q[:, :8]
    ak.attention_forward(small, small, small, cu, cu, 2, 2, 0.125, (-1, 0), 0.0)
    assert len(grids[0][1]) == 2 and grids[0][1][1] == docs * 8


# ---------------------------------------------------------------------------------------------
# The torch backend on CUDA is SDPA (the real baseline), where SDPA computes the same thing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sq,sk,window,group", [(17, 17, (-1, 0), 1), (9, 23, (-1, 0), 2), (23, 23, (5, 0), 2),
                                                (16, 30, (4, 3), 4), (20, 20, (-1, -1), 1)])
def test_sdpa_path_matches_the_reference(sq, sk, window, group):
    """The SDPA route (run here on CPU tensors, float64) against the reference, forward and
    backward: causal square as SDPA's flag, bottom-right causal and windows as masks, GQA."""
    from tokenforge.ops.attention import _reference_dense, sdpa_can_run, sdpa_dense

    assert sdpa_can_run(sq, sk, window, 0.0, False)
    torch.manual_seed(0)
    q = torch.randn(2, sq, 4, 32, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, sk, 4 // group, 32, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, sk, 4 // group, 32, dtype=torch.float64, requires_grad=True)
    out = sdpa_dense(q, k, v, 0.2, window)
    ref = _reference_dense(q, k, v, 0.2, window, 0.0, torch.float64)[0]
    assert rel_error(out, ref) < 1e-10
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for g, w in zip(got, want):
        assert rel_error(g, w) < 1e-10


def test_sdpa_is_not_used_where_it_would_differ():
    from tokenforge.ops.attention import sdpa_can_run

    assert not sdpa_can_run(30, 20, (-1, 0), 0.0, False)   # rows with no key: SDPA gives NaN, we give 0
    assert not sdpa_can_run(16, 16, (-1, 0), 30.0, False)  # softcap
    assert not sdpa_can_run(16, 16, (-1, 0), 0.0, True)    # lse asked for
    assert sdpa_can_run(30, 20, (-1, -1), 0.0, False)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_cuda_torch_backend_is_sdpa(monkeypatch):
    import tokenforge.ops.attention as oa

    calls = []
    real = oa.sdpa_dense
    monkeypatch.setattr(oa, "sdpa_dense", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.bfloat16)
    out = attention(q, q, q, causal=True, backend="torch")
    assert calls and rel_error(out, attention_reference(q.float(), q.float(), q.float(), causal=True)) < 1e-2
