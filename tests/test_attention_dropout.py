"""Attention dropout (flash_attn's and SDPA's dropout_p): the Triton kernels against the float64
reference that drops with the same Philox mask (ops.attention.dropout_keep_reference), forward
and both backward passes, dense and varlen; the mask read back from the kernels bit for bit in
several tilings; its statistics; seeds, activation checkpointing, flash_attn's S_dmask,
torch.compile and SDPA routing."""

from __future__ import annotations

import math

import pytest
import torch
from device_params import DEVICES, HAS_CUDA
from test_attention import compile_attention, fixed_config_variants, make_qkv

from tokenforge import kernels
from tokenforge.ops.attention import (_dropout_seed, attention, attention_reference, attention_varlen,
                                      attention_varlen_reference, dropout_keep_reference, dropout_threshold)
from tokenforge.testing import TOLERANCE, rel_error


def _seed_after(manual_seed: int, device="cpu") -> int:
    """The dropout seed the next attention call on ``device`` draws after torch.manual_seed(manual_seed)."""
    torch.manual_seed(manual_seed)
    return int(_dropout_seed(device))


def _ref(q, k, v, seed, p, **kw):
    """float64 reference (leaves requiring grad) with the kernels' mask."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = attention_reference(q64, k64, v64, dropout=(seed, dropout_threshold(p)), **kw)
    return out, (q64, k64, v64)


# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window, softcap, alibi)
CASES = [
    (2, 37, 37, 4, 2, 64, True, (-1, -1), 0.0, False),
    (1, 20, 45, 2, 1, 32, False, (-1, -1), 0.0, False),    # more keys than queries, MQA
    (1, 50, 50, 2, 2, 128, False, (5, 7), 0.0, False),     # sliding window both sides
    (1, 33, 33, 2, 1, 64, True, (-1, -1), 20.0, True),     # softcap and ALiBi with it
    (1, 17, 17, 2, 1, 256, True, (-1, -1), 0.0, False),    # the largest head dim
]


def _case_id(c):
    b, sq, sk, hq, hkv, d, causal, window, cap, alibi = c
    return (f"b{b}-q{sq}-k{sk}-h{hq}/{hkv}-d{d}" + ("-causal" if causal else "")
            + (f"-win{window[0]}_{window[1]}" if window != (-1, -1) else "") + (f"-cap{cap:g}" if cap else "")
            + ("-alibi" if alibi else ""))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_dropout_matches_float64(device, deterministic, case):
    """out, dq, dk, dv against float64 autograd of the reference dropping the same entries; the
    same call without dropout is far off, so a kernel that ignored the mask would fail."""
    b, sq, sk, hq, hkv, d, causal, window, cap, alibi = case
    p = 0.3
    # fp16: its error sits ~20x under the tolerance (bf16's, truncated by the interpreter, within
    # 1.2x of it); bf16 runs in the mask, seed and GPU tests.
    q, k, v = (t.requires_grad_() for t in make_qkv(b, sq, sk, hq, hkv, d, torch.float16, device))
    slopes = torch.rand(hq, device=device) * 0.5 + 0.25 if alibi else None
    kw = dict(causal=causal, window=window, softcap=cap, alibi_slopes=slopes)
    seed = _seed_after(11, device)
    torch.manual_seed(11)
    out = attention(q, k, v, p, deterministic=deterministic, backend="triton", **kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref, leaves = _ref(q, k, v, seed, p, **kw)
    ref.backward(dout.double())
    tol = TOLERANCE[torch.float16]
    errs = {"out": rel_error(out, ref)}
    errs.update({n: rel_error(t.grad, r.grad) for n, t, r in zip(("dq", "dk", "dv"), (q, k, v), leaves)})
    for name, err in errs.items():
        assert err <= tol, f"{name}: {err:.3e} > {tol:.0e}; all: {errs}"
    undropped = attention_reference(*(t.detach().double() for t in (q, k, v)), **kw)
    assert rel_error(out, undropped) > 10 * tol


def _probe(sq, sk, hq, hkv, device):
    """q = 0 (every visible key gets probability 1 / sk) and v = the identity over keys: out[i, h, j]
    is the kept, rescaled probability of (i, j), zero where dropped."""
    q = torch.zeros(1, sq, hq, sk, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, sk, hkv, sk, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.eye(sk, device=device, dtype=torch.bfloat16)[None, :, None, :].expand(1, sk, hkv, sk).contiguous()
    return q, k, v.requires_grad_()


TILINGS = [None, dict(BLOCK_M=16, BLOCK_N=32), dict(BLOCK_M=64, BLOCK_N=64)]


@pytest.mark.parametrize("tiling", TILINGS, ids=["fixed", "16x32", "64x64"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["one-pass", "two-pass"])
def test_kernels_draw_the_reference_mask_in_every_tiling(monkeypatch, tiling, deterministic):
    """The mask read back from the forward (out) and from the backward (dv = P_drop^T dO with dO
    the identity over queries) equals dropout_keep_reference bit for bit, whatever the tiles."""
    if not kernels.INTERPRETED:
        pytest.skip("reads the mask back through the interpreter's tiles")
    from tokenforge.kernels import attention as ak

    if tiling is not None:
        for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_fused"):
            fixed = ak._FIXED[name]
            monkeypatch.setitem(ak._FIXED, name, lambda hd, _f=fixed, **kw: {**_f(hd, **kw), **tiling})
    sq, sk, hq, hkv, p = 40, 64, 4, 2, 0.25
    q, k, v = _probe(sq, sk, hq, hkv, "cpu")
    seed = _seed_after(3)
    torch.manual_seed(3)
    out = attention(q, k, v, p, deterministic=deterministic, backend="triton")
    keep = dropout_keep_reference(seed, dropout_threshold(p), 1, hq, sq, sk)[0]  # (h, sq, sk)
    assert torch.equal(out[0].transpose(0, 1) != 0, keep)
    kept = out[0].transpose(0, 1)[keep].float()
    assert torch.allclose(kept, torch.full_like(kept, 1 / (sk * (1 - p))), rtol=1e-2)
    dout = torch.zeros_like(out)
    dout[0, torch.arange(sq), :, torch.arange(sq)] = 1.0  # dO[i, h] = e_i
    out.backward(dout)
    # dv[j, hk, i] = sum over the group's heads h of P_drop[h, i, j]: nonzero iff some head kept it.
    dv = v.grad[0].permute(1, 2, 0)[..., :sq, :]  # (hkv, sq, sk)
    group_keep = keep.view(hkv, hq // hkv, sq, sk).any(1)
    assert torch.equal(dv != 0, group_keep)


def test_mask_statistics():
    """The keep rate is 1 - p within 5 sigma over a million draws, words of one Philox call are
    independent (both of keys 4t and 4t + 1 dropped at rate p^2), and rows, heads and seeds differ."""
    p = 0.17
    thr = dropout_threshold(p)
    keep = dropout_keep_reference(123456789, thr, 4, 4, 256, 256)
    n = keep.numel()
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    both = (~keep[..., 0::4] & ~keep[..., 1::4]).double().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (n / 4))
    assert not torch.equal(keep[:, :, 0], keep[:, :, 1])
    assert not torch.equal(keep[:, 0], keep[:, 1]) and not torch.equal(keep[0], keep[1])
    assert not torch.equal(keep, dropout_keep_reference(123456790, thr, 4, 4, 256, 256))
    # Thresholds: p = 0 keeps everything, p close to 1 still keeps some, and never 2^32.
    assert dropout_threshold(0.0) == 0 and dropout_threshold(1 - 1e-12) == 2**32 - 1
    assert dropout_threshold(0.5) == 2**31


@pytest.mark.parametrize("device", DEVICES)
def test_seeds_come_from_torch_generator(device):
    """torch.manual_seed reproduces a call bit for bit; the next call draws a new mask; the torch
    backend (the reference, on CPU) drops the same entries as the kernel."""
    q, k, v = make_qkv(1, 24, 24, 2, 2, 32, torch.bfloat16, device)
    torch.manual_seed(7)
    a = attention(q, k, v, 0.4, causal=True, backend="triton")
    b = attention(q, k, v, 0.4, causal=True, backend="triton")
    torch.manual_seed(7)
    again = attention(q, k, v, 0.4, causal=True, backend="triton")
    assert torch.equal(a, again) and not torch.equal(a, b)
    if device == "cpu":
        torch.manual_seed(7)
        ref = attention(q, k, v, 0.4, causal=True, backend="torch")
        assert rel_error(a, ref) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
def test_activation_checkpointing_redraws_the_same_mask(device):
    """torch.utils.checkpoint restores the RNG state for its recompute: gradients equal those of
    the plain call (two-pass backward: bit for bit)."""
    from torch.utils.checkpoint import checkpoint

    q, k, v = make_qkv(2, 20, 20, 2, 1, 64, torch.bfloat16, device)

    def f(q, k, v):
        return attention(q, k, v, 0.25, causal=True, deterministic=True, backend="triton")

    grads = []
    for wrap in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(1)
        out = checkpoint(f, *leaves, use_reentrant=False) if wrap else f(*leaves)
        (out.float() * torch.arange(out.numel(), device=device).view(out.shape).sin()).sum().backward()
        grads.append([t.grad for t in leaves])
    for plain, ckpt in zip(*grads):
        assert torch.equal(plain, ckpt)


def _fa2_normalise(s_dmask, q, k, causal, block_n):
    """flash_attn's tests' reading of S_dmask, written out: |S| times exp(M - lse), M the running
    max over key blocks from the right, gives the softmax; the sign gives the mask."""
    sq, sk = q.shape[1], k.shape[1]
    a = s_dmask[..., :sq, :sk].double()
    group = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(group, 2)) / math.sqrt(q.shape[-1])
    if causal:
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    blocks = [c.amax(-1) for c in s.split(block_n, -1)]
    running = torch.stack(blocks, -1).flip(-1).cummax(-1).values.flip(-1)
    scale = torch.cat([torch.exp(running[..., n:n + 1] - lse).expand(c.shape)
                       for n, c in enumerate(s.split(block_n, -1))], -1)
    return a.abs() * scale, a >= 0, torch.softmax(s, -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_return_attn_probs_is_flash_attn_s_dmask(device, head_dim):
    """return_attn_probs with dropout gives flash_attn 2's S_dmask: (b, h, sq, sk) rounded up to
    128, which its tests' normalisation turns into the softmax, negative exactly where dropped;
    without dropout, None (as flash_attn)."""
    sq, sk, hq, hkv, p = 45, 70, 4, 2, 0.17
    q, k, v = make_qkv(2, sq, sk, hq, hkv, head_dim, torch.bfloat16, device)
    seed = _seed_after(5, device)
    torch.manual_seed(5)
    out, lse, s_dmask = attention(q, k, v, p, None, True, return_attn_probs=True, backend="triton")
    assert s_dmask.shape == (2, hq, 128, 128) and s_dmask.dtype == q.dtype
    assert not s_dmask[..., sq:, :].any() and not s_dmask[..., sk:].any()
    block_n = {32: 128, 64: 64, 128: 32}[head_dim]
    probs, kept, softmax = _fa2_normalise(s_dmask.cpu(), q.cpu(), k.cpu(), True, block_n)
    assert (probs - softmax).abs().max().item() < 1e-2 * softmax.max().item()
    keep = dropout_keep_reference(seed, dropout_threshold(p), 2, hq, sq, sk)
    visible = softmax > 1e-30  # dropped zeros read as -0.0 >= 0
    assert torch.equal(kept[visible], keep[visible])
    assert attention(q, k, v, 0.0, None, True, return_attn_probs=True)[2] is None


def _cu(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["one-pass", "two-pass"])
def test_varlen_dropout_matches_float64(device, deterministic):
    """Packed documents drop as batch entries of their own (document b is head block b): against
    the per-document reference, forward and gradients; S_dmask per document."""
    lens_q, lens_k, hq, hkv, d, p = [5, 1, 30, 17], [9, 4, 30, 17], 4, 2, 64, 0.2
    q = torch.randn(sum(lens_q), hq, d, device=device, dtype=torch.float16, requires_grad=True)
    k = torch.randn(sum(lens_k), hkv, d, device=device, dtype=torch.float16, requires_grad=True)
    v = torch.randn(sum(lens_k), hkv, d, device=device, dtype=torch.float16, requires_grad=True)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    seed = _seed_after(9, device)
    torch.manual_seed(9)
    out, _, s_dmask = attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), p, causal=True,
                                       deterministic=deterministic, return_attn_probs=True, backend="triton")
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_varlen_reference(q64, k64, v64, cu_q, cu_k, causal=True, dropout=(seed, dropout_threshold(p)))
    ref.backward(dout.double())
    tol = TOLERANCE[torch.float16]
    for name, got, want in (("out", out, ref), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                            ("dv", v.grad, v64.grad)):
        assert rel_error(got, want) <= tol, name
    assert s_dmask.shape == (4, hq, 128, 128)
    keep = dropout_keep_reference(seed, dropout_threshold(p), 1, hq, 30, 30, first_batch=2)[0]
    causal = torch.ones(30, 30, dtype=torch.bool).tril()
    assert torch.equal((s_dmask[2, :, :30, :30] >= 0)[:, causal].cpu(), keep[:, causal])


@pytest.mark.parametrize("p", [1.0, -0.1, True, "0.1"])
def test_bad_dropout_is_a_clear_error(p):
    q, k, v = make_qkv(1, 8, 8, 2, 2, 32, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
        attention(q, k, v, p)


def test_cuda_backend_refuses_dropout(monkeypatch):
    """backend='cuda' has no dropout: refused with what to do, before anything launches."""
    from tokenforge import backends

    monkeypatch.setattr(backends, "choose", lambda *a, **kw: "cuda")
    monkeypatch.setattr("tokenforge.cuda.attention.check_call", lambda *a: None)
    q, k, v = make_qkv(1, 8, 8, 2, 2, 64, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="backend='cuda' has no attention dropout; use backend='triton'"):
        attention(q, k, v, 0.1)


def test_custom_ops_with_dropout_pass_opcheck():
    if not kernels.INTERPRETED:
        pytest.skip("the custom ops wrap the kernel backend; it runs on CPU only under TRITON_INTERPRET=1")
    q, k, v = make_qkv(1, 17, 9, 4, 2, 32, torch.float16, "cpu")
    seed = torch.tensor(12345, dtype=torch.int64)
    args = (q, k, v, None, None, 17, 9, 0.2, -1, 0, 0.0, "triton", None, 0.3, seed)
    torch.library.opcheck(torch.ops.tokenforge.attention_fwd, args)
    out, lse = torch.ops.tokenforge.attention_fwd(*args)
    bargs = (torch.randn_like(out), q, k, v, out, lse, None, None, 17, 9, 0.2, -1, 0, 0.0, True, "triton", None,
             0.3, seed)
    torch.library.opcheck(torch.ops.tokenforge.attention_bwd, bargs)


def test_fullgraph_compile_with_dropout_matches_eager():
    """No graph break: the seed is drawn in the graph and handed to the op as a tensor; under
    aot_eager the same torch.manual_seed gives the same mask as eager."""
    backend = "triton" if kernels.INTERPRETED else None
    torch._dynamo.reset()

    def f(q, k, v):
        return attention(q, k, v, 0.3, causal=True, backend=backend) * 2

    q, k, v = (t.requires_grad_() for t in make_qkv(1, 20, 20, 2, 1, 32, torch.float16, "cpu"))
    torch.manual_seed(4)
    eager = f(q, k, v)
    explanation = torch._dynamo.explain(f)(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    torch.manual_seed(4)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.equal(compiled, eager)


def test_sdpa_patch_routes_dropout():
    """F.scaled_dot_product_attention(dropout_p > 0) goes to the kernel (SDPA's semantics: drop,
    then scale by 1 / (1 - p)), the same mask as tokenforge's attention under the same seed."""
    import torch.nn.functional as F

    from tokenforge import sdpa_patch

    q, k, v = (t.transpose(1, 2) for t in make_qkv(1, 16, 16, 2, 2, 32, torch.bfloat16, "cpu"))
    before = dict(sdpa_patch.stats)
    with sdpa_patch.patch_sdpa():
        torch.manual_seed(2)
        routed = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    assert sdpa_patch.stats["routed"] == before["routed"] + 1
    torch.manual_seed(2)
    ours = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.3, causal=True, backend="triton")
    assert torch.equal(routed, ours.transpose(1, 2))


def test_module_drops_only_in_training():
    from tokenforge.nn import Attention

    q, k, v = make_qkv(1, 16, 16, 2, 2, 32, torch.bfloat16, "cpu")
    m = Attention(causal=True, dropout=0.5)
    torch.manual_seed(0)
    train = m(q, k, v)
    m.eval()
    assert torch.equal(m(q, k, v), attention(q, k, v, causal=True))
    assert not torch.equal(train, m(q, k, v))
    assert "dropout=0.5" in repr(m)
    with pytest.raises(ValueError, match="dropout"):
        Attention(dropout=1.0)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("seqlen,head_dim", [(1024, 64), (2048, 128)])
def test_cuda_dropout_real_sizes(seqlen, head_dim):
    """At real sizes on the GPU (the tuned tiles, TMA, the one-pass backward at d64): the kernel
    against the fp32 reference dropping with the same mask, forward and gradients."""
    q, k, v = (t.requires_grad_() for t in make_qkv(2, seqlen, seqlen, 8, 2, head_dim, torch.bfloat16, "cuda"))
    seed = _seed_after(0, "cuda")
    torch.manual_seed(0)
    out = attention(q, k, v, 0.1, causal=True, backend="triton")
    dout = torch.randn_like(out)
    out.backward(dout)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, causal=True, dropout=(seed, dropout_threshold(0.1)))
    ref.backward(dout.float())
    tol = TOLERANCE[torch.bfloat16]
    assert rel_error(out, ref) <= tol
    for got, want in zip((q.grad, k.grad, v.grad), leaves):
        assert rel_error(got, want.grad) <= tol


# Spill bytes the dropout variants may have, per (target, kernel, head dim): the worst of the dense,
# every-feature and descriptor variants under triton 3.6 and 3.9, rounded up. The Philox words of a
# tile (four per four scores) must live next to kernels that sit at 255 registers without them:
# under 3.6 (the GPU machine's) the d128 dk/dv pass spills 136 B on the dense TMA path, 128-236 B
# on the pointer paths, the every-feature d128 dq 60 B and d256 dq ~950 B. Without dropout all of
# these are 0 (test_attention.py's gate).
DROPOUT_SPILL_BOUND = {
    ("sm_90", "_attn_fwd", 128): 16, ("sm_90", "_attn_fwd", 256): 72,
    ("sm_90", "_attn_bwd_dkdv", 128): 336, ("sm_90", "_attn_bwd_dkdv", 256): 32,
    ("sm_90", "_attn_bwd_dq", 128): 64, ("sm_90", "_attn_bwd_dq", 256): 976,
    ("sm_90", "_attn_bwd_fused", 64): 48,
    ("sm_80", "_attn_fwd", 128): 320,
    ("sm_80", "_attn_bwd_dkdv", 64): 64, ("sm_80", "_attn_bwd_dkdv", 256): 32,
    ("sm_80", "_attn_bwd_dq", 128): 960, ("sm_80", "_attn_bwd_dq", 256): 912,
}


@pytest.mark.compile_gate
@pytest.mark.parametrize("name", ["_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_fused"])
def test_dropout_compiles(name):
    """The dropout variant of every fixed config (dense; varlen + windows + softcap + GQA 4; the
    descriptor path where sm_90 takes it) compiles on each gated architecture, within
    DROPOUT_SPILL_BOUND."""
    from compile_gate import ptxas_report, spill_bytes

    for arch, hd, config, kw in fixed_config_variants(name):
        report = ptxas_report(compile_attention(name, config, arch, dropout=True, **kw).asm["ptx"], arch)
        assert spill_bytes(report) <= DROPOUT_SPILL_BOUND.get((arch, name, hd), 0), (name, hd, arch, kw, report)
