"""patch_sdpa: supported F.scaled_dot_product_attention calls run the kernel and match SDPA;
every other call passes through untouched; install/uninstall/context nesting restore the original."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenforge import kernels, sdpa_patch
from tokenforge.sdpa_patch import patch_sdpa
from tokenforge.testing import TOLERANCE, rel_error

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED and not torch.cuda.is_available(),
                                reason="needs the Triton interpreter (CPU) or a GPU to route anything")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _clean():
    sdpa_patch.uninstall()
    yield
    sdpa_patch.uninstall()


def _bhsd(b, h, s, d, dtype=torch.float16):
    return torch.randn(b, h, s, d, device=DEVICE, dtype=dtype)


def _counts():
    return dict(sdpa_patch.stats)


@pytest.mark.parametrize("kw,hq,hkv,sq,sk", [
    (dict(), 4, 4, 17, 33),
    (dict(is_causal=True), 4, 4, 40, 40),
    (dict(is_causal=True, enable_gqa=True), 4, 2, 24, 24),
    (dict(scale=0.3), 2, 2, 9, 9),
])
def test_routed_calls_match_sdpa(kw, hq, hkv, sq, sk):
    _check_routed(_bhsd(2, hq, sq, 32), _bhsd(2, hkv, sk, 32), _bhsd(2, hkv, sk, 32), **kw)


def _check_routed(q, k, v, **kw):
    """The call runs on the kernel, and matches SDPA in float64: output and gradients, every row."""
    for t in (q, k, v):
        t.requires_grad_()
    ref_args = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_args, **kw)
    before = _counts()
    with patch_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    assert sdpa_patch.stats["routed"] == before["routed"] + 1
    assert out.shape == ref.shape and out.dtype == q.dtype
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.double())
    assert rel_error(out, ref) < TOLERANCE[torch.float16]
    for t, r in zip((q, k, v), ref_args):
        assert rel_error(t.grad, r.grad) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("make", [
    # a mask that differs between queries (an all-True one is a key-padding mask: routed)
    lambda q, k, v: dict(attn_mask=torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=DEVICE).tril()),
    lambda q, k, v: dict(dropout_p=1.0),             # SDPA's own error (dropout is routed: test_attention_dropout)
    lambda q, k, v: dict(is_causal=True, _sk=20),   # top-left causal with sq != sk
    lambda q, k, v: dict(_dtype=torch.float32),
    lambda q, k, v: dict(_d=16),                     # head dim the kernel does not take
    lambda q, k, v: dict(_3d=True),
], ids=["attn_mask", "dropout", "causal-rectangular", "fp32", "head_dim-16", "3-D"])
def test_unsupported_calls_pass_through(make):
    torch.manual_seed(0)
    q, k, v = _bhsd(1, 2, 12, 32), _bhsd(1, 2, 12, 32), _bhsd(1, 2, 12, 32)
    kw = make(q, k, v)
    sk, dtype, d, three = kw.pop("_sk", 12), kw.pop("_dtype", torch.float16), kw.pop("_d", 32), kw.pop("_3d", False)
    q, k, v = _bhsd(1, 2, 12, d, dtype), _bhsd(1, 2, sk, d, dtype), _bhsd(1, 2, sk, d, dtype)
    if three:
        q, k, v = q[0], k[0], v[0]
    if "dropout_p" in kw:
        torch.manual_seed(1)
    expected = F.scaled_dot_product_attention(q, k, v, **kw)
    before = _counts()
    with patch_sdpa():
        if "dropout_p" in kw:
            torch.manual_seed(1)
        got = F.scaled_dot_product_attention(q, k, v, **kw)
    assert sdpa_patch.stats["passed"] == before["passed"] + 1 and sdpa_patch.stats["routed"] == before["routed"]
    assert torch.equal(got, expected)


def _key_padding_mask(lengths, starts, seqlen_k):
    mask = torch.zeros(len(lengths), seqlen_k, dtype=torch.bool, device=DEVICE)
    for row, (n, start) in enumerate(zip(lengths, starts)):
        mask[row, start:start + n] = True
    return mask


@pytest.mark.parametrize("layout", ["b11s", "expanded", "materialised", "1s"])
def test_key_padding_masks_are_routed(layout):
    """A boolean key-padding mask (right, left and middle stretches of keys; every query live) runs
    on the kernel, reading the keys in place: as SDPA in float64 with the same mask, outputs and
    gradients, every row. Shapes (b, 1, 1, sk), an expanded (b, 1, sq, sk) view (stride 0 over the
    queries), a materialised (b, 1, sq, sk) one (as transformers' encoders build it: its rows are
    compared on the device, once per mask) and (1, sk): one row for the whole batch."""
    b, hq, hkv, sq, sk = 3, 4, 2, 11, 19
    rows = _key_padding_mask([19, 7, 12], [0, 12, 3], sk)
    mask = {"b11s": rows[:, None, None, :], "expanded": rows[:, None, None, :].expand(b, 1, sq, sk),
            "materialised": rows[:, None, None, :].expand(b, 1, sq, sk).clone(), "1s": rows[1:2]}[layout]
    _check_routed(_bhsd(b, hq, sq, 32), _bhsd(b, hkv, sk, 32), _bhsd(b, hkv, sk, 32), attn_mask=mask,
                  enable_gqa=True, scale=0.2)


@pytest.mark.parametrize("make", [
    lambda: _key_padding_mask([5, 7], [0, 0], 12).index_fill(1, torch.tensor([2], device=DEVICE), False)[:, None, None],
    lambda: _key_padding_mask([5, 0], [0, 0], 12)[:, None, None],   # a row with no key: SDPA's NaN row
    lambda: torch.zeros(2, 1, 1, 12, device=DEVICE),                # an additive float mask
    lambda: _key_padding_mask([5, 7], [0, 0], 12)[:, None, :, None].expand(2, 1, 12, 12),  # pads queries
    lambda: torch.ones(12, 12, dtype=torch.bool, device=DEVICE).tril()[None, None].expand(2, 1, 12, 12).clone(),
], ids=["holes", "empty-row", "float", "query-padding", "materialised-causal"])
def test_other_masks_pass_through(make):
    q, k, v = _bhsd(2, 2, 12, 32), _bhsd(2, 2, 12, 32), _bhsd(2, 2, 12, 32)
    mask = make()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    before = _counts()
    with patch_sdpa():
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert sdpa_patch.stats["passed"] == before["passed"] + 1 and sdpa_patch.stats["routed"] == before["routed"]
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_a_key_padding_mask_is_read_once(monkeypatch):
    """The layers of a forward share one mask tensor: its stretches are read on the host once."""
    from tokenforge import hf_attention

    reads = []
    real = hf_attention._plan_from_mask
    monkeypatch.setattr(hf_attention, "_plan_from_mask", lambda m: reads.append(1) or real(m))
    mask = _key_padding_mask([9, 4], [0, 5], 9)[:, None, None, :]
    q = _bhsd(2, 2, 9, 32)
    with patch_sdpa():
        for _ in range(3):
            F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert len(reads) == 1


def test_errors_of_sdpa_are_unchanged():
    q, k = _bhsd(1, 3, 8, 32), _bhsd(1, 2, 8, 32)
    with pytest.raises(RuntimeError) as theirs:
        F.scaled_dot_product_attention(q, k, k)
    with patch_sdpa(), pytest.raises(RuntimeError) as ours:
        F.scaled_dot_product_attention(q, k, k)
    assert str(ours.value) == str(theirs.value)


def test_install_uninstall_and_nesting():
    original = F.scaled_dot_product_attention
    with patch_sdpa():
        assert sdpa_patch.is_installed()
        with patch_sdpa():
            assert sdpa_patch.is_installed()
        assert sdpa_patch.is_installed()
    assert F.scaled_dot_product_attention is original
    sdpa_patch.install()
    sdpa_patch.install()
    with patch_sdpa():
        pass
    assert sdpa_patch.is_installed()  # the context does not undo a script-wide install
    sdpa_patch.uninstall()
    assert F.scaled_dot_product_attention is original


def test_module_attention_layer_uses_the_kernel():
    """A stock torch attention call site (nn.MultiheadAttention calls F.scaled_dot_product_attention
    through torch's functional path) keeps working under the patch."""
    mha = torch.nn.MultiheadAttention(64, 2, batch_first=True).to(DEVICE)
    x = torch.randn(2, 10, 64, device=DEVICE)
    ref = mha(x, x, x, need_weights=False)[0]
    with patch_sdpa():
        out = mha(x, x, x, need_weights=False)[0]
    assert rel_error(out, ref) < 1e-5  # fp32: passed through, identical math


def test_nn_modules_match_the_reference():
    from tokenforge.nn.attention import Attention, MultiHeadAttention
    from tokenforge.ops.attention import attention_reference

    q, k, v = (torch.randn(1, 20, h, 32, device=DEVICE, dtype=torch.bfloat16) for h in (4, 2, 2))
    layer = Attention(causal=True, window=(8, -1), backend="triton")
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, window=(8, -1))
    assert rel_error(layer(q, k, v), ref) < TOLERANCE[torch.bfloat16]
    assert "causal=True" in repr(layer)

    block = MultiHeadAttention(128, 4, 2, backend="triton").to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 9, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = block(x)
    y.float().sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="n_kv_heads"):
        MultiHeadAttention(128, 4, 3)


def test_bare_call_installs_and_unpatch_removes():
    """``tokenforge.patch_sdpa()`` called bare (as the README reads) routes for good;
    ``tokenforge.unpatch_sdpa()`` restores torch's; the context-manager form still restores."""
    import torch.nn.functional as F

    import tokenforge
    from tokenforge import sdpa_patch

    original = F.scaled_dot_product_attention
    assert not sdpa_patch.is_installed()
    try:
        tokenforge.patch_sdpa()
        assert sdpa_patch.is_installed() and F.scaled_dot_product_attention is not original
        with tokenforge.patch_sdpa():  # nested inside a bare install: leaves it installed
            assert sdpa_patch.is_installed()
        assert sdpa_patch.is_installed()
    finally:
        tokenforge.unpatch_sdpa()
    assert F.scaled_dot_product_attention is original
    with tokenforge.patch_sdpa():
        assert sdpa_patch.is_installed()
    assert not sdpa_patch.is_installed()
