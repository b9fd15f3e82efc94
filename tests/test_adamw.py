"""tokenforge.optim.AdamW: every backend against torch.optim.AdamW, step by step, for every option;
state_dict round trips both ways; master weights; bf16 stochastic rounding; bad input."""

import copy
import math
import os

import pytest
import torch
from device_params import DEVICES, HAS_CUDA, kernel_backends

from tokenforge import backends
from tokenforge.backends import BackendUnavailableError
from tokenforge.optim import AdamW
from tokenforge.optim.adamw import stochastic_round_bf16_reference
from tokenforge.optim.multi_tensor import SparseGradientError
from tokenforge.testing import rel_error

# fp32 per-step tolerance of the issue. Both sides compute the same fp32 formulas; they differ by
# torch's fused-multiply-add choices and the fp32 rounding of the bias corrections, ~1e-7.
FP32_TOL = 1e-6
SMALL_SIZES = [1, 7, 1000, 16385, 33]  # 16385: two chunks at the interpreter's block, 1-element tail
AWKWARD_SIZES = [1, 7, 1000, 65537] + [3, 17, 127, 129, 255, 2049, 5, 64]


def _require(backend, device):
    """Skip (saying why) when ``backend`` cannot run AdamW on ``device`` here, e.g. a tokenforge._C
    built before csrc/adamw.cu existed."""
    reason = backends.why_not("adamw", backend, torch.empty(1, device=device))
    if reason is not None:
        pytest.skip(f"{backend} unavailable: {reason}")


def _params(sizes, device, dtype=torch.float32):
    shapes = [(n,) if i % 2 == 0 or n < 4 else (n // 4, 4) if n % 4 == 0 else (n,) for i, n in enumerate(sizes)]
    return [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in shapes]


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _set_grads(*param_lists, scale=1.0):
    for ps in zip(*param_lists):
        g = torch.randn_like(ps[0]) * scale
        for p in ps:
            p.grad = g.clone()


def _compare(ours_opt, ref_opt, ours, ref, tol, what):
    """Params tensor by tensor; moments over all tensors together. A moment element is a running
    sum that can pass near 0 (m of a 1-element tensor after cancelling grads), where one fp32
    rounding of its terms -- torch's CPU lerp/addcmul may fuse multiply-adds, the kernel may not --
    is a large *relative* error of that tensor; over the whole state the relative error is the
    well-conditioned ~1e-7."""
    states = {}
    for i, (a, b) in enumerate(zip(ours, ref)):
        # The same holds for the params of a tiny tensor that training moves through 0 (lr 1e-2 x
        # 50 steps moves a param by up to 0.5): relative to the params' O(1) start scale.
        diff = (a.detach().double() - b.detach().double()).norm().item()
        err = diff / max(b.detach().double().norm().item(), 0.1 * math.sqrt(b.numel()))
        assert err <= tol, f"{what}: param {i} ({a.numel()} elements) relative error {err:.2e} > {tol:.0e}"
        sa, sb = ours_opt.state[a], ref_opt.state[b]
        if not sb:
            assert not sa
            continue
        assert float(sa["step"]) == float(sb["step"])
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if k in sb:
                states.setdefault(k, ([], []))
                states[k][0].append(sa[k].reshape(-1))
                states[k][1].append(sb[k].reshape(-1))
    for k, (xs, ys) in states.items():
        err = rel_error(torch.cat(xs), torch.cat(ys))
        assert err <= tol, f"{what}: {k} relative error {err:.2e} > {tol:.0e}"


OPTIONS = {
    "default": dict(lr=1e-2),
    "amsgrad": dict(lr=1e-2, amsgrad=True),
    "maximize": dict(lr=1e-2, maximize=True, weight_decay=0.1),
    "no_weight_decay": dict(lr=3e-2, weight_decay=0.0, betas=(0.8, 0.99), eps=1e-6),
    "betas_zero": dict(lr=1e-3, betas=(0.0, 0.0), weight_decay=0.5),
}


def _run(device, backend, sizes, kwargs, steps, ours_kwargs=None, groups=None, grad_scale=1.0):
    ref = _params(sizes, device)
    ours = _clone(ref)
    if groups is None:
        ref_opt = torch.optim.AdamW(ref, **kwargs)
        ours_opt = AdamW(ours, **kwargs, **(ours_kwargs or {}), backend=backend)
    else:
        ref_opt = torch.optim.AdamW([dict(params=ref[a:b], **g) for (a, b), g in groups], **kwargs)
        ours_opt = AdamW([dict(params=ours[a:b], **g) for (a, b), g in groups], **kwargs, **(ours_kwargs or {}),
                         backend=backend)
    for step in range(steps):
        _set_grads(ours, ref, scale=grad_scale)
        ref_opt.step()
        ours_opt.step()
        _compare(ours_opt, ref_opt, ours, ref, FP32_TOL, f"step {step}")
    return ours_opt, ref_opt, ours, ref


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log2(beta=0) = -inf, as intended
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_torch_adamw_every_step(device, backend, option):
    if backend == "torch" and option not in ("default", "amsgrad"):
        pytest.skip("the torch reference loop is covered by default/amsgrad; the kernels by every option")
    if backend == "cuda" and device != "cuda":
        pytest.skip("the CUDA C++ kernel runs on CUDA tensors only")
    _require(backend, device)
    _run(device, backend, SMALL_SIZES, OPTIONS[option], steps=50)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_awkward_sizes_many_tensors_50_steps(device, backend):
    if backend == "cuda" and device != "cuda":
        pytest.skip("the CUDA C++ kernel runs on CUDA tensors only")
    _require(backend, device)
    opt, _, _, _ = _run(device, backend, AWKWARD_SIZES, dict(lr=1e-2, weight_decay=0.1), steps=50)
    # One pointer-table build for the whole run: grads are fresh tensors each step, so this holds
    # only because the allocator recycles addresses; on CPU it may rebuild, but never per tensor.
    assert len(opt._caches) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_with_different_options(device):
    groups = [((0, 2), dict(lr=1e-2, amsgrad=True)), ((2, 4), dict(lr=3e-3, betas=(0.5, 0.9), weight_decay=0.0)),
              ((4, 5), dict(maximize=True, eps=1e-4))]
    opt, _, _, _ = _run(device, "triton", SMALL_SIZES, dict(lr=1e-3), steps=20, groups=groups)
    assert len(opt.param_groups) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_lr_and_scheduler(device):
    """A tensor lr (on the device) equals the same float lr; an LR scheduler drives both alike."""
    ref = _params(SMALL_SIZES, device)
    ours = _clone(ref)
    ours_t = _clone(ref)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    ours_opt = AdamW(ours, lr=1e-2, backend="triton")
    tensor_opt = AdamW(ours_t, lr=torch.tensor(1e-2, device=device), backend="triton")
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (ref_opt, ours_opt, tensor_opt)]
    for step in range(10):
        _set_grads(ref, ours, ours_t)
        for o in (ref_opt, ours_opt, tensor_opt):
            o.step()
        for s in scheds:
            s.step()
        _compare(ours_opt, ref_opt, ours, ref, FP32_TOL, f"float lr, step {step}")
        _compare(tensor_opt, ref_opt, ours_t, ref, FP32_TOL, f"tensor lr, step {step}")
    assert isinstance(tensor_opt.param_groups[0]["lr"], torch.Tensor)
    assert math.isclose(float(tensor_opt.param_groups[0]["lr"]), 1e-2 * 0.5 ** 3, rel_tol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_none_params_are_skipped(device):
    ref = _params(SMALL_SIZES, device)
    ours = _clone(ref)
    ref_opt, ours_opt = torch.optim.AdamW(ref, lr=1e-2), AdamW(ours, lr=1e-2, backend="triton")
    for step in range(4):
        _set_grads(ours[1:], ref[1:])
        if step % 2:
            ours[3].grad = ref[3].grad = None
        ours_opt.step()
        ref_opt.step()
        _compare(ours_opt, ref_opt, ours, ref, FP32_TOL, f"step {step}")
    assert len(ours_opt.state[ours[0]]) == 0
    assert float(ours_opt.state[ours[3]]["step"]) == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trip_mid_training(device, direction, amsgrad):
    ref = _params(SMALL_SIZES, device)
    ours = _clone(ref)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, amsgrad=amsgrad)
    ours_opt = AdamW(ours, lr=1e-2, amsgrad=amsgrad, backend="triton")
    first, second = (torch_opt, ours_opt) if direction == "torch_to_ours" else (ours_opt, torch_opt)
    first_params = ref if first is torch_opt else ours
    for _ in range(5):
        _set_grads(first_params)
        first.step()
    # Continue from the same point: copy params, load the other optimizer's state (as torch.load would).
    for a, b in zip(ours if first is torch_opt else ref, first_params):
        a.data.copy_(b.data)
    saved = copy.deepcopy(first.state_dict())
    second.load_state_dict(saved)
    assert sorted(second.state_dict()["state"][0]) == sorted(saved["state"][0])
    for step in range(5):
        _set_grads(ours, ref)
        ours_opt.step()
        torch_opt.step()
        _compare(ours_opt, torch_opt, ours, ref, FP32_TOL, f"after loading, step {step}")
    # And our state_dict reloads into ourselves unchanged.
    again = AdamW(_clone(ours), lr=1e-2, amsgrad=amsgrad, backend="triton")
    again.load_state_dict(copy.deepcopy(ours_opt.state_dict()))
    for a, b in zip(again.state.values(), ours_opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and a["step"].device == b["step"].device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_low_precision_params_keep_fp32_master(device, dtype, backend):
    """fp16/bf16 params: the fp32 master follows torch's fp32 AdamW (fed the same grads) to fp32
    accuracy, and the param is the master rounded to nearest."""
    low = _params(SMALL_SIZES, device, dtype)
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]
    ref_opt, ours_opt = torch.optim.AdamW(ref, lr=1e-2), AdamW(low, lr=1e-2, backend=backend)
    for step in range(10):
        for p, r in zip(low, ref):
            g = torch.randn_like(p)
            p.grad, r.grad = g, g.float()
        ours_opt.step()
        ref_opt.step()
        for i, (p, r) in enumerate(zip(low, ref)):
            st = ours_opt.state[p]
            assert st["master_param"].dtype == torch.float32 and st["exp_avg"].dtype == torch.float32
            assert rel_error(st["master_param"], r) <= FP32_TOL, f"step {step} param {i}"
            assert torch.equal(p.detach(), st["master_param"].to(dtype))
    # The state_dict keeps the fp32 master through a round trip into a fresh optimizer...
    clone = _clone(low)
    again = AdamW(clone, lr=1e-2, backend=backend)
    again.load_state_dict(copy.deepcopy(ours_opt.state_dict()))
    assert all(torch.equal(again.state[c]["master_param"], ours_opt.state[p]["master_param"]) for c, p in zip(clone, low))
    # ... and loads into torch.optim.AdamW, which casts the moments to the param dtype.
    torch_low = torch.optim.AdamW(_clone(low), lr=1e-2)
    torch_low.load_state_dict(copy.deepcopy(ours_opt.state_dict()))
    assert next(iter(torch_low.state.values()))["exp_avg"].dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_in_one_group(device):
    ps = _params([100, 37], device) + _params([64, 5], device, torch.bfloat16) + _params([9], device, torch.float64)
    ref = [torch.nn.Parameter(p.detach().double()) for p in ps]
    ours_opt, ref_opt = AdamW(ps, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2)
    for _ in range(3):
        for p, r in zip(ps, ref):
            g = torch.randn_like(p)
            p.grad, r.grad = g, g.double()
        ours_opt.step()
        ref_opt.step()
    for p, r in zip(ps, ref):
        master = ours_opt.state[p].get("master_param", p)
        assert rel_error(master, r) <= FP32_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_pointer_tables_are_cached(device):
    ps = _params(SMALL_SIZES, device)
    opt = AdamW(ps, lr=1e-2, backend="triton")
    grads = [torch.randn_like(p) for p in ps]
    for _ in range(3):
        for p, g in zip(ps, grads):
            p.grad = g  # same grad tensors: same pointers
        opt.step()
    (cache,) = opt._caches.values()
    assert cache.rebuilds == 1
    ps[0].grad = ps[0].grad.clone()
    opt.step()
    assert cache.rebuilds == 2


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1e-3), "learning rate"),
    (dict(lr=torch.tensor(-1.0)), "learning rate"),
    (dict(eps=-1e-8), "epsilon"),
    (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(sr_state_dtype=torch.float16), "sr_state_dtype"),
])
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_bad_hyper_parameters_in_a_group():
    with pytest.raises(ValueError, match="beta parameter"):
        AdamW([dict(params=[torch.nn.Parameter(torch.randn(3))], betas=(0.9, 1.5))])


def test_sparse_grad_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = AdamW(emb.parameters())
    with pytest.raises(SparseGradientError, match="sparse gradients"):
        opt.step()
    with pytest.raises(RuntimeError):  # what torch.optim.AdamW raises, for code that catches that
        opt.step()


def test_complex_params_are_refused():
    with pytest.raises(TypeError, match="complex"):
        AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


def test_mixed_devices_in_one_group_are_refused():
    with pytest.raises(ValueError, match="several devices"):
        AdamW([torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))])


def test_cuda_backend_refuses_cleanly_without_a_gpu():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        AdamW([p], backend="cuda").step()
    from tokenforge import cuda as cuda_ext

    if HAS_CUDA or not cuda_ext.is_available() or not hasattr(cuda_ext.get_extension(), "adamw_fp32_step"):
        return
    with pytest.raises(RuntimeError, match="no CUDA device"):  # the raw entry point, never a crash
        cuda_ext.get_extension().adamw_fp32_step(8, 8, 8, 8, 0, 1, 1, 2048, False, False, True, 0)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_cuda_backend_rejects_low_precision():
    p = torch.nn.Parameter(torch.randn(3, device="cuda", dtype=torch.bfloat16))
    p.grad = torch.randn_like(p)
    with pytest.raises(BackendUnavailableError):
        AdamW([p], backend="cuda").step()


# ---------------------------------------------------------------------------------------------
# bf16 with stochastic rounding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32])
def test_stochastic_rounding_kernel_matches_reference(device, state_dtype):
    """The kernel and the torch reference share the counter-based hash: the same bf16 params up to
    rare one-ulp flips."""
    ps = _params([1, 7, 1000, 2053], device, torch.bfloat16)
    qs = _clone(ps)
    kw = dict(lr=1e-2, bf16_stochastic_rounding=True, sr_state_dtype=state_dtype, seed=1234)
    a, b = AdamW(ps, backend="triton", **kw), AdamW(qs, backend="torch", **kw)
    for _ in range(3):
        _set_grads(ps, qs)
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        assert "master_param" not in a.state[p]
        assert a.state[p]["exp_avg"].dtype == state_dtype
        # Same hash, same random bits; the fp32 values being rounded may differ in their last bit
        # (kernel vs torch operation order), which flips the rounding only when the random
        # threshold falls between them: ~2^-16 per element-step. Such an element is one bf16 ulp off.
        differ = p != q
        assert differ.float().mean() <= 1e-3
        if differ.any():
            ulp = (p.float() - p.float().nextafter(torch.zeros_like(p.float())).to(torch.bfloat16).float()).abs()
            assert ((p.float() - q.float()).abs()[differ] <= 2 * ulp[differ] + 1e-30).all()
        assert rel_error(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"]) <= 1e-2 if state_dtype == torch.bfloat16 \
            else rel_error(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"]) <= 1e-6


def test_stochastic_rounding_is_unbiased():
    """Mean of many stochastically rounded values equals the fp32 value within its standard error."""
    n, reps = 4096, 64
    x = torch.randn(n) * 3
    draws = torch.stack([stochastic_round_bf16_reference(x, seed=7, step=s, key=3).float() for s in range(reps)])
    # The two bf16 neighbours of x: truncation toward zero, and one bf16 ulp further out.
    bits = x.view(torch.int32)
    trunc = (bits & ~0xFFFF).view(torch.float32)
    ulp = ((trunc.abs().view(torch.int32) + 0x10000).view(torch.float32) - trunc.abs())
    # Each draw is one of the two neighbours, so its std is at most ulp/2: the mean of reps draws
    # has error std <= ulp / (2 sqrt(reps)); normalised errors z average to 0 over n elements.
    z = (draws.mean(0) - x) / (ulp / 2 / math.sqrt(reps))
    assert z.mean().abs() < 5 / math.sqrt(n), "stochastic rounding is biased"
    assert (z.abs() < 6).float().mean() > 0.999
    # Every draw is one of the two neighbours.
    assert ((draws == trunc) | (draws == trunc + torch.sign(x) * ulp)).all()
    # Round-to-nearest would be biased for a value at 1/4 of an ulp.
    base = torch.tensor([1.0]) + 2.0 ** -7 / 4  # bf16 ulp at 1 is 2^-7
    mean = torch.stack([stochastic_round_bf16_reference(base.expand(4096).contiguous(), 1, s, 0).float()
                        for s in range(4)]).mean()
    assert abs(mean.item() - base.item()) < 2 ** -7 * 4 / math.sqrt(4 * 4096)


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_kernel_is_unbiased(device):
    """Through the kernel: tiny updates that round-to-nearest would drop entirely still move the
    bf16 params by their fp32 amount on average."""
    n = 4096
    p = torch.nn.Parameter(torch.ones(n, device=device, dtype=torch.bfloat16))
    opt = AdamW([p], lr=1e-4, weight_decay=0.0, bf16_stochastic_rounding=True, sr_state_dtype=torch.float32,
                backend="triton")
    steps = 20
    for _ in range(steps):
        p.grad = torch.ones_like(p)  # Adam's normalised update is then exactly lr per step
        opt.step()
    expected = 1.0 - steps * 1e-4  # round-to-nearest would leave every element at 1.0
    mean = p.float().mean().item()
    # Each element's error is a sum of steps rounding errors of std <= ulp/2 (ulp 2^-8 below 1).
    bound = 5 * (2 ** -8 / 2) * math.sqrt(steps) / math.sqrt(n)
    assert abs(mean - expected) < bound, (mean, expected, bound)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_tiny_model_bf16_stochastic_rounding_tracks_fp32(device):
    torch.manual_seed(0)
    x = torch.randn(256, 16, device=device)
    y = torch.sin(x @ torch.randn(16, 1, device=device))

    def make(dtype):
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device, dtype)

    def train(model, opt, dtype):
        losses = []
        for _ in range(40):
            loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    m32, mbf = make(torch.float32), make(torch.bfloat16)
    l32 = train(m32, torch.optim.AdamW(m32.parameters(), lr=2e-2), torch.float32)
    lbf = train(mbf, AdamW(mbf.parameters(), lr=2e-2, bf16_stochastic_rounding=True), torch.bfloat16)
    assert lbf[-1] < 0.5 * lbf[0], "bf16 + SR did not train"
    # bf16 activations alone perturb the loss by ~1%; the final losses agree to 10% of the start.
    assert abs(lbf[-1] - l32[-1]) < 0.1 * l32[0], (l32[-1], lbf[-1])


# ---------------------------------------------------------------------------------------------
# Real sizes on the GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_real_sizes(backend):
    _require(backend, "cuda")
    sizes = [4096 * 4096, 4096, 11008 * 4096 // 4, 1, 32000 * 512 + 3]
    _run("cuda", backend, sizes, dict(lr=1e-3, weight_decay=0.1, amsgrad=True), steps=5)


# ---------------------------------------------------------------------------------------------
# FSDP2-style DTensor params: the kernels update each rank's local shard
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def one_rank_mesh():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh

    created = False
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        created = True
    yield init_device_mesh("cpu", (1,))
    if created:
        dist.destroy_process_group()


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_dtensor_params_sharded_like_fsdp2(one_rank_mesh, max_grad_norm):
    from torch.distributed.tensor import Shard, distribute_tensor

    plain = _params([1, 7, 1000, 16385 - 1], "cpu")
    sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), one_rank_mesh, [Shard(0)])) for p in plain]
    ref_opt = torch.optim.AdamW(plain, lr=1e-2)
    opt = AdamW(sharded, lr=1e-2, backend="triton", max_grad_norm=max_grad_norm)
    for step in range(3):
        for p, s in zip(plain, sharded):
            g = torch.randn_like(p)
            p.grad = g.clone()
            s.grad = distribute_tensor(g.clone(), one_rank_mesh, [Shard(0)])
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(plain, max_grad_norm)
        ref_opt.step()
        opt.step()
        for p, s in zip(plain, sharded):
            assert rel_error(s.full_tensor(), p) <= FP32_TOL, f"step {step}"
    assert opt._caches, "the DTensor params did not go through the multi-tensor kernel"
    st = opt.state[sharded[2]]
    assert type(st["exp_avg"]).__name__ == "DTensor"  # states shard like their params (checkpointable)


# ---------------------------------------------------------------------------------------------
# 8-bit block-wise quantized states
# ---------------------------------------------------------------------------------------------

Q8_SIZES = [1, 7, 1000, 16385, 300]


def _movement_error(ps, refs, starts):
    """||p - p_ref|| / ||p_ref - p_start||: the error relative to how far training moved the params."""
    num = sum(float((p.detach().float() - r.detach()).double().pow(2).sum()) for p, r in zip(ps, refs))
    den = sum(float((r.detach() - s).double().pow(2).sum()) for r, s in zip(refs, starts))
    return (num / den) ** 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_8bit_states_track_fp32_adamw_for_100_steps(device):
    """Stated tolerance: after 100 steps the 8-bit optimizer's params are within 3% of the distance
    fp32 AdamW moved them (measured ~1%: the companded codes keep ~1-2% relative precision per
    moment element, and the update is a ratio of the two)."""
    ref = _params(Q8_SIZES, device)
    starts = [p.detach().clone() for p in ref]
    ours = _clone(ref)
    opt, ref_opt = AdamW(ours, lr=1e-3, state_bits=8, backend="triton"), torch.optim.AdamW(ref, lr=1e-3)
    for _ in range(100):
        for p, r in zip(ours, ref):
            g = torch.randn_like(p) + 0.5
            p.grad, r.grad = g, g.clone()
        opt.step()
        ref_opt.step()
    assert _movement_error(ours, ref, starts) <= 0.03
    st = opt.state[ours[3]]
    assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_sq"].dtype == torch.uint8
    state_bytes = sum(t.numel() * t.element_size() for k, t in st.items() if k != "step")
    assert state_bytes / ours[3].numel() <= 2.1  # vs 8 for fp32 moments


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_kernel_matches_reference_and_round_trips(device, dtype):
    ps = _params(Q8_SIZES, device, dtype)
    a = AdamW(ps, lr=1e-2, state_bits=8, backend="triton", max_grad_norm=10.0)
    for _ in range(4):
        _set_grads(ps)
        a.step()
    # From identical states (a state_dict round trip), one more step of the kernel and of the
    # torch reference, with the same Philox draws: the dequantized moments are identical, so the
    # params agree to fp32 rounding; a sqrt(v) code may differ by one where the rounding
    # probability lands within fp32 rounding of its draw (log2 / exp2 differ in the last bit), and
    # then the m / sqrt(v) code of that element follows the other sqrt(v); where the sqrt(v) codes
    # agree the m codes differ at most by one (a .5 tie).
    qs = _clone(ps)
    b = AdamW(qs, lr=1e-2, state_bits=8, backend="torch", max_grad_norm=10.0)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.state[qs[3]]["exp_avg"].dtype == torch.int8 and b.state[qs[3]]["block_max"].dtype == torch.float32
    befores = [a.state[p].get("master_param", p).detach().clone() for p in ps]
    _set_grads(ps, qs)
    a.step()
    b.step()
    # Params: fp32 rounding of p - lr * update is relative to |p| + the size of the update's terms,
    # not to the new |p|. Where the step nearly cancels the param (a 1-element tensor near 0, seed
    # 3061717419 in CI) a few ulps of the step were 1.1e-6 of the result; where m cancels
    # (beta1 * m + (1 - beta1) * g, both over sqrt(v_hat), terms up to ~10 * lr at step 5 with
    # independently dequantized moments) ulps of its terms were 8e-7 of |p| + lr (31 seeds). So
    # each element is bounded by FP32_TOL * (|p_before| + 10 * lr) (measured <= 1.2e-7 of that),
    # and all tensors together norm-wise as well; a wrong element is off by O(lr), ~1e5 times more.
    news = [[o.state[t].get("master_param", t).detach() for t in ts] for o, ts in ((a, ps), (b, qs))]
    for pa, pb, before in zip(*news, befores):
        scale = before.double().abs() + 10 * 1e-2
        worst = ((pa.double() - pb.double()).abs() / scale.clamp_min(1e-30)).max().item()
        assert worst <= FP32_TOL, f"param of {pa.numel()} elements: {worst:.3g}"
    assert rel_error(*(torch.cat([t.reshape(-1) for t in side]) for side in news)) <= FP32_TOL
    # The rates of differing codes are over all tensors together: in the 300-element tensor a
    # single .5 tie is already a rate of 3.3e-3 (seed 38 in CI), yet that is one code in 17693.
    r_diffs, u_diffs = [], []
    for p, q in zip(ps, qs):
        sa, sb = a.state[p], b.state[q]
        r_diff = (sa["exp_avg_sq"].int() - sb["exp_avg_sq"].int()).abs()
        assert r_diff.max() <= 1, "exp_avg_sq"
        u_diff = (sa["exp_avg"].int() - sb["exp_avg"].int()).abs()
        assert u_diff[r_diff == 0].max() <= 1, "exp_avg"
        r_diffs.append(r_diff.reshape(-1))
        u_diffs.append(u_diff.reshape(-1))
    assert torch.cat(r_diffs).float().mean() <= 1e-3, "exp_avg_sq"
    assert (torch.cat(u_diffs) > 0).float().mean() <= 2e-3, "exp_avg"
    # The block maxima over all tensors together (see _compare: a 1-element block's m can cancel).
    scales = [torch.cat([o.state[t]["block_max"].reshape(-1) for t in ts]) for o, ts in ((a, ps), (b, qs))]
    assert rel_error(*scales) <= FP32_TOL
    # A fresh triton optimizer loaded from the state_dict continues bit for bit.
    clone = _clone(ps)
    again = AdamW(clone, lr=1e-2, state_bits=8, backend="triton", max_grad_norm=10.0)
    again.load_state_dict(copy.deepcopy(a.state_dict()))
    _set_grads(ps, clone)
    a.step()
    again.step()
    for p, c in zip(ps, clone):
        assert torch.equal(p, c)


@pytest.mark.parametrize("device", DEVICES)
def test_8bit_keeps_small_moments_alive_in_mixed_blocks(device):
    """Every quant block mixes gradients of scale 1 and 1e-6 (interleaved at random). Stated bounds
    after 200 steps against fp32 torch.optim.AdamW on the same gradients, per block and per class:
    m within 5% (measured <= 2.6%; the old sqrt companding stored 0 for every small element: 100%),
    no small v stored as 0, mean v ratio within 7% (unbiased stochastic codes: measured <= 3%),
    per-block mean log v ratio within [-0.35, 0.15] for small elements (log-tail codes, 36% apart in
    v: measured [-0.21, 0.01]) and +-0.08 for large ones, params within 7% / 35% of fp32's
    displacement (measured 3.5% / 20%)."""
    from tokenforge.optim.adamw import dequantize_moments

    torch.manual_seed(0)
    nb = 16
    n = 256 * nb
    scale = torch.where(torch.arange(n) % 2 == 0, 1.0, 1e-6)[torch.randperm(n)].to(device)
    mean = (torch.randn(n) * 0.3).to(device)
    p8 = torch.nn.Parameter(torch.zeros(n, device=device))
    p32 = torch.nn.Parameter(torch.zeros(n, device=device))
    opt8 = AdamW([p8], lr=1e-3, weight_decay=0.0, state_bits=8, backend="triton")
    opt32 = torch.optim.AdamW([p32], lr=1e-3, weight_decay=0.0)
    for _ in range(200):
        g = scale * (mean + torch.randn(n, device=device))
        p8.grad, p32.grad = g, g.clone()
        opt8.step()
        opt32.step()
    m8, v8 = dequantize_moments(opt8.state[p8])
    m32, v32 = opt32.state[p32]["exp_avg"], opt32.state[p32]["exp_avg_sq"]
    for cls, sel, log_v_band, p_bound in (("large", scale == 1, (-0.08, 0.08), 0.07),
                                          ("small", scale != 1, (-0.35, 0.15), 0.35)):
        per_block = lambda x: (x * sel).view(nb, 256)  # noqa: E731
        m_err = per_block(m8 - m32).norm(dim=1) / per_block(m32).norm(dim=1)
        assert m_err.max() <= 0.05, (cls, m_err)
        assert not bool((v8[sel] == 0).any()), f"{cls}: second moments stored as 0"
        assert abs(float((v8[sel] / v32[sel]).mean()) - 1) <= 0.07, cls
        log_v = per_block(torch.log(v8 / v32)).sum(1) / sel.view(nb, 256).sum(1)
        assert log_v_band[0] <= log_v.min() and log_v.max() <= log_v_band[1], (cls, log_v)
        p_err = per_block((p8 - p32).detach()).norm(dim=1) / per_block(p32.detach()).norm(dim=1)
        assert p_err.max() <= p_bound, (cls, p_err)


def _mixed_scale_regression():
    """An MLP fitting tanh(x . w) on inputs whose features span 1e-3..10 (so first-layer gradients
    mix magnitudes inside a quant block)."""
    g = torch.Generator().manual_seed(0)
    d, rows = 64, 2048
    feature_scale = 10.0 ** torch.linspace(-3, 1, d)
    x = torch.randn(rows, d, generator=g) * feature_scale
    w = torch.randn(d, 1, generator=g) / feature_scale[:, None] / d ** 0.5
    return x, torch.tanh(x @ w) + 0.1 * torch.randn(rows, 1, generator=g)


def _regression_losses(x, y, make_optimizer, steps=500):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                              torch.nn.GELU(), torch.nn.Linear(128, 1))
    opt = make_optimizer(net.parameters())
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = ((net(x[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            losses.append(float(((net(x) - y) ** 2).mean()))
    return torch.tensor(losses)


@pytest.mark.parametrize("lr, band", [(1e-3, 0.05), (3e-3, 0.10)])
def test_8bit_loss_curve_stays_in_band_of_fp32_adamw_for_500_steps(lr, band):
    """Stated band: at every one of 500 steps |log(loss_8bit / loss_fp32)| <= 0.05 at lr 1e-3 and
    <= 0.10 at lr 3e-3, mean <= 0.02 (measured over 3 seeds: max 0.022 / 0.057, mean <= 0.01; the
    old companded codes: 0.055 / 0.133). Runs the torch reference of the 8-bit step (the
    interpreter needs ~150 s for 500 steps); test_8bit_kernel_matches_reference_and_round_trips and
    the mixed-block test above hold the kernel to it."""
    x, y = _mixed_scale_regression()
    ref = _regression_losses(x, y, lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01))
    ours = _regression_losses(x, y, lambda ps: AdamW(ps, lr=lr, weight_decay=0.01, state_bits=8, backend="torch"))
    assert ref[-1] < 0.25 * ref[0], "the problem did not train: the band would mean nothing"
    gap = (ours / ref).log().abs()
    assert gap.max() <= band and gap.mean() <= 0.02, f"max {gap.max():.3f} at step {int(gap.argmax())}, mean {gap.mean():.4f}"


def test_8bit_code_rounding_is_unbiased_in_v():
    """The sqrt(v) codes round up with probability (v - v_lo) / (v_hi - v_lo): over 4096 draws the
    mean stored v of values between codes (top, knee and log-tail codes) is within 4 sigma of v."""
    from tokenforge.optim.adamw import dequantize_moments, quantize_moments_

    torch.manual_seed(0)
    v = torch.tensor([1.0, 0.3, 0.0127, 3.1e-9, 4e-13, 2e-14]).repeat(43)[:256]
    v[0] = 1.0  # the block maximum: stored exactly
    draws = 4096
    total = torch.zeros(256, dtype=torch.float64)
    lo, hi = torch.full((256,), float("inf")), torch.zeros(256)
    state = {"exp_avg": torch.zeros(256, dtype=torch.int8), "exp_avg_sq": torch.zeros(256, dtype=torch.uint8),
             "block_max": torch.zeros(2, 1)}
    for _ in range(draws):
        quantize_moments_(state, torch.zeros(256), v, uniform=torch.rand(256))
        vq = dequantize_moments(state)[1]
        total += vq.double()
        lo, hi = torch.minimum(lo, vq), torch.maximum(hi, vq)
    mean = total / draws
    # Bernoulli between the two neighbouring codes: sd <= (hi - lo) / 2 / sqrt(draws).
    sigma = (hi - lo).double() / 2 / draws ** 0.5
    assert torch.all((mean - v.double()).abs() <= 4 * sigma + 1e-7 * v.double()), (mean / v.double())
    assert float(mean[0]) == 1.0
    assert torch.all(hi > 0), "a live v was stored as 0 on every draw"


def test_8bit_refuses_the_old_state_format():
    p = torch.nn.Parameter(torch.randn(300))
    opt = AdamW([p], state_bits=8, backend="torch")
    opt.state[p].update(step=torch.tensor(3.0), exp_avg=torch.zeros(300, dtype=torch.int8),
                        exp_avg_sq=torch.zeros(300, dtype=torch.uint8), qscale=torch.ones(2, 2))
    p.grad = torch.randn(300)
    with pytest.raises(ValueError, match="older tokenforge"):
        opt.step()


def test_8bit_bad_options():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="state_bits"):
        AdamW(p, state_bits=4)
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW(p, state_bits=8, amsgrad=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stochastic_rounding_is_shard_invariant(tmp_path, backend):
    """bf16 + stochastic rounding: params stepped as DTensor Shard(0) shards on 2 gloo ranks end
    bit-identical to the same params stepped whole (the rounding bits are keyed by each element's
    index in the full parameter, not by its index in the local shard)."""
    from torchrun import run_worker

    out = tmp_path / "sr.pt"
    run_worker("sr_shard_worker.py", backend, str(out))
    results = torch.load(out)
    assert results == {"AdamW": [True] * 4, "Lion": [True] * 4}, results


def test_stochastic_rounding_offset_is_the_global_index():
    """The reference draws by global index: rounding a tensor whole equals rounding its pieces
    with their offsets, and pieces rounded as if they started at 0 do not (bits would repeat)."""
    x = torch.randn(1000) * 5
    whole = stochastic_round_bf16_reference(x, seed=3, step=2, key=1)
    pieces = torch.cat([stochastic_round_bf16_reference(x[:300], 3, 2, 1, offset=0),
                        stochastic_round_bf16_reference(x[300:], 3, 2, 1, offset=300)])
    assert torch.equal(whole, pieces)
    local = torch.cat([stochastic_round_bf16_reference(x[:500], 3, 2, 1), stochastic_round_bf16_reference(x[500:], 3, 2, 1)])
    assert not torch.equal(whole, local)
    # 64-bit indices: offsets past 2**32 give bits of their own, not those of index mod 2**32
    far = stochastic_round_bf16_reference(x, 3, 2, 1, offset=2**32)
    assert not torch.equal(far, whole)


# ---------------------------------------------------------------------------------------------
# CUDA graph capture of the step: tensor lr on the device, refused clearly otherwise.
# ---------------------------------------------------------------------------------------------


def test_capture_with_float_lr_is_refused(monkeypatch):
    from tokenforge.optim import multi_tensor
    from tokenforge.optim.multi_tensor import CaptureError

    ps = _params([10, 33], "cpu")
    opt = AdamW(ps, lr=1e-3, backend="torch")
    _set_grads(ps)
    opt.step()  # warm-up outside capture
    monkeypatch.setattr(multi_tensor, "_capturing", lambda: True)
    import tokenforge.optim.adamw as adamw_mod

    monkeypatch.setattr(adamw_mod, "_capturing", lambda: True)
    with pytest.raises(CaptureError, match="lr as a CUDA tensor"):
        opt.step()
    fresh = AdamW(_params([4], "cpu"), lr=torch.tensor(1e-3), backend="torch")
    fresh.param_groups[0]["params"][0].grad = torch.ones(4)
    with pytest.raises(CaptureError, match="lr as a CUDA tensor|one step before capturing"):
        fresh.step()


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_and_replay_follow_the_lr_schedule(backend):
    """Capture one step with a device lr, replay it with a changing lr and fresh grads: the same
    params as eager steps with the same schedule."""
    sizes = [1000, 4096, 3, 70000]
    ps = _params(sizes, "cuda")
    qs = _clone(ps)
    lr_t = torch.tensor(1e-3, device="cuda")
    graphed = AdamW(ps, lr=lr_t, weight_decay=0.01, backend=backend)
    eager = AdamW(qs, lr=1e-3, weight_decay=0.01, backend=backend)
    grads = [torch.randn_like(p) for p in ps]
    for p, q, g in zip(ps, qs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    graphed.step()
    eager.step()  # warm-up step outside capture (creates the states and tables)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph):
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    # capture ran nothing; undo nothing. Replay with a schedule:
    for i, lr in enumerate([5e-4, 2e-4, 1e-4]):
        new = [torch.randn_like(p) for p in ps]
        for p, q, g in zip(ps, qs, new):
            p.grad.copy_(g)
            q.grad = g.clone()
        lr_t.fill_(lr)
        graph.replay()
        eager.param_groups[0]["lr"] = lr
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(ps, qs):
        assert rel_error(p, q) < 1e-6
