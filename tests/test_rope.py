"""RoPE: the Triton kernel against the float64 torch reference (q_out, k_out, dq, dk), Hugging Face's
and GPT-J's formulas written out here, the module, torch.compile, refusals and the compile gate."""

import re

import pytest
from compile_gate import GATE_ARCHS
import torch
from device_params import DEVICES, HAS_CUDA, kernel_backends

from tokenforge import backends, kernels
from tokenforge.nn.rope import RotaryEmbedding
from tokenforge.ops.rope import rope, rope_reference
from tokenforge.testing import TOLERANCE, PoisonEmpty, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS = [(4, 4), (4, 2), (4, 1)]
# (head_dim, rotary_dim): full rotary at a power-of-two and a non-power-of-two head dim, and partial.
DIMS = [(64, 64), (80, 80), (80, 32)]


def _shape(layout, batch, seq, heads, head_dim):
    return (batch, seq, heads, head_dim) if layout == "bshd" else (batch, heads, seq, head_dim)


def _tables(batch, seq, rot_dim, device, with_pos, cos_dtype=torch.float32, batched=False):
    """Random cos/sin (not a rotation: any values must work) and maybe position_ids into a table."""
    if with_pos:
        n_pos = seq + 23
        cos, sin = (torch.randn(n_pos, rot_dim, device=device).to(cos_dtype) for _ in range(2))
        pid = torch.randint(0, n_pos, (batch, seq), device=device)
        return cos, sin, pid
    lead = (batch,) if batched else ()
    cos, sin = (torch.randn(*lead, seq, rot_dim, device=device).to(cos_dtype) for _ in range(2))
    return cos, sin, None


def _oracle(q, k, cos, sin, pid, interleaved, layout, dq_out, dk_out):
    """q_out, k_out, dq, dk of the reference in float64 (autograd)."""
    qd = q.detach().double().requires_grad_()
    kd = k.detach().double().requires_grad_()
    qo, ko = rope_reference(qd, kd, cos.double(), sin.double(), pid, interleaved, layout)
    dq, dk = torch.autograd.grad((qo, ko), (qd, kd), (dq_out.double(), dk_out.double()))
    return qo.detach(), ko.detach(), dq, dk


def check_against_reference(q, k, cos, sin, pid, interleaved, layout, backend):
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    q_out, k_out = rope(q, k, cos, sin, position_ids=pid, interleaved=interleaved, layout=layout, backend=backend)
    assert (q_out.shape, q_out.dtype, k_out.shape, k_out.dtype) == (q.shape, q.dtype, k.shape, k.dtype)
    assert q_out.data_ptr() != q.data_ptr() and k_out.data_ptr() != k.data_ptr()  # never in place
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    ref = _oracle(q, k, cos, sin, pid, interleaved, layout, dq_out, dk_out)
    # Rotations are orthogonal and random cos/sin are O(1), so the only error is the output's
    # rounding to its dtype: the standard tolerance holds without loosening.
    tol = max(TOLERANCE[q.dtype], TOLERANCE[k.dtype])
    for name, out, r in zip(("q_out", "k_out", "dq", "dk"), (q_out, k_out, dq, dk), ref):
        err = rel_error(out, r)
        assert err <= tol, (f"{name}: relative error {err:.3e} > {tol:.0e} ({backend}, q {tuple(q.shape)} "
                            f"{q.dtype}, layout {layout}, interleaved {interleaved}, pos {pid is not None})")


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------

# (batch, seq, dtype, position_ids?) runs inside each grid test: every dtype, both position modes.
RUNS = [(1, 1, torch.float32, True), (3, 17, torch.bfloat16, False), (3, 17, torch.float16, True),
        (1, 17, torch.float32, False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}-{h[1]}")
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"d{d[0]}r{d[1]}")
def test_grid(device, layout, interleaved, heads, dims):
    (hq, hk), (head_dim, rot_dim) = heads, dims
    for backend in kernel_backends(device):
        for i, (batch, seq, dtype, with_pos) in enumerate(RUNS):
            q = torch.randn(_shape(layout, batch, seq, hq, head_dim), device=device, dtype=dtype)
            k = torch.randn(_shape(layout, batch, seq, hk, head_dim), device=device, dtype=dtype)
            cos, sin, pid = _tables(batch, seq, rot_dim, device, with_pos, batched=i % 2 == 1)
            check_against_reference(q, k, cos, sin, pid, interleaved, layout, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_long_seq(device, layout, interleaved):
    """seq 129: token blocks with a partial last block; GQA 4:1, partial rotary, both cos modes."""
    for backend in kernel_backends(device):
        for batch, dtype, with_pos, (head_dim, rot_dim) in [(1, torch.bfloat16, True, (80, 32)),
                                                             (3, torch.float32, False, (64, 64))]:
            q = torch.randn(_shape(layout, batch, 129, 4, head_dim), device=device, dtype=dtype)
            k = torch.randn(_shape(layout, batch, 129, 1, head_dim), device=device, dtype=dtype)
            cos, sin, pid = _tables(batch, 129, rot_dim, device, with_pos, batched=True)
            check_against_reference(q, k, cos, sin, pid, interleaved, layout, backend)


def _packed_qkv(layout, batch, seq, hq, hk, head_dim, device, dtype):
    """q, k as views of one fused projection output (batch, seq, (hq + 2 hk) * head_dim): strided
    over heads and tokens, unit last stride; for "bhsd" the views are transposed (no copy)."""
    qkv = torch.randn(batch, seq, (hq + 2 * hk) * head_dim, device=device, dtype=dtype)
    heads = qkv.view(batch, seq, hq + 2 * hk, head_dim)
    q, k = heads[:, :, :hq], heads[:, :, hq:hq + hk]
    if layout == "bhsd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    return q, k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(device, layout, dtype):
    for backend in kernel_backends(device):
        q, k = _packed_qkv(layout, 3, 17, 4, 2, 64, device, dtype)
        assert not q.is_contiguous() and not k.is_contiguous()
        cos, sin, pid = _tables(3, 17, 48, device, dtype == torch.float16, cos_dtype=dtype)
        check_against_reference(q, k, cos, sin, pid, dtype == torch.bfloat16, layout, backend)
        # A last dim that is not contiguous (q and cos stored transposed) is copied first.
        q = _strided_last_dim(torch.randn(_shape(layout, 2, 5, 3, 16), device=device, dtype=dtype))
        k = torch.randn(_shape(layout, 2, 5, 1, 16), device=device, dtype=dtype)
        cos, sin, _ = _tables(2, 5, 16, device, False)
        check_against_reference(q, k, _strided_last_dim(cos), sin, None, False, layout, backend)


def _strided_last_dim(t):
    """t's values in storage where the last dim is not the contiguous one."""
    out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert out.stride(-1) != 1 and torch.equal(out, t)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_views_do_not_copy(device, monkeypatch):
    """Views of a packed qkv reach the kernel as they are: the launcher sees the same storage."""
    from tokenforge.kernels import rope as launcher

    seen, original = [], launcher.rope_forward

    def spy(q, k, *args, **kwargs):
        seen.append((q.data_ptr(), k.data_ptr()))
        return original(q, k, *args, **kwargs)

    monkeypatch.setattr(launcher, "rope_forward", spy)
    q, k = _packed_qkv("bhsd", 2, 9, 4, 2, 32, device, torch.float32)
    cos, sin, _ = _tables(2, 9, 32, device, False)
    rope(q, k, cos, sin, layout="bhsd", backend="triton")
    assert seen == [(q.data_ptr(), k.data_ptr())]


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_and_cos_dtypes(device):
    """cos/sin in fp32 beside bf16 q/k (or in q's dtype); q and k may even differ in dtype."""
    for backend in kernel_backends(device):
        for q_dtype, k_dtype, cos_dtype in [(torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                            (torch.float16, torch.float16, torch.float32),
                                            (torch.float32, torch.bfloat16, torch.float16)]:
            q = torch.randn(2, 7, 4, 32, device=device, dtype=q_dtype)
            k = torch.randn(2, 7, 2, 32, device=device, dtype=k_dtype)
            cos, sin, pid = _tables(2, 7, 32, device, False, cos_dtype=cos_dtype)
            check_against_reference(q, k, cos, sin, pid, False, "bshd", backend)


@pytest.mark.parametrize("device", DEVICES)
def test_position_id_shapes(device):
    """position_ids (1, seq), (seq,) and int32; a (1, max_pos, R) table; (1, seq, R) rows."""
    for backend in kernel_backends(device):
        q = torch.randn(3, 11, 2, 16, device=device)
        k = torch.randn(3, 11, 2, 16, device=device)
        cos, sin = torch.randn(30, 16, device=device), torch.randn(30, 16, device=device)
        ids = torch.randint(0, 30, (11,), device=device)
        for pid, c, s in [(ids[None], cos, sin), (ids, cos[None], sin[None]), (ids.int()[None], cos, sin)]:
            check_against_reference(q, k, c, s, pid, False, "bshd", backend)
        check_against_reference(q, k, cos[None, :11], sin[None, :11], None, True, "bshd", backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_magnitudes(device, scale):
    for backend in kernel_backends(device):
        q = (torch.randn(2, 9, 4, 64, device=device) * scale).half()
        k = (torch.randn(2, 9, 2, 64, device=device) * scale).half()
        cos, sin, _ = _tables(2, 9, 64, device, False)
        # out_i = q_i cos - q_j sin mixes two entries of q, so |out| <= 2 max|q| max(|cos|, |sin|):
        # with cos, sin scaled to <= 0.25 that is <= max|q| / 2, inside fp16's range (seen: 0.5
        # let a true value of 76370 overflow, correctly, to inf).
        cos, sin = cos * 0.25, sin * 0.25
        check_against_reference(q, k, cos, sin, None, False, "bshd", backend)


# ---------------------------------------------------------------------------------------------
# The formulas users know, written out here
# ---------------------------------------------------------------------------------------------


def _llama_cos_sin(rot_dim, positions, base=10000.0, interleaved=False):
    """Hugging Face LlamaRotaryEmbedding (default rope): cos/sin of shape (batch, seq, rot_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rot_dim", [64, 32])
def test_matches_hugging_face_formula(device, rot_dim):
    """The half-split result is HF's ``q * cos + rotate_half(q) * sin`` (bhsd, cos unsqueezed on
    dim 1), with partial rotary as in HF's phi/neox models (rotate the first rot_dim, keep the rest)."""
    for backend in kernel_backends(device):
        positions = torch.randint(0, 4096, (2, 13))
        cos, sin = (t.to(device) for t in _llama_cos_sin(rot_dim, positions))
        q = torch.randn(2, 4, 13, 64, device=device)
        k = torch.randn(2, 2, 13, 64, device=device)
        q_out, k_out = rope(q, k, cos, sin, layout="bhsd", backend=backend)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        for x, out in ((q, q_out), (k, k_out)):
            xr = x[..., :rot_dim]
            want = torch.cat((xr * c + _rotate_half(xr) * s, x[..., rot_dim:]), dim=-1)
            assert rel_error(out, want) < 1e-6
            assert torch.equal(out[..., rot_dim:], x[..., rot_dim:])  # pass-through is exact


@pytest.mark.parametrize("device", DEVICES)
def test_matches_gpt_j_formula(device):
    """interleaved=True is GPT-J's rotate_every_two with each frequency repeated for its pair."""
    for backend in kernel_backends(device):
        positions = torch.arange(21)[None]
        cos, sin = (t[0].to(device) for t in _llama_cos_sin(32, positions, interleaved=True))
        q = torch.randn(1, 21, 3, 32, device=device)
        k = torch.randn(1, 21, 3, 32, device=device)
        q_out, k_out = rope(q, k, cos, sin, interleaved=True, backend=backend)
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        assert rel_error(q_out, q * c + _rotate_every_two(q) * s) < 1e-6
        assert rel_error(k_out, k * c + _rotate_every_two(k) * s) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_rotation_by_minus_theta(device):
    """With real angles, dq is dq_out rotated by -theta, and rotating back recovers q."""
    for backend in kernel_backends(device):
        cos, sin = (t[0].to(device) for t in _llama_cos_sin(32, torch.arange(10)[None]))
        q = torch.randn(1, 10, 2, 32, device=device, requires_grad=True)
        k = torch.randn(1, 10, 2, 32, device=device, requires_grad=True)
        q_out, k_out = rope(q, k, cos, sin, backend=backend)
        back_q, back_k = rope(q_out.detach(), k_out.detach(), cos, -sin, backend=backend)
        assert rel_error(back_q, q) < 1e-5 and rel_error(back_k, k) < 1e-5
        dq, _ = torch.autograd.grad((q_out, k_out), (q, k), (q_out.detach(), k_out.detach()))
        assert rel_error(dq, q) < 1e-5


# ---------------------------------------------------------------------------------------------
# Launchers called directly with NaN-poisoned allocations: every output element must be written.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("batch,seq,hq,hk,head_dim,rot_dim,with_pos",
                         [(1, 1, 1, 1, 2, 2, False), (3, 17, 4, 1, 80, 32, True), (2, 33, 5, 3, 22, 10, False),
                          (1, 9, 2, 2, 66, 64, True)])
def test_launchers_write_every_output(device, layout, interleaved, batch, seq, hq, hk, head_dim, rot_dim, with_pos):
    from tokenforge.kernels import rope as launcher
    from tokenforge.ops.rope import _normalise_tables

    q = torch.randn(_shape(layout, batch, seq, hq, head_dim), device=device, dtype=torch.bfloat16)
    k = torch.randn(_shape(layout, batch, seq, hk, head_dim), device=device, dtype=torch.bfloat16)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    cos, sin, pid = _tables(batch, seq, rot_dim, device, with_pos, batched=True)
    c, s, p = _normalise_tables(cos, sin, pid)
    with PoisonEmpty():
        q_out, k_out = launcher.rope_forward(q, k, c, s, p, interleaved, layout)
        dq, dk = launcher.rope_backward(dq_out, dk_out, c, s, p, interleaved, layout)
    assert q_out.is_contiguous() and dq.is_contiguous()
    ref = _oracle(q, k, cos, sin, pid, interleaved, layout, dq_out, dk_out)
    for name, out, r in zip(("q_out", "k_out", "dq", "dk"), (q_out, k_out, dq, dk), ref):
        assert rel_error(out, r) <= TOLERANCE[torch.bfloat16], name


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_positions_give_nan_in_kernel(device):
    """The kernel cannot raise without a host sync: a position with no table row gives NaN for the
    rotated entries of that token (and the pass-through entries stay exact)."""
    from tokenforge.kernels import rope as launcher

    q, k = torch.randn(1, 4, 2, 16, device=device), torch.randn(1, 4, 1, 16, device=device)
    cos, sin = torch.randn(8, 8, device=device), torch.randn(8, 8, device=device)
    pid = torch.tensor([[0, 8, -1, 7]], device=device)
    q_out, k_out = launcher.rope_forward(q, k, cos, sin, pid, False, "bshd")
    for x, out in ((q, q_out), (k, k_out)):
        assert torch.isnan(out[0, 1:3, :, :8]).all() and torch.isfinite(out[0, [0, 3]]).all()
        assert torch.equal(out[..., 8:], x[..., 8:])


# ---------------------------------------------------------------------------------------------
# CUDA at real sizes (skipped without a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,seq,hq,hk,head_dim,rot_dim", [(4, 4096, 32, 8, 128, 128), (2, 2048, 12, 12, 80, 32),
                                                              (1, 1000, 8, 1, 256, 256)])
def test_cuda_real_sizes(layout, interleaved, dtype, batch, seq, hq, hk, head_dim, rot_dim):
    q, k = _packed_qkv(layout, batch, seq, hq, hk, head_dim, "cuda", dtype)
    cos, sin, pid = _tables(batch, seq, rot_dim, "cuda", interleaved, batched=not interleaved)
    check_against_reference(q, k, cos, sin, pid, interleaved, layout, "triton")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_cuda_auto_picks_triton():
    q = torch.randn(1, 8, 4, 64, device="cuda", dtype=torch.bfloat16)
    cos = torch.randn(8, 64, device="cuda")
    assert backends.explain("rope", q, q, cos, cos)[0] == "triton"


# ---------------------------------------------------------------------------------------------
# Dispatch and refusals
# ---------------------------------------------------------------------------------------------


def test_cpu_auto_backend_and_float64(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    q, cos = torch.randn(1, 3, 2, 8), torch.randn(3, 8)
    assert backends.choose("rope", q, q, cos, cos) == ("triton" if kernels.INTERPRETED else "torch")
    q64, cos64 = q.double(), cos.double()
    assert backends.choose("rope", q64, q64, cos64, cos64) == "torch"
    got = rope(q64, q64, cos64, cos64)
    want = rope_reference(q64, q64, cos64, cos64)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        rope(q64, q64, cos64, cos64, backend="triton")
    with pytest.raises(backends.BackendUnavailableError, match="no cuda backend"):
        rope(q, q, cos, cos, backend="cuda")


def test_head_dim_limit_is_a_clear_error():
    from tokenforge.kernels.rope import MAX_HEAD_DIM

    q, cos = torch.empty(1, 1, 1, MAX_HEAD_DIM + 2), torch.empty(1, 2)
    with pytest.raises(backends.BackendUnavailableError, match=f"{MAX_HEAD_DIM + 2} > {MAX_HEAD_DIM}.*backend='torch'"):
        rope(q, q, cos, cos, backend="triton")


def _args(**over):
    a = dict(q=torch.randn(2, 5, 4, 16), k=torch.randn(2, 5, 2, 16), cos=torch.randn(5, 16), sin=torch.randn(5, 16))
    a.update(over)
    return a


@pytest.mark.parametrize(
    "over,kwargs,exc,match",
    [
        (dict(cos=torch.randn(5, 15), sin=torch.randn(5, 15)), {}, ValueError, "rotary_dim 15.*even"),
        (dict(cos=torch.randn(5, 18), sin=torch.randn(5, 18)), {}, ValueError, "rotary_dim 18.*<= head_dim 16"),
        (dict(k=torch.randn(3, 5, 2, 16)), {}, ValueError, "agree in batch, seq and head_dim"),
        (dict(k=torch.randn(2, 6, 2, 16)), {}, ValueError, "agree in batch, seq and head_dim"),
        (dict(k=torch.randn(2, 5, 2, 8)), {}, ValueError, "agree in batch, seq and head_dim"),
        (dict(cos=torch.randn(6, 16), sin=torch.randn(6, 16)), {}, ValueError, r"cos\[:seq\]"),
        (dict(cos=torch.randn(3, 5, 16), sin=torch.randn(3, 5, 16)), {}, ValueError, "batch 2"),
        (dict(sin=torch.randn(5, 8)), {}, ValueError, "same shape"),
        (dict(q=torch.randint(0, 5, (2, 5, 4, 16))), {}, TypeError, r"q must be a floating-point.*q.float\(\)"),
        (dict(cos=torch.ones(5, 16, dtype=torch.int32)), {}, TypeError, "cos must be a floating-point"),
        (dict(k=torch.randn(2, 5, 2, 16, device="meta")), {}, ValueError, "one device"),
        (dict(q=torch.randn(2, 5, 16)), {}, ValueError, "4-D"),
        (dict(q=[1.0]), {}, TypeError, "torch.Tensor"),
        ({}, dict(layout="sbhd"), ValueError, "layout"),
        ({}, dict(position_ids=torch.zeros(2, 5)), TypeError, "int64 or int32"),
        ({}, dict(position_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"position_ids has shape \(2, 4\)"),
        ({}, dict(position_ids=torch.full((2, 5), 5)), ValueError, r"\[5, 5\].*5 rows"),
        ({}, dict(position_ids=torch.full((2, 5), -1)), ValueError, "range over"),
        ({}, dict(position_ids=torch.zeros(2, 5, dtype=torch.long, device="meta")), ValueError, "one device"),
        (dict(cos=torch.randn(2, 5, 16), sin=torch.randn(2, 5, 16)), dict(position_ids=torch.zeros(2, 5, dtype=torch.long)),
         ValueError, "table"),
        (dict(cos=torch.randn(5, 16, requires_grad=True)), {}, ValueError, r"cos.detach\(\)"),
    ],
)
def test_bad_inputs(over, kwargs, exc, match):
    a = _args(**over)
    with pytest.raises(exc, match=match):
        rope(a["q"], a["k"], a["cos"], a["sin"], **kwargs)


def test_empty_inputs():
    q = torch.randn(2, 0, 4, 16, requires_grad=True)
    k = torch.randn(2, 0, 2, 16, requires_grad=True)
    q_out, k_out = rope(q, k, torch.randn(0, 16), torch.randn(0, 16))
    assert q_out.shape == q.shape and k_out.shape == k.shape
    (q_out.sum() + k_out.sum()).backward()
    assert q.grad.shape == q.shape


# ---------------------------------------------------------------------------------------------
# nn.RotaryEmbedding
# ---------------------------------------------------------------------------------------------


def _backend():
    return "triton" if kernels.INTERPRETED else None


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_module_matches_formula(interleaved, layout):
    module = RotaryEmbedding(32, max_position_embeddings=64, base=500000.0, interleaved=interleaved,
                             layout=layout, backend=_backend())
    q = torch.randn(_shape(layout, 2, 19, 4, 48))
    k = torch.randn(_shape(layout, 2, 19, 2, 48))
    # float64 angles as the module builds them; HF's fp32 formula differs by fp32 rounding only.
    inv = 500000.0 ** -(torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    freqs = torch.arange(19, dtype=torch.float64)[:, None] * inv
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    bcast = (slice(None), None) if layout == "bshd" else (None, slice(None))
    c, s = emb.cos()[bcast], emb.sin()[bcast]
    turn = _rotate_every_two if interleaved else _rotate_half
    q_out, k_out = module(q, k)
    for x, out in ((q, q_out), (k, k_out)):
        xr = x[..., :32].double()
        want = torch.cat((xr * c + turn(xr) * s, x[..., 32:].double()), -1)
        assert rel_error(out, want) < 1e-6
    # position_ids index the same table: arange positions give the same result, others differ.
    pid = torch.arange(19).expand(2, 19)
    q_pos, k_pos = module(q, k, position_ids=pid)
    assert torch.equal(q_pos, q_out) and torch.equal(k_pos, k_out)
    shifted = module(q, k, position_ids=pid + 7)[0]
    want = rope_reference(q, k, module.cos_cached, module.sin_cached, pid + 7, interleaved, layout)[0]
    assert rel_error(shifted, want) < 1e-6


def test_module_state_and_refusals():
    module = RotaryEmbedding(16, max_position_embeddings=8)
    assert list(module.state_dict()) == []  # the table is derived, never saved
    assert "dim=16" in repr(module)
    with pytest.raises(ValueError, match="max_position_embeddings 8"):
        module(torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16))
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(15)
    with pytest.raises(ValueError, match="layout"):
        RotaryEmbedding(16, layout="sbhd")


# ---------------------------------------------------------------------------------------------
# torch.compile: custom ops with fake implementations, zero graph breaks
# ---------------------------------------------------------------------------------------------


class TinyAttentionInput(torch.nn.Module):
    """A fused qkv projection split into strided q/k views, rotated: the way models call RoPE."""

    def __init__(self, dim, hq, hk, head_dim, backend):
        super().__init__()
        self.hq, self.hk, self.head_dim = hq, hk, head_dim
        self.qkv = torch.nn.Linear(dim, (hq + 2 * hk) * head_dim)
        self.rope = RotaryEmbedding(head_dim // 2, max_position_embeddings=32, backend=backend)

    def forward(self, x, position_ids=None):
        b, s, _ = x.shape
        heads = self.qkv(x).view(b, s, self.hq + 2 * self.hk, self.head_dim)
        q, k = heads[:, :, :self.hq], heads[:, :, self.hq:self.hq + self.hk]
        q, k = self.rope(q, k, position_ids)
        return q.sum(-1) * 2 + k.sum(-1).repeat_interleave(self.hq // self.hk, dim=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("with_pos", [False, True])
def test_fullgraph_compile_forward_backward(device, compile_backend, with_pos):
    torch._dynamo.reset()
    for backend in kernel_backends(device):
        model = TinyAttentionInput(24, 4, 2, 16, backend).to(device)
        x = torch.randn(2, 7, 24, device=device, requires_grad=True)
        pid = torch.randint(0, 32, (2, 7), device=device) if with_pos else None
        eager = model(x, pid)
        eager_grads = torch.autograd.grad(eager.sum(), [x, *model.parameters()])
        compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
        out = compiled(x, pid)
        grads = torch.autograd.grad(out.sum(), [x, *model.parameters()])
        assert rel_error(out, eager) < 1e-5
        for g, ref in zip(grads, eager_grads):
            assert rel_error(g, ref) < 1e-5


@pytest.mark.parametrize("with_pos", [False, True])
def test_no_graph_breaks_reported(with_pos):
    torch._dynamo.reset()
    model = TinyAttentionInput(24, 4, 1, 16, _backend())
    pid = torch.randint(0, 32, (2, 5)) if with_pos else None
    explanation = torch._dynamo.explain(model)(torch.randn(2, 5, 24), pid)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_custom_ops_have_fake_implementations():
    if not kernels.INTERPRETED:
        pytest.skip("the custom ops wrap kernel backends; none runs on CPU without TRITON_INTERPRET=1")
    q, k = _packed_qkv("bhsd", 2, 5, 4, 2, 16, "cpu", torch.float32)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    pid_table = torch.randn(9, 8)
    for op in (torch.ops.tokenforge.rope_fwd, torch.ops.tokenforge.rope_bwd):
        torch.library.opcheck(op, (q, k, cos, sin, None, False, "bhsd", "triton"),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(op, (q, k, pid_table, pid_table, torch.randint(0, 9, (1, 5)), True, "bhsd", "triton"),
                              test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# Compile gate: every config the launcher can pick compiles for sm_90 and sm_80 without spills.
# ---------------------------------------------------------------------------------------------

FLAGS = ("INTERLEAVED", "HAS_PASS", "HAS_POS", "BACKWARD")
# The register-heaviest variant (index arithmetic of the pass-through pairs, the position gather
# and the swapped sin of the backward; ptxas: ~110 registers at most, the interleaved one no more);
# all 16 variants are gated at the LLaMA-8B config below.
HEAVIEST = dict(INTERLEAVED=False, HAS_PASS=True, HAS_POS=True, BACKWARD=True)


def _rope_compile(cfg, flags, arch, q_dtype="bfloat16", cos_dtype="float32", aligned=True):
    from compile_gate import TARGETS, TRITON_DTYPE, compile_kernel, jit_function

    from tokenforge.kernels import rope as rope_kernels

    x, c = "*" + TRITON_DTYPE[q_dtype], "*" + TRITON_DTYPE[cos_dtype]
    types = {n: x for n in ("Q", "K", "QO", "KO")}
    types.update(COS=c, SIN=c, POS="*i64")
    fn = rope_kernels._rope_kernel
    for name in jit_function(fn).arg_names:
        if name not in types and name not in FLAGS and not name.startswith("BLOCK_"):
            types[name] = "i32"  # sizes and strides of tensors under 2**31 elements
    cfg = dict(cfg)
    num_warps = cfg.pop("num_warps")
    return compile_kernel(fn, types, dict(cfg, **flags), num_warps, TARGETS[arch], aligned=aligned,
                          unaligned_args=("n_tok", "seq", "heads_q", "heads_k", "n_pos"))


def _rope_configs():
    from tokenforge.kernels import rope as rope_kernels

    return rope_kernels.all_configs()


def _assert_no_spills(compiled, arch, what):
    from compile_gate import ptxas_report, spill_bytes

    report = ptxas_report(compiled.asm["ptx"], arch)
    assert spill_bytes(report) == 0, f"{what} spills on {arch}:\n{report}"


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", GATE_ARCHS)
@pytest.mark.parametrize("cfg", _rope_configs(), ids=lambda c: f"t{c['BLOCK_T']}h{c['BLOCK_H']}j{c['BLOCK_J']}")
def test_rope_configs_compile_without_spills(arch, cfg):
    compiled = _rope_compile(cfg, HEAVIEST, arch)
    assert len(compiled.asm["cubin"]) > 0
    _assert_no_spills(compiled, arch, f"{cfg} {HEAVIEST}")


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", GATE_ARCHS)
def test_rope_every_variant_compiles(arch):
    """All 16 flag variants at the LLaMA-8B config, and every q/cos dtype pairing, unaligned too."""
    from tokenforge.kernels import rope as rope_kernels

    cfg = rope_kernels.config(32, 8, 128)
    for bits in range(16):
        flags = {name: bool(bits >> i & 1) for i, name in enumerate(FLAGS)}
        _assert_no_spills(_rope_compile(cfg, flags, arch), arch, f"{cfg} {flags}")
    for q_dtype in ("float32", "float16", "bfloat16"):
        for cos_dtype in ("float32", q_dtype):
            compiled = _rope_compile(cfg, HEAVIEST, arch, q_dtype, cos_dtype, aligned=False)
            assert len(compiled.asm["cubin"]) > 0


@pytest.mark.compile_gate
def test_rope_vectorised_loads_on_aligned_rows():
    """The LLaMA path (half-split, full rotary) loads 16 bytes per instruction on aligned inputs."""
    from tokenforge.kernels import rope as rope_kernels

    compiled = _rope_compile(rope_kernels.config(32, 8, 128), dict.fromkeys(FLAGS, False), "sm_90")
    assert re.search(r"ld\.global(\.\w+)*\.v4", compiled.asm["ptx"]), "expected 128-bit vector loads"


def test_every_shape_maps_to_a_gated_config():
    from tokenforge.kernels import rope as rope_kernels

    gated = [tuple(sorted(c.items())) for c in rope_kernels.all_configs()]
    assert len(set(gated)) == len(gated)
    for hq, hk in [(1, 1), (4, 1), (32, 8), (12, 12), (3, 5), (64, 64), (128, 128), (100, 7)]:
        for head_dim in [2, 16, 22, 64, 80, 96, 128, 256, 320, 512]:
            assert tuple(sorted(rope_kernels.config(hq, hk, head_dim).items())) in gated, (hq, hk, head_dim)
