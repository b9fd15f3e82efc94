"""tokenforge.fp8.grouped_mm_float8 (recipes rowwise: every GEMM in fp8; rowwise_with_gw_hp: dB in
the compute dtype; blockwise: every GEMM in fp8 on 1x128 / 128x128 / 128-token blocks) against a float64 emulation built here from the quantizer's reference (the same
fp8 operands, dequantized, multiplied per expert in float64): out and dA per row, dB per expert, an
empty expert's dB exactly zero; the SQNR against the unquantized product; both backends; the
per-expert token quantizer; the MoE layer with fp8 experts; convert/patch; bad input."""

from __future__ import annotations

import math
import re

import pytest
import torch
from device_params import DEVICES

from tokenforge.fp8 import dequantize, grouped_mm_float8, quantize_reference
from tokenforge.testing import TOLERANCE, rel_error

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# Triton's interpreter warns while it casts fp32 to e5m2 through numpy; the codes come out bit for
# bit the quantizer reference's (tests/test_fp8_quantize.py), so the warning is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")


def _offs(counts, device):
    return torch.cumsum(torch.tensor(counts), 0).to(torch.int32).to(device)


def _deq(t, dtype, scaling, block=None):
    data, scale = quantize_reference(t, dtype, scaling, block=block)
    return dequantize(data, scale, torch.float64)


def _deq_token_blocks(t, dtype):
    """Each column of t (one expert's tokens) quantized per 128 of its rows, dequantized."""
    return torch.cat([_deq(t[i:i + 128], dtype, "colwise") for i in range(0, t.shape[0], 128)])


def emulated(a, b, dout, counts, recipe):
    """(out, dA, dB) in float64 from the recipe's fp8 operands: a per token row and b[e] per output
    column (e4m3) for out; dOut per token row (e5m2) and b[e] per row of K (e4m3) for dA; for dB
    ('rowwise') a (e4m3) and dOut (e5m2) per column over each expert's tokens, else unquantized.
    'blockwise', all e4m3: a and dOut in 1x128 blocks, b[e] in 128x128 blocks (out and dA), a and
    dOut per column and 128 of each expert's tokens (dB)."""
    if recipe == "blockwise":
        a_q, d_q = _deq(a, E4M3, "blockwise", (1, 128)), _deq(dout, E4M3, "blockwise", (1, 128))
    else:
        a_q, d_q = _deq(a, E4M3, "rowwise"), _deq(dout, E5M2, "rowwise")
    out, da, db, start = [], [], [], 0
    for e, c in enumerate(counts):
        rows = slice(start, start + c)
        if recipe == "blockwise":
            w_q = _deq(b[e], E4M3, "blockwise", (128, 128))
            out.append(a_q[rows] @ w_q)
            da.append(d_q[rows] @ w_q.t())
        else:
            out.append(a_q[rows] @ _deq(b[e], E4M3, "colwise"))
            da.append(d_q[rows] @ _deq(b[e], E4M3, "rowwise").t())
        if recipe == "rowwise" and c:
            db.append(_deq(a[rows], E4M3, "colwise").t() @ _deq(dout[rows], E5M2, "colwise"))
        elif recipe == "blockwise" and c:
            db.append(_deq_token_blocks(a[rows], E4M3).t() @ _deq_token_blocks(dout[rows], E4M3))
        else:
            db.append(a[rows].double().t() @ dout[rows].double())
        start += c
    return torch.cat(out), torch.cat(da), torch.stack(db)


def _worst_row(out, ref):
    live = ref.norm(dim=1) > 0
    return ((out.double() - ref).norm(dim=1)[live] / ref.norm(dim=1)[live]).max().item()


def _sqnr_db(out, ref):
    err = rel_error(out, ref)
    return math.inf if err == 0 else -20 * math.log10(err)


CPU_CASES = {"awkward": ([0, 21, 1, 33, 0, 7], 48, 64), "one-takes-all": ([0, 0, 53, 0], 32, 48)}
GPU_CASES = {"moe-64": ([int(c) for c in torch.randint(0, 600, (64,), generator=torch.Generator().manual_seed(0))],
                        2048, 1408),
             "skewed": ([8192] + [0] * 14 + [3], 7168, 2048)}
# Blockwise: K and N multiples of 128, experts of more than 128 tokens (several dB token blocks,
# the last one partial) and an expert of exactly 128.
CPU_BLOCK_CASES = {"awkward": ([0, 5, 129, 0, 129, 2], 128, 128), "one-takes-all": ([0, 0, 131, 0], 128, 256)}
GPU_BLOCK_CASES = {"moe-64": (GPU_CASES["moe-64"][0], 2048, 1408), "skewed": GPU_CASES["skewed"]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp", "blockwise"])
def test_matches_the_float64_emulation_per_row(device, dtype, backend, recipe):
    """Experts stored (E, K, N) (tokenforge.nn.MoE) and (E, N, K) (Hugging Face's gate_up_proj,
    passed transposed): the weight casts take different routes to the same fp8 operands."""
    if recipe == "blockwise":
        cases = CPU_BLOCK_CASES if device == "cpu" else GPU_BLOCK_CASES
    else:
        cases = CPU_CASES if device == "cpu" else GPU_CASES
    # Every case stored (E, K, N); the first (the awkward counts) also stored (E, N, K): the layout
    # changes only the weight cast's route, which one case covers (CI time: blockwise is ~10 s a case).
    runs = [(case, "ekn") for case in cases.items()] + [(next(iter(cases.items())), "enk")]
    for (name, (counts, k, n)), stored in runs:
        offs = _offs(counts, device)
        a = torch.randn(sum(counts), k, device=device, dtype=dtype, requires_grad=True)
        shape = (len(counts), k, n) if stored == "ekn" else (len(counts), n, k)
        leaf = (torch.randn(shape, device=device) / k ** 0.5).to(dtype).requires_grad_()
        b = leaf if stored == "ekn" else leaf.transpose(1, 2)
        out = grouped_mm_float8(a, b, offs, recipe=recipe, backend=backend)
        dout = torch.randn_like(out)
        out.backward(dout)
        db = leaf.grad if stored == "ekn" else leaf.grad.transpose(1, 2)
        ref_out, ref_da, ref_db = emulated(a.detach(), b.detach(), dout, counts, recipe)
        # One rounding of an fp32 accumulator to the output dtype per element.
        row_tol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5
        db_tol = row_tol if recipe != "rowwise_with_gw_hp" else TOLERANCE[dtype]
        where = (name, stored)
        assert out.dtype == dtype and out.shape == ref_out.shape
        assert _worst_row(out, ref_out) <= row_tol, (where, "out")
        assert _worst_row(a.grad, ref_da) <= row_tol, (where, "dA")
        for e, c in enumerate(counts):
            if c == 0:
                assert torch.count_nonzero(db[e]) == 0, (where, f"dB[{e}] of an empty expert")
            else:
                assert rel_error(db[e], ref_db[e]) <= db_tol, (where, f"dB[{e}]")
        # Against the unquantized product: fp8 costs resolution, not correctness.
        exact = torch.cat([a.detach()[s:e].double() @ b.detach()[i].double()
                           for i, (s, e) in enumerate(zip([0] + offs.tolist()[:-1], offs.tolist()))])
        assert _sqnr_db(out, exact) >= 20, where


@pytest.mark.parametrize("device", DEVICES)
def test_scales_hold_per_expert_and_per_row(device):
    """Tokens and experts of magnitudes 2^-8 .. 2^8: each row and each expert keeps its own scale
    (a tensorwise scale would flush the small ones to zero)."""
    counts, k, n = ([9, 0, 17, 6], 32, 48) if device == "cpu" else ([700, 0, 1300, 211], 1024, 512)
    offs = _offs(counts, device)
    t = sum(counts)
    a = (torch.randn(t, k, device=device) * 2.0 ** torch.randint(-8, 9, (t, 1), device=device)).to(torch.bfloat16)
    b = (torch.randn(len(counts), k, n, device=device) * 2.0 ** torch.arange(-8, 8, 4, device=device)[:, None, None]
         ).to(torch.bfloat16)
    out = grouped_mm_float8(a, b, offs)
    ref_out, _, _ = emulated(a, b, torch.zeros_like(out), counts, "rowwise")
    assert _worst_row(out, ref_out) <= 2.0 ** -7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp", "blockwise"])
def test_moe_layer_with_fp8_experts(device, recipe):
    """MoE(fp8=...) trains like the bf16 layer (output and every gradient within fp8's SQNR),
    the same parameters and state_dict keys; fp8=None is the plain layer."""
    from tokenforge.nn import MoE

    dim, hidden, tokens = (32, 48, 40) if device == "cpu" else (1024, 1536, 4096)
    if recipe == "blockwise" and device == "cpu":
        dim, hidden = 128, 128
    torch.manual_seed(0)
    plain = MoE(dim, hidden, num_experts=6, top_k=2, num_shared_experts=1, device=device, dtype=torch.bfloat16)
    fp8 = MoE(dim, hidden, num_experts=6, top_k=2, num_shared_experts=1, device=device, dtype=torch.bfloat16,
              fp8=recipe)
    fp8.load_state_dict(plain.state_dict())
    assert fp8.state_dict().keys() == plain.state_dict().keys()
    assert f"fp8={recipe}" in repr(fp8)
    x = torch.randn(2, tokens // 2, dim, device=device, dtype=torch.bfloat16)
    outs = []
    for layer in (plain, fp8):
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.float().square().mean().backward()
        outs.append((y, xx.grad, layer.w_gate_up.grad, layer.w_down.grad, layer.router.weight.grad))
    for what, got, ref in zip(("y", "dx", "dw_gate_up", "dw_down", "drouter"), outs[1], outs[0]):
        assert _sqnr_db(got, ref) >= 17, what


def test_bad_input_gets_a_clear_error():
    from tokenforge.nn import MoE

    counts = [5, 11]
    offs = _offs(counts, "cpu")
    a = torch.randn(16, 32, dtype=torch.bfloat16)
    b = torch.randn(2, 32, 48, dtype=torch.bfloat16)
    cases = [
        (dict(a=a, b=b, offs=offs, recipe="tensorwise"), ValueError, "recipe must be one of"),
        (dict(a=a, b=b, offs=offs, recipe="blockwise"), ValueError, "needs K and N multiples of 128"),
        (dict(a=a[:, :24], b=b[:, :24], offs=offs), ValueError, "multiples of 16"),
        (dict(a=a, b=b[:, :, :40], offs=offs), ValueError, "multiples of 16"),
        (dict(a=a, b=b.float(), offs=offs), TypeError, "share one of"),
        (dict(a=a.to(E4M3), b=b.to(E4M3), offs=offs), TypeError, "compute dtype"),
        (dict(a=a, b=b, offs=_offs([5, 10], "cpu")), ValueError, "offs[-1]"),
        (dict(a=a, b=b, offs=offs.long()), TypeError, "int32"),
    ]
    for kwargs, exc, words in cases:
        args = (kwargs.pop("a"), kwargs.pop("b"), kwargs.pop("offs"))
        with pytest.raises(exc, match=re.escape(words)):
            grouped_mm_float8(*args, **kwargs)
    with pytest.raises(ValueError, match="multiples of 16"):
        MoE(24, 48, num_experts=2, top_k=1, fp8="rowwise_with_gw_hp")
    with pytest.raises(ValueError, match="recipe must be one of"):
        MoE(32, 48, num_experts=2, top_k=1, fp8="tensorwise")
    with pytest.raises(ValueError, match="multiples of 128"):
        MoE(128, 48, num_experts=2, top_k=1, fp8="blockwise")


def test_empty_batch_and_frozen_inputs():
    offs = _offs([0, 0], "cpu")
    a = torch.randn(0, 32, requires_grad=True)
    b = torch.randn(2, 32, 16, requires_grad=True)
    out = grouped_mm_float8(a, b, offs)
    out.sum().backward()
    assert out.shape == (0, 16) and torch.count_nonzero(b.grad) == 0
    # Only b trainable (a frozen input), then only a: each gradient alone matches the pair's.
    counts = [3, 13]
    offs = _offs(counts, "cpu")
    a = torch.randn(16, 32)
    b = torch.randn(2, 32, 16, requires_grad=True)
    grouped_mm_float8(a, b, offs).sum().backward()
    a2 = a.clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    grouped_mm_float8(a2, b2, offs).sum().backward()
    assert torch.equal(b.grad, b2.grad)


def test_convert_and_patch_turn_on_fp8_experts_and_keep_routers():
    """convert_to_float8 / tokenforge.patch(fp8=...) on an MoE Transformer: the expert GEMMs go fp8
    (report.experts), routers stay nn.Linear, a training step's loss stays close to bf16's, and
    revert / unpatch turn the experts back exactly."""
    import tokenforge
    from tokenforge.fp8 import Float8Linear, convert_to_float8, revert_float8
    from tokenforge.models.transformer import PRESETS, Transformer
    from tokenforge.nn import MoE

    torch.manual_seed(0)
    model = Transformer(PRESETS["moe-tiny"])
    moes = [name for name, m in model.named_modules() if isinstance(m, MoE)]
    assert moes
    ids = torch.randint(0, 256, (2, 32))

    def loss():
        return model(ids, targets=ids)

    ref = loss()
    report = convert_to_float8(model, "rowwise")
    assert report.experts == moes and all(model.get_submodule(n).fp8 == "rowwise" for n in moes)
    for name in moes:
        assert type(model.get_submodule(f"{name}.router")) is torch.nn.Linear
        assert report.skipped[f"{name}.router"].startswith("MoE router")
    assert "experts" in str(report)
    got = loss()
    assert abs(got.item() - ref.item()) <= 0.05 * abs(ref.item())
    got.backward()
    assert all(model.get_submodule(n).w_gate_up.grad is not None for n in moes)
    revert_float8(model)
    assert all(model.get_submodule(n).fp8 is None for n in moes)
    assert not any(isinstance(m, Float8Linear) for m in model.modules())

    patched = tokenforge.patch(model, fp8="rowwise", attention=False, rope=False, swiglu=False, cross_entropy=False,
                               rms_norm=False)
    assert any("expert GEMMs" in p for p in patched.patched), str(patched)
    assert all(model.get_submodule(n).fp8 == "rowwise" for n in moes)
    tokenforge.unpatch(model)
    report = convert_to_float8(model, "rowwise_with_gw_hp")  # that recipe keeps the experts' dB in high precision
    assert all(model.get_submodule(n).fp8 == "rowwise_with_gw_hp" for n in moes)
    revert_float8(model)
    assert all(model.get_submodule(n).fp8 is None for n in moes)
    assert torch.equal(loss(), ref)


def test_blockwise_models_get_blockwise_experts_where_widths_tile():
    """A blockwise-converted model: MoE layers whose widths are multiples of 128 run blockwise expert
    GEMMs, the others rowwise, each named in the report; revert turns both off."""
    from tokenforge.fp8 import convert_to_float8, revert_float8
    from tokenforge.fp8.grouped import expert_recipe_for, fit_expert_recipe
    from tokenforge.nn import MoE

    assert [expert_recipe_for(r) for r in ("tensorwise", "rowwise", "rowwise_with_gw_hp", "blockwise")] == \
        ["rowwise", "rowwise", "rowwise_with_gw_hp", "blockwise"]
    assert fit_expert_recipe("blockwise", 256, 1408) == "blockwise"
    assert fit_expert_recipe("blockwise", 256, 96) == "rowwise" and fit_expert_recipe("rowwise", 48, 32) == "rowwise"
    model = torch.nn.ModuleDict({"wide": MoE(128, 256, num_experts=4, top_k=2), "narrow": MoE(64, 96, num_experts=4,
                                                                                                 top_k=2)})
    report = convert_to_float8(model, "blockwise")
    assert model["wide"].fp8 == "blockwise" and model["narrow"].fp8 == "rowwise"
    assert report.experts == ["wide", "narrow"] and list(report.expert_notes) == ["narrow"]
    assert "narrow: grouped GEMMs in fp8 (rowwise: dim 64 / hidden_dim 96 not multiples of 128" in str(report)
    revert_float8(model)
    assert model["wide"].fp8 is None and model["narrow"].fp8 is None


@pytest.mark.parametrize("recipe", ["rowwise", "blockwise"])
def test_torch_compile_fullgraph_matches_eager(recipe):
    """No graph breaks (offs unchecked, as MoE calls it), the same out and gradients as eager."""
    counts, k, n = ([0, 21, 11], 32, 16) if recipe == "rowwise" else ([0, 130, 3], 128, 128)
    offs = _offs(counts, "cpu")
    a = torch.randn(sum(counts), k, requires_grad=True)
    b = torch.randn(3, k, n, requires_grad=True)

    def f(a, b):
        return grouped_mm_float8(a, b, offs, check_offs=False, recipe=recipe, backend="triton")

    eager = f(a, b)
    eager.square().sum().backward()
    grads = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(f)(a, b)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(a, b)
    out.square().sum().backward()
    assert torch.equal(out, eager) and torch.equal(a.grad, grads[0]) and torch.equal(b.grad, grads[1])


@pytest.mark.parametrize("device", DEVICES)
def test_expert_column_quantizer_matches_the_reference_bit_for_bit(device):
    """Per-(expert, column) scales over each expert's tokens, the data transposed: the kernel and the
    reference agree bit for bit (e4m3 and e5m2, power-of-two scales too), empty experts scale 1, a
    column of one expert holding an inf or nan shows in that expert's scale only."""
    from tokenforge.fp8.quantize import quantize_expert_cols_op, quantize_expert_cols_reference

    counts, c = ([0, 37, 1, 70, 0, 9], 80) if device == "cpu" else ([0, 3000, 1, 7000, 0, 900], 2048)
    offs = _offs(counts, device)
    x = torch.randn(sum(counts), c, device=device, dtype=torch.bfloat16) * 3
    x[40, 5] = float("inf")  # expert 3's rows start at 38
    for dtype in (E4M3, E5M2):
        for pow2 in (False, True):
            data_t, scale = quantize_expert_cols_op(x, offs, dtype, pow2, "triton")
            ref_t, ref_scale = quantize_expert_cols_reference(x, offs, dtype, pow2)
            assert data_t.shape == (c, sum(counts)) and scale.shape == (len(counts), c)
            assert torch.equal(scale, ref_scale), (dtype, pow2)
            assert torch.equal(data_t.view(torch.uint8), ref_t.view(torch.uint8)), (dtype, pow2)
            assert torch.all(scale[[0, 4]] == 1)
            assert torch.isinf(scale[3, 5]) and torch.isfinite(scale[1]).all() and torch.isfinite(scale[3, 6:]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # the inf, interpreted
@pytest.mark.parametrize("device", DEVICES)
def test_expert_token_block_quantizer_matches_the_reference_bit_for_bit(device):
    """Scales per (column, 128 of an expert's tokens from its first): the kernel and the reference
    agree bit for bit, each block's scale sits in row e + start_e // 128 + j (one row per block,
    rows of no block stay 1), and an inf shows in its own block's scale only."""
    from tokenforge.fp8.quantize import quantize_expert_cols_op, quantize_expert_cols_reference
    from tokenforge.kernels.fp8_quantize import token_block_scale_rows

    counts, c = ([0, 37, 1, 300, 0, 128, 129], 80) if device == "cpu" else ([0, 3000, 1, 7000, 0, 128, 900], 2048)
    offs = _offs(counts, device)
    t = sum(counts)
    x = torch.randn(t, c, device=device, dtype=torch.bfloat16) * 3
    x[38 + 130, 5] = float("inf")  # expert 3 (rows from 38): its second token block
    for dtype in (E4M3, E5M2):
        for pow2 in (False, True):
            data_t, scale = quantize_expert_cols_op(x, offs, dtype, pow2, "triton", 128)
            ref_t, ref_scale = quantize_expert_cols_reference(x, offs, dtype, pow2, 128)
            assert scale.shape == (token_block_scale_rows(t, len(counts)), c) == ref_scale.shape
            assert torch.equal(scale, ref_scale), (dtype, pow2)
            assert torch.equal(data_t.view(torch.uint8), ref_t.view(torch.uint8)), (dtype, pow2)
    # The rows, from the rule: every block its own row, in order, the others 1.
    used, start = [], 0
    for e, n in enumerate(counts):
        used += [e + start // 128 + j for j in range((n + 127) // 128)]
        start += n
    assert used == sorted(set(used)) and max(used) < scale.shape[0]
    unused = [r for r in range(scale.shape[0]) if r not in used]
    assert torch.all(scale[unused] == 1)
    row = used[3]  # expert 3's blocks are the 3rd and 4th in order (after experts 1 and 2)
    assert torch.isinf(scale[row, 5]) and torch.isfinite(scale[used[2]]).all() and torch.isfinite(scale[row, 6:]).all()
    # Blockwise scales track each block: a block at 1e-3 next to one at 1e3 in the same column keeps
    # its resolution (the per-expert scale would flush it to zero).
    y = torch.randn(256, c, device=device)
    y[128:] *= 1e-6
    data_t, scale = quantize_expert_cols_op(y, _offs([256], device), E4M3, False, "triton", 128)
    back = data_t.float().t() * torch.cat([scale[0].expand(128, c), scale[1].expand(128, c)])
    assert rel_error(back[128:], y[128:]) < 0.07


def test_custom_ops_pass_opcheck():
    """The two ops the fp8 dB adds: schema and fake tensors agree with the real outputs."""
    from tokenforge import kernels

    backend = "triton" if kernels.INTERPRETED else "torch"
    offs = _offs([0, 7, 9], "cpu")
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.tokenforge.fp8_quantize_expert_cols, (x, offs, E4M3, False, backend),
                          test_utils=("test_faketensor",))
    a_t, s_a = torch.ops.tokenforge.fp8_quantize_expert_cols(x, offs, E4M3, False, backend)
    d_t, s_d = torch.ops.tokenforge.fp8_quantize_expert_cols(torch.randn(16, 48), offs, E5M2, False, backend)
    torch.library.opcheck(torch.ops.tokenforge.grouped_mm_fp8_wgrad,
                          (a_t, d_t, offs, s_a, s_d, torch.bfloat16, backend), test_utils=("test_faketensor",))
    # Per 128 tokens (the blockwise recipe): 200 tokens, so several blocks and scale rows.
    offs = _offs([0, 150, 50], "cpu")
    x = torch.randn(200, 32, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.tokenforge.fp8_quantize_expert_cols, (x, offs, E4M3, False, backend, 128),
                          test_utils=("test_faketensor",))
    a_t, s_a = torch.ops.tokenforge.fp8_quantize_expert_cols(x, offs, E4M3, False, backend, 128)
    d_t, s_d = torch.ops.tokenforge.fp8_quantize_expert_cols(torch.randn(200, 48), offs, E4M3, False, backend, 128)
    torch.library.opcheck(torch.ops.tokenforge.grouped_mm_fp8_wgrad,
                          (a_t, d_t, offs, s_a, s_d, torch.bfloat16, backend, 128), test_utils=("test_faketensor",))
