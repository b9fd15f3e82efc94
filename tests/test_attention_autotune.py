"""The attention launchers' explicit autotuner (kernels/attention.py: candidates, _select, _TUNED).

On CPU the timer is faked (``_time_config`` replaced) and the tuner is switched on by hand
(``_can_tune``, TOKENFORGE_AUTOTUNE=on, a cache file under tmp_path), so the choice logic, the
in-memory and on-disk caches and the refusals are tested without a GPU; the end-to-end tests run
the interpreter with small candidate tiles and check the results against a float64 reference
whichever candidate wins and whichever ran last. On CUDA a real autotuned call is checked too.
"""

from __future__ import annotations

import pytest
import torch
from device_params import HAS_CUDA

from tokenforge.kernels import attention as ak
from tokenforge.ops.attention import attention, attention_reference
from tokenforge.testing import TOLERANCE, rel_error

KERNELS = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")


def _cfg(bm, bn, bd=32, w=4, st=1):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=w, num_stages=st)


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    """Every test reads and writes its own tuning cache file, never the user's."""
    monkeypatch.setenv("TOKENFORGE_TUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(ak, "_DISK", None)
    return tmp_path / "tune.json"


@pytest.fixture
def tuner(monkeypatch):
    """Tuning on (whatever the device), an empty cache, and a fake timer: candidate c takes
    times[kernel][(BLOCK_M, BLOCK_N)] ms (default 1.0); every timing is recorded in ``calls``.
    With run=True the fake timer also runs the launch (into the scratch outputs)."""
    state = dict(times={}, calls=[], run=False, kernel=None)
    monkeypatch.setenv("TOKENFORGE_AUTOTUNE", "on")
    monkeypatch.setattr(ak, "_TUNED", {})
    monkeypatch.setattr(ak, "_can_tune", lambda device: ak.autotune_enabled())
    real_select = ak._select

    def select(kernel, head_dim, device, key_extra, launch):
        state["kernel"] = kernel
        return real_select(kernel, head_dim, device, key_extra, launch)

    def fake_time(launch, cfg):
        k = state["kernel"]
        state["calls"].append((k, cfg["BLOCK_M"], cfg["BLOCK_N"]))
        if state["run"]:
            launch(cfg)
        return state["times"].get(k, {}).get((cfg["BLOCK_M"], cfg["BLOCK_N"]), 1.0)

    monkeypatch.setattr(ak, "_select", select)
    monkeypatch.setattr(ak, "_time_config", fake_time)
    return state


def _noop(cfg):
    raise AssertionError("the fake timer does not launch unless asked")


def test_fastest_candidate_is_chosen_and_cached(tuner, monkeypatch):
    monkeypatch.setattr(ak, "arch_family", lambda device: "sm_90")
    cands = ak.candidates("_attn_fwd", 64, "sm_90", interpreted=False)
    monkeypatch.setattr(ak, "candidates", lambda kernel, d, arch: cands)
    assert len(cands) >= 2
    fastest = cands[-1]
    tuner["times"]["_attn_fwd"] = {(c["BLOCK_M"], c["BLOCK_N"]): 2.0 for c in cands[:-1]}
    tuner["times"]["_attn_fwd"][(fastest["BLOCK_M"], fastest["BLOCK_N"])] = 0.5
    key = ("bfloat16", False, False, True, True, False, 2, 1024, 1024)
    dev = torch.device("cpu")
    assert ak._select("_attn_fwd", 64, dev, key, _noop) == fastest
    assert len(tuner["calls"]) == len(cands)
    assert ak.tuned_configs() == {("_attn_fwd", "sm_90", 64, *key): fastest}
    # Same key: no timing at all.
    assert ak._select("_attn_fwd", 64, dev, key, _noop) == fastest
    assert len(tuner["calls"]) == len(cands)
    # Another key (longer sequences) tunes again.
    key2 = key[:-2] + (4096, 4096)
    ak._select("_attn_fwd", 64, dev, key2, _noop)
    assert len(tuner["calls"]) == 2 * len(cands)
    assert len(ak.tuned_configs()) == 2


def test_failing_candidate_is_skipped(tuner, monkeypatch):
    monkeypatch.setattr(ak, "arch_family", lambda device: "sm_80")
    cands = [_cfg(32, 16), _cfg(64, 64), _cfg(16, 16)]
    monkeypatch.setattr(ak, "candidates", lambda kernel, d, arch: cands)
    real = ak._time_config

    def time_or_fail(launch, cfg):
        if cfg["BLOCK_M"] == 64:
            from triton.runtime.errors import OutOfResources

            raise OutOfResources(300000, 232448, "shared memory")
        return real(launch, cfg)

    monkeypatch.setattr(ak, "_time_config", time_or_fail)
    tuner["times"]["_attn_bwd_dq"] = {(32, 16): 3.0, (16, 16): 2.0}
    assert ak._select("_attn_bwd_dq", 32, torch.device("cpu"), ("k",), _noop) == cands[2]


def test_other_launch_errors_are_raised(tuner, monkeypatch):
    """Only "does not fit this GPU" skips a candidate; a real launch error is never hidden."""
    monkeypatch.setattr(ak, "arch_family", lambda device: "sm_90")
    monkeypatch.setattr(ak, "candidates", lambda kernel, d, arch: [_cfg(32, 16), _cfg(64, 64)])

    def broken(launch, cfg):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(ak, "_time_config", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        ak._select("_attn_fwd", 32, torch.device("cpu"), ("k",), _noop)


def test_choice_is_written_to_disk_and_read_back_without_timing(tuner, monkeypatch, private_cache):
    import json

    monkeypatch.setattr(ak, "arch_family", lambda device: "sm_90")
    cands = [_cfg(32, 16), _cfg(64, 64), _cfg(16, 16)]
    monkeypatch.setattr(ak, "candidates", lambda kernel, d, arch: cands)
    tuner["times"]["_attn_fwd"] = {(64, 64): 0.5}
    assert ak._select("_attn_fwd", 32, torch.device("cpu"), ("k",), _noop) == cands[1]
    saved = json.loads(private_cache.read_text())
    assert list(saved.values()) == [cands[1]]
    (entry,) = saved
    assert "triton " in entry and "_attn_fwd" in entry  # keyed by device, Triton version, kernel, ...
    # A new process (empty memory caches), default mode (cache): the disk entry, no timing.
    monkeypatch.setattr(ak, "_TUNED", {})
    monkeypatch.setattr(ak, "_DISK", None)
    monkeypatch.delenv("TOKENFORGE_AUTOTUNE")
    n = len(tuner["calls"])
    assert ak._select("_attn_fwd", 32, torch.device("cpu"), ("k",), _noop) == cands[1]
    assert len(tuner["calls"]) == n
    # off: the fixed config whatever the cache says
    monkeypatch.setattr(ak, "_TUNED", {})
    monkeypatch.setenv("TOKENFORGE_AUTOTUNE", "off")
    assert ak._select("_attn_fwd", 32, torch.device("cpu"), ("k",), _noop) == cands[0]


def test_default_mode_never_times_in_a_step(monkeypatch):
    """The default (cache) with nothing cached: the fixed config, and no timing run."""
    monkeypatch.delenv("TOKENFORGE_AUTOTUNE", raising=False)
    monkeypatch.setattr(ak, "_TUNED", {})
    monkeypatch.setattr(ak, "arch_family", lambda device: "sm_90")
    monkeypatch.setattr(ak, "_time_config", lambda launch, cfg: pytest.fail("timed inside a step"))
    assert ak.autotune_mode() == "cache" and not ak._can_tune(torch.device("cpu"))
    cands = ak.candidates("_attn_fwd", 128, "sm_90", interpreted=False)
    monkeypatch.setattr(ak, "candidates", lambda kernel, d, arch: cands)
    assert ak._select("_attn_fwd", 128, torch.device("cpu"), ("k",), _noop) == cands[0]


def test_no_timing_under_torch_distributed(monkeypatch):
    """Ranks that timed on their own could launch different kernels: with more than one rank the
    cache or the fixed config decides, even with TOKENFORGE_AUTOTUNE=on."""
    monkeypatch.setenv("TOKENFORGE_AUTOTUNE", "on")
    monkeypatch.setattr(ak, "INTERPRETED", False)
    monkeypatch.setattr(ak, "_distributed_world", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not ak._can_tune(torch.device("cuda", 0))
    monkeypatch.setattr(ak, "_distributed_world", lambda: 1)
    assert ak._can_tune(torch.device("cuda", 0))


def test_bad_mode_and_unreadable_cache_are_clear_errors(monkeypatch, private_cache):
    monkeypatch.setenv("TOKENFORGE_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match="TOKENFORGE_AUTOTUNE='sometimes'"):
        ak.autotune_mode()
    monkeypatch.delenv("TOKENFORGE_AUTOTUNE")
    private_cache.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable.*tokenforge tune attention"):
        ak._disk()


def test_autotune_off_skips_timing(tuner, monkeypatch):
    monkeypatch.setenv("TOKENFORGE_AUTOTUNE", "0")
    monkeypatch.setattr(ak, "arch_family", lambda device: "sm_90")
    cands = ak.candidates("_attn_bwd_dkdv", 128, "sm_90", interpreted=False)
    monkeypatch.setattr(ak, "candidates", lambda kernel, d, arch: cands)
    assert ak._select("_attn_bwd_dkdv", 128, torch.device("cpu"), ("k",), _noop) == cands[0]
    assert tuner["calls"] == [] and ak.tuned_configs() == {}


def test_cpu_and_interpreter_never_time(monkeypatch):
    """Without the test switch: CPU tensors (and the interpreter) use the fixed config, untimed."""
    monkeypatch.setattr(ak, "_TUNED", {})
    monkeypatch.setattr(ak, "_time_config", lambda launch, cfg: pytest.fail("timed on CPU"))
    assert not ak._can_tune(torch.device("cpu"))
    assert ak.arch_family(torch.device("cpu")) == "default"
    for name in KERNELS:
        for d in (32, 64, 128, 256):
            assert ak._select(name, d, torch.device("cpu"), ("k",), _noop) == ak._FIXED[name](d)
    assert ak.tuned_configs() == {}


def test_candidate_tables():
    """Fixed config first, 1-3 more per (arch, kernel, head dim block) on sm_90/sm_80, none on other
    parts, no duplicates, and every one in all_configs() of the targets that can pick it (so the
    compile gate checks it there)."""
    gated = [(n, c) for n, c in ak.all_configs()]
    gated_on = {target: ak.all_configs(target) for target in ("sm_90", "sm_80")}
    for arch in ak.ARCH_FAMILIES:
        targets = [arch] if arch != "default" else ["sm_90", "sm_80"]
        for name in KERNELS:
            for d in range(32, 257, 8):
                cands = ak.candidates(name, d, arch, interpreted=False)
                assert cands[0] == ak._FIXED[name](d, interpreted=False, arch=arch)
                assert len(cands) == len({tuple(sorted(c.items())) for c in cands})
                assert 1 <= len(cands) <= 4 and (len(cands) >= 2) == (arch != "default")
                for c in cands:
                    assert c["BLOCK_D"] == ak.block_d(d)
                    assert (name, c) in gated, (arch, name, d, c)
                    for target in targets:
                        assert (name, c) in gated_on[target], (target, name, d, c)
    assert len(gated) == len({(n, tuple(sorted(c.items()))) for n, c in gated})


def test_key_covers_flags_and_buckets():
    q = torch.empty(1, 8, 4, 64, dtype=torch.bfloat16)
    k = torch.empty(1, 8, 2, 64, dtype=torch.bfloat16)
    base = ak._tune_key(q, k, (-1, 0), 0.0, False, 1000, 1000)
    assert base == ak._tune_key(q, k, (-1, 0), 0.0, False, 1024, 600)[:-2] + (1024,) + base[-1:]
    others = [ak._tune_key(q, k, (-1, -1), 0.0, False, 1000, 1000),
              ak._tune_key(q, k, (128, 0), 0.0, False, 1000, 1000),
              ak._tune_key(q, k, (-1, 0), 30.0, False, 1000, 1000),
              ak._tune_key(q, k, (-1, 0), 0.0, True, 1000, 1000),
              ak._tune_key(q, q, (-1, 0), 0.0, False, 1000, 1000),
              ak._tune_key(q.half(), k.half(), (-1, 0), 0.0, False, 1000, 1000),
              ak._tune_key(q, k, (-1, 0), 0.0, False, 3000, 1000),
              ak._tune_key(q, k, (-1, 0), 0.0, False, 1000, 1000, batch=64),  # batch x heads
              ak._tune_key(q, k, (-1, 0), 0.0, False, 1000, 1000, alibi=True),
              ak._tune_key(q, k, (-1, 0), 0.0, False, 1000, 1000, dropout=True)]
    assert len({base, *others}) == len(others) + 1
    assert ak._tune_key(q, k, (-1, 0), 0.0, False, 10**6, 10**6)[-3:-1] == (ak.SEQ_BUCKET_CAP,) * 2


# Small interpreter-friendly candidates with distinct tilings: the winner and the last one timed
# differ, so a result written by the wrong launch would show.
_INTERP_CANDS = [_cfg(32, 16), _cfg(16, 32), _cfg(16, 16)]


@pytest.mark.parametrize("deterministic", [True, False], ids=["two-pass", "one-pass"])
@pytest.mark.parametrize("winner", [1, 0])
def test_autotuned_results_match_reference(tuner, monkeypatch, winner, deterministic):
    """Every tuned kernel's winner writes the real outputs; the one-pass backward (dq by atomics,
    the interpreter always takes it with deterministic=False) is tuned as its own kernel."""
    monkeypatch.setattr(ak, "candidates", lambda kernel, d, arch: _INTERP_CANDS)
    tuner["run"] = True
    kernels = KERNELS if deterministic else ("_attn_fwd", "_attn_bwd_fused")
    fast = (_INTERP_CANDS[winner]["BLOCK_M"], _INTERP_CANDS[winner]["BLOCK_N"])
    for name in kernels:
        tuner["times"][name] = {fast: 0.1}
    dev = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(7)
    dtype = torch.float16
    q, k, v, do = (torch.randn(s, generator=g).to(dev, dtype)
                   for s in ((2, 40, 4, 32), (2, 40, 2, 32), (2, 40, 2, 32), (2, 40, 4, 32)))
    for t in (q, k, v):
        t.requires_grad_(True)
    out = attention(q, k, v, backend="triton", deterministic=deterministic)
    out.backward(do)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = attention_reference(q64, k64, v64)
    ref.backward(do.double())
    # Non-causal, 40 keys per query: no cancelling rows, so plain relative errors apply.
    for got, want in ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_error(got, want) < TOLERANCE[dtype]
    tuned = ak.tuned_configs()
    assert sorted(key[0] for key in tuned) == sorted(kernels)
    assert all(c == _INTERP_CANDS[winner] for c in tuned.values())
    n = len(tuner["calls"])
    assert n == len(kernels) * len(_INTERP_CANDS)
    # The second call reuses the cache: no timing.
    attention(q, k, v, backend="triton", deterministic=deterministic).backward(do)
    assert len(tuner["calls"]) == n


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: real timing with triton.testing.do_bench")
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_real_autotune_matches_reference(monkeypatch, causal):
    monkeypatch.setenv("TOKENFORGE_AUTOTUNE", "on")
    monkeypatch.setattr(ak, "_TUNED", {})
    timed = []
    real = ak._time_config
    monkeypatch.setattr(ak, "_time_config", lambda launch, cfg: timed.append(cfg) or real(launch, cfg))
    g = torch.Generator().manual_seed(3)
    dtype = torch.bfloat16
    q = torch.randn(2, 1024, 8, 128, generator=g).cuda().to(dtype).requires_grad_(True)
    k = torch.randn(2, 1024, 2, 128, generator=g).cuda().to(dtype).requires_grad_(True)
    v = torch.randn(2, 1024, 2, 128, generator=g).cuda().to(dtype).requires_grad_(True)
    do = torch.randn(2, 1024, 8, 128, generator=g).cuda().to(dtype)
    out = attention(q, k, v, causal=causal, backend="triton")
    out.backward(do)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=causal)
    ref.backward(do.double())
    errs = [rel_error(a, b) for a, b in ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad))]
    assert max(errs) < TOLERANCE[dtype], errs
    if ak.arch_family(q.device) != "default":
        assert len(ak.tuned_configs()) == 3 and len(timed) >= 6
    n = len(timed)
    out2 = attention(q, k, v, causal=causal, backend="triton")
    assert len(timed) == n
    assert torch.equal(out2, out)  # the cached winner runs again: bitwise the same
