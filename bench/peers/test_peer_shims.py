"""Checks of the peer-suite shims without the peers installed: each Liger-Kernel adapter, given
Liger's positional arguments, returns what the tokenforge op gives (so a renamed keyword breaks CI,
not the next GPU run); the flash_attn stand-in exports tokenforge's functions;
the runner's script parses and refuses a wrong checkout; compare_junit tells our failures from
the ones the peer's own kernels share."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch

from tokenforge import ops

_HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def liger_shim(monkeypatch):
    """liger_on_cpu.py and liger_shim.py loaded against empty stand-ins for liger_kernel.ops and Liger's test.utils."""
    liger = types.ModuleType("liger_kernel")
    liger.ops = types.ModuleType("liger_kernel.ops")
    liger_test = types.ModuleType("test")
    liger_test.utils = types.ModuleType("test.utils")
    liger_test.utils.supports_bfloat16 = lambda: False
    for name, module in (("liger_kernel", liger), ("liger_kernel.ops", liger.ops), ("test", liger_test),
                         ("test.utils", liger_test.utils)):
        monkeypatch.setitem(sys.modules, name, module)
    for plugin in ("liger_on_cpu", "liger_shim"):
        spec = importlib.util.spec_from_file_location(f"tokenforge_{plugin}", os.path.join(_HERE, f"{plugin}.py"))
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return liger.ops, liger_test.utils


def _same(a, b):
    if a is None or b is None:
        assert a is None and b is None
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_liger_adapters_call_our_ops_with_liger_argument_order(liger_shim):
    liger_ops, liger_test_utils = liger_shim
    torch.manual_seed(0)
    x, r, w = torch.randn(5, 48), torch.randn(5, 48), torch.randn(48)
    _same(liger_ops.LigerRMSNormFunction.apply(x, w, 1e-5, 1.0, "gemma"),
          ops.rms_norm(x, w, 1e-5, offset=1.0, casting_mode="gemma"))
    for got, want in zip(liger_ops.LigerFusedAddRMSNormFunction.apply(x, r, w, 1e-5, 0.0, "llama"),
                         ops.add_rms_norm(x, r, w, 1e-5, casting_mode="llama")):
        _same(got, want)

    logits, target = torch.randn(6, 40), torch.tensor([1, -100, 39, 0, 7, -100])
    got = liger_ops.LigerCrossEntropyFunction.apply(logits, target, None, -100, 1e-3, 0.1, "sum", 20.0, True, True)
    want = ops.cross_entropy(logits, target, ignore_index=-100, z_loss=1e-3, label_smoothing=0.1,
                             reduction="sum", softcap=20.0, return_z_loss=True, return_token_accuracy=True)
    assert len(got) == 4 and got[3] is None
    for g, v in zip(got, (want.loss, want.z_loss, want.token_accuracy)):
        _same(g, v)
    got = liger_ops.LigerCrossEntropyFunction.apply(logits, target, None, -100, 0.0, 0.0, "mean", None, False, False,
                                                    True)
    _same(got[3], ops.cross_entropy(logits, target, return_predicted_tokens=True).predicted_tokens)
    assert got[1] is None and got[2] is None
    loss, z_loss, accuracy, predicted = liger_ops.LigerCrossEntropyFunction.apply(logits, target)
    _same(loss, ops.cross_entropy(logits, target))
    assert z_loss is None and accuracy is None and predicted is None

    hidden, lm_weight, class_weight = torch.randn(6, 16), torch.randn(40, 16), torch.rand(40) + 0.5
    got = liger_ops.LigerFusedLinearCrossEntropyFunction.apply(hidden, lm_weight, target, None, class_weight,
                                                                -100, 0.0, 0.05, "mean")
    _same(got[0], ops.linear_cross_entropy(hidden, lm_weight, target, class_weight=class_weight,
                                           label_smoothing=0.05))
    got = liger_ops.LigerFusedLinearCrossEntropyFunction.apply(hidden, lm_weight, target, use_token_scaling=True,
                                                                return_predicted_tokens=True)
    want = ops.linear_cross_entropy(hidden, lm_weight, target, token_scaling=True, return_predicted_tokens=True)
    _same(got[0], want.loss)
    _same(got[3], want.predicted_tokens)

    gate, up = torch.randn(4, 24), torch.randn(4, 24)
    _same(liger_ops.LigerSiLUMulFunction.apply(gate, up), ops.swiglu(gate, up))
    _same(liger_ops.LigerGELUMulFunction.apply(gate, up), ops.geglu(gate, up, approximate="tanh"))

    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)  # HF's (b, h, s, d): unsqueeze_dim 1
    cos, sin = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    for got, want in zip(liger_ops.LigerRopeFunction.apply(q, k, cos, sin),
                         ops.rope(q, k, cos, sin, layout="bhsd")):
        _same(got, want)
    for got, want in zip(liger_ops.LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin, None, 2),
                         ops.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, layout="bshd")):
        _same(got, want)
    if not torch.cuda.is_available():
        assert liger_test_utils.supports_bfloat16()  # liger_on_cpu: bf16 cases run under the interpreter


def test_liger_fused_moe_adapter_is_the_expert_sum(liger_shim):
    """Liger's fused MoE (transformers 5 *Experts layout) through the adapter vs a float64 loop:
    out[t] = sum_j w[t, j] * down_e(silu(gate_e x) * up_e x), e = index[t, j]."""
    liger_ops, _ = liger_shim
    torch.manual_seed(1)
    tokens, experts, hidden, inter, top_k = 7, 4, 16, 8, 2
    x = torch.randn(tokens, hidden)
    gate_up, down = torch.randn(experts, 2 * inter, hidden) / 4, torch.randn(experts, hidden, inter) / 3
    index = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    index[0] = 3  # both of token 0's slots on one expert; expert 3 also takes others
    weights = torch.rand(tokens, top_k)
    out = liger_ops.LigerFusedMoEFunction.apply(x, gate_up, down, index, weights)
    want = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for j in range(top_k):
            e = int(index[t, j])
            g, u = (gate_up[e].double() @ x[t].double()).split(inter)
            want[t] += weights[t, j].double() * (down[e].double() @ (torch.nn.functional.silu(g) * u))
    assert out.shape == (tokens, hidden) and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_liger_falcon_h1_multipliers_map_to_ours(liger_shim):
    liger_ops, _ = liger_shim
    gate, up = torch.randn(3, 16), torch.randn(3, 16)
    _same(liger_ops.LigerSiLUMulFunction.apply(gate, up, 0.5, 2.0),
          ops.swiglu(gate, up, gate_multiplier=0.5, down_multiplier=2.0))


def test_flash_attn_stand_in_exports_our_attention(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(_HERE, "flash_attn_shim"))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    import flash_attn
    from flash_attn.flash_attn_interface import _flash_attn_varlen_forward, _get_block_size_n, flash_attn_gpu
    from flash_attn.layers.rotary import apply_rotary_emb

    assert flash_attn.__file__.startswith(os.path.join(_HERE, "flash_attn_shim"))
    assert flash_attn.flash_attn_func is ops.attention
    assert flash_attn.flash_attn_varlen_func is ops.attention_varlen
    assert flash_attn.flash_attn_qkvpacked_func is ops.attention_qkvpacked
    assert flash_attn.flash_attn_varlen_kvpacked_func is ops.attention_varlen_kvpacked
    assert _get_block_size_n("cpu", 128, False, True) == 64 and _get_block_size_n("cpu", 64, True, False) == 64
    assert flash_attn.flash_attn_with_kvcache is ops.attention_with_kvcache
    for internal in (lambda: _flash_attn_varlen_forward(), lambda: flash_attn_gpu.fwd):
        with pytest.raises(pytest.skip.Exception, match="internal"):
            internal()
    # flash_attn's rotary: (positions, rotary_dim / 2) tables, offsets per batch entry, dims past
    # rotary_dim untouched; in float64 against the formula, interleaved and half-split
    x = torch.randn(2, 3, 2, 8, dtype=torch.float64)
    angle = torch.rand(9, 2, dtype=torch.float64)
    offsets = torch.tensor([1, 5])
    for interleaved in (False, True):
        got = apply_rotary_emb(x, angle.cos(), angle.sin(), interleaved=interleaved, seqlen_offsets=offsets)
        pos = offsets[:, None] + torch.arange(3)
        c, s = angle.cos()[pos][:, :, None], angle.sin()[pos][:, :, None]
        a, b = (x[..., 0:4:2], x[..., 1:4:2]) if interleaved else (x[..., :2], x[..., 2:4])
        want = x.clone()
        if interleaved:
            want[..., 0:4:2], want[..., 1:4:2] = a * c - b * s, b * c + a * s
        else:
            want[..., :2], want[..., 2:4] = a * c - b * s, b * c + a * s
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_runner_refuses_a_wrong_checkout(tmp_path):
    script = os.path.join(_HERE, "run_peer_tests.sh")
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    for peer in ("liger", "flash_attn"):
        res = subprocess.run(["bash", script, peer, str(tmp_path)], capture_output=True, text=True)
        assert res.returncode == 2 and "checkout" in res.stderr, res.stderr
    res = subprocess.run(["bash", script, "apex", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown peer" in res.stderr


def test_compare_junit_lists_only_our_failures(tmp_path, capsys):
    sys.path.insert(0, _HERE)
    try:
        import compare_junit
    finally:
        sys.path.remove(_HERE)

    def junit(path, outcomes):
        def body(outcome):
            if outcome.startswith("failed"):
                return f"<failure message='{outcome.split(' ', 1)[1]}: it went wrong'/>"
            return "<skipped message='y'/>" if outcome == "skipped" else ""
        cases = "".join(f"<testcase classname='t' name='{n}'>{body(o)}</testcase>" for n, o in outcomes.items())
        path.write_text(f"<testsuites><testsuite name='pytest'>{cases}</testsuite></testsuites>")
        return str(path)

    ours = junit(tmp_path / "ours.xml", {"a": "failed AssertionError", "b": "failed AssertionError", "c": "passed",
                                         "d": "skipped", "e": "failed ValueError", "f": "failed AssertionError"})
    base = junit(tmp_path / "base.xml", {"a": "passed", "b": "failed AssertionError", "c": "failed TypeError",
                                         "d": "passed", "f": "failed RuntimeError"})
    assert compare_junit.main([ours, base]) == 1
    out = capsys.readouterr().out
    assert "ours:     1 passed, 4 failed, 1 skipped" in out and "baseline: 2 passed, 3 failed, 0 skipped" in out
    assert "failed with both, same exception type: 1; failed with ours, not run by the baseline: 1" in out
    assert "different exception types (look by hand): 1\n  t::f: ours AssertionError / baseline RuntimeError" in out
    assert "failed only with ours: 1\n  t::a\n" in out
    assert compare_junit.main([base, base]) == 0
    assert compare_junit.main([ours]) == 2
