"""MoE routing, permutation and the MoE layer (tokenforge.ops.moe_routing, tokenforge.nn.MoE):
routing against a brute-force per-token selection (softmax / sigmoid, selection bias, group-limited),
permutation round trips with gradients, the layer's output and every gradient against a per-token,
per-expert float64 loop (the Triton grouped GEMM in the interpreter, and the torch backend),
shared experts, the two balancing mechanisms, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from device_params import DEVICES

from tokenforge.nn import MoE
from tokenforge.ops import load_balancing_loss, moe_permute, moe_route, moe_unpermute
from tokenforge.testing import rel_error


def _brute_route(logits, k, score, bias, n_groups, topk_groups, normalize, scaling):
    scores = torch.softmax(logits.double(), -1) if score == "softmax" else torch.sigmoid(logits.double())
    out_w, out_e = [], []
    per = logits.shape[1] // n_groups
    for t in range(logits.shape[0]):
        sel = scores[t] + (bias.double() if bias is not None else 0)
        allowed = list(range(logits.shape[1]))
        if n_groups > 1:
            gs = [sorted(sel[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(n_groups)]
            best = sorted(range(n_groups), key=lambda g: -sum(gs[g]))[:topk_groups]
            allowed = [i for i in allowed if i // per in best]
        chosen = sorted(allowed, key=lambda i: -float(sel[i]))[:k]
        w = scores[t, chosen]
        if normalize:
            w = w / w.sum()
        out_w.append(w * scaling)
        out_e.append(chosen)
    return torch.stack(out_w), torch.tensor(out_e)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_matches_brute_force(score, groups, with_bias):
    torch.manual_seed(0)
    logits = torch.randn(37, 16, dtype=torch.float64)
    bias = torch.randn(16) * 0.3 if with_bias else None
    w, e, scores = moe_route(logits, 3, score=score, bias=bias, n_groups=groups[0], topk_groups=groups[1],
                             normalize=score == "sigmoid", scaling=2.5 if score == "sigmoid" else 1.0)
    ref_w, ref_e = _brute_route(logits, 3, score, bias, groups[0], groups[1], score == "sigmoid",
                                2.5 if score == "sigmoid" else 1.0)
    assert torch.equal(torch.sort(e, 1).values, torch.sort(ref_e, 1).values)
    order, ref_order = torch.argsort(e, 1), torch.argsort(ref_e, 1)
    assert torch.allclose(w.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-12, atol=0)
    if with_bias:  # the bias steers selection only: weights are the unbiased scores of the chosen
        raw = scores.gather(1, e)
        expect = raw / raw.sum(-1, keepdim=True) * 2.5 if score == "sigmoid" else raw
        assert torch.allclose(w, expect, rtol=1e-12, atol=0)


def test_permute_round_trip_and_gradients():
    """The torch backend (the Triton kernels: tests/test_moe_permute.py)."""
    torch.manual_seed(0)
    x = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    experts = torch.randint(0, 5, (23, 3))
    xs, offs, order, counts = moe_permute(x, experts, 5, backend="torch")
    assert torch.equal(counts, torch.bincount(experts.reshape(-1), minlength=5))
    assert offs.dtype == torch.int32 and int(offs[-1]) == 69
    flat = experts.reshape(-1)[order]
    assert bool((flat[1:] >= flat[:-1]).all()), "rows are not in expert order"
    weights = torch.rand(23, 3, dtype=torch.float64, requires_grad=True)
    y = moe_unpermute(xs * 2.0, order, weights, backend="torch")
    assert torch.allclose(y, 2.0 * x * weights.sum(1, keepdim=True))
    assert torch.autograd.gradcheck(lambda a, w: moe_unpermute(moe_permute(a, experts, 5, backend="torch")[0] ** 2, order, w,
                                                               backend="torch"),
                                    (x, weights))


def _loop_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer in float64, token by token and expert by expert, with the layer's routing."""
    h = x.reshape(-1, layer.dim).double()
    logits = h @ layer.router.weight.double().t()
    bias = layer.expert_bias if layer.bias_update_rate > 0 else None
    w, e, _ = moe_route(logits, layer.top_k, bias=bias, **layer.route_kw)
    hid = layer.hidden_dim
    rows = []
    for t in range(h.shape[0]):
        acc = torch.zeros(layer.dim, dtype=torch.float64)
        for j in range(layer.top_k):
            ex = int(e[t, j])
            gu = h[t] @ layer.w_gate_up[ex].double()
            acc = acc + w[t, j] * ((F.silu(gu[:hid]) * gu[hid:]) @ layer.w_down[ex].double())
        rows.append(acc)
    y = torch.stack(rows)
    if layer.shared_experts is not None:
        s = layer.shared_experts
        y = y + (F.silu(h @ s.gate_proj.weight.double().t()) * (h @ s.up_proj.weight.double().t())) @ s.down_proj.weight.double().t()
    return y.view(x.shape)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=DEVICES[0].marks), "torch"])
@pytest.mark.parametrize("shared", [0, 1])
def test_layer_matches_per_expert_float64_loop(backend, shared):
    """Output and the gradients of x, router, expert weights and shared experts, fp32 layer vs the
    float64 loop (the routing of the two agrees: logits differ by fp32 rounding only; a tie would
    show as one wrong row)."""
    torch.manual_seed(0)
    layer = MoE(24, 20, num_experts=6, top_k=2, num_shared_experts=shared, backend=backend)
    x = torch.randn(3, 11, 24, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref_layer = MoE(24, 20, num_experts=6, top_k=2, num_shared_experts=shared, backend="torch", dtype=torch.float64)
    ref_layer.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in layer.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    ref = _loop_moe(ref_layer, x64)
    ref.backward(grad.double())
    assert rel_error(y, ref) <= 1e-5
    assert rel_error(x.grad, x64.grad) <= 1e-5
    for (name, p), (_, p64) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        assert p.grad is not None, name
        assert rel_error(p.grad, p64.grad) <= 1e-5, name
        if p.dim() == 3:  # per expert: one expert's wrong gradient must fail
            for ex in range(p.shape[0]):
                assert rel_error(p.grad[ex], p64.grad[ex]) <= 1e-5, (name, ex)


def test_autocast_runs_the_experts_in_bf16():
    """Under autocast the expert GEMMs run in the autocast dtype (as nn.Linear would), fp32 masters
    get fp32 gradients; the result stays within bf16 rounding of the fp32 layer."""
    torch.manual_seed(0)
    layer = MoE(32, 24, num_experts=4, top_k=2, backend="torch")
    x = torch.randn(20, 32)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_error(y, ref) <= 2e-2
    y.float().sum().backward()
    assert layer.w_gate_up.grad.dtype == torch.float32 and layer.w_gate_up.grad.abs().sum() > 0


def test_float64_layer_is_the_loop():
    torch.manual_seed(1)
    layer = MoE(16, 12, num_experts=4, top_k=2, score="sigmoid", n_groups=2, topk_groups=1, routed_scaling=2.0,
                dtype=torch.float64, backend="torch")
    x = torch.randn(9, 16, dtype=torch.float64)
    assert torch.allclose(layer(x), _loop_moe(layer, x), rtol=1e-12, atol=1e-12)


def test_balancing():
    """A router skewed towards expert 0: the auxiliary loss is reported (> 1: imbalanced), the
    selection bias moves against the overloaded expert and, over 60 training forwards, spreads the
    load (the weights stay the unbiased scores: checked in test_route_matches_brute_force)."""
    torch.manual_seed(0)
    layer = MoE(8, 8, num_experts=4, top_k=1, aux_loss_coef=0.01, bias_update_rate=0.02, backend="torch")
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3)
        layer.router.weight[0] += 0.4
    x = torch.randn(256, 8).abs()
    layer.train()
    layer(x)
    first = layer.last_expert_counts.clone()
    assert int(first.sum()) == 256 and int(first.argmax()) == 0
    assert layer.aux_loss is not None and float(layer.aux_loss.detach()) > 0.01
    assert layer.expert_bias[0] < 0 and bool((layer.expert_bias[1:] > 0).all()), layer.expert_bias
    worst = []
    for _ in range(60):
        layer(x)
        worst.append(int(layer.last_expert_counts.max()))
    assert sum(worst[-10:]) / 10 < 0.6 * int(first.max()), (first, worst[-10:])
    uniform = torch.full((10, 4), 0.25)
    assert abs(float(load_balancing_loss(uniform, torch.tensor([5, 5, 5, 5]))) - 1.0) < 1e-6


@pytest.mark.parametrize("kwargs, words", [
    (dict(top_k=0), ["top_k"]),
    (dict(top_k=9), ["top_k"]),
    (dict(n_groups=3), ["n_groups"]),
    (dict(n_groups=4, topk_groups=5), ["topk_groups"]),
    (dict(n_groups=4, topk_groups=1, top_k=3), ["top_k", "groups"]),
    (dict(score="relu"), ["score"]),
    (dict(aux_loss_coef=-1.0), ["aux_loss_coef"]),
])
def test_bad_options_get_a_clear_error(kwargs, words):
    args = dict(dim=8, hidden_dim=8, num_experts=8, top_k=2)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        MoE(**args)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_wrong_input_width():
    with pytest.raises(ValueError, match="last dim"):
        MoE(8, 8, 4, 2)(torch.randn(3, 7))


# ---------------------------------------------------------------------------------------------
# MoE in the reference Transformer, presets, patch, train, cost
# ---------------------------------------------------------------------------------------------


def test_presets_are_sized_like_the_published_models():
    """Config-only presets: total and active parameters near the published figures (GQA stands in
    for multi-head latent attention, so attention is a few percent off)."""
    from tokenforge.models.transformer import TransformerConfig

    for name, total, active in (("deepseek-v3", 671e9, 37e9), ("kimi-k2", 1.04e12, 32e9)):
        cfg = TransformerConfig.preset(name)
        assert abs(cfg.num_params() / total - 1) < 0.02, (name, cfg.num_params())
        assert abs(cfg.num_params(active=True) / active - 1) < 0.06, (name, cfg.num_params(active=True))
        # FLOPs per token follow the active parameters, not the total.
        assert cfg.flops_per_token(4096) < 6 * 1.1 * active + 12 * cfg.n_layers * cfg.dim * 4096
    gpu = TransformerConfig.preset("moe-2b")
    assert 1e9 <= gpu.num_params() <= 3e9 and gpu.num_params(active=True) < gpu.num_params() / 2


def test_moe_transformer_counts_its_own_parameters_and_trains():
    from tokenforge.models.transformer import Transformer, TransformerConfig

    cfg = TransformerConfig.preset("moe-tiny")
    torch.manual_seed(0)
    model = Transformer(cfg)
    assert model.num_params() == cfg.num_params()
    assert isinstance(model.layers[0].feed_forward, torch.nn.Module) and not isinstance(model.layers[0].feed_forward, MoE)
    assert isinstance(model.layers[1].feed_forward, MoE) and model.layers[1].feed_forward.backend == "torch"
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    load = model.expert_load()
    assert load.shape == (1, cfg.n_experts) and int(load.sum()) == 2 * 16 * cfg.n_experts_per_token


def test_patch_switches_moe_to_the_grouped_kernels_same_loss_and_grads():
    """tokenforge.patch on the MoE reference model: MoE layers go to the grouped GEMM (Triton under
    the interpreter here), same loss and every grad within fp32 tolerance; unpatch restores."""
    import copy

    import tokenforge
    from tokenforge.models.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig.preset("moe-tiny")
    plain = Transformer(cfg)
    patched = copy.deepcopy(plain)
    report = tokenforge.patch(patched, attention=False, rope=False, rms_norm=False, swiglu=False,
                              cross_entropy=False)
    assert any(line.startswith("moe: 1 MoE layers") for line in report.patched), report.patched
    assert patched.layers[1].feed_forward.backend is None
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    a, b = plain(idx, idx), patched(idx, idx)
    a.backward()
    b.backward()
    assert abs(float(a.detach()) - float(b.detach())) < 1e-5
    for (name, p), (_, q) in zip(plain.named_parameters(), patched.named_parameters()):
        assert rel_error(q.grad, p.grad) <= 1e-4, name
    tokenforge.unpatch(patched)
    assert patched.layers[1].feed_forward.backend == "torch"
    assert patched.state_dict().keys() == plain.state_dict().keys()


def test_train_refuses_config_only_presets_and_runs_moe_tiny(tmp_path, capsys):
    from tokenforge import train

    assert train.main(["--preset", "kimi-k2", "--max-steps", "1"]) != 0
    err = capsys.readouterr().err
    assert "config-only" in err and "\n" == err[-1] and err.count("\n") == 1
    out = tmp_path / "run"
    assert train.main(["--preset", "moe-tiny", "--seq-len", "32", "--batch-size", "4", "--max-data-bytes", "400000",
                       "--eval-iters", "1", "--progress", "none", "--kernels", "off", "--max-steps", "3",
                       "--out", str(out)]) == 0
    import json

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "expert_load" in r]
    assert steps and len(steps[-1]["expert_load"]) == 1 and len(steps[-1]["expert_load"][0]) == 8
    assert steps[-1]["expert_load_max_over_mean"] >= 1.0


@pytest.mark.parametrize("backend,nproc", [("torch", 2), ("torch", 4), ("triton", 2)])
def test_expert_parallel_matches_one_process(tmp_path, backend, nproc):
    """Experts sharded over 2 / 4 gloo ranks (tokens exchanged with all-to-all) compute what one
    process computes with every expert on all ranks' tokens: outputs, input and router gradients,
    each rank's slice of the expert gradients; the selection bias stays equal on every rank."""
    from torchrun import run_worker

    out = tmp_path / "ep.json"
    run_worker("moe_ep_worker.py", backend, str(out), nproc=nproc, timeout=240)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == nproc
    tol = 1e-12 if backend == "torch" else 1e-5
    for rank, errors in enumerate(per_rank):
        assert errors["local_shape"][0] == 8 // nproc and errors["bias_equal"], (rank, errors)
        for name in ("out", "dx", "router", "shared", "w_gate_up", "w_down"):
            assert errors[name] <= tol, (rank, name, errors)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # interpreter e5m2 casts
def test_train_fp8_puts_the_moe_experts_in_fp8(capsys):
    """tokenforge train --preset moe-tiny --fp8: the Linear layers and the MoE layer's expert GEMMs
    run in fp8 (the note says both) and the loss stays finite."""
    from tokenforge import train

    assert train.main(["--preset", "moe-tiny", "--seq-len", "32", "--batch-size", "2", "--max-data-bytes", "400000",
                       "--eval-every", "0", "--eval-iters", "1", "--progress", "none", "--max-steps", "1", "--fp8",
                       "--fp8-recipe", "rowwise"]) == 0
    text = capsys.readouterr().out
    assert "1 MoE layers' experts -> grouped fp8 GEMMs" in text, text
    assert "final loss nan" not in text
