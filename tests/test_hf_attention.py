"""tokenforge's Hugging Face attention implementation (tokenforge.hf_attention).

The attention function transformers calls is checked against a float64 oracle written from the
masks transformers' SDPA path would build (padding, causal by absolute position, sliding window,
packed documents): every live query row's output and the gradients of q, k, v, per row and
norm-wise, on the torch path (float64) and the Triton kernel (bf16). Then tiny Hugging Face models
patched (this implementation) against unpatched (SDPA, or eager for Gemma2) on padded and packed
batches: the loss and every gradient, and greedy decoding from a static cache."""
from __future__ import annotations

import math
import sys
import zlib

import pytest
import torch
from device_params import HAS_CUDA, INTERPRETING
from torch import nn

import tokenforge
from tokenforge import hf_attention
from tokenforge.ops.attention import attention_reference
from tokenforge.patch import calls
from tokenforge.testing import TOLERANCE, rel_error

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not hf_attention.available(), reason="transformers without masking_utils")

HEADS_Q, HEADS_KV, HEAD_DIM = 4, 2, 32


class _Layer(nn.Module):
    is_causal = True


def _oracle(q, k, v, visible, live_q, scale, softcap):
    """out (b, sq, hq, d) in float64: softmax over the visible keys of each query; rows of padding
    queries (live_q False) and rows that see no key are 0."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = (p @ v) * live_q[:, None, :, None]
    return out.transpose(1, 2)


def _keep(a, j, window, causal):
    """Whether position a sees position j: causal j <= a; a window of w keeps |a - j| < w."""
    keep = j <= a if causal else torch.ones(a.shape[0], j.shape[1], dtype=torch.bool)
    return keep & ((a - j).abs() < window if window else True)


def _padded_visibility(mask, q_len, window, causal=True):
    """Queries are the last q_len of the mask's positions; key j is visible to the query at
    position a when it is live and _keep(a, j)."""
    b, kv = mask.shape
    a = torch.arange(kv - q_len, kv)[:, None]
    j = torch.arange(kv)[None, :]
    keep = _keep(a, j, window, causal)
    visible = keep[None] & mask[:, None, :]
    live = torch.ones(b, q_len, dtype=torch.bool) if q_len == 1 else mask[:, kv - q_len:]
    return visible, live


def _packed_visibility(documents, window, causal=True):
    """documents (b, s) ids: _keep within a document only."""
    i = torch.arange(documents.shape[1])[:, None]
    keep = _keep(i, i.T, window, causal)
    return keep[None] & (documents[:, :, None] == documents[:, None, :]), torch.ones_like(documents, dtype=torch.bool)


def _scenario(name, window):
    """(q_len, kv_len, mask or None, keywords for the function, visibility, live queries)."""
    if name in ("right_padded", "left_padded"):
        lengths = [13, 7, 10]
        mask = torch.zeros(3, 13, dtype=torch.bool)
        for r, n in enumerate(lengths):
            if name == "right_padded":
                mask[r, :n] = True
            else:
                mask[r, 13 - n:] = True
        return (13, 13, mask, {}, *_padded_visibility(mask, 13, window))
    if name in ("decode", "chunk"):  # generation with a left-padded KV cache: 1 or 3 new tokens
        q_len = 1 if name == "decode" else 3
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[0, :5] = False
        return (q_len, 12, mask, {}, *_padded_visibility(mask, q_len, window))
    if name == "static_cache":  # keys past the mask are unfilled slots, left out
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1, :3] = False
        return (9, 14, mask, {}, *_padded_visibility(mask, 9, window))
    if name == "cache_no_mask":  # fewer queries than keys, nothing padded: causal bottom-right
        return (3, 11, None, {}, *_padded_visibility(torch.ones(2, 11, dtype=torch.bool), 3, window))
    if name in ("packed_positions", "packed_one_row"):
        docs = [[5, 9, 4], [18]] if name == "packed_positions" else [[6, 1, 11]]
        positions = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in docs])
        documents = torch.cat([torch.cat([torch.full((n,), d) for d, n in enumerate(row)])[None] for row in docs])
        return (18, 18, None, {"position_ids": positions}, *_packed_visibility(documents, window))
    if name == "cu_seq_lens":  # DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        cu = torch.tensor([0, 4, 11, 17], dtype=torch.int32)
        documents = torch.repeat_interleave(torch.arange(3), cu.diff())[None]
        kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7,
                  position_ids=torch.zeros(1, 17, dtype=torch.long))  # the offsets win over the positions
        return (17, 17, None, kw, *_packed_visibility(documents, window))
    raise AssertionError(name)


SCENARIOS = ["right_padded", "left_padded", "decode", "chunk", "static_cache", "cache_no_mask", "packed_positions",
             "packed_one_row", "cu_seq_lens"]
# float64 takes the ops' torch path; bf16 the Triton kernel (interpreted on CPU, real on CUDA).
KINDS = [pytest.param(torch.float64, "cpu", id="f64-cpu"),
         pytest.param(torch.bfloat16, "cpu", id="bf16-cpu",
                      marks=pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1")),
         pytest.param(torch.bfloat16, "cuda", id="bf16-cuda",
                      marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine"))]


@pytest.mark.parametrize("dtype,device", KINDS)
@pytest.mark.parametrize("window,softcap", [(None, None), (4, None), (None, 5.0)])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_attention_function_matches_the_masks_transformers_means(scenario, window, softcap, dtype, device):
    q_len, kv_len, mask, kw, visible, live = _scenario(scenario, window)
    batch = visible.shape[0]
    torch.manual_seed(zlib.crc32(repr((scenario, window, softcap)).encode()))  # the same every run
    q = torch.randn(batch, HEADS_Q, q_len, HEAD_DIM, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(batch, HEADS_KV, kv_len, HEAD_DIM, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(batch, HEADS_KV, kv_len, HEAD_DIM, dtype=dtype, device=device, requires_grad=True)
    mask = None if mask is None else mask.to(device)
    kw = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
    visible, live = visible.to(device), live.to(device)
    scale = 0.3
    used = visible.shape[-1]  # a static cache's unfilled keys are not in the oracle
    ref = _oracle(q, k[:, :, :used], v[:, :, :used], visible, live, scale, softcap)
    out, weights = hf_attention.hf_attention_forward(_Layer(), q, k, v, mask, scaling=scale, sliding_window=window,
                                                     softcap=softcap, **kw)
    assert weights is None and out.shape == (batch, q_len, HEADS_Q, HEAD_DIM) and out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else TOLERANCE[dtype]
    assert rel_error(out, ref) <= tol
    assert not out[~live].any(), "padding query rows must be 0"

    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert rel_error(got, want) <= (1e-12 if dtype == torch.float64 else 2 * TOLERANCE[dtype]), name
    if used < kv_len:
        assert not dk[:, :, used:].any() and not dv[:, :, used:].any()


@pytest.mark.parametrize("dtype,device", KINDS[1:])
@pytest.mark.parametrize("scenario", ["right_padded", "left_padded", "decode", "chunk", "static_cache", "holes",
                                      "cache_no_mask", "single_token"])
def test_generation_reads_the_keys_in_place(scenario, dtype, device, monkeypatch):
    """Without autograd (generate()), a padding mask whose live keys are one stretch per row (left
    or right padding) has the kernel read the keys where they are, in the cache's own storage; a
    mask with holes gathers them. Both as the oracle."""
    from tokenforge.kernels import attention_kvcache as decode_kernels
    from tokenforge.ops.attention import LAUNCHERS

    if scenario == "single_token":  # one-token prompts, one of them padding: a sequence with no key
        mask = torch.tensor([[True], [False], [True]])
        q_len, kv_len = 1, 1
        visible, live = _padded_visibility(mask, 1, None)
    elif scenario == "holes":
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[0, 3:5] = False
        q_len, kv_len = 1, 12
        visible, live = _padded_visibility(mask, 1, None)
        visible[0] = mask[0]  # the one query sees every live key
    else:
        q_len, kv_len, mask, _, visible, live = _scenario(scenario, None)
    read = []  # the storage each kernel launch read its keys from
    for module, fn in ((LAUNCHERS["triton"], "attention_forward"), (decode_kernels, "attention_decode")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda q_, k_, *a, _fn=fn, _real=real, **kw:
                            read.append((_fn, k_.untyped_storage().data_ptr())) or _real(q_, k_, *a, **kw))
    torch.manual_seed(5)
    batch = visible.shape[0]
    q = torch.randn(batch, HEADS_Q, q_len, HEAD_DIM, dtype=dtype, device=device)
    k = torch.randn(batch, HEADS_KV, kv_len, HEAD_DIM, dtype=dtype, device=device)
    v = torch.randn(batch, HEADS_KV, kv_len, HEAD_DIM, dtype=dtype, device=device)
    with torch.no_grad():
        out, _ = hf_attention.hf_attention_forward(_Layer(), q, k, v, None if mask is None else mask.to(device),
                                                   scaling=0.3)
    used = visible.shape[-1]
    ref = _oracle(q, k[:, :, :used], v[:, :, :used], visible.to(device), live.to(device), 0.3, None)
    assert rel_error(out, ref) <= TOLERANCE[dtype]
    # one launch: a decoding step (one query; a few without padding) on the decoding kernel, longer
    # blocks of a padded batch on the varlen one
    decoding = scenario == "cache_no_mask" or (q_len == 1 and scenario != "holes")
    assert [fn for fn, _ in read] == ["attention_decode" if decoding else "attention_forward"], read
    assert (read[0][1] == k.untyped_storage().data_ptr()) == (scenario != "holes"), read


@pytest.mark.parametrize("dtype,device", KINDS[1:])
@pytest.mark.parametrize("scenario", ["right_padded", "left_padded", "holes"])
def test_padded_training_reads_the_batch_in_place(scenario, dtype, device, monkeypatch):
    """With autograd (training), a left- or right-padded batch runs the kernel on q, k, v where
    they are, forward and backward (no gathered copies); a mask with holes gathers. Both as the
    oracle, gradients included."""
    from tokenforge.ops.attention import LAUNCHERS

    if scenario == "holes":
        mask = torch.ones(2, 13, dtype=torch.bool)
        mask[0, 3:5] = False
        visible, live = _padded_visibility(mask, 13, None)
    else:
        _, _, mask, _, visible, live = _scenario(scenario, None)
    read = []  # (launcher, q's storage, k's storage)
    launcher = LAUNCHERS["triton"]
    for fn, at in (("attention_forward", 0), ("attention_backward", 1)):
        real = getattr(launcher, fn)
        monkeypatch.setattr(launcher, fn, lambda *a, _fn=fn, _real=real, _at=at, **kw: read.append(
            (_fn, a[_at].untyped_storage().data_ptr(), a[_at + 1].untyped_storage().data_ptr())) or _real(*a, **kw))
    torch.manual_seed(8)
    batch, seqlen = mask.shape
    # transformers' layout: (batch, heads, seq, dim) views of (batch, seq, heads, dim) projections
    q, k, v = (torch.randn(batch, seqlen, heads, HEAD_DIM, dtype=dtype, device=device).transpose(1, 2)
               .requires_grad_() for heads in (HEADS_Q, HEADS_KV, HEADS_KV))
    out, _ = hf_attention.hf_attention_forward(_Layer(), q, k, v, mask.to(device), scaling=0.3)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    ref = _oracle(q, k, v, visible.to(device), live.to(device), 0.3, None)
    assert rel_error(out, ref) <= TOLERANCE[dtype]
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), torch.autograd.grad(ref, (q, k, v), grad.double())):
        assert rel_error(got, want) <= 2 * TOLERANCE[dtype], name
    in_place = scenario != "holes"
    assert [fn for fn, _, _ in read] == ["attention_forward", "attention_backward"], read
    for _, q_at, k_at in read:
        assert (q_at == q.untyped_storage().data_ptr()) == in_place, read
        assert (k_at == k.untyped_storage().data_ptr()) == in_place, read


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("packed", [False, True])
def test_bidirectional_layers(packed, window):
    """is_causal=False (an encoder, a bidirectional decoder): every live key of the document, within
    the window on both sides."""
    torch.manual_seed(11)
    if packed:
        documents = torch.tensor([[0] * 5 + [1] * 9, [0] * 6 + [1] * 8])
        positions = torch.cat([torch.arange(5), torch.arange(9)]).repeat(2, 1)
        positions[1] = torch.cat([torch.arange(6), torch.arange(8)])
        mask, kw = None, {"position_ids": positions}
        visible, live = _packed_visibility(documents, window, causal=False)
    else:
        mask = torch.ones(2, 14, dtype=torch.bool)
        mask[0, 9:] = False
        kw = {}
        visible, live = _padded_visibility(mask, 14, window, causal=False)
    q = torch.randn(2, HEADS_Q, 14, HEAD_DIM, dtype=torch.float64)
    k = torch.randn(2, HEADS_KV, 14, HEAD_DIM, dtype=torch.float64)
    v = torch.randn_like(k)
    out, _ = hf_attention.hf_attention_forward(_Layer(), q, k, v, mask, scaling=0.3, sliding_window=window,
                                               is_causal=False, **kw)
    assert rel_error(out, _oracle(q, k, v, visible, live, 0.3, None)) <= 1e-12


def test_one_wrong_document_fails_the_oracle():
    """The oracle is strict enough: attention across two packed documents (what an unpacked call
    would do) is caught."""
    _, _, _, kw, visible, live = _scenario("packed_positions", None)
    q = torch.randn(2, HEADS_Q, 18, HEAD_DIM, dtype=torch.float64)
    k = torch.randn(2, HEADS_KV, 18, HEAD_DIM, dtype=torch.float64)
    v = torch.randn_like(k)
    ref = _oracle(q, k, v, visible, live, 0.3, None)
    whole, _ = hf_attention.hf_attention_forward(_Layer(), q, k, v, None, scaling=0.3)  # positions dropped
    assert rel_error(whole, ref) > 1e-3


def test_the_unpadding_plan_is_built_once_per_mask(monkeypatch):
    """Every layer gets the same mask tensor: one host-side plan for all of them; a mask changed
    in place (a new version) gets a new one."""
    built = []
    real = hf_attention._plan_from_mask
    monkeypatch.setattr(hf_attention, "_plan_from_mask", lambda m: built.append(1) or real(m))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    q = torch.randn(2, HEADS_Q, 10, HEAD_DIM, dtype=torch.float64)
    k = torch.randn(2, HEADS_KV, 10, HEAD_DIM, dtype=torch.float64)
    first, _ = hf_attention.hf_attention_forward(_Layer(), q, k, k, mask)
    for _ in range(3):
        again, _ = hf_attention.hf_attention_forward(_Layer(), q, k, k, mask)
    assert len(built) == 1 and torch.equal(first, again)
    mask[0, 7:] = True
    full, _ = hf_attention.hf_attention_forward(_Layer(), q, k, k, mask)
    assert len(built) == 2 and not torch.equal(full, first)


@pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("scenario", ["decode", "chunk", "cache_no_mask"])
def test_a_decoding_step_builds_its_cache_rows_once(scenario, monkeypatch):
    """Every layer of a decoding step reads the cache rows (starts, used) built by the first one:
    a GPU decoding step is launch-bound, and rebuilding them cost launches in every layer. The
    next step (one more key, or a new mask) gets new ones."""
    q_len, kv_len, mask, _, _, _ = _scenario(scenario, None)
    seen = []  # (starts, used) the kernel was given
    monkeypatch.setattr(hf_attention, "_decode_step", lambda q, k, v, starts, used, *a: seen.append(
        (starts, used)) or q.new_zeros(q.shape))
    attention_ops = sys.modules["tokenforge.ops.attention"]
    real_rows = attention_ops.attention_over_cache_rows
    monkeypatch.setattr(attention_ops, "attention_over_cache_rows", lambda q, k, v, cu_q, starts, used, *a: seen.append(
        (starts, used)) or real_rows(q, k, v, cu_q, starts, used, *a))

    def step(keys, mask):
        batch = 2
        q = torch.randn(batch, HEADS_Q, q_len, HEAD_DIM, dtype=torch.bfloat16)
        k = torch.randn(batch, HEADS_KV, keys, HEAD_DIM, dtype=torch.bfloat16)
        with torch.no_grad():
            for _ in range(3):  # three layers
                hf_attention.hf_attention_forward(_Layer(), q, k, k, mask)

    step(kv_len, mask)
    assert len(seen) == 3 and all(s is seen[0][0] and u is seen[0][1] for s, u in seen), seen
    nxt = None if mask is None else torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    step(kv_len + 1, nxt)
    assert len(seen) == 6 and seen[3][1] is not seen[0][1] and all(u is seen[3][1] for _, u in seen[3:])
    assert seen[3][1].tolist() == (nxt.sum(-1) if nxt is not None else torch.full((2,), kv_len + 1)).tolist()


def test_a_ready_4d_mask_goes_to_sdpa_and_sinks_are_taken():
    q = torch.randn(1, HEADS_Q, 6, HEAD_DIM)
    k = torch.randn(1, HEADS_KV, 6, HEAD_DIM)
    mask4 = torch.rand(1, 1, 6, 6) > 0.3
    mask4[..., 0] = True
    layer = _Layer()
    layer.num_key_value_groups = HEADS_Q // HEADS_KV
    out, _ = hf_attention.hf_attention_forward(layer, q, k, k, mask4, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), k.repeat_interleave(2, 1),
                                                           attn_mask=mask4, scale=0.25).transpose(1, 2)
    assert rel_error(out, ref) <= 1e-6
    # GPT-OSS's attention sinks (s_aux): one more logit per head in every row's softmax
    sinks = torch.randn(HEADS_Q) + 1.0
    out, _ = hf_attention.hf_attention_forward(layer, q, k, k, None, scaling=0.25, s_aux=sinks)
    ref = attention_reference(q.transpose(1, 2).double(), k.transpose(1, 2).double(), k.transpose(1, 2).double(),
                              causal=True, softmax_scale=0.25, sinks=sinks.double())
    assert rel_error(out, ref) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Tiny Hugging Face models, patched vs unpatched.
# ---------------------------------------------------------------------------------------------


def _model(family, attn="sdpa", dtype=torch.float32):
    t = transformers
    common = dict(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    if family == "llama":
        cfg, cls = t.LlamaConfig(**common), t.LlamaForCausalLM
    elif family == "mistral":  # every layer windowed
        cfg, cls = t.MistralConfig(**common, sliding_window=6), t.MistralForCausalLM
    elif family == "olmo3":  # alternating windowed layers, q/k norms over all heads, post-norms
        cfg, cls = t.Olmo3Config(**common, sliding_window=6), t.Olmo3ForCausalLM
    elif family == "smollm3":  # no rotary in every 2nd layer
        cfg, cls = t.SmolLM3Config(**common, no_rope_layer_interval=2), t.SmolLM3ForCausalLM
    else:  # gemma2: attention softcap, alternating sliding-window layers; eager unpatched
        cfg, cls = (t.Gemma2Config(**common, head_dim=32, sliding_window=6, attn_logit_softcapping=5.0,
                                   final_logit_softcapping=3.0), t.Gemma2ForCausalLM)
        attn = "eager"
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return cls(cfg).to(dtype)


def _loss_and_grads(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(1, 256, (3, 15))
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0  # right padding
    mask[2, :6] = 0   # left padding
    labels = ids.masked_fill(mask == 0, -100)
    # The last padding position predicts row 2's first token. A query that sees no key gives 0 in
    # SDPA, flash_attn and here, but eager attention averages every value: not a prediction to score.
    labels[2, 6] = -100
    return dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask, labels=labels)


def _packed_batch(flash_kwargs: bool):
    torch.manual_seed(2)
    features = [{"input_ids": torch.randint(1, 256, (n,)).tolist()} for n in (5, 11, 3, 8)]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_tensors="pt")
    batch = collator(features)
    batch.pop("seq_idx", None)
    # Without a cache: transformers' SDPA masks only see packing when there is none (Trainer turns
    # it off); with the default use_cache=True the unpatched model attends across the documents.
    return dict(batch, use_cache=False)


def _assert_same(loss, grads, ref_loss, ref_grads, tol):
    assert rel_error(loss, ref_loss) <= tol
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert rel_error(grads[name], ref_grads[name]) <= tol, name


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "olmo3", "smollm3"])
@pytest.mark.parametrize("batch_kind", ["padded", "packed_positions", "packed_cu_seq_lens"])
def test_patched_model_matches_unpatched_on_padded_and_packed_batches(family, batch_kind):
    """fp32: the plumbing (unpadding, documents, windows, softcap) on the torch path; the loss and
    every gradient as the unpatched model, whose SDPA gets the dense masks."""
    model = _model(family)
    impl = model.config._attn_implementation
    batch = _padded_batch() if batch_kind == "padded" else _packed_batch(batch_kind == "packed_cu_seq_lens")
    ref_loss, ref_grads = _loss_and_grads(model, **batch)
    report = tokenforge.patch(model)
    assert any(p.startswith(f"attention: attn_implementation {impl!r} -> 'tokenforge_flash'") for p in report.patched)
    before = dict(calls)
    try:
        loss, grads = _loss_and_grads(model, **batch)
        if batch_kind != "padded":  # the documents stay documents with a cache too
            with torch.no_grad():
                assert rel_error(model(**dict(batch, use_cache=True)).loss, ref_loss) <= 1e-5
    finally:
        tokenforge.unpatch(model)
    ran = calls.get("attention_varlen", 0) - before.get("attention_varlen", 0)
    assert ran >= model.config.num_hidden_layers, "every layer's attention runs on documents"
    assert model.config._attn_implementation == impl
    _assert_same(loss, grads, ref_loss, ref_grads, 1e-5)


@pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1")
def test_bf16_padded_and_packed_batches_reach_the_kernel(monkeypatch):
    """In bf16 the padded and packed batches run the Triton kernel (counted at its launcher), and
    the loss agrees with unpatched SDPA to bf16 precision."""
    from tokenforge.ops.attention import LAUNCHERS

    launches = []
    launcher = LAUNCHERS["triton"]
    real = launcher.attention_forward
    monkeypatch.setattr(launcher, "attention_forward", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    model = _model("llama", dtype=torch.bfloat16)
    for batch in (_padded_batch(), _packed_batch(False)):
        with torch.no_grad():
            ref = model(**batch).loss.float()
            tokenforge.patch(model)
            try:
                launches.clear()
                loss = model(**batch).loss.float()
            finally:
                tokenforge.unpatch(model)
        assert len(launches) == model.config.num_hidden_layers
        assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item())


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_from_a_patched_model_with_left_padding(cache):
    """Greedy decoding of a left-padded batch, token for token as unpatched: the prefill unpads,
    each decoding step runs one query per sequence against the live cached keys (a static cache's
    unfilled slots left out through its padding mask)."""
    model = _model("mistral").eval()
    torch.manual_seed(3)
    ids = torch.randint(3, 256, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=mask)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        ref = model.generate(input_ids=ids, **kw)
        tokenforge.patch(model)
        try:
            out = model.generate(input_ids=ids, **kw)
        finally:
            tokenforge.unpatch(model)
    assert torch.equal(out, ref)


def test_output_attentions_and_other_kernels_are_left_alone():
    model = _model("llama", attn="eager")
    model.config.output_attentions = True
    report = tokenforge.patch(model)
    tokenforge.unpatch(model)
    assert any("output_attentions" in s for s in report.skipped)
    assert model.config._attn_implementation == "eager"
    assert math.isfinite(model(input_ids=torch.randint(0, 256, (1, 5))).logits.sum().item())
