"""tokenforge.patch / unpatch: same parameters, same state_dict, same loss and gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F

import tokenforge
from tokenforge.models import Transformer, TransformerConfig
from tokenforge.testing import rel_error

OPTIONS = ["rms_norm", "rope", "swiglu", "cross_entropy", "attention"]
# fp32 kernels agree with PyTorch to ~1e-7 per op; through two layers, a loss and its backward the
# differences compound to ~1e-6 at most.
TOL = 1e-5


def _tiny_model(**overrides):
    torch.manual_seed(0)
    return Transformer(TransformerConfig.preset("tiny", **overrides))


def _loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _batch(cfg, batch=2, seq=17):
    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    targets = torch.randint(0, cfg.vocab_size, (batch, seq))
    targets[0, :3] = -100  # ignored positions, as padding would be
    return idx, targets


def _assert_same(loss_a, grads_a, loss_b, grads_b, tol=TOL):
    assert rel_error(loss_b, loss_a) <= tol, (loss_a.item(), loss_b.item())
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        err = rel_error(grads_b[name], grads_a[name])
        assert err <= tol, f"grad of {name}: relative error {err:.2e}"


@pytest.mark.parametrize("only", OPTIONS + ["all"])
def test_tokenforge_transformer_same_loss_and_grads(only):
    model = _tiny_model()
    idx, targets = _batch(model.cfg)
    ref = _loss_and_grads(model, idx, targets)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    opts = {o: (only == "all" or o == only) for o in OPTIONS}
    report = tokenforge.patch(model, **opts)
    assert report.family == "tokenforge"
    assert list(model.state_dict()) == keys
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters()), "patch must not re-create parameters"
    for o in OPTIONS:
        if opts[o]:
            assert any(line.startswith(o) for line in report.patched + report.skipped), (o, str(report))
    if opts["rms_norm"]:  # the residual add is fused into the norm after it, in every block
        assert f"add_rms_norm: {model.cfg.n_layers} Block.add_norm_fn" in str(report), str(report)
        assert all(b.add_norm_fn.__name__ == "_fused_add_rms_norm" for b in model.layers)
    _assert_same(*ref, *_loss_and_grads(model, idx, targets))
    tokenforge.unpatch(model)
    _assert_same(*ref, *_loss_and_grads(model, idx, targets), tol=0.0 if only != "all" else TOL)


def test_unpatch_restores_everything_exactly():
    model = _tiny_model()
    before = {n: (type(m), dict(vars(m))) for n, m in model.named_modules()}
    tokenforge.patch(model)
    assert isinstance(model.norm, tokenforge.nn.RMSNorm)
    tokenforge.unpatch(model)
    after = {n: (type(m), dict(vars(m))) for n, m in model.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name][0] is after[name][0], name
        assert before[name][1].keys() == after[name][1].keys(), name
    assert model.loss_fn is tokenforge.models.transformer.logits_cross_entropy
    assert type(model.norm) is torch.nn.RMSNorm


def test_patch_twice_is_a_clear_error_and_unpatch_needs_a_patch():
    model = _tiny_model()
    tokenforge.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        tokenforge.patch(model)
    tokenforge.unpatch(model)
    with pytest.raises(RuntimeError, match="not patched"):
        tokenforge.unpatch(model)
    with pytest.raises(TypeError, match="nn.Module"):
        tokenforge.patch(object())


def test_report_says_what_was_skipped():
    model = _tiny_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    report = tokenforge.patch(model, optimizer=sgd)
    assert any(s.startswith("optimizer: SGD has no tokenforge equivalent") for s in report.skipped)
    assert report.optimizer is sgd
    tokenforge.unpatch(model)


def test_optimizer_is_swapped_for_the_fused_one_with_its_state():
    model = _tiny_model()
    idx, targets = _batch(model.cfg)
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.05)
    for m, o in ((model, opt), (twin, twin_opt)):  # one torch step each, so there is state to carry
        m(idx, targets).backward()
        o.step()
        o.zero_grad()
    report = tokenforge.patch(model, optimizer=opt, attention=False, rope=False, swiglu=False,
                              cross_entropy=False, rms_norm=False)
    fused = report.optimizer
    assert isinstance(fused, tokenforge.optim.AdamW)
    assert fused.param_groups[0]["weight_decay"] == 0.05
    for m, o in ((model, fused), (twin, twin_opt)):
        m(idx, targets).backward()
        o.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert rel_error(p, q) < 1e-6, name
    tokenforge.unpatch(model)


@pytest.mark.parametrize("fp8", [True, "blockwise"])
def test_fp8_patch_converts_and_unpatch_restores(fp8):
    model = _tiny_model()
    originals = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    idx, targets = _batch(model.cfg)
    ref_loss, _ = _loss_and_grads(model, idx, targets)
    report = tokenforge.patch(model, fp8=fp8, attention=False, rope=False, swiglu=False, cross_entropy=False,
                              rms_norm=False)
    assert any(p.startswith("fp8:") for p in report.patched), str(report)
    converted = [m for n, m in model.named_modules() if isinstance(m, tokenforge.fp8.Float8Linear)]
    assert converted and "output" not in [n for n, m in model.named_modules() if m in converted]
    assert all(m.recipe == ("tensorwise" if fp8 is True else fp8) for m in converted)
    loss, grads = _loss_and_grads(model, idx, targets)
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) < 0.05 * ref_loss.item()
    tokenforge.unpatch(model)
    assert all(model.get_submodule(n) is m for n, m in originals.items())


def test_fp8_patch_with_nothing_eligible_says_so():
    model = _tiny_model(dim=60, n_heads=6, n_kv_heads=2, hidden_dim=150)  # no multiple-of-16 Linear
    report = tokenforge.patch(model, fp8=True)
    assert any(s.startswith("fp8: no eligible") for s in report.skipped), str(report)
    tokenforge.unpatch(model)


def test_generic_patch_on_a_hand_written_model():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(32, eps=1e-6)
            self.proj = torch.nn.Linear(32, 32)

        def forward(self, x):
            q = self.proj(self.norm(x)).view(2, 5, 4, 8).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    model = Tiny()
    x = torch.randn(2, 5, 32)
    ref = model(x)
    report = tokenforge.patch(model)
    try:  # unpatch even on failure: the SDPA routing is process-wide
        assert report.family == "generic"
        assert any("not an architecture tokenforge knows" in s for s in report.skipped)
        assert any(p.startswith("rms_norm: 1") for p in report.patched)
        assert isinstance(model.norm, tokenforge.nn.RMSNorm)
        # The attention output, not its sum: a sum of terms of both signs amplifies a rounding-sized
        # difference past any relative bound (1.7e-5 was seen).
        assert rel_error(model(x), ref) < 1e-5
    finally:
        tokenforge.unpatch(model)
    assert type(model.norm) is torch.nn.RMSNorm


def test_unknown_rmsnorm_classes_are_named_in_the_report():
    class T5LikeRMSNorm(torch.nn.Module):  # a norm class of its own: not replaced, and said so by name
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    model = torch.nn.Sequential(T5LikeRMSNorm(), torch.nn.Linear(8, 8), T5LikeRMSNorm())
    report = tokenforge.patch(model)
    assert any(s.startswith("rms_norm: 2 T5LikeRMSNorm module(s) left alone") for s in report.skipped), report
    assert type(model[0]) is T5LikeRMSNorm
    tokenforge.unpatch(model)


def test_patched_model_compiles_fullgraph():
    model = _tiny_model()
    idx, targets = _batch(model.cfg)
    tokenforge.patch(model)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(idx, targets)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(idx, targets)
    loss.backward()
    eager = copy.deepcopy(model)
    assert rel_error(loss, eager(idx, targets)) < TOL
    tokenforge.unpatch(model)
