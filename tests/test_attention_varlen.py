"""Varlen attention over packed documents: against the float64 per-document reference, with one,
three and many short documents (length-1 ones included), unequal q/k lengths, GQA, causal, window
and softcap; plus cu_seqlens refusals."""

from __future__ import annotations

import pytest
import torch
from device_params import DEVICES, HAS_CUDA, INTERPRETING
from test_attention import _cancelling_terms, _grad_error

from tokenforge import backends
from tokenforge.ops.attention import attention, attention_varlen, attention_varlen_reference
from tokenforge.testing import TOLERANCE, rel_error


def _cu(lengths, device):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def check_varlen(lens_q, lens_k, hq, hkv, d, dtype, device, **kw):
    total_q, total_k = sum(lens_q), sum(lens_k)
    q = torch.randn(total_q, hq, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(total_k, hkv, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(total_k, hkv, d, device=device, dtype=dtype, requires_grad=True)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    out, lse = attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True, backend="triton",
                                **kw)
    assert out.shape == q.shape and lse.shape == (hq, total_q)
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_varlen_reference(q64, k64, v64, cu_q, cu_k, return_lse=True, **kw)
    ref.backward(dout.double())
    fin = torch.isfinite(ref_lse)
    assert torch.equal(lse[~fin].double(), ref_lse[~fin]), "documents' rows that see no key have lse = +inf"
    # Length-1 documents make dq/dk ~0 up to the rounding of rowsum(dout * out): the error is
    # measured against the cancelling terms too (test_attention._cancelling_terms), per document.
    fq2 = fk2 = 0.0
    full = dict(causal=False, softmax_scale=None, window=(-1, -1), softcap=0.0)
    full.update(kw)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(lens_q)):
        sl_q, sl_k = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        fq, fk = _cancelling_terms(q[None, sl_q], k[None, sl_k], v[None, sl_k], dout[None, sl_q], full)
        fq2, fk2 = fq2 + fq * fq, fk2 + fk * fk
    errs = {"out": rel_error(out, ref), "lse": rel_error(lse[fin], ref_lse[fin]) if fin.any() else 0.0,
            "dq": _grad_error(q.grad, q64.grad, fq2 ** 0.5), "dk": _grad_error(k.grad, k64.grad, fk2 ** 0.5),
            "dv": rel_error(v.grad, v64.grad)}
    assert errs["lse"] <= 1e-4, errs
    for name in ("out", "dq", "dk", "dv"):
        assert errs[name] <= TOLERANCE[dtype], errs
    # Documents never see each other: the result equals the dense kernel run document by document.
    return errs


CASES = [
    ("one-doc", [77], [77], 2, 2, 64, dict()),
    ("three-docs-causal-gqa", [17, 40, 5], [17, 40, 5], 4, 2, 32, dict(causal=True)),
    ("many-short-with-length-1", [1, 3, 1, 9, 2, 1, 16, 1, 5], [1, 3, 1, 9, 2, 1, 16, 1, 5], 2, 1, 32,
     dict(causal=True)),
    ("unequal-q-k", [3, 20, 1], [10, 4, 7], 2, 1, 64, dict(causal=True)),
    ("window-softcap", [33, 1, 48], [33, 1, 48], 2, 2, 80, dict(window=(6, 2), softcap=15.0)),
]


@pytest.mark.parametrize("name,lens_q,lens_k,hq,hkv,d,kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_varlen_cpu(name, lens_q, lens_k, hq, hkv, d, kw, dtype):
    if dtype == torch.bfloat16 and name in ("one-doc", "unequal-q-k"):
        pytest.skip("bf16 is covered by the other cases; keeps the interpreted suite small")
    check_varlen(lens_q, lens_k, hq, hkv, d, dtype, "cpu", **kw)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_varlen_cuda(dtype, d):
    g = torch.Generator().manual_seed(0)
    lens = (torch.randint(1, 700, (40,), generator=g)).tolist() + [1, 1, 2048]
    for kw in (dict(), dict(causal=True), dict(causal=True, window=(128, -1), softcap=30.0)):
        check_varlen(lens, lens, 16, 4, d, dtype, "cuda", **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_matches_dense_per_document(device, monkeypatch):
    """Packing never leaks across documents: each document equals a dense call on it alone, bit for
    bit. Both run the pointer loads: dense calls otherwise read by TMA, whose tiles reach the
    interpreter's numpy matmul with other strides, and numpy sums in a stride-dependent order (an
    ulp apart in some elements, for some seeds)."""
    from tokenforge.kernels import attention as ak

    monkeypatch.setattr(ak, "tma_usable", lambda *tensors: False)
    lens = [5, 31, 12]
    q = torch.randn(sum(lens), 4, 32, device=device, dtype=torch.float16)
    k = torch.randn(sum(lens), 2, 32, device=device, dtype=torch.float16)
    v = torch.randn(sum(lens), 2, 32, device=device, dtype=torch.float16)
    cu = _cu(lens, device)
    out = attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True, backend="triton")
    start = 0
    for n in lens:
        dense = attention(q[None, start:start + n], k[None, start:start + n], v[None, start:start + n], causal=True,
                          backend="triton")
        assert torch.equal(out[start:start + n], dense[0])
        start += n


def test_grid_is_sized_from_max_seqlen_without_host_reads(monkeypatch):
    """No .item()/.tolist() of CUDA cu_seqlens on the hot path: the kernels' grid comes from the
    max_seqlen ints (checked here by making tolist fail for non-CPU tensors is impossible on CPU, so
    the launcher is called directly with a poisoned cu_seqlens that it must not read on the host)."""
    from tokenforge.kernels import attention as launcher

    lens = [3, 9]
    cu = _cu(lens, "cpu")
    q = torch.randn(12, 2, 32, dtype=torch.float16)
    called = []
    real_tolist = torch.Tensor.tolist

    def spy(self):
        called.append(True)
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", spy)
    out, lse = launcher.attention_forward(q, q, q, cu, cu, 9, 9, 0.2, (-1, 0), 0.0)
    launcher.attention_backward(torch.randn_like(out), q, q, q, out, lse, cu, cu, 9, 9, 0.2, (-1, 0), 0.0)
    assert not called


def _varlen_inputs():
    q = torch.randn(10, 2, 32, dtype=torch.float16)
    return q, q.clone(), q.clone()


@pytest.mark.parametrize(
    "cu_q,cu_k,max_q,exc,match",
    [
        (torch.tensor([0, 4, 3, 10], dtype=torch.int32), None, 7, ValueError, "never decrease"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), None, 7, ValueError, "end at the packed length 10"),
        (torch.tensor([1, 4, 10], dtype=torch.int32), None, 7, ValueError, "start at 0"),
        (torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 10], dtype=torch.int32), 7, ValueError,
         "batch \\+ 1"),
        (torch.tensor([0.0, 10.0]), None, 10, TypeError, "int32"),
        (torch.tensor([[0, 10]], dtype=torch.int32), None, 10, TypeError, "1-D"),
        (torch.tensor([0, 4, 10], dtype=torch.int32), None, 5, ValueError, "max_seqlen is 5"),
        (torch.tensor([10], dtype=torch.int32), None, 10, ValueError, "at least 2"),
    ],
)
def test_bad_cu_seqlens(cu_q, cu_k, max_q, exc, match):
    q, k, v = _varlen_inputs()
    with pytest.raises(exc, match=match):
        attention_varlen(q, k, v, cu_q, cu_q if cu_k is None else cu_k, max_q, max_q)


def test_varlen_bad_shapes():
    q, k, v = _varlen_inputs()
    cu = torch.tensor([0, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="3-D"):
        attention_varlen(q[None], k[None], v[None], cu, cu, 10, 10)
    with pytest.raises(ValueError, match="heads_q"):
        attention_varlen(q, k[:, :1].expand(10, 3, 32).contiguous(), v[:, :1].expand(10, 3, 32).contiguous(),
                         cu, cu, 10, 10)
    with pytest.raises(ValueError, match="is on meta but q is on cpu; move it"):
        attention_varlen(q, k, v, cu.to("meta"), cu, 10, 10)


def test_varlen_int64_cu_seqlens_and_torch_backend():
    q = torch.randn(12, 2, 32, dtype=torch.float32)
    cu = torch.tensor([0, 5, 12], dtype=torch.int64)
    assert backends.choose("attention", q, q, q) == "torch"
    out = attention_varlen(q, q, q, cu, cu, 7, 7, causal=True)
    ref = attention_varlen_reference(q.double(), q.double(), q.double(), cu, cu, causal=True)
    assert rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_alibi_per_document_slopes(device):
    """ALiBi on packed documents: slopes (documents, heads) pick each document's own row, the bias
    aligned bottom-right within each document; forward and gradients against float64."""
    lens_q, lens_k = [7, 1, 23], [7, 5, 30]
    cu_q = torch.tensor([0, 7, 8, 31], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 7, 12, 42], dtype=torch.int32, device=device)
    q = torch.randn(31, 4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(42, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(42, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    slopes = torch.rand(3, 4, device=device) * 0.5 + 0.05
    out = attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, alibi_slopes=slopes)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_varlen_reference(q64, k64, v64, cu_q, cu_k, causal=True, alibi_slopes=slopes.double())
    tol = TOLERANCE[torch.bfloat16]
    assert rel_error(out, ref) <= tol
    g = torch.randn_like(out)
    for name, got, want in zip("qkv", torch.autograd.grad(out, (q, k, v), g),
                               torch.autograd.grad(ref, (q64, k64, v64), g.double())):
        assert rel_error(got, want) <= tol, f"d{name}"
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        attention_varlen(q, k, v, cu_q, cu_k, 23, 30, alibi_slopes=torch.rand(2, 4, device=device))


# ---------------------------------------------------------------------------------------------
# attention_padded: a padded dense batch read in place (the Hugging Face padded-training path).
# ---------------------------------------------------------------------------------------------


def _padded_case(lengths, seqlen, starts, hq, hkv, d, dtype, device):
    """(q, k, v, starts, used, live): (b, seqlen, h, d) tensors whose rows outside each
    sequence's stretch [starts[b], starts[b] + lengths[b]) hold NaN, which a kernel that reads them
    turns into a NaN output; live (b, seqlen) bool marks the stretches."""
    batch = len(lengths)
    live = torch.zeros(batch, seqlen, dtype=torch.bool, device=device)
    for b, (s, n) in enumerate(zip(starts, lengths)):
        live[b, s:s + n] = True
    tensors = []
    for heads in (hq, hkv, hkv):
        t = torch.randn(batch, seqlen, heads, d, device=device, dtype=dtype)
        t[~live] = float("nan")
        tensors.append(t.requires_grad_())
    as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return (*tensors, as_i32(starts), as_i32(lengths), live)


PADDED_CASES = [
    # right, left, middle, empty, full and one-token sequences in one batch; GQA
    ("causal", [9, 17, 0, 37, 1, 23], [0, 20, 5, 0, 36, 7], dict(causal=True)),
    ("window-softcap", [30, 12, 37], [0, 25, 0], dict(causal=True, window=(5, 0), softcap=12.0)),
    ("bidirectional", [6, 37, 19], [31, 0, 2], dict()),
]


@pytest.mark.parametrize("name,lengths,starts,kw", PADDED_CASES, ids=[c[0] for c in PADDED_CASES])
@pytest.mark.parametrize("device", DEVICES)
def test_attention_padded_matches_each_sequence_alone(name, lengths, starts, kw, device):
    """Every sequence of a padded batch, read in place, against float64 on its live rows alone
    (out, dq, dk, dv per row and norm-wise); the padding rows hold NaN (in q, k, v and the
    incoming gradient), so a kernel that reads one fails, and get out 0 and gradients 0."""
    from tokenforge.ops.attention import attention_padded

    seqlen, hq, hkv, d = 37, 4, 2, 32
    q, k, v, st, used, live = _padded_case(lengths, seqlen, starts, hq, hkv, d, torch.bfloat16, device)
    out = attention_padded(q, k, v, st, used, st, used, max(lengths), max(lengths), **kw)
    dout = torch.randn_like(out)
    dout[~live] = float("nan")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    for what, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.equal(t[~live], torch.zeros_like(t[~live])), f"{what}: padding rows must be 0"
    # the reference: the live rows packed as documents, in float64
    cu = _cu(lengths, device)
    leaves = [t.detach()[live].double().requires_grad_() for t in (q, k, v)]
    ref_kw = dict(kw)
    ref = attention_varlen_reference(*leaves, cu, cu, **ref_kw)
    ref_grads = torch.autograd.grad(ref, leaves, dout[live].double())
    tol = TOLERANCE[torch.bfloat16]
    assert rel_error(out[live], ref) <= tol
    for what, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        assert rel_error(got[live], want) <= 2 * tol, what


@pytest.mark.parametrize("device", DEVICES)
def test_attention_padded_equals_the_gathered_varlen_call(device):
    """In place and gathered are the same computation: the same kernel over the same rows, with
    the same dropout mask (the offsets are each sequence's own), so the outputs and gradients (of
    the two-pass backward) are bitwise equal; the queries may be a shorter block than the keys (a chunk after a cache)."""
    from tokenforge.ops.attention import attention_padded

    lengths_k, starts_k = [14, 3, 20], [6, 0, 0]
    lengths_q, starts_q = [4, 3, 1], [0, 1, 3]
    q, _, _, sq, uq, live_q = _padded_case(lengths_q, 5, starts_q, 4, 2, 32, torch.float16, device)
    _, k, v, sk, uk, live_k = _padded_case(lengths_k, 20, starts_k, 4, 2, 32, torch.float16, device)
    kw = dict(causal=True, dropout_p=0.25, softcap=9.0, deterministic=True)  # no dq atomics: bitwise
    torch.manual_seed(3)
    out = attention_padded(q, k, v, sq, uq, sk, uk, 4, 20, **kw)
    gathered = [t.detach()[m].requires_grad_() for t, m in ((q, live_q), (k, live_k), (v, live_k))]
    torch.manual_seed(3)
    want = attention_varlen(*gathered, _cu(lengths_q, device), _cu(lengths_k, device), 4, 20, backend="triton", **kw)
    assert torch.equal(out[live_q], want)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    ref = torch.autograd.grad(want, gathered, dout[live_q])
    for what, g, r, m in zip(("dq", "dk", "dv"), got, ref, (live_q, live_k, live_k)):
        assert torch.equal(g[m], r), what


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-kernel", "fp32-torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_seqused_takes_the_first_rows_of_each_document(device, dtype):
    """flash_attn 3's seqused_q / seqused_k: document b is the first seqused[b] of its cu_seqlens
    rows (none, some, all). The unused rows hold NaN in q, k, v and the incoming gradient, so
    reading one fails; they get out 0, lse +inf and gradient 0; the used ones match float64 per
    row (the Triton kernel in bf16, the torch path in fp32)."""
    cap_q, used_q = [10, 6, 20, 3], [7, 0, 20, 1]
    cap_k, used_k = [12, 6, 25, 3], [10, 2, 13, 3]

    def tensor(caps, used, heads):
        live = torch.cat([torch.arange(c) < u for c, u in zip(caps, used)]).to(device)
        t = torch.randn(sum(caps), heads, 32, device=device, dtype=dtype)
        t[~live] = float("nan")
        return t.requires_grad_(), live

    q, live_q = tensor(cap_q, used_q, 4)
    k, live_k = tensor(cap_k, used_k, 2)
    v, _ = tensor(cap_k, used_k, 2)
    as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    cu_q, cu_k = _cu(cap_q, device), _cu(cap_k, device)
    kw = dict(causal=True, softcap=8.0)
    out, lse = attention_varlen(q, k, v, cu_q, cu_k, 20, 25, seqused_q=as_i32(used_q), seqused_k=as_i32(used_k),
                                return_lse=True, **kw)
    dout = torch.randn_like(out)
    dout[~live_q] = float("nan")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert not out[~live_q].any() and bool(torch.isinf(lse[:, ~live_q]).all())
    for name, g, live in zip("qkv", grads, (live_q, live_k, live_k)):
        assert not g[~live].any(), f"d{name} of unused rows"
    leaves = [t.detach()[m].double().requires_grad_() for t, m in ((q, live_q), (k, live_k), (v, live_k))]
    ref, ref_lse = attention_varlen_reference(*leaves, _cu(used_q, device), _cu(used_k, device), return_lse=True,
                                              **kw)
    tol = TOLERANCE[dtype]
    assert rel_error(out[live_q], ref) <= tol
    fin = torch.isfinite(ref_lse)  # the first queries of the 20-query document see no key (causal)
    assert torch.equal(torch.isfinite(lse[:, live_q]), fin) and rel_error(lse[:, live_q][fin], ref_lse[fin]) <= 1e-4
    for name, g, r, live in zip("qkv", grads, torch.autograd.grad(ref, leaves, dout[live_q].double()),
                                (live_q, live_k, live_k)):
        assert rel_error(g[live], r) <= 2 * tol, f"d{name}"


def test_seqused_refusals():
    q, k, v = _varlen_inputs()
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="seqused_k must count 0 up to each document's rows"):
        attention_varlen(q, k, v, cu, cu, 6, 6, seqused_k=torch.tensor([5, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="has 3 entries but there are 2 documents"):
        attention_varlen(q, k, v, cu, cu, 6, 6, seqused_q=torch.tensor([1, 1, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="1-D int32"):
        attention_varlen(q, k, v, cu, cu, 6, 6, seqused_q=torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="not taken with return_attn_probs"):
        attention_varlen(q, k, v, cu, cu, 6, 6, dropout_p=0.1, return_attn_probs=True,
                         seqused_q=torch.tensor([1, 1], dtype=torch.int32))


def test_attention_padded_refusals():
    from tokenforge.ops.attention import attention_padded

    q = torch.randn(2, 8, 2, 32, dtype=torch.float16)
    ok = torch.tensor([0, 2], dtype=torch.int32)
    used = torch.tensor([8, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="the k stretches must lie within its 8 rows"):
        attention_padded(q, q, q, ok, used, ok, torch.tensor([8, 7], dtype=torch.int32), 8, 8)
    with pytest.raises(ValueError, match="at most max_used_q = 6"):
        attention_padded(q, q, q, ok, used, ok, used, 6, 8)
    with pytest.raises(ValueError, match="used_k must be an int32 tensor of shape \\(2,\\)"):
        attention_padded(q, q, q, ok, used, ok, used.long(), 8, 8)


@pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 (the kernel on CPU tensors)")
def test_attention_padded_compiles_fullgraph():
    """torch.compile(fullgraph=True) over attention_padded, with the queries' stretches passed as
    the keys' too and k as v (one tensor twice, which dynamo refuses for an autograd.Function): no
    graph break, the eager output and gradients bit for bit."""
    from tokenforge.ops.attention import attention_padded

    torch._dynamo.reset()
    q = torch.randn(2, 9, 4, 32, dtype=torch.float16, requires_grad=True)
    k = torch.randn(2, 9, 2, 32, dtype=torch.float16, requires_grad=True)
    starts, used = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([9, 6], dtype=torch.int32)

    def f(q, k):
        return attention_padded(q, k, k, starts, used, starts, used, 9, 9, causal=True) * 2

    eager = f(q, k)
    eager_grads = torch.autograd.grad(eager.float().sum(), (q, k))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k)
    assert torch.equal(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled.float().sum(), (q, k)), eager_grads):
        assert torch.equal(got, want)
