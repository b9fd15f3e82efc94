"""tokenforge.optim.Muon and QKClip: the update against torch.optim.Muon and a float64 formula,
AdamW groups exactly as tokenforge.optim.AdamW, the parameter rule, convergence on a convex
problem, state_dict round trip and exact resume, bf16 masters, clipping, FSDP2 shards on 2 gloo
ranks = one process, bad input; QK-clip's max logit and rescale (MHA and GQA)."""

from __future__ import annotations

import math

import pytest
import torch
from device_params import HAS_CUDA, INTERPRETING
from torchrun import run_worker

from tokenforge.models.transformer import Transformer, TransformerConfig
from tokenforge.ops.newton_schulz import COEFFICIENTS
from tokenforge.optim import AdamW, Muon, QKClip, muon_param_groups
from tokenforge.optim.muon import adjusted_ratio
from tokenforge.optim.qk_clip import max_logits
from tokenforge.testing import rel_error

BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1")),
            "torch"]
SHAPES = [(24, 40), (40, 24), (24, 40), (7, 5)]


def _params(shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(*s, generator=g) * 0.1).to(dtype)) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _run(opt, params, steps=3):
    for step in range(steps):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()


def _muon_float64(params, steps, lr, wd, momentum, nesterov, adjust):
    """Muon's formulas, float64 throughout (the oracle)."""
    a, b, c = COEFFICIENTS
    ps = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ps]
    for step in range(steps):
        for p, buf, g in zip(ps, bufs, _grads(params, step)):
            g = g.double()
            buf.lerp_(g, 1 - momentum)
            u = g.lerp(buf, momentum) if nesterov else buf
            x = u.T if u.shape[0] > u.shape[1] else u
            x = x / x.norm()
            for _ in range(5):
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            o = x.T if u.shape[0] > u.shape[1] else x
            p.mul_(1 - lr * wd).add_(o, alpha=-lr * adjusted_ratio(adjust, *p.shape))
    return ps


# ---------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nesterov,adjust", [(True, None), (False, "match_rms_adamw"), (True, "original")])
def test_update_matches_float64_formula(backend, nesterov, adjust):
    params = _params()
    opt = Muon(params, lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust, ns_dtype=torch.float32,
               backend=backend)
    _run(opt, params)
    want = _muon_float64(_params(), 3, 0.02, 0.1, 0.95, nesterov, adjust)
    start = _params()
    for p, w, p0 in zip(params, want, start):
        # relative to the distance travelled, so a wrong update cannot hide behind the weights
        assert rel_error(p.detach() - p0.detach(), w - p0.detach().double()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_bf16_update_matches_torch_optim_muon(backend, adjust):
    """Same arguments, same defaults, same bf16 iteration as torch.optim.Muon; the difference is
    bf16 rounding (tokenforge normalises in fp32 before one rounding, torch in bf16)."""
    ours, theirs = _params(SHAPES[:3]), _params(SHAPES[:3])
    _run(Muon(ours, lr=0.02, adjust_lr_fn=adjust, backend=backend), ours)
    _run(torch.optim.Muon(theirs, lr=0.02, adjust_lr_fn=adjust), theirs)
    for a, b, p0 in zip(ours, theirs, _params(SHAPES[:3])):
        assert rel_error(a.detach() - p0.detach(), (b - p0).detach()) < 4e-2


def test_defaults_are_torch_optim_muon_defaults():
    import inspect

    ours = inspect.signature(Muon.__init__).parameters
    theirs = inspect.signature(torch.optim.Muon.__init__).parameters
    for name, p in theirs.items():
        if name in ("self", "params"):
            continue
        assert name in ours, name
        assert ours[name].default == p.default, name


def test_grads_are_left_alone():
    params = _params()
    opt = Muon(params, lr=0.02, backend="torch")
    grads = _grads(params, 0)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_same_shapes_share_one_newton_schulz_call(monkeypatch):
    from tokenforge.optim import muon as muon_mod

    calls = []
    real = muon_mod.newton_schulz
    monkeypatch.setattr(muon_mod, "newton_schulz", lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k))
    params = _params()
    _run(Muon(params, lr=0.02, backend="torch"), params, steps=1)
    assert sorted(calls) == sorted([(2, 24, 40), (1, 40, 24), (1, 7, 5)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_groups_step_exactly_as_tokenforge_adamw(backend):
    mats, vecs = _params(SHAPES[:2]), _params([(13,), (5, 3)], seed=1)
    ref = _params([(13,), (5, 3)], seed=1)
    opt = Muon([{"params": mats}, {"params": vecs, "use_muon": False, "weight_decay": 0.05}], lr=0.02,
               adamw_lr=3e-3, adamw_betas=(0.9, 0.99), backend=backend)
    adam = AdamW(ref, lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, backend=backend)
    for step in range(3):
        for p, g in zip(mats + vecs, _grads(mats + vecs, step)):
            p.grad = g
        for p, g in zip(ref, _grads(mats + vecs, step)[2:]):
            p.grad = g
        opt.step()
        adam.step()
    assert all(torch.equal(a, b) for a, b in zip(vecs, ref))


def test_low_precision_params_keep_fp32_master_and_momentum():
    params = _params(SHAPES[:2], dtype=torch.bfloat16)
    opt = Muon(params, lr=0.02, ns_dtype=torch.float32, backend="torch")
    _run(opt, params)
    for p in params:
        st = opt.state[p]
        assert st["momentum_buffer"].dtype == torch.float32 and st["master_param"].dtype == torch.float32
        assert torch.equal(p.detach(), st["master_param"].to(torch.bfloat16))
    want = _muon_float64(_params(SHAPES[:2], dtype=torch.bfloat16), 3, 0.02, 0.1, 0.95, True, None)
    for st, w in zip((opt.state[p] for p in params), want):
        # the master follows the float64 formula started from the bf16 weights (fp32-accurate)
        assert rel_error(st["master_param"], w) < 1e-5


def test_max_grad_norm_clips_every_group():
    mats, vecs = _params(SHAPES[:2]), _params([(13,)], seed=1)
    opt = Muon([{"params": mats}, {"params": vecs, "use_muon": False}], lr=0.02, max_grad_norm=0.5, backend="torch")
    _run(opt, mats + vecs, steps=1)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in _grads(mats + vecs, 0)]))
    assert torch.allclose(opt.last_grad_norm, norm)


def test_converges_on_a_least_squares_problem():
    """min_W ||W X - Y||^2 with a known W*: Muon with a decaying lr reaches it."""
    g = torch.Generator().manual_seed(5)
    w_star = torch.randn(16, 32, generator=g)
    x = torch.randn(32, 256, generator=g)
    y = w_star @ x
    w = torch.nn.Parameter(torch.zeros(16, 32))
    opt = Muon([w], lr=0.5, weight_decay=0.0, backend="torch", ns_dtype=torch.float32)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 300)
    first = None
    for _ in range(300):
        loss = ((w @ x - y) ** 2).mean()
        first = first or float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    final = float(((w.detach() @ x - y) ** 2).mean())
    assert final < 1e-3 * first, (first, final)


# ---------------------------------------------------------------------------------------------
# Which parameters Muon takes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_param_rule_on_the_reference_transformer(tie):
    model = Transformer(TransformerConfig.preset("tiny", tie_embeddings=tie))
    groups = muon_param_groups(model)
    muon = {id(p) for g in groups if g["use_muon"] for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in muon} == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    adam = [p for g in groups if not g["use_muon"] for p in g["params"]]
    assert any(p is model.tok_embeddings.weight for p in adam) and any(p is model.output.weight for p in adam)
    flat = next(g for g in groups if g.get("weight_decay") == 0.0)
    assert all(p.dim() == 1 for p in flat["params"])
    # every trainable param exactly once
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})


def test_conv_weights_go_to_adamw_unless_asked():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    groups = muon_param_groups(model)
    assert not any(p.dim() == 4 for g in groups if g["use_muon"] for p in g["params"])
    opt = Muon(model, conv_to_muon=True, lr=0.02, backend="torch")
    conv = model[0].weight
    assert any(p is conv for g in opt.param_groups if g["use_muon"] for p in g["params"])
    loss = model(torch.randn(2, 3, 6, 6)).square().mean()
    loss.backward()
    before = conv.detach().clone()
    opt.step()
    assert not torch.equal(before, conv.detach())


def test_module_argument_applies_the_rule():
    model = Transformer(TransformerConfig.preset("tiny"))
    opt = Muon(model, lr=1e-3, adjust_lr_fn="match_rms_adamw", backend="torch")
    assert [g["use_muon"] for g in opt.param_groups] == [True, False, False]
    x = torch.randint(0, 256, (2, 16))
    model(x, x).backward()
    opt.step()


# ---------------------------------------------------------------------------------------------
# state_dict and resume
# ---------------------------------------------------------------------------------------------


def test_state_dict_round_trip_and_exact_resume(tmp_path):
    def make():
        ps = _params() + _params([(9,)], seed=3)
        return ps, Muon([{"params": ps[:4]}, {"params": ps[4:], "use_muon": False}], lr=0.02, backend="torch")

    straight, opt = make()
    _run(opt, straight, steps=4)

    first, opt1 = make()
    for step in range(2):
        for p, g in zip(first, _grads(first, step)):
            p.grad = g
        opt1.step()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    second, opt2 = make()
    with torch.no_grad():
        for p, s in zip(second, saved["params"]):
            p.copy_(s)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state_dict()["param_groups"] == opt1.state_dict()["param_groups"]
    for step in range(2, 4):
        for p, g in zip(second, _grads(second, step)):
            p.grad = g
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(straight, second))


# ---------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp_shards_match_one_process(tmp_path, backend):
    out = tmp_path / "muon.pt"
    run_worker("muon_shard_worker.py", backend, str(out))
    result = torch.load(out)
    assert all(result["moved"]), result
    assert all(result["equal"]), result


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params,kw,match", [
    (lambda: [torch.nn.Parameter(torch.randn(5))], {}, "2-D matrices.*use_muon=False"),
    (lambda: [torch.nn.Parameter(torch.randn(2, 3, 3, 3))], {}, "matrix_view='flatten'"),
    (lambda: _params(), {"lr": -1.0}, "learning rate"),
    (lambda: _params(), {"lr": float("nan")}, "learning rate"),
    (lambda: _params(), {"momentum": 1.0}, "momentum"),
    (lambda: _params(), {"ns_steps": 0}, "ns_steps"),
    (lambda: _params(), {"ns_steps": 2.5}, "ns_steps"),
    (lambda: _params(), {"adjust_lr_fn": "moonlight"}, "adjust_lr_fn"),
    (lambda: _params(), {"weight_decay": -0.1}, "weight_decay"),
    (lambda: _params(), {"eps": 0.0}, "eps"),
    (lambda: _params(), {"ns_coefficients": (1.0, 2.0)}, "three floats"),
    (lambda: _params(), {"ns_dtype": torch.float16}, "ns_dtype"),
    (lambda: [{"params": _params([(4,)]), "use_muon": False}], {"adamw_betas": (0.9, 1.5)}, "beta"),
])
def test_bad_input_is_refused_clearly(params, kw, match):
    with pytest.raises(ValueError, match=match):
        Muon(params(), **kw)


# ---------------------------------------------------------------------------------------------
# QK-clip
# ---------------------------------------------------------------------------------------------


def test_max_logits_matches_the_scores():
    torch.manual_seed(0)
    q, k = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8)
    scores = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(2, dim=2)) / math.sqrt(8)
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -math.inf)
    assert torch.allclose(max_logits(q, k), scores.amax(dim=(0, 2, 3)), atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_qk_clip_bounds_the_heads_that_passed_and_leaves_the_others(kv_heads):
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny", n_kv_heads=kv_heads))
    attn = model.layers[0].attention
    with torch.no_grad():  # blow up query head 1 of layer 0
        attn.wq.weight[attn.head_dim:2 * attn.head_dim] *= 200.0
    originals = [layer.attention.attention_fn for layer in model.layers]
    clip = QKClip(model, threshold=5.0)
    x = torch.randint(0, 256, (2, 24))

    def logits():
        seen = {}

        def spy(module, fn):
            def f(q, k, v):
                seen[module] = max_logits(q, k)
                return fn(q, k, v)
            return f

        fns = {}
        for m in clip.modules:
            fns[m] = m.attention_fn
            m.attention_fn = spy(m, m.attention_fn)
        with torch.no_grad():
            model(x, x)
        for m, fn in fns.items():
            m.attention_fn = fn
        return [seen[m] for m in clip.modules]

    before = logits()
    assert float(before[0][1]) > 5.0
    model(x, x).backward()
    assert clip.step() >= 1 and clip.last_max_logit > 5.0
    after = logits()
    assert float(after[0][1]) == pytest.approx(5.0, rel=1e-4)  # exactly at the threshold
    # layer 0 sees the same input: its other heads keep their logits (later layers see a changed
    # residual stream, so theirs move for that reason alone)
    for h in range(attn.n_heads):
        if float(before[0][h]) <= 5.0:
            assert float(after[0][h]) == pytest.approx(float(before[0][h]), rel=1e-4, abs=1e-6)
        else:
            assert float(after[0][h]) <= 5.0 * (1 + 1e-4)
    clip.remove()
    assert all(m.attention_fn is fn for m, fn in zip(clip.modules, originals))


def test_qk_clip_scales_the_optimizer_master_copy():
    model = Transformer(TransformerConfig.preset("tiny")).to(torch.bfloat16)
    opt = Muon(model, lr=1e-3, adjust_lr_fn="match_rms_adamw", backend="torch")
    attn = model.layers[0].attention
    with torch.no_grad():
        attn.wq.weight.mul_(300.0)
    clip = QKClip(model, threshold=5.0, optimizer=opt)
    x = torch.randint(0, 256, (2, 16))
    model(x, x).backward()
    opt.step()
    assert clip.step() > 0
    # scaled together: without the master's rescale the next step would undo the clip
    assert rel_error(attn.wq.weight.detach().float(), opt.state[attn.wq.weight]["master_param"]) < 1e-2


@pytest.mark.parametrize("kw,match", [({"threshold": 0.0}, "threshold"), ({"threshold": float("inf")}, "threshold"),
                                      ({"alpha": 1.5}, "alpha")])
def test_qk_clip_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        QKClip(Transformer(TransformerConfig.preset("tiny")), **kw)
    with pytest.raises(ValueError, match="no attention module"):
        QKClip(torch.nn.Linear(3, 3))


# ---------------------------------------------------------------------------------------------
# CUDA (bench/gpu_tests.txt): real sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_cuda_real_sizes():
    """The 125m preset's hidden shapes on the GPU: fp32 Newton-Schulz (IEEE dots) against the
    float64 formula, and the bf16 default against torch.optim.Muon."""
    shapes = [(768, 768)] * 3 + [(2048, 768), (768, 2048)]
    params = [torch.nn.Parameter(p.detach().cuda()) for p in _params(shapes)]

    def run(opt, ps):
        for step in range(2):
            for p, g in zip(ps, _grads(ps, step)):
                p.grad = g.cuda()
            opt.step()

    run(Muon(params, lr=0.02, ns_dtype=torch.float32, backend="triton"), params)
    want = _muon_float64(_params(shapes), 2, 0.02, 0.1, 0.95, True, None)
    for p, w, p0 in zip(params, want, _params(shapes)):
        assert rel_error((p.detach().cpu() - p0.detach()), w - p0.detach().double()) < 1e-4
    ours = [torch.nn.Parameter(p.detach().cuda()) for p in _params(shapes)]
    theirs = [torch.nn.Parameter(p.detach().cuda()) for p in _params(shapes)]
    run(Muon(ours, lr=0.02, backend="triton"), ours)
    run(torch.optim.Muon(theirs, lr=0.02), theirs)
    for a, b, p0 in zip(ours, theirs, _params(shapes)):
        assert rel_error(a.detach().cpu() - p0.detach(), (b.detach().cpu() - p0.detach())) < 4e-2
