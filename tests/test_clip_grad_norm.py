"""tokenforge.optim.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ (norms, clipped grads,
inf/NaN behaviour), and AdamW(max_grad_norm=...) against torch's clip + AdamW."""

import copy
import math

import pytest
import torch
from device_params import DEVICES

from tokenforge.optim import AdamW, clip_grad_norm_
from tokenforge.testing import rel_error

SIZES = [1, 7, 1000, 16385, 33]


def _params_with_grads(device, dtype=torch.float32, scale=1.0):
    ps = [torch.nn.Parameter(torch.randn(n, device=device, dtype=dtype)) for n in SIZES]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, r in zip(ps, ref):
        p.grad = torch.randn_like(p) * scale
        r.grad = p.grad.clone()
    return ps, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clips / does not clip
def test_matches_torch(device, backend, norm_type, max_norm):
    ours, ref = _params_with_grads(device)
    ours[2].grad = None  # params without grads are skipped
    ref[2].grad = None
    grads64 = [r.grad.double() for r in ref if r.grad is not None]
    norm64 = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads64]), norm_type)
    coef64 = min(1.0, max_norm / (float(norm64) + 1e-6))
    n_ours = clip_grad_norm_(ours, max_norm, norm_type, backend=backend)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    assert n_ours.shape == n_ref.shape == () and n_ours.dtype == n_ref.dtype and n_ours.device == n_ref.device
    # Against float64: a sum of 17k fp32 terms in some order (torch's own error is the same size).
    assert rel_error(n_ours, norm64) <= 1e-5
    assert rel_error(n_ref, norm64) <= 1e-5
    it = iter(grads64)
    for a, b in zip(ours, ref):
        if b.grad is None:
            assert a.grad is None
        else:
            assert rel_error(a.grad, next(it) * coef64) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_grads(device, dtype):
    """Against float64, in units of the dtype's rounding u (measured over 60 seeds: our norm 0.96u,
    ours 1.9u, torch 2.5u; torch's norm reached 1.16u in CI). Ours accumulates in fp32 and rounds
    the norm once (<= u); torch rounds each tensor's norm to the dtype before combining them and
    rounds again (<= 2u). Ours takes the coefficient from its norm in fp32 and rounds the product
    once (<= 2u in all); torch also rounds the coefficient to the dtype (<= 3u). Comparing the two
    to each other would add their errors."""
    ours, ref = _params_with_grads(device, dtype)
    grads64 = [p.grad.double() for p in ours]
    norm64 = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads64]))
    coef64 = min(1.0, 1.0 / (float(norm64) + 1e-6))
    n_ours = clip_grad_norm_(ours, 1.0)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert n_ours.dtype == n_ref.dtype == dtype
    u = 2.0 ** -(11 if dtype == torch.float16 else 8)
    assert rel_error(n_ours, norm64) <= 1.1 * u and rel_error(n_ref, norm64) <= 2.2 * u
    for a, b, g in zip(ours, ref, grads64):
        assert rel_error(a.grad, g * coef64) <= 2.2 * u
        assert rel_error(b.grad, g * coef64) <= 3.2 * u


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf * 0 and all-NaN maxima
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_nonfinite_norms(device, bad, norm_type):
    ours, ref = _params_with_grads(device)
    ours[3].grad[5] = bad
    ref[3].grad[5] = bad
    n_ours = clip_grad_norm_(ours, 1.0, norm_type)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
    assert (n_ours.isnan() and n_ref.isnan()) or (n_ours.isinf() and n_ref.isinf())
    for a, b in zip(ours, ref):  # scaled by a non-finite coefficient exactly as torch does
        assert torch.equal(a.grad.isnan(), b.grad.isnan())
        fin = b.grad.isfinite()
        assert torch.equal(a.grad[fin], b.grad[fin])
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True)


def test_no_grads_and_single_tensor():
    p = torch.nn.Parameter(torch.randn(5))
    assert float(clip_grad_norm_([p], 1.0)) == 0.0
    p.grad = torch.full((5,), 10.0)
    norm = clip_grad_norm_(p, 1.0)  # a lone tensor is accepted, as in torch
    assert math.isclose(float(norm), 10 * math.sqrt(5), rel_tol=1e-6)
    assert math.isclose(float(p.grad.norm()), 1.0, rel_tol=1e-5)


def test_sparse_grad_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        clip_grad_norm_(emb.parameters(), 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_adamw_max_grad_norm_matches_clip_then_step(device, max_norm):
    """Clipping inside the step equals torch's clip_grad_norm_ + AdamW, and leaves .grad alone."""
    ps = [torch.nn.Parameter(torch.randn(n, device=device)) for n in SIZES]
    ref = copy.deepcopy(ps)
    opt = AdamW([dict(params=ps[:2]), dict(params=ps[2:], lr=3e-3)], lr=1e-2, max_grad_norm=max_norm)
    ref_opt = torch.optim.AdamW([dict(params=ref[:2]), dict(params=ref[2:], lr=3e-3)], lr=1e-2)
    for step in range(5):
        for p, r in zip(ps, ref):
            g = torch.randn_like(p) * 3
            p.grad, r.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        opt.step()
        ref_opt.step()
        assert rel_error(opt.last_grad_norm, norm) <= 1e-6
        for p, r in zip(ps, ref):
            assert rel_error(p, r) <= 1e-6, f"step {step}"
        if max_norm < 1:
            assert not torch.equal(ps[3].grad, ref[3].grad)  # ours did not touch .grad
