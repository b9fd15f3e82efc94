"""Cross-entropy: the Triton kernel (loss and dlogits in one forward) against F.cross_entropy on
float64 logits, every reduction and option, awkward shapes, poisoned outputs, bad inputs, the
compile gate."""

import math
import re

import pytest
from compile_gate import GATE_ARCHS
import torch
import torch.nn.functional as F
from device_params import DEVICES, HAS_CUDA, kernel_backends

import tokenforge.nn.cross_entropy as tf_nn
from tokenforge import backends, kernels
from tokenforge.ops.cross_entropy import cross_entropy, cross_entropy_reference
from tokenforge.testing import ROW_SLACK, TOLERANCE, PoisonEmpty, rel_error, row_errors

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]


def oracle(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=0.0):
    """F.cross_entropy on float64 logits, z-loss and softcap written out here (independent of
    tokenforge's reference). All-ignored 'mean' is 0 (tokenforge's documented choice)."""
    x = logits.double().reshape(-1, logits.shape[-1])
    t = target.reshape(-1)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    loss = F.cross_entropy(x, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = t != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(x, -1) ** 2 * valid
    if reduction == "none":
        return loss.reshape(target.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum().clamp(min=1)


def make_target(shape, V, device, ignore_frac=0.2, ignore_index=-100):
    t = torch.randint(0, V, shape, device=device)
    t[torch.rand(shape, device=device) < ignore_frac] = ignore_index
    return t


def loss_tolerance(loss: torch.Tensor) -> float:
    """fp32 math (1e-5), plus half an ulp where the loss is rounded to fp16/bf16 (torch's dtype rule)."""
    return 1e-5 if loss.dtype in (torch.float32, torch.float64) else torch.finfo(loss.dtype).eps / 2 + 1e-5


def check(logits, target, backend, reduction="mean", grad_output=None, **opts):
    """Loss and dlogits of ``backend`` against the float64 oracle (the loss in the logits' dtype,
    torch's rule outside autocast: fp32 math rounded once)."""
    x = logits.detach().requires_grad_()
    out = cross_entropy(x, target, reduction=reduction, backend=backend, **opts)
    assert out.dtype == logits.dtype and out.shape == (target.shape if reduction == "none" else ())
    xd = logits.detach().double().requires_grad_()
    ref = oracle(xd, target, reduction=reduction, **opts)
    g = torch.randn_like(ref) if grad_output is None else grad_output
    out.backward(g.to(out.dtype))
    ref.backward(g.double())
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    # The loss is fp32 math from logits that are exact in float64, rounded once to the logits'
    # dtype (torch's rounding: half an ulp). The gradient is stored in the logits' dtype, so its
    # tolerance is that dtype's.
    loss_err, grad_err = rel_error(out, ref), rel_error(x.grad, xd.grad)
    tol = TOLERANCE[logits.dtype]
    if logits.dtype == torch.bfloat16 and kernels.INTERPRETED:
        # Triton's interpreter converts fp32 -> bf16 by truncation (twice the error of the GPU's
        # round-to-nearest-even, and biased; measured), and the gradient is stored twice: by the
        # forward and again when backward rescales it by grad_output.
        tol *= 2
    where = f"{backend} {tuple(logits.shape)} {logits.dtype} {reduction} {opts}"
    # A loss is lse - x_target: when the target dominates, it is a small difference of terms of
    # size |x| + log V, and fp32 can only be exact relative to those terms (seen: one token, vocab
    # 7, 1.8e-5 relative to a tiny loss). So the error may also be measured against them.
    term = logits.detach().double().abs().amax().item() + math.log(logits.shape[-1])
    count = int((target != opts.get("ignore_index", -100)).sum()) if reduction == "sum" else 1
    abs_err = (out.detach().double() - ref.detach()).abs().max().item()
    loss_tol = loss_tolerance(out)
    assert loss_err <= loss_tol or abs_err <= loss_tol * term * max(count, 1), f"loss: {loss_err:.2e} ({where})"
    # Likewise a gradient row softmax(x) - onehot(t) is a small difference when the target dominates
    # (p_t near 1): fp32 is exact relative to its terms (at most 1) times the row's upstream scale,
    # not relative to the tiny result (seen: one token, vocab 7, 1.6e-5). Any other row still fails.
    if grad_err > tol:
        valid = (target != opts.get("ignore_index", -100)).reshape(-1, 1).double()
        upstream = g.detach().double().abs().reshape(-1, 1) if reduction == "none" else g.detach().double().abs()
        if reduction == "mean":
            upstream = upstream / valid.sum().clamp(min=1)
        bound = tol * upstream * valid * (1 + 2 * opts.get("z_loss", 0.0) * term) + 1e-30
        elem_err = (x.grad.double() - xd.grad).abs().reshape(-1, logits.shape[-1])
        assert bool((elem_err <= bound).all()), f"dlogits: {grad_err:.2e} > {tol:.0e} ({where})"
    return out, x.grad


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


# 129 tokens (one interpreted program each) only in bf16, the training dtype, to keep CPU time low.
GRID = [(d, n) for d in DTYPES for n in (1, 17)] + [(torch.bfloat16, 129)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tokens", GRID, ids=[f"{d}-{n}" for d, n in GRID])
@pytest.mark.parametrize("V", [7, 1000])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grid(device, dtype, tokens, V, reduction):
    for backend in kernel_backends(device):
        if backend == "cuda":
            continue  # cross-entropy has no CUDA C++ kernel
        logits = (torch.randn(tokens, V, device=device) * 3).to(dtype)
        check(logits, make_target((tokens,), V, device), backend, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_vocab(device, dtype):
    """32003 (not a multiple of the block) and 128256 classes: several vocab blocks per row."""
    for V, tokens in ((32003, 3), (128256, 2)):
        logits = (torch.randn(tokens, V, device=device) * 2).to(dtype)
        check(logits, torch.tensor([V - 1, 5, 0][:tokens], device=device), "triton", "mean")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", [dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(z_loss=0.5),
                                  dict(softcap=30.0), dict(softcap=2.0),
                                  dict(label_smoothing=0.2, z_loss=1e-2, softcap=10.0)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_options(device, dtype, opts, reduction):
    logits = (torch.randn(13, 1000, device=device) * 4).to(dtype)
    check(logits, make_target((13,), 1000, device), "triton", reduction, **opts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_other_ignore_index(device, reduction):
    logits = torch.randn(20, 50, device=device)
    target = make_target((20,), 50, device, ignore_frac=0.3, ignore_index=7)
    check(logits, target, "triton", reduction, ignore_index=7)
    # A class index used as ignore_index is never counted, whatever its logit.
    check(logits, torch.full((20,), 3, device=device), "triton", reduction, ignore_index=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(device, reduction):
    """Every target ignored: loss 0 and zero gradients (torch gives nan for 'mean')."""
    x = torch.randn(9, 40, device=device, requires_grad=True)
    target = torch.full((9,), -100, device=device)
    out = cross_entropy(x, target, reduction=reduction, backend="triton")
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(x.grad, torch.zeros_like(x))
    ref = cross_entropy(x, target, reduction=reduction, backend="torch")
    assert torch.equal(ref, torch.zeros_like(ref))


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_non_contiguous(device):
    # (B, T, V) logits, (B, T) target.
    check(torch.randn(2, 5, 300, device=device), make_target((2, 5), 300, device), "triton", "none")
    check(torch.randn(2, 5, 300, device=device), make_target((2, 5), 300, device), "triton", "mean")
    # Row-strided view (padded rows): read in place through the row stride.
    padded = torch.randn(17, 1200, device=device, dtype=torch.bfloat16)[:, :1000]
    assert not padded.is_contiguous()
    check(padded, make_target((17,), 1000, device), "triton", "sum")
    # Transposed: classes not contiguous, copied.
    check(torch.randn(64, 11, device=device).t(), make_target((11,), 64, device), "triton", "mean")
    # Non-contiguous target and an expanded (stride-0) upstream gradient for 'none'.
    target = make_target((30,), 64, device)[::3]
    check(torch.randn(10, 64, device=device), target, "triton", "none",
          grad_output=torch.randn(1, device=device).expand(10))
    # grad_output exactly 1 (loss.backward()): the backward's fast path that skips the rescale.
    check(torch.randn(10, 64, device=device), target, "triton", "mean", grad_output=torch.tensor(1.0, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e-3, 30.0])
def test_magnitudes(device, scale):
    """Peaked softmax (scale 30: log-probabilities near -100) and nearly uniform (1e-3)."""
    for dtype in DTYPES:
        logits = (torch.randn(16, 500, device=device) * scale).to(dtype)
        check(logits, make_target((16,), 500, device), "triton", "mean")


# ---------------------------------------------------------------------------------------------
# Class weights, return_z_loss, token accuracy (what Liger-Kernel's tests ask of a cross-entropy)
# ---------------------------------------------------------------------------------------------


def weighted_oracle(logits, target, weight, reduction, label_smoothing=0.0, z_loss=0.0, softcap=0.0,
                    ignore_index=-100):
    """(loss, z-loss, accuracy) in float64 from F.cross_entropy(weight=...) itself (torch's 'mean'
    over the weights of the targets); z-loss averaged over non-ignored tokens; accuracy of the
    logits' first argmax."""
    V = logits.shape[-1]
    x = logits.double().reshape(-1, V)
    t = target.reshape(-1)
    valid = t != ignore_index
    xs = softcap * torch.tanh(x / softcap) if softcap else x
    w = weight.double() if weight is not None else None
    ce = F.cross_entropy(xs, t, weight=w, ignore_index=ignore_index, reduction=reduction if reduction != "none"
                         else "none", label_smoothing=label_smoothing)
    z_rows = z_loss * torch.logsumexp(xs, -1) ** 2 * valid
    acc_rows = ((logits.reshape(-1, V).argmax(-1) == t) & valid).double()
    n = valid.sum().clamp(min=1)
    if reduction == "none":
        return (ce + z_rows).reshape(target.shape), z_rows.reshape(target.shape), acc_rows.reshape(target.shape)
    z = z_rows.sum() if reduction == "sum" else z_rows.sum() / n
    return ce + z, z, acc_rows.sum() / n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1), dict(label_smoothing=0.2, z_loss=1e-2, softcap=5.0)],
                         ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("V", [7, 1000, 5000])
def test_class_weights_z_loss_and_accuracy(device, dtype, opts, reduction, V):
    tokens = 19
    logits = (torch.randn(tokens, V, device=device) * 3).to(dtype)
    target = make_target((tokens,), V, device)
    # A few targets the argmax hits, so accuracy is neither 0 nor 1.
    hit = torch.arange(tokens, device=device) % 3 == 0
    target = torch.where(hit & (target != -100), logits.float().argmax(-1), target)
    weight = torch.rand(V, device=device) * 2 + 0.1
    for backend in ("triton", "torch"):
        x = logits.detach().requires_grad_()
        out = cross_entropy(x, target, weight, reduction=reduction, return_z_loss=True, return_token_accuracy=True,
                            backend=backend, **opts)
        xd = logits.detach().double().requires_grad_()
        ref_loss, ref_z, ref_acc = weighted_oracle(xd, target, weight, reduction, **opts)
        g = torch.randn_like(ref_loss)
        out.loss.backward(g.to(out.loss.dtype))
        ref_loss.backward(g)
        where = f"{backend} {dtype} V={V} {reduction} {opts}"
        tol = TOLERANCE[dtype] * (2 if dtype == torch.bfloat16 and kernels.INTERPRETED else 1)
        assert out.loss.dtype == out.z_loss.dtype == dtype and out.token_accuracy.dtype == torch.float32
        assert rel_error(out.loss, ref_loss) <= loss_tolerance(out.loss), where
        assert rel_error(x.grad, xd.grad) <= tol, where
        assert rel_error(out.z_loss, ref_z.detach()) <= loss_tolerance(out.loss) or not opts.get("z_loss"), where
        assert torch.allclose(out.token_accuracy.double(), ref_acc, rtol=0, atol=1e-7), where  # fp32 fraction
        assert not out.z_loss.requires_grad and not out.token_accuracy.requires_grad


def _logits_with_ties(rows: int, V: int, device) -> torch.Tensor:
    """(rows, V) logits whose argmax is awkward: row 0's maximum is in the last column, row 1's is
    tied in two columns a vocab block apart (the first must win), row 2 is tied everywhere
    (argmax 0), the other rows are random with their maximum anywhere."""
    x = torch.randn(rows, V, device=device) * 3
    x[0, -1] = 50.0
    x[1, 3], x[1, V - 2] = 40.0, 40.0
    x[2] = 1.5
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("V", [7, 5000])  # one block; several (the argmax carried across blocks)
def test_predicted_tokens(device, dtype, V):
    """return_predicted_tokens: int64 per token in target's shape, torch.argmax of the logits as given
    (first of ties, before the softcap), -1 where ignored (also with ignore_index=-1, where -1 is a
    token id no row may match), for every reduction, both backends, the fused linear form and the
    modules; token accuracy is the same as before (predicted == target over non-ignored tokens).
    Compared whole with torch.equal: one wrong row fails."""
    rows = 24
    logits = _logits_with_ties(rows, V, device).to(dtype)
    for ignore_index in (-100, -1):
        target = make_target((4, 6), V, device, ignore_index=ignore_index)
        target.view(-1)[:3] = torch.tensor([V - 1, 3, 0], device=device)  # the tie rows hit their argmax
        t = target.reshape(-1)
        want = torch.where(t != ignore_index, logits.float().argmax(-1), -1).view(4, 6)
        assert want[0, 0] == V - 1 and want[0, 1] == 3 and want[0, 2] == 0
        want_acc_rows = ((want.reshape(-1) == t) & (t != ignore_index)).double()
        for backend in ("triton", "torch"):
            for reduction in REDUCTIONS:
                x = logits.detach().reshape(4, 6, V).requires_grad_()
                out = cross_entropy(x, target, ignore_index=ignore_index, reduction=reduction, softcap=2.0,
                                    return_token_accuracy=True, return_predicted_tokens=True, backend=backend)
                where = f"{backend} {dtype} V={V} ignore_index={ignore_index} {reduction}"
                assert out.predicted_tokens.dtype == torch.int64 and not out.predicted_tokens.requires_grad, where
                assert torch.equal(out.predicted_tokens, want), where
                acc = want_acc_rows.view(4, 6) if reduction == "none" else want_acc_rows.sum() / (t != ignore_index).sum()
                assert torch.allclose(out.token_accuracy.double(), acc, rtol=0, atol=1e-7), where
                out.loss.sum().backward()  # the loss still carries its gradient
                assert x.grad is not None and bool(torch.isfinite(x.grad).all()), where
            only = cross_entropy(logits, t, ignore_index=ignore_index, return_predicted_tokens=True, backend=backend)
            assert only.z_loss is None and only.token_accuracy is None and torch.equal(only.predicted_tokens,
                                                                                      want.reshape(-1))
            module = tf_nn.CrossEntropyLoss(ignore_index=ignore_index, return_predicted_tokens=True, backend=backend)
            assert "return_predicted_tokens=True" in repr(module)
            assert torch.equal(module(logits, t).predicted_tokens, want.reshape(-1))
    with pytest.raises(TypeError, match="return_predicted_tokens must be True or False"):
        cross_entropy(logits, t, return_predicted_tokens=1)


def token_scaled_oracle(logits, target, weight, reduction, label_smoothing=0.0, z_loss=0.0, softcap=0.0,
                        ignore_index=-100):
    """Float64 cross-entropy with token scaling, from F.cross_entropy itself: each token's loss
    (z-loss included) times p_t = softmax(x)[t], detached; 'mean' as without scaling (the class
    part over the weights of the targets, the z-loss part over the count)."""
    V = logits.shape[-1]
    x = logits.double().reshape(-1, V)
    t = target.reshape(-1)
    valid = t != ignore_index
    xs = softcap * torch.tanh(x / softcap) if softcap else x
    lse = torch.logsumexp(xs, -1)
    p_t = (torch.exp(xs.gather(1, torch.where(valid, t, 0)[:, None])[:, 0] - lse) * valid).detach()
    w = weight.double() if weight is not None else None
    ce = F.cross_entropy(xs, t, weight=w, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing) * p_t
    z = z_loss * lse ** 2 * p_t
    if reduction == "none":
        return (ce + z).reshape(target.shape)
    if reduction == "sum":
        return ce.sum() + z.sum()
    w_valid = (w[torch.where(valid, t, 0)] * valid).sum() if w is not None else valid.sum()
    return ce.sum() / w_valid + z.sum() / valid.sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-2, softcap=6.0, weighted=True)],
                         ids=["plain", "smoothing-z-softcap-weights"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_token_scaling(device, dtype, opts, reduction):
    """token_scaling (Liger-Kernel's use_token_scaling): loss and logits gradient against the float64
    oracle (p_t held constant: a gradient through it would differ), per row as well as norm-wise,
    V over several vocab blocks, on both backends and through the module; it really scales (the
    unscaled loss differs)."""
    opts = dict(opts)
    weight = torch.rand(5000, device=device) + 0.5 if opts.pop("weighted", False) else None
    logits = (torch.randn(37, 5000, device=device) * 4).to(dtype)
    target = make_target((37,), 5000, device)
    hit = torch.arange(37, device=device) % 4 == 0  # confident rows: p_t near 1, the rest near 0
    target = torch.where(hit & (target != -100), logits.float().argmax(-1), target)
    xd = logits.detach().double().requires_grad_()
    ref = token_scaled_oracle(xd, target, weight, reduction, **opts)
    g = torch.randn_like(ref)
    ref.backward(g)
    tol = TOLERANCE[dtype] * (2 if dtype == torch.bfloat16 and kernels.INTERPRETED else 1)
    for backend in ("triton", "torch"):
        x = logits.detach().requires_grad_()
        loss = cross_entropy(x, target, weight, reduction=reduction, token_scaling=True, backend=backend, **opts)
        loss.backward(g.to(loss.dtype))
        where = f"{backend} {dtype} {reduction} {opts}"
        assert rel_error(loss, ref) <= loss_tolerance(loss), where
        assert rel_error(x.grad, xd.grad) <= tol, where
        assert max(row_errors(x.grad, xd.grad)) <= ROW_SLACK * tol, where
        plain = cross_entropy(logits, target, weight, reduction=reduction, backend=backend, **opts)
        assert rel_error(plain, ref) > 0.1, where
    module = tf_nn.CrossEntropyLoss(weight, reduction=reduction, token_scaling=True, backend="triton", **opts)
    assert "token_scaling=True" in repr(module)
    assert rel_error(module(logits, target), ref) <= loss_tolerance(loss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_dtype_is_torchs(device, reduction):
    """The loss has torch's dtype: the logits' (bf16 for bf16 logits, as F.cross_entropy and
    Liger-Kernel give, so allclose against either does not raise), fp32 for fp16/bf16 logits under
    autocast (where torch runs cross_entropy in fp32) and then fp32-exact; bf16 is that fp32 value
    rounded once. z-loss follows the loss; token accuracy is always fp32."""
    logits = (torch.randn(33, 500, device=device) * 3).to(torch.bfloat16)
    target = make_target((33,), 500, device)
    for backend in ("triton", "torch"):
        plain = cross_entropy(logits, target, reduction=reduction, backend=backend)
        eager = torch.nn.functional.cross_entropy(logits, target, reduction=reduction)
        assert plain.dtype == eager.dtype == torch.bfloat16
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            amp = cross_entropy(logits, target, reduction=reduction, backend=backend, return_z_loss=True,
                                return_token_accuracy=True)
            assert torch.nn.functional.cross_entropy(logits, target, reduction=reduction).dtype == torch.float32
        assert amp.loss.dtype == amp.z_loss.dtype == amp.token_accuracy.dtype == torch.float32
        assert torch.equal(plain, amp.loss.to(torch.bfloat16))
        ref = cross_entropy_reference(logits.double(), target, reduction=reduction)
        assert rel_error(amp.loss, ref) <= 1e-5
        for dtype in (torch.float32, torch.float16):
            assert cross_entropy(logits.to(dtype), target, reduction=reduction, backend=backend).dtype == dtype
    assert cross_entropy(logits.double(), target, reduction=reduction).dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_class_weights_one_wrong_row_fails_and_edge_cases(device):
    """Per-row bound: one class weight off changes one row's loss and gradient, and the per-row
    check sees it. All-ignored weighted 'mean' is 0 (not torch's nan); zero-weight classes give
    zero loss and gradient rows."""
    V = 300
    logits = torch.randn(40, V, device=device)
    target = make_target((40,), V, device, ignore_frac=0.0)
    weight = torch.rand(V, device=device) + 0.5
    out = cross_entropy(logits, target, weight, reduction="none", backend="triton")
    wrong = weight.clone()
    wrong[target[17]] *= 1.01  # one class's weight off by 1%: that row (and any with that target)
    ref = weighted_oracle(logits, target, wrong, "none")[0]
    assert rel_error(out, ref) > 1e-5
    assert rel_error(out, weighted_oracle(logits, target, weight, "none")[0]) <= 1e-5
    # Every target ignored: 0, and zero gradients.
    x = logits.detach().requires_grad_()
    out = cross_entropy(x, torch.full((40,), -100, device=device), weight, backend="triton")
    out.backward()
    assert out.item() == 0.0 and not x.grad.any()
    # Weight 0 on a row's target (no smoothing): that row contributes nothing.
    w0 = weight.clone()
    w0[target[3]] = 0.0
    x = logits.detach().requires_grad_()
    out = cross_entropy(x, target, w0, reduction="none", backend="triton")
    out.sum().backward()
    rows = target == target[3]
    assert (out[rows] == 0).all() and not x.grad[rows].any()


def test_module_and_refusals_for_the_new_options():
    V = 30
    x = torch.randn(12, V)
    t = make_target((12,), V, "cpu")
    w = torch.rand(V) + 0.5
    ours = tf_nn.CrossEntropyLoss(weight=w, label_smoothing=0.05, return_z_loss=True, z_loss=1e-3, backend="triton")
    loss, z, acc, predicted = ours(x, t)  # Liger-Kernel's fields, in its order
    assert acc is None and predicted is None and rel_error(loss, weighted_oracle(x, t, w, "mean", 0.05, 1e-3)[0]) < 1e-5
    assert "weight" in dict(ours.named_buffers()) and "return_z_loss=True" in repr(ours)
    theirs = torch.nn.CrossEntropyLoss(weight=w)
    assert rel_error(tf_nn.CrossEntropyLoss(weight=w)(x, t), theirs(x, t)) < 1e-5
    for bad, exc, match in ((torch.rand(V + 1), ValueError, r"shape \(30,\)"),
                            (torch.ones(V, dtype=torch.long), TypeError, "floating point"),
                            (torch.rand(V, requires_grad=True), ValueError, "detach"),
                            ([1.0] * V, TypeError, "torch.Tensor")):
        with pytest.raises(exc, match=match):
            cross_entropy(x, t, bad)
    with pytest.raises(TypeError, match="return_z_loss must be True or False"):
        cross_entropy(x, t, return_z_loss=1)


# ---------------------------------------------------------------------------------------------
# Launchers with NaN-poisoned allocations; out-of-range targets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,V", [(1, 1), (5, 17), (33, 1000), (2, 9000)])
@pytest.mark.parametrize("mean", [True, False])
def test_launcher_writes_every_output(device, rows, V, mean):
    from tokenforge.kernels import cross_entropy as launcher

    logits = torch.randn(rows, V, device=device, dtype=torch.bfloat16)
    target = make_target((rows,), V, device, ignore_frac=0.3)
    n_valid = (target != -100).sum().clamp(min=1).float()
    row_scale = torch.randn(rows, device=device)
    with PoisonEmpty():
        loss, dlogits = launcher.cross_entropy_forward(logits, target, n_valid=n_valid if mean else None,
                                                       row_scale=row_scale, label_smoothing=0.1)
    xd = logits.double().requires_grad_()
    ref = oracle(xd, target, reduction="none", label_smoothing=0.1)
    (ref * row_scale.double()).sum().div(n_valid.double() if mean else 1.0).backward()
    # With V == 1 the loss is exactly 0 (lse == x): measured against 1, not against 0.
    assert (loss.double() - ref).norm().item() <= 1e-5 * max(1.0, ref.norm().item())
    assert rel_error(dlogits, xd.grad) < TOLERANCE[torch.bfloat16] or xd.grad.norm() < 1e-6
    # The backward: in-place rescale by a scalar and by one value per row.
    g = torch.randn(rows, device=device)
    expected = dlogits.double() * g.double()[:, None]
    launcher.scale_rows_(dlogits, g)
    assert rel_error(dlogits, expected) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
def test_launcher_in_place_gradient(device):
    """dlogits=logits overwrites the logits with the gradient (what the fused linear CE uses)."""
    from tokenforge.kernels import cross_entropy as launcher

    logits = torch.randn(7, 300, device=device)
    target = make_target((7,), 300, device)
    xd = logits.double().requires_grad_()
    oracle(xd, target, reduction="sum").backward()
    _, d = launcher.cross_entropy_forward(logits, target, dlogits=logits)
    assert d is logits and rel_error(logits, xd.grad) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_target(device):
    logits = torch.randn(4, 10, device=device, requires_grad=True)
    for bad in (10, -1, 1000):
        target = torch.tensor([1, bad, 2, -100], device=device)
        for backend in ("triton", "torch"):
            with pytest.raises(ValueError, match=f"target value {bad} is out of range for 10 classes"):
                cross_entropy(logits, target, backend=backend, validate=True)
        if device == "cpu":  # validation is free on CPU, so it is the default there
            with pytest.raises(ValueError, match="out of range"):
                cross_entropy(logits, target, backend="triton")
        # Unvalidated, the kernel marks the bad token: NaN loss and NaN gradient row, never garbage.
        x = logits.detach().requires_grad_()
        out = cross_entropy(x, target, backend="triton", reduction="none", validate=False)
        out.sum().backward()
        assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()
        assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2, 3]]).all()


def test_second_backward_is_refused():
    """The saved gradient is rescaled in place, so autograd's version counter refuses a second
    backward through the same graph instead of returning a twice-scaled gradient."""
    x = torch.randn(3, 8, requires_grad=True)
    for first in (None, torch.tensor(3.0)):  # grad_output 1 takes a fast path without the rescale
        out = cross_entropy(x, torch.tensor([1, 2, 3]), backend="triton")
        out.backward(first, retain_graph=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward(torch.tensor(2.0))


def test_no_grad_and_detached_inputs():
    x = torch.randn(5, 20)
    t = make_target((5,), 20, "cpu")
    with torch.no_grad():
        out = cross_entropy(x, t, backend="triton")
    assert rel_error(out, oracle(x, t)) < 1e-5
    assert rel_error(cross_entropy(x, t, backend="triton", reduction="none"), oracle(x, t, reduction="none")) < 1e-5


# ---------------------------------------------------------------------------------------------
# Dispatch, refusals, module
# ---------------------------------------------------------------------------------------------


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    x = torch.randn(2, 8)
    assert backends.choose("cross_entropy", x) == ("triton" if kernels.INTERPRETED else "torch")
    x64 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, 2, -100])
    assert backends.choose("cross_entropy", x64) == "torch"
    out = cross_entropy(x64, t, label_smoothing=0.1, z_loss=1e-2, softcap=5.0)
    assert out.dtype == torch.float64
    assert torch.allclose(out, oracle(x64, t, label_smoothing=0.1, z_loss=1e-2, softcap=5.0), rtol=1e-12)
    x32 = torch.randn(6, 9)
    t32 = torch.tensor([0, 8, -100, 3, 3, 1])
    for red in REDUCTIONS:
        assert rel_error(cross_entropy_reference(x32, t32, reduction=red, z_loss=0.1, softcap=3.0),
                         oracle(x32, t32, reduction=red, z_loss=0.1, softcap=3.0)) < 1e-6
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        cross_entropy(x64, t, backend="triton")
    with pytest.raises(backends.BackendUnavailableError, match="no cuda backend"):
        cross_entropy(x, torch.tensor([1, 2]), backend="cuda")


@pytest.mark.parametrize(
    "make_args,kwargs,exc,match",
    [
        (lambda: (torch.randn(3, 8), torch.tensor([1, 2, 3], dtype=torch.int32)), {}, TypeError, "int64.*target.long"),
        (lambda: (torch.randn(3, 8), torch.tensor([1.0, 2.0, 3.0])), {}, TypeError, "int64"),
        (lambda: (torch.randint(0, 5, (3, 8)), torch.tensor([1, 2, 3])), {}, TypeError, "floating point"),
        (lambda: (torch.randn(3, 8), torch.tensor([1, 2])), {}, ValueError,
         r"target has shape \(2,\) but must be \(3,\)"),
        (lambda: (torch.randn(2, 3, 8), torch.randint(0, 3, (2, 8))), {}, ValueError, "class dim is the last"),
        (lambda: (torch.randn(3, 0), torch.tensor([0, 0, 0])), {}, ValueError, "at least one class"),
        (lambda: (torch.tensor(1.0), torch.tensor(0)), {}, ValueError, "at least one dimension"),
        (lambda: ([[1.0]], torch.tensor([0])), {}, TypeError, "torch.Tensor"),
        (lambda: (torch.randn(3, 8), torch.tensor([1, 2, 3], device="meta")), {}, ValueError, "one device"),
        (lambda: (torch.randn(3, 8), torch.tensor([1, 2, 3])), dict(reduction="avg"), ValueError, "reduction must be"),
        (lambda: (torch.randn(3, 8), torch.tensor([1, 2, 3])), dict(label_smoothing=1.5), ValueError,
         "label_smoothing"),
        (lambda: (torch.randn(3, 8), torch.tensor([1, 2, 3])), dict(z_loss=-1.0), ValueError, "z_loss"),
        (lambda: (torch.randn(3, 8), torch.tensor([1, 2, 3])), dict(softcap=float("nan")), ValueError, "softcap"),
        (lambda: (torch.randn(3, 8), torch.tensor([1, 2, 3])), dict(ignore_index=1.0), TypeError, "ignore_index"),
    ],
)
def test_bad_inputs(make_args, kwargs, exc, match):
    logits, target = make_args()
    with pytest.raises(exc, match=match):
        cross_entropy(logits, target, **kwargs)


def test_empty_batch():
    x = torch.randn(0, 16, requires_grad=True)
    out = cross_entropy(x, torch.zeros(0, dtype=torch.long), reduction="sum")
    out.backward()
    assert out.item() == 0.0 and x.grad.shape == (0, 16)


def test_module_matches_torch():
    ours = tf_nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=0.05, backend="triton")
    theirs = torch.nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=0.05)
    x = torch.randn(12, 30)
    t = make_target((12,), 30, "cpu", ignore_index=-1)
    assert rel_error(ours(x, t), theirs(x, t)) < 1e-5
    assert "label_smoothing=0.05" in repr(ours)
    with pytest.raises(ValueError, match="reduction"):
        tf_nn.CrossEntropyLoss(reduction="batchmean")


# ---------------------------------------------------------------------------------------------
# torch.compile: custom ops with fake implementations, zero graph breaks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_compile_fullgraph(reduction):
    torch._dynamo.reset()
    backend = "triton" if kernels.INTERPRETED else None

    def f(x, t, w=None):
        out = cross_entropy(x * 2.0, t, w, reduction=reduction, z_loss=1e-3, backend=backend,
                            return_z_loss=w is not None, return_token_accuracy=w is not None)
        return out.sum() if w is None else out.loss.sum() + 0.0 * (out.z_loss.sum() + out.token_accuracy.sum())

    x = torch.randn(6, 40, requires_grad=True)
    t = make_target((6,), 40, "cpu")
    w = torch.rand(40) + 0.5
    explanation = torch._dynamo.explain(f)(x, t, w)  # class weights and the extra outputs trace too
    assert explanation.graph_break_count == 0, explanation.break_reasons
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, t, w)
    assert rel_error(out, f(x, t, w)) < 1e-6
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(f)(x, t)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = f(x, t)
    eager.backward()
    g_eager, x.grad = x.grad.clone(), None
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, t)
    out.backward()
    assert rel_error(out, eager) < 1e-6 and rel_error(x.grad, g_eager) < 1e-6


def test_custom_ops_opcheck():
    if not kernels.INTERPRETED:
        pytest.skip("the custom ops wrap the Triton kernels; they run on CPU only under TRITON_INTERPRET=1")
    x = torch.randn(5, 33)
    t = make_target((5,), 33, "cpu")
    for mean, grad in ((True, True), (False, False)):
        torch.library.opcheck(torch.ops.tokenforge.cross_entropy_fwd,
                              (x, t, -100, 0.1, 1e-3, 0.0, mean, grad, True, "triton"),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.tokenforge.cross_entropy_scale_, (torch.randn(5, 33), torch.randn(5), "triton"),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# CUDA at real sizes (skipped without a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("tokens,V", [(4096, 32003), (1024, 128256), (8192, 1000)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_real_sizes(tokens, V, dtype):
    logits = (torch.randn(tokens, V, device="cuda") * 2).to(dtype)
    target = make_target((tokens,), V, "cuda")
    check(logits, target, "triton", "mean")
    check(logits, target, "triton", "none", softcap=30.0, z_loss=1e-4, label_smoothing=0.1)
    with pytest.raises(ValueError, match="out of range"):
        cross_entropy(logits, torch.full_like(target, V), validate=True)


# ---------------------------------------------------------------------------------------------
# Compile gate: every config the launcher can pick compiles for sm_90/sm_80 without spills
# ---------------------------------------------------------------------------------------------


def _ce_arg_types(dtype: str) -> dict:
    from compile_gate import TRITON_DTYPE

    t = "*" + TRITON_DTYPE[dtype]
    return dict(LOGITS=t, DLOGITS=t, D=t, TARGET="*i64", LOSS="*fp32", N_VALID="*fp32", ROW_SCALE="*fp32",
                CLASS_WEIGHT="*fp32", W_VALID="*fp32", Z_ROWS="*fp32", PRED_ROWS="*i64", G="*fp32", V="i32", stride_l="i32", stride_d="i32", stride_g="i32", ignore_index="i32",
                label_smoothing="fp32", z_loss="fp32", softcap="fp32",
                # the vocab-parallel passes
                STATS="*fp32", COEFS="*fp32", V_local="i32", vocab_start="i32", stride_s="i32", stride_c="i32")


def _compile_ce(name, config, dtype, arch, aligned=True, **flags):
    from compile_gate import TARGETS, compile_kernel

    from tokenforge.kernels import cross_entropy as ce_kernels

    config = dict(config)
    num_warps = config.pop("num_warps")
    if name == "_cross_entropy_fwd_kernel":
        # Default: every feature on (the most registers); callers turn some off.
        config.update(dict(HAS_SOFTCAP=True, MEAN=True, HAS_ROW_SCALE=True, COMPUTE_GRAD=True, HAS_WEIGHT=True,
                           SPLIT_Z=True, HAS_PRED=True, TOKEN_SCALING=True), **flags)
    elif name.startswith("_vocab_shard_"):
        config.update(dict(HAS_SOFTCAP=True), **flags)
    return compile_kernel(getattr(ce_kernels, name), _ce_arg_types(dtype), config, num_warps, TARGETS[arch],
                          aligned=aligned, unaligned_args=("V", "ignore_index", "stride_g", "V_local", "vocab_start"))


def _gate_configs():
    from tokenforge.kernels import cross_entropy as ce_kernels

    return ce_kernels.all_configs()


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", GATE_ARCHS)
@pytest.mark.parametrize("name,config", _gate_configs(),
                         ids=[f"{n}-{c.get('BLOCK_V', c.get('BLOCK'))}w{c['num_warps']}" for n, c in _gate_configs()])
def test_configs_compile_without_spills(arch, name, config):
    from compile_gate import ptxas_report, spill_bytes

    compiled = _compile_ce(name, config, "bfloat16", arch)
    report = ptxas_report(compiled.asm["ptx"], arch)
    assert spill_bytes(report) == 0, f"{name} {config} spills on {arch}:\n{report}"
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert regs and max(regs) <= 128, report


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", GATE_ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_variants_compile(arch, dtype):
    """Every flag combination the launcher passes, every dtype, unaligned too, at the 128k-vocab config."""
    from tokenforge.kernels import cross_entropy as ce_kernels

    cfg = ce_kernels.fwd_config(128256)
    off = dict(HAS_WEIGHT=False, SPLIT_Z=False, HAS_PRED=False, TOKEN_SCALING=False)
    for flags in (dict(HAS_SOFTCAP=False, MEAN=False, HAS_ROW_SCALE=False, COMPUTE_GRAD=False, **off),
                  dict(HAS_SOFTCAP=False, MEAN=True, HAS_ROW_SCALE=False, COMPUTE_GRAD=True, **off),
                  dict(HAS_SOFTCAP=True, MEAN=False, HAS_ROW_SCALE=True, COMPUTE_GRAD=True, **off),
                  dict(HAS_SOFTCAP=False, MEAN=True, HAS_ROW_SCALE=False, COMPUTE_GRAD=True, HAS_WEIGHT=True,
                       SPLIT_Z=False, HAS_PRED=True, TOKEN_SCALING=True)):
        for aligned in (True, False):
            assert len(_compile_ce("_cross_entropy_fwd_kernel", cfg, dtype, arch, aligned, **flags).asm["cubin"]) > 0
    for name in ("_vocab_shard_stats_kernel", "_vocab_shard_grad_kernel"):
        for softcap in (False, True):
            for aligned in (True, False):
                assert len(_compile_ce(name, cfg, dtype, arch, aligned, HAS_SOFTCAP=softcap).asm["cubin"]) > 0


def test_every_vocab_maps_to_a_gated_config():
    from tokenforge.kernels import cross_entropy as ce_kernels

    gated = {(n, tuple(sorted(c.items()))) for n, c in _gate_configs()}
    for V in [1, 7, 16, 17, 1000, 8192, 8193, 32003, 128256, 256000]:
        for name in ("_cross_entropy_fwd_kernel", "_vocab_shard_stats_kernel", "_vocab_shard_grad_kernel"):
            assert (name, tuple(sorted(ce_kernels.fwd_config(V).items()))) in gated, (name, V)
