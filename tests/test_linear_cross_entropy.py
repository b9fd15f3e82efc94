"""Fused linear cross-entropy: equal to F.cross_entropy(hidden @ weight.T + bias) in float64 for loss
and every gradient, over chunk sizes, reductions and options; never allocates (tokens x vocab)."""

import pytest
import torch
import torch.nn.functional as F
from device_params import DEVICES, HAS_CUDA
from torch.utils._python_dispatch import TorchDispatchMode

import tokenforge.nn.cross_entropy as tf_nn
from tokenforge import backends, kernels
from tokenforge.ops.linear_cross_entropy import (chunked_forward, default_chunk_size, linear_cross_entropy,
                                                linear_cross_entropy_reference)
from tokenforge.testing import ROW_SLACK, TOLERANCE, PoisonEmpty, rel_error, row_errors

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]
# The CE step of each chunk: the Triton kernel (interpreted on CPU) and its torch twin.
CE_BACKENDS = ["triton", "torch"]


def oracle(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
           z_loss=0.0, softcap=0.0):
    """Unfused, in float64, written out here: logits, then F.cross_entropy (+ z-loss, softcap)."""
    x = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    x = x.reshape(-1, x.shape[-1])
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


def make_inputs(N, H, V, dtype, device, bias=True, ignore_frac=0.2):
    hidden = torch.randn(N, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) / H ** 0.5).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    target = torch.randint(0, V, (N,), device=device)
    target[torch.rand(N, device=device) < ignore_frac] = -100
    return hidden, weight, b, target


def check(hidden, weight, bias, target, backend, reduction="mean", chunk_size=None, grad_output=None, **opts):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = linear_cross_entropy(leaves[0], leaves[1], target, leaves[2], reduction=reduction, chunk_size=chunk_size,
                               backend=backend, **opts)
    loss_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    assert out.dtype == loss_dtype and out.shape == (target.shape if reduction == "none" else ())
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    ref = oracle(refs[0], refs[1], target, refs[2], reduction=reduction, **opts)
    g = torch.randn_like(ref) if grad_output is None else grad_output.double()
    out.backward(g.to(loss_dtype))
    ref.backward(g)
    # fp32: matmuls and math in fp32. fp16/bf16: the logits are rounded to the inputs' dtype after
    # the matmul exactly as in eager torch, and dlogits before the gradient matmuls: that dtype's.
    tol = TOLERANCE.get(hidden.dtype, 1e-10)  # float64 (torch backend): exact up to summation order
    where = f"{backend} N={target.numel()} H={hidden.shape[-1]} V={weight.shape[0]} {hidden.dtype} {reduction} " \
            f"chunk={chunk_size} {opts}"
    assert rel_error(out, ref) <= tol, f"loss {rel_error(out, ref):.2e} ({where})"
    for name, ours, theirs in zip(("hidden", "weight", "bias"), leaves, refs):
        if ours is None:
            continue
        assert ours.grad.dtype == ours.dtype and ours.grad.shape == ours.shape
        err = rel_error(ours.grad, theirs.grad)
        assert err <= tol, f"d{name}: {err:.2e} > {tol:.0e} ({where})"


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 17, 129])
@pytest.mark.parametrize("V", [7, 1000])
@pytest.mark.parametrize("H", [64, 96])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grid(device, tokens, V, H, reduction):
    h, w, b, t = make_inputs(tokens, H, V, torch.float32, device)
    check(h, w, b, t, "triton", reduction, chunk_size=16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", CE_BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 33, 1000, None])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_chunk_sizes(device, backend, chunk_size, reduction):
    """Chunks of 1 token, not dividing N (33 = 4*7 + 5), exactly N, larger than N, automatic."""
    h, w, b, t = make_inputs(33, 64, 300, torch.float32, device)
    check(h, w, b, t, backend, reduction, chunk_size=chunk_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dtypes(device, dtype, reduction):
    for backend in CE_BACKENDS:
        h, w, b, t = make_inputs(40, 96, 1000, dtype, device)
        check(h, w, b, t, backend, reduction, chunk_size=16)


@pytest.mark.parametrize("device", DEVICES)
def test_large_vocab(device):
    h, w, b, t = make_inputs(3, 64, 32003, torch.bfloat16, device, bias=False, ignore_frac=0.0)
    check(h, w, b, t, "triton", "mean", chunk_size=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", [dict(label_smoothing=0.1), dict(z_loss=1e-2), dict(softcap=3.0),
                                  dict(label_smoothing=0.2, z_loss=1e-3, softcap=10.0)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_options(device, opts, reduction):
    for backend in CE_BACKENDS:
        h, w, b, t = make_inputs(21, 64, 500, torch.float32, device)
        check(h, w, b, t, backend, reduction, chunk_size=8, **opts)


@pytest.mark.parametrize("device", DEVICES)
def test_no_bias_leading_dims_other_ignore_index(device):
    h, w, _, _ = make_inputs(10, 64, 100, torch.float32, device)
    t = torch.randint(0, 100, (2, 5), device=device)
    t[0, 1] = 3
    check(h.reshape(2, 5, 64), w, None, t, "triton", "none", chunk_size=3, ignore_index=3)
    check(h.reshape(2, 5, 64), w, None, t, "triton", "mean", chunk_size=4, ignore_index=3)
    # Non-contiguous hidden and weight (copied), stride-0 upstream gradient for 'none'.
    hh = torch.randn(64, 10, device=device).t()
    ww = torch.randn(64, 100, device=device).t() / 8
    check(hh, ww, None, t.reshape(-1), "triton", "none", chunk_size=4,
          grad_output=torch.randn(1, device=device).expand(10))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(device, reduction):
    h, w, b, _ = make_inputs(6, 32, 50, torch.float32, device)
    leaves = [x.detach().requires_grad_() for x in (h, w, b)]
    out = linear_cross_entropy(*leaves[:2], torch.full((6,), -100, device=device), leaves[2], reduction=reduction,
                               chunk_size=4, backend="triton")
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    for x in leaves:
        assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_frozen_inputs_and_no_grad(reduction):
    """Only the gradients asked for are computed (and returned): frozen lm_head, frozen hidden."""
    h, w, b, t = make_inputs(9, 32, 40, torch.float32, "cpu")
    for grad_h, grad_w, grad_b in ((True, False, False), (False, True, False), (False, False, True)):
        leaves = [x.clone().requires_grad_(r) for x, r in ((h, grad_h), (w, grad_w), (b, grad_b))]
        refs = [x.double().requires_grad_(r) for x, r in ((h, grad_h), (w, grad_w), (b, grad_b))]
        g = torch.randn(9) if reduction == "none" else torch.tensor(1.7)
        linear_cross_entropy(*leaves[:2], t, leaves[2], reduction=reduction, chunk_size=4, backend="triton").backward(g)
        oracle(*refs[:2], t, refs[2], reduction=reduction).backward(g.double())
        for ours, ref in zip(leaves, refs):
            assert (ours.grad is None) == (ref.grad is None)
            if ref.grad is not None:
                assert rel_error(ours.grad, ref.grad) < 1e-5
    with torch.no_grad():
        out = linear_cross_entropy(h, w, t, b, reduction="none", backend="triton")
    assert rel_error(out, oracle(h, w, t, b, reduction="none")) < 1e-5


def test_out_of_range_target():
    h, w, b, _ = make_inputs(4, 16, 10, torch.float32, "cpu")
    t = torch.tensor([1, 10, 2, -100])
    for backend in CE_BACKENDS:
        with pytest.raises(ValueError, match="target value 10 is out of range for 10 classes"):
            linear_cross_entropy(h, w, t, b, backend=backend)
    out = linear_cross_entropy(h, w, t, b, reduction="none", backend="triton", validate=False)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()


def test_default_chunk_size():
    # Liger's rule: a chunk's logits about the size of hidden.
    assert default_chunk_size(16384, 4096, 128256) == 512
    assert default_chunk_size(10, 4096, 1000) == 10
    assert default_chunk_size(1, 64, 128256) == 1
    for n, h, v in [(1000, 64, 1000), (4096, 2048, 32000), (3, 7, 1000)]:
        c = default_chunk_size(n, h, v)
        assert 1 <= c <= n and (c == n or c * v <= 2 * n * h + v)


@pytest.mark.parametrize("backend", CE_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0)], ids=str)
def test_class_weights_z_loss_and_accuracy(backend, reduction, opts):
    """class_weight (torch's cross-entropy weight), return_z_loss and return_token_accuracy through
    the chunk loop (chunks of 4 over 17 tokens) against float64 F.cross_entropy(weight=...): loss,
    every gradient, the z-loss and the accuracy."""
    from test_cross_entropy import weighted_oracle

    h, w, b, t = make_inputs(17, 24, 300, torch.float32, "cpu")
    cw = torch.rand(300) * 2 + 0.1
    leaves = [x.detach().requires_grad_() for x in (h, w, b)]
    out = linear_cross_entropy(*leaves[:2], t, leaves[2], class_weight=cw, reduction=reduction, return_z_loss=True,
                               return_token_accuracy=True, chunk_size=4, backend=backend, **opts)
    refs = [x.detach().double().requires_grad_() for x in (h, w, b)]
    logits = F.linear(refs[0], refs[1], refs[2])
    ref_loss, ref_z, ref_acc = weighted_oracle(logits, t, cw, reduction, **opts)
    g = torch.randn_like(ref_loss)
    out.loss.backward(g.float())
    ref_loss.backward(g)
    assert rel_error(out.loss, ref_loss) <= 1e-5
    for ours, theirs in zip(leaves, refs):
        assert rel_error(ours.grad, theirs.grad) <= 1e-5
    if opts:
        assert rel_error(out.z_loss, ref_z.detach()) <= 1e-5
    predicted = torch.addmm(b, h, w.t()).argmax(-1)  # the fp32 logits the loop computes
    acc_rows = ((predicted == t) & (t != -100)).double()
    expected = acc_rows if reduction == "none" else acc_rows.sum() / (t != -100).sum().clamp(min=1)
    assert torch.allclose(out.token_accuracy.double(), expected, rtol=0, atol=1e-7)
    # The module: class_weight as a buffer, same numbers.
    module = tf_nn.LinearCrossEntropyLoss(reduction=reduction, chunk_size=4, class_weight=cw, backend=backend,
                                          **opts)
    assert "class_weight" in dict(module.named_buffers()) and "weighted" in repr(module)
    assert rel_error(module(h, w, t, b), ref_loss.detach()) <= 1e-5
    with pytest.raises(ValueError, match=r"class_weight must have one entry per class, shape \(300,\)"):
        linear_cross_entropy(h, w, t, b, class_weight=torch.rand(24))


@pytest.mark.parametrize("backend", CE_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0)], ids=str)
def test_token_scaling(backend, reduction, opts):
    """token_scaling through the chunk loop (chunks of 4 over 17 tokens; 'none' reruns the loop in
    backward with per-token scales) against the float64 oracle on the unfused logits: loss and the
    gradients of hidden, weight and bias, per row too."""
    from test_cross_entropy import token_scaled_oracle

    h, w, b, t = make_inputs(17, 24, 300, torch.float32, "cpu")
    h = h * 3  # spread the target probabilities: the scaling matters
    cw = torch.rand(300) + 0.5
    leaves = [x.detach().requires_grad_() for x in (h, w, b)]
    out = linear_cross_entropy(*leaves[:2], t, leaves[2], class_weight=cw, reduction=reduction, token_scaling=True,
                               chunk_size=4, backend=backend, **opts)
    refs = [x.detach().double().requires_grad_() for x in (h, w, b)]
    ref = token_scaled_oracle(F.linear(refs[0], refs[1], refs[2]), t, cw, reduction, **opts)
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    assert rel_error(out, ref) <= 1e-5
    for ours, theirs in zip(leaves, refs):
        assert rel_error(ours.grad, theirs.grad) <= 1e-5
        assert max(row_errors(ours.grad, theirs.grad)) <= ROW_SLACK * 1e-5
    module = tf_nn.LinearCrossEntropyLoss(reduction=reduction, chunk_size=4, class_weight=cw, token_scaling=True,
                                          backend=backend, **opts)
    assert "token_scaling=True" in repr(module) and rel_error(module(h, w, t, b), ref.detach()) <= 1e-5


@pytest.mark.parametrize("backend", CE_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_predicted_tokens(backend, reduction):
    """return_predicted_tokens through the chunk loop (chunks of 4 over 3 x 7 tokens, the last one
    short): each token's argmax of the logits the loop computes, -1 where ignored, in target's
    shape, with the loss and its gradients unchanged; the module passes the flag on."""
    h, w, b, t = make_inputs(21, 24, 300, torch.float32, "cpu")
    t = t.view(3, 7)
    leaves = [x.detach().requires_grad_() for x in (h.view(3, 7, 24), w, b)]
    out = linear_cross_entropy(*leaves[:2], t, leaves[2], reduction=reduction, return_predicted_tokens=True,
                               chunk_size=4, backend=backend)
    want = torch.where(t != -100, torch.addmm(b, h, w.t()).argmax(-1).view(3, 7), -1)
    assert out.z_loss is None and out.token_accuracy is None
    assert out.predicted_tokens.dtype == torch.int64 and torch.equal(out.predicted_tokens, want)
    plain = linear_cross_entropy(h.view(3, 7, 24), w, t, b, reduction=reduction, chunk_size=4, backend=backend)
    assert torch.equal(out.loss, plain)
    out.loss.sum().backward()
    ref = [x.detach().requires_grad_() for x in (h.view(3, 7, 24), w, b)]
    linear_cross_entropy(*ref[:2], t, ref[2], reduction=reduction, chunk_size=4, backend=backend).sum().backward()
    for ours, theirs in zip(leaves, ref):
        assert torch.equal(ours.grad, theirs.grad)
    module = tf_nn.LinearCrossEntropyLoss(reduction=reduction, chunk_size=4, return_predicted_tokens=True,
                                          backend=backend)
    assert "return_predicted_tokens=True" in repr(module)
    assert torch.equal(module(h.view(3, 7, 24), w, t, b).predicted_tokens, want)


@pytest.mark.parametrize("backend", CE_BACKENDS)
@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "weights-z-accuracy"])
def test_chunk_loop_writes_every_output(backend, mean, extras):
    """The chunk loop under NaN-poisoned allocations (loss, grad_hidden, the logits buffer, the last
    short chunk, the z-loss and predicted-token rows): every element written, every gradient right."""
    h, w, b, t = make_inputs(23, 32, 70, torch.bfloat16, "cpu")
    row_scale = torch.randn(23)
    z = 1e-2 if extras else 0.0
    cw = torch.rand(70) + 0.5 if extras else None
    with PoisonEmpty():
        loss, n_valid, w_valid, z_rows, pred_rows, gh, gw, gb = chunked_forward(
            h, w, t, b, row_scale, -100, 0.1, z, 0.0, mean, 5, True, True, backend, cw, extras, extras)
    refs = [x.double().requires_grad_() for x in (h, w, b)]
    logits = torch.nn.functional.linear(refs[0], refs[1], refs[2])
    ce = torch.nn.functional.cross_entropy(logits, t, weight=cw.double() if extras else None, reduction="none",
                                           label_smoothing=0.1)
    zr = z * torch.logsumexp(logits, -1) ** 2 * (t != -100)
    if mean:
        ce = ce / (w_valid.double() if extras else n_valid.double())
        zr = zr / n_valid.double()
    ((ce + zr) * row_scale.double()).sum().backward()
    tol = TOLERANCE[torch.bfloat16]
    if extras:
        scale = (w_valid if mean else 1.0), (n_valid if mean else 1.0)
        assert rel_error(loss / scale[0], ce) <= tol and rel_error(z_rows / scale[1], zr) <= tol
        # argmax of the bf16 logits the loop computes (torch.addmm, as it does), not of float64 ones.
        predicted = torch.addmm(b, h, w.t()).argmax(-1)
        assert torch.equal(pred_rows, torch.where(t != -100, predicted, -1))
        assert float(w_valid) == pytest.approx(float((cw[t.clamp(min=0)] * (t != -100)).sum()))
    else:
        assert rel_error(loss, ce.detach() * (n_valid.double() if mean else 1.0)) <= tol
        assert w_valid is None and z_rows is None and pred_rows is None
    for ours, theirs in zip((gh, gw, gb), refs):
        assert rel_error(ours, theirs.grad) <= tol


# ---------------------------------------------------------------------------------------------
# Memory: no (tokens x vocab) tensor is ever allocated
# ---------------------------------------------------------------------------------------------


class RecordNumel(TorchDispatchMode):
    """Records (op, bytes) of every tensor an aten op returns (empty*, mm outputs, everything).
    Bytes, not numel: Triton's interpreter views buffers as raw uint8 storage (aten.set_)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel() * t.element_size()))
        return out

    def largest(self):
        return max(self.sizes, key=lambda s: s[1])


@pytest.mark.parametrize("backend", CE_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_tokens_by_vocab_tensor(backend, reduction):
    N, H, V, chunk = 64, 16, 1000, 8
    logits_bytes = N * V * 4  # fp32
    h, w, b, t = make_inputs(N, H, V, torch.float32, "cpu")
    # The chunk loop itself (the custom op's body, which a dispatch mode outside the op cannot see).
    rec = RecordNumel()
    with rec:
        chunked_forward(h, w, t, b, torch.randn(N) if reduction == "none" else None, -100, 0.1, 1e-3, 5.0,
                        reduction == "mean", chunk, True, True, backend)
    assert rec.largest()[1] <= max(chunk * V, V * H) * 4 < logits_bytes, rec.largest()
    # The whole public path, forward and backward (the custom op's outputs included).
    leaves = [x.detach().requires_grad_() for x in (h, w, b)]
    rec = RecordNumel()
    with rec:
        out = linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], reduction=reduction, chunk_size=chunk,
                                   backend=backend)
        out.sum().backward()
    assert rec.largest()[1] < logits_bytes, rec.largest()
    # The same recorder sees the unfused baseline's logits: the check can fail.
    rec = RecordNumel()
    with rec:
        oracle(h, w, t, b)
    assert rec.largest()[1] >= logits_bytes


# ---------------------------------------------------------------------------------------------
# Refusals, dispatch, module, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_args,kwargs,exc,match",
    [
        (lambda: (torch.randn(3, 8), torch.randn(5, 8, dtype=torch.float64), torch.tensor([1, 2, 3]), None), {},
         TypeError, "hidden is torch.float32 but weight is torch.float64"),
        (lambda: (torch.randn(3, 8).bfloat16(), torch.randn(5, 8), torch.tensor([1, 2, 3]), None), {},
         TypeError, "cast one to the other"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8), torch.tensor([1, 2, 3]), torch.randn(5).double()), {},
         TypeError, "bias is torch.float64"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8), torch.tensor([1, 2, 3]), torch.randn(4)), {},
         ValueError, r"bias must be \(5,\)"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 7), torch.tensor([1, 2, 3]), None), {},
         ValueError, r"weight must be \(V, H\)"),
        (lambda: (torch.randn(3, 8), torch.randn(8), torch.tensor([1, 2, 3]), None), {}, ValueError, "weight must be"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8), torch.tensor([1, 2]), None), {},
         ValueError, "target has shape"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8), torch.tensor([1, 2, 3]).int(), None), {}, TypeError, "int64"),
        (lambda: (torch.randint(0, 3, (3, 8)), torch.randn(5, 8), torch.tensor([1, 2, 3]), None), {},
         TypeError, "floating point"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8, device="meta"), torch.tensor([1, 2, 3]), None), {},
         ValueError, "one device"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8), torch.tensor([1, 2, 3]), None), dict(chunk_size=0),
         ValueError, "chunk_size"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8), torch.tensor([1, 2, 3]), None), dict(reduction="x"),
         ValueError, "reduction"),
    ],
)
def test_bad_inputs(make_args, kwargs, exc, match):
    hidden, weight, target, bias = make_args()
    with pytest.raises(exc, match=match):
        linear_cross_entropy(hidden, weight, target, bias, **kwargs)


def test_backend_choice_and_float64():
    h, w, b, t = make_inputs(5, 8, 20, torch.float64, "cpu")
    assert backends.choose("linear_cross_entropy", h) == "torch"
    check(h, w, b, t, None, "mean", chunk_size=2, label_smoothing=0.1, z_loss=1e-2, softcap=4.0)
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        linear_cross_entropy(h, w, t, b, backend="triton")


def test_empty_batch():
    h = torch.randn(0, 8, requires_grad=True)
    out = linear_cross_entropy(h, torch.randn(5, 8), torch.zeros(0, dtype=torch.long), reduction="sum")
    out.backward()
    assert out.item() == 0.0 and h.grad.shape == (0, 8)


def test_module():
    loss_fn = tf_nn.LinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=4, backend="triton")
    h, w, b, t = make_inputs(10, 32, 50, torch.float32, "cpu")
    assert rel_error(loss_fn(h, w, t, b), oracle(h, w, t, b, label_smoothing=0.1)) < 1e-5
    assert "chunk_size=4" in repr(loss_fn) and list(loss_fn.parameters()) == []


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_compile_fullgraph(reduction):
    torch._dynamo.reset()
    backend = "triton" if kernels.INTERPRETED else None
    lm_head = torch.nn.Linear(32, 50)

    def f(x, t):
        return linear_cross_entropy(x * 2.0, lm_head.weight, t, lm_head.bias, reduction=reduction, chunk_size=4,
                                    backend=backend).sum()

    h, _, _, t = make_inputs(10, 32, 50, torch.float32, "cpu")
    h.requires_grad_()
    explanation = torch._dynamo.explain(f)(h, t)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = f(h, t)
    eager.backward()
    grads = [h.grad.clone(), lm_head.weight.grad.clone(), lm_head.bias.grad.clone()]
    h.grad = None
    lm_head.zero_grad()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(h, t)
    out.backward()
    assert rel_error(out, eager) < 1e-6
    for ours, ref in zip([h.grad, lm_head.weight.grad, lm_head.bias.grad], grads):
        assert rel_error(ours, ref) < 1e-6


def test_custom_op_opcheck():
    if not kernels.INTERPRETED:
        pytest.skip("runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")
    h, w, b, t = make_inputs(6, 16, 30, torch.float32, "cpu")
    for bias, rs, gh, gw in ((b, None, True, True), (None, torch.randn(6), True, False), (b, None, False, True),
                             (b, None, False, False)):
        torch.library.opcheck(torch.ops.tokenforge.linear_cross_entropy_fwd,
                              (h, w, t, bias, rs, -100, 0.0, 0.0, 0.0, True, 4, gh, gw, True, "triton"),
                              test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# CUDA at real sizes (skipped without a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_real_sizes(dtype, reduction):
    h, w, b, t = make_inputs(2048, 1024, 32003, dtype, "cuda", bias=False)
    check(h, w, None, t, "triton", reduction)
    check(h, w, None, t, "triton", reduction, chunk_size=300, z_loss=1e-4, softcap=30.0)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_cuda_peak_memory_below_logits():
    N, H, V = 4096, 1024, 128256
    h, w, _, t = make_inputs(N, H, V, torch.bfloat16, "cuda", bias=False)
    h.requires_grad_()
    w.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(h, w, t).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < N * V * 2, f"peak {extra / 2**20:.0f} MiB >= the bf16 logits ({N * V * 2 / 2**20:.0f} MiB)"


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_held_gradients_are_in_the_weights_dtype(weight_dtype):
    """Between forward and backward only grad_hidden and grad_weight (in the weight's dtype) are
    held: no fp32 V x H accumulator (2 GB at V=128k, H=4096) survives the forward."""
    N, H, V = 48, 32, 3000
    h = torch.randn(N, H, dtype=weight_dtype, requires_grad=True)
    w = (torch.randn(V, H) * 0.05).to(weight_dtype).requires_grad_()
    t = torch.randint(0, V, (N,))
    loss = linear_cross_entropy(h, w, t, backend="torch")
    saved = loss.grad_fn.saved_tensors
    held = sum(x.numel() * x.element_size() for x in saved)
    assert held <= N * H * h.element_size() + V * H * w.element_size() + 64, held
    assert all(x.dtype != torch.float32 or weight_dtype == torch.float32 for x in saved if x.numel() >= V * H)
    loss.backward()
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    linear_cross_entropy_reference(hd, wd, t).backward()
    tol = TOLERANCE[weight_dtype] if weight_dtype != torch.float32 else 1e-5
    assert rel_error(w.grad, wd.grad) <= tol and rel_error(h.grad, hd.grad) <= tol
