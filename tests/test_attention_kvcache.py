"""attention_with_kvcache (flash_attn_with_kvcache's API) against a float64 oracle written from its
documented semantics, loop by loop: the cache after the append (rotated keys, values, nothing else
touched) and every query row's output and lse."""
from __future__ import annotations

import math

import pytest
import torch
from device_params import DEVICES

from tokenforge.ops import attention_with_kvcache
from tokenforge.kernels import attention_kvcache as decode_kernels
from tokenforge.ops.attention import LAUNCHERS
from tokenforge.ops.attention_kvcache import DECODE_MAX_ROWS
from tokenforge.testing import TOLERANCE, rel_error


def _rotate64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions, interleaved: bool) -> torch.Tensor:
    """x (seq, heads, d) rotated in float64 at positions by (P, R/2) frequency tables."""
    x = x.double().clone()
    half = cos.shape[1]
    for s, p in enumerate(positions):
        c, n = cos[p].double(), sin[p].double()
        if interleaved:
            a, b = x[s, :, 0:2 * half:2].clone(), x[s, :, 1:2 * half:2].clone()
            x[s, :, 0:2 * half:2], x[s, :, 1:2 * half:2] = a * c - b * n, b * c + a * n
        else:
            a, b = x[s, :, :half].clone(), x[s, :, half:2 * half].clone()
            x[s, :, :half], x[s, :, half:2 * half] = a * c - b * n, b * c + a * n
    return x


def _oracle(q, k_cache, v_cache, k, v, cos, sin, seqlens, batch_idx, leftpad, block_table, scale, causal, window,
            softcap, slopes, interleaved):
    """(expected k_cache, v_cache after the append, out, lse), float64, one query row at a time."""
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    batch, sq, heads, d = q.shape
    group = heads // k_cache.shape[2]
    new = 0 if k is None else k.shape[1]
    per_query = causal or window != (-1, -1)

    def slot(b, pos):
        if block_table is None:
            return int(batch_idx[b]) if batch_idx is not None else b, pos
        page = k_cache.shape[1]
        return int(block_table[b, pos // page]), pos % page

    out = torch.zeros(batch, sq, heads, d, dtype=torch.float64)
    lse = torch.full((batch, heads, sq), float("inf"), dtype=torch.float64)  # no key: +inf, as flash_attn
    for b in range(batch):
        start = int(seqlens[b])
        if new:
            knew = k[b] if cos is None else _rotate64(k[b], cos, sin, range(start, start + new), interleaved)
            for i in range(new):
                kc[slot(b, start + i)] = knew[i].double()
                vc[slot(b, start + i)] = v[b, i].double()
        qb = q[b].double() if cos is None else _rotate64(
            q[b], cos, sin, [start + i if per_query else start for i in range(sq)], interleaved)
        first = 0 if leftpad is None else int(leftpad[b])
        keys = torch.stack([kc[slot(b, j)] for j in range(first, start + new)]) if start + new > first else None
        vals = torch.stack([vc[slot(b, j)] for j in range(first, start + new)]) if keys is not None else None
        sk = 0 if keys is None else keys.shape[0]
        for h in range(heads):
            for i in range(sq):
                scores = []
                for j in range(sk):
                    diag = i + sk - sq
                    if (causal and j > diag) or (window[0] >= 0 and j < diag - window[0]) or \
                            (window[1] >= 0 and j > diag + window[1]):
                        continue
                    s = float(qb[i, h] @ keys[j, h // group]) * scale
                    if softcap:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        s -= float(slopes[h]) * abs(diag - j)
                    scores.append((s, j))
                if not scores:
                    continue
                top = max(s for s, _ in scores)
                weights = [(math.exp(s - top), j) for s, j in scores]
                total = sum(w for w, _ in weights)
                lse[b, h, i] = top + math.log(total)
                out[b, i, h] = sum(w * vals[j, h // group] for w, j in weights) / total
    return kc, vc, out, lse


CASES = {
    # name: cache layout and options (batch 3, heads 4, 2 kv heads unless said)
    "dense-append-rotary-causal-leftpad-batchidx": dict(paged=False, new=3, sq=3, rotary=True, interleaved=True,
                                                        causal=True, leftpad=True, batch_idx=True),
    "dense-append-fewer-new-than-queries-full": dict(paged=False, new=2, sq=5, rotary=True, interleaved=False,
                                                     causal=False),
    "paged-append-rotary-window-alibi-softcap": dict(paged=True, new=2, sq=2, rotary=True, interleaved=False,
                                                     window=(6, 0), alibi=True, softcap=8.0),
    "paged-decode-no-append-causal": dict(paged=True, new=0, sq=1, causal=True),
    "dense-no-append-whole-cache": dict(paged=False, new=0, sq=4, seqlens="none", causal=True, kv_heads=1),
    # 20 queries x 4 heads a kv head: past the decoding kernel's tile, the varlen kernel (in place; pages gathered)
    "dense-long-query-block-causal": dict(paged=False, new=0, sq=20, seqlens="none", causal=True, kv_heads=1),
    "paged-long-query-block-window": dict(paged=True, new=2, sq=20, kv_heads=1, window=(5, 0)),
    # key splits: each split's own softmax, merged
    "paged-decode-three-splits-softcap": dict(paged=True, new=1, sq=1, causal=True, softcap=4.0, splits=3),
    "paged-sliced-pages-decode-window": dict(paged=True, new=1, sq=3, causal=True, window=(6, 0), sliced=True),
    "dense-decode-two-splits-alibi-leftpad": dict(paged=False, new=1, sq=2, causal=True, alibi=True, leftpad=True,
                                                  splits=2),
    # the cache a slice of a longer one (rows 31 apart): still read in place on the kernel
    "dense-sliced-cache-append-causal-batchidx": dict(paged=False, new=1, sq=1, causal=True, batch_idx=True,
                                                      sliced=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_oracle(device, backend, name, monkeypatch):
    case = CASES[name]
    if backend == "torch" and device != "cpu":
        pytest.skip("the torch backend's float64 case runs on CPU")
    torch.manual_seed(sorted(CASES).index(name))
    dtype = torch.float64 if backend == "torch" else torch.bfloat16
    batch, heads, kv_heads, d, capacity, page = 3, 4, case.get("kv_heads", 2), 32, 24, 8
    sq, new = case["sq"], case["new"]
    q = torch.randn(batch, sq, heads, d, dtype=dtype, device=device)
    k = torch.randn(batch, new, kv_heads, d, dtype=dtype, device=device) if new else None
    v = torch.randn(batch, new, kv_heads, d, dtype=dtype, device=device) if new else None
    if case["paged"]:
        num_blocks = 11
        k_cache = torch.randn(num_blocks, page + (3 if case.get("sliced") else 0), kv_heads, d, dtype=dtype,
                              device=device)[:, :page]
        block_table = torch.randperm(num_blocks, device=device)[:batch * (capacity // page)].view(batch, -1).int()
    else:
        extra = 7 if case.get("sliced") else 0
        k_cache = torch.randn(batch + 2, capacity + extra, kv_heads, d, dtype=dtype, device=device)[:, :capacity]
        block_table = None
    v_cache = torch.randn(k_cache.shape[0], k_cache.stride(0) // k_cache.stride(1), *k_cache.shape[2:], dtype=dtype,
                          device=device)[:, :k_cache.shape[1]]  # laid out as k_cache
    # an empty sequence (0 cached keys, its new ones only), a short one, one that fills the cache
    seqlens = torch.tensor([0, 7, capacity - new], dtype=torch.int32, device=device)
    if case.get("seqlens") == "none":
        seqlens_arg, seqlens = None, torch.full((batch,), capacity, dtype=torch.int32, device=device)
    else:
        seqlens_arg = seqlens
    leftpad = torch.tensor([0, 3, 5], dtype=torch.int32, device=device) if case.get("leftpad") else None
    batch_idx = torch.tensor([4, 0, 2], dtype=torch.int32, device=device) if case.get("batch_idx") else None
    cos = sin = None
    if case.get("rotary"):
        angle = torch.rand(capacity + sq, 12, device=device, dtype=torch.float64) * 2 * math.pi  # rotary_dim 24 < d
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    slopes = torch.rand(heads, device=device) * 0.3 if case.get("alibi") else None
    window, softcap = case.get("window", (-1, -1)), case.get("softcap", 0.0)
    causal, interleaved = case.get("causal", False), case.get("interleaved", True)
    scale = d ** -0.5
    want_kc, want_vc, want_out, want_lse = _oracle(
        q.cpu(), k_cache.cpu(), v_cache.cpu(), None if k is None else k.cpu(), None if v is None else v.cpu(),
        None if cos is None else cos.cpu(), None if sin is None else sin.cpu(), seqlens.cpu(),
        None if batch_idx is None else batch_idx.cpu(), None if leftpad is None else leftpad.cpu(),
        None if block_table is None else block_table.cpu(), scale, causal, window, softcap,
        None if slopes is None else slopes.cpu(), interleaved)
    read = []  # (kernel, the storage its keys came from)
    for module, fn in ((LAUNCHERS["triton"], "attention_forward"), (decode_kernels, "attention_decode")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda q_, k_, *a, _fn=fn, _real=real, **kw:
                            read.append((_fn, k_.untyped_storage().data_ptr())) or _real(q_, k_, *a, **kw))
    out, lse = attention_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, seqlens_arg, batch_idx, leftpad,
                                      block_table, None, causal, window, softcap, interleaved, slopes,
                                      return_softmax_lse=True, backend=backend, num_splits=case.get("splits", 0))
    if backend == "triton":
        # A few query rows per kv head: the decoding kernel, dense or paged cache read in place; more: the
        # varlen kernel, reading a dense cache in place and gathered pages.
        decoding = heads // kv_heads * sq <= DECODE_MAX_ROWS
        in_place = decoding or not case["paged"]
        want = "attention_decode" if decoding else "attention_forward"
        assert read == [(want, read[0][1])] and (read[0][1] == k_cache.untyped_storage().data_ptr()) == in_place, read
    tol = TOLERANCE.get(dtype, 1e-12)
    # the cache: values copied bit for bit, keys rotated to within a rounding, nothing else touched
    assert torch.equal(v_cache.cpu().double(), want_vc)
    assert rel_error(k_cache.cpu().flatten(0, 1), want_kc.flatten(0, 1)) <= tol
    if cos is None:
        assert torch.equal(k_cache.cpu().double(), want_kc)
    # every query row: rows with no key in reach are 0 with lse +inf (a sequence of 0 keys included)
    assert out.shape == q.shape and lse.shape == (batch, heads, sq)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_error(out.cpu().flatten(0, 1), want_out.flatten(0, 1)) <= tol
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), seen) and (lse.cpu()[~seen] == float("inf")).all(), \
        "rows that see no key must have lse +inf"
    assert (lse.cpu().double()[seen] - want_lse[seen]).abs().max() <= 4 * tol
    assert (out.cpu()[~seen.permute(0, 2, 1)] == 0).all()
    only_out = attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), None, None, None, None,
                                      seqlens + new if new else seqlens_arg, batch_idx, leftpad, block_table,
                                      None, causal, window, softcap, interleaved, slopes, backend=backend,
                                      num_splits=case.get("splits", 0))
    if cos is None:  # the same keys, read back from the cache this time: the same answer
        assert torch.equal(only_out, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seqlen_q", [1, 3, 70])
def test_sinks_match_float64(device, seqlen_q):
    """Attention sinks (GPT-OSS) on a cache: the decoding kernel (1 and 3 rows per sequence), the
    varlen kernel in place (70 rows, causal: its first rows see only a few keys), a left-padded
    sequence; out and lse vs attention_reference with the sinks on each sequence's live keys."""
    from tokenforge.ops.attention import attention_reference

    torch.manual_seed(seqlen_q)
    hq, hkv, d, cap = 4, 2, 64, 96
    q = torch.randn(2, seqlen_q, hq, d, device=device).to(torch.bfloat16)
    k_cache, v_cache = (torch.randn(2, cap, hkv, d, device=device).to(torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([80, 90], dtype=torch.int32, device=device)
    leftpad = torch.tensor([0, 10], dtype=torch.int32, device=device)
    sinks = torch.rand(hq, device=device) * 2 + 1
    out, lse = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, cache_leftpad=leftpad, causal=True,
                                      return_softmax_lse=True, sinks=sinks)
    for b in range(2):
        lo, hi = int(leftpad[b]), int(seqlens[b])
        ref, ref_lse = attention_reference(q[b:b + 1].double(), k_cache[b:b + 1, lo:hi].double(),
                                           v_cache[b:b + 1, lo:hi].double(), causal=True, sinks=sinks.double(),
                                           return_lse=True)
        assert rel_error(out[b:b + 1], ref) <= TOLERANCE[torch.bfloat16], b
        assert rel_error(lse[b:b + 1], ref_lse) <= 1e-5, b


def test_refuses_bad_input():
    q = torch.randn(2, 1, 4, 16)
    k_cache, v_cache = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    seqlens = torch.tensor([3, 7], dtype=torch.int32)
    cos = torch.randn(8, 4)
    before = k_cache.clone(), v_cache.clone()
    cases = [
        (dict(k=k, v=v, cache_seqlens=torch.tensor([3, 8], dtype=torch.int32)), "0..seqlen_cache = 8"),
        (dict(k=k, v=v), "pass cache_seqlens"),
        (dict(k=k), "both k and v"),
        (dict(cache_seqlens=seqlens, rotary_cos=cos, rotary_sin=cos), "pass k and v too"),
        (dict(k=k, v=v, cache_seqlens=seqlens, rotary_cos=cos), "both rotary_cos and rotary_sin"),
        (dict(k=k, v=v, cache_seqlens=seqlens, rotary_cos=cos[:7], rotary_sin=cos[:7]), "7 positions"),
        (dict(k=k, v=v, cache_seqlens=seqlens.float()), "cache_seqlens must be an int32"),
        (dict(cache_seqlens=seqlens, cache_leftpad=torch.tensor([4, 0], dtype=torch.int32)), "cache_leftpad"),
        (dict(cache_seqlens=seqlens, cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), "0..1"),
        (dict(k=k.half(), v=v.half(), cache_seqlens=seqlens), "share one dtype"),
        (dict(num_splits=-1), "num_splits"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            attention_with_kvcache(q, k_cache, v_cache, **kwargs)
    pages = torch.randn(5, 4, 2, 16)
    table = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside 0..4"):
        attention_with_kvcache(q, pages, pages.clone(), cache_seqlens=seqlens, block_table=table)
    with pytest.raises(RuntimeError, match="block_table.shape\\[1\\] x page_size = 8"):  # as flash_attn
        attention_with_kvcache(q, pages, pages.clone(), k, v, cache_seqlens=seqlens + 1, block_table=table % 5)
    with pytest.raises(ValueError, match="cache_batch_idx picks"):
        attention_with_kvcache(q, pages, pages.clone(), cache_seqlens=seqlens, block_table=table % 5,
                               cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), "a refused call writes nothing"


# ---------------------------------------------------------------------------------------------
# Compile gate: the decoding kernel for sm_90 and sm_80, every tile shape it launches.
# ---------------------------------------------------------------------------------------------


@pytest.mark.compile_gate
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_decode_kernel_compiles_without_spills(head_dim, rows):
    """The decoding kernel at the GPU config for d64/d128/d256 and tiles of 1 (MQA, one query), 8
    (GQA 8) and 64 query rows, dense and paged, with window, softcap and ALiBi: compiles for every
    gated target with no spills. On sm_90 the 64-row tile is a warpgroup's and issues wgmma."""
    import triton

    from compile_gate import TARGETS, TRITON_DTYPE, compile_kernel, ptxas_report, spill_bytes, uses_wgmma

    cfg = decode_kernels.config(head_dim, rows, interpreted=False)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    bf16 = "*" + TRITON_DTYPE["bfloat16"]
    types = dict(Q=bf16, K=bf16, V=bf16, O=bf16, LSE="*fp32", O_PART="*fp32", LSE_PART="*fp32", START="*i32",
                 USED="*i32", BLOCK_TABLE="*i32", ALIBI="*fp32", qk_scale="fp32", softcap="fp32")
    for name in ("stride_qr", "stride_qh", "stride_kr", "stride_kh", "stride_vr", "stride_vh", "stride_or",
                 "stride_oh", "stride_bt", "stride_alb", "stride_ps", "stride_pr", "stride_ph", "stride_ls",
                 "stride_lh", "SEQ_Q", "KV_HEADS", "HEAD_DIM", "SPLIT", "PAGE", "PITCH", "WIN_LEFT", "WIN_RIGHT"):
        types[name] = "i32"
    for arch, target in TARGETS.items():
        for paged, features in ((False, False), (True, True)):
            constexprs = dict(cfg, GROUP=rows, PAGED=paged, SINGLE=not paged, HAS_LEFT=features, HAS_RIGHT=True,
                              HAS_SOFTCAP=features, HAS_ALIBI=features, BLOCK_M=decode_kernels.block_m(rows),
                              BLOCK_D=triton.next_power_of_2(head_dim), UPCAST=False)
            compiled = compile_kernel(decode_kernels._decode_fwd, types, constexprs, num_warps, target,
                                      unaligned_args=("SEQ_Q", "KV_HEADS", "HEAD_DIM", "SPLIT", "PAGE", "PITCH",
                                                      "WIN_LEFT", "WIN_RIGHT", "qk_scale", "softcap"),
                                      num_stages=num_stages)
            assert spill_bytes(ptxas_report(compiled.asm["ptx"], arch)) == 0, (arch, head_dim, rows, paged)
            if arch == "sm_90" and rows == 64:
                assert uses_wgmma(compiled), (head_dim, paged)


def test_decode_grid_stays_within_cuda_limits(monkeypatch):
    """4100 sequences x 16 kv heads = 65600 programs: past axis 1's 65535, so (sequence x kv head)
    goes on axis 0 (2^31 - 1) and the key splits (at most 64) on axis 1."""
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(decode_kernels, "_decode_fwd", Recorder())
    batch, heads_k, d, keys = 4100, 16, 32, 64
    q = torch.zeros(batch, heads_k, d, dtype=torch.bfloat16)
    cache = torch.zeros(batch * keys, heads_k, d, dtype=torch.bfloat16)
    starts = torch.arange(batch, dtype=torch.int32) * keys
    used = torch.full((batch,), keys, dtype=torch.int32)
    for splits in (1, 3):
        decode_kernels.attention_decode(q, cache, cache, starts, used, None, keys, keys, 1, keys, 0.1, (-1, 0), 0.0,
                                        num_splits=splits)
    assert grids == [(batch * heads_k, 1), (batch * heads_k, 3)]
