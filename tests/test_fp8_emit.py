"""fp8 emitted by the producers of Float8Linear's inputs (tokenforge.fp8.emit): RMSNorm, the fused
residual add + RMSNorm and SwiGLU write their output's fp8 copy (rowwise or (1, 128) blocks) in the
pass that writes the output, and the next Float8Linear uses it instead of quantizing again.

What must hold, checked in the interpreter:

- the emitted copy is bit-identical to quantizing the stored output (data and scales), for awkward
  widths (partial 128-blocks, rows wider than one tile), every input dtype, e4m3/e5m2, power-of-two
  scales, rows at magnitudes 1e-3 .. 1e3, and zero / inf / nan rows (the quantizer's documented rules);
- a Float8Linear fed an emitting producer skips its input cast and gives the same output and
  gradients, bit for bit, as without emission; a changed, reshaped or differently cast tensor is
  quantized afresh;
- tokenforge.patch(model, fp8="rowwise" | "blockwise") turns it on for the reference Transformer
  (same loss and gradients bit for bit, fewer casts), not for tensorwise, and unpatch turns it off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from device_params import DEVICES

import tokenforge
from tokenforge import fp8
from tokenforge.fp8 import emit
from tokenforge.ops import add_rms_norm, rms_norm, swiglu

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _quantized(y: torch.Tensor, cast: fp8.EmitCast):
    """What tokenforge.fp8.quantize makes of the stored output: the quantizer Float8Linear would
    run (Triton here; its agreement with the torch rules is tests/test_fp8_quantize.py's)."""
    y2 = y.reshape(-1, y.shape[-1])
    if cast.blockwise:
        return fp8.quantize(y2, cast.fp8_dtype, "blockwise", cast.power_of_two, block=(1, 128), backend="triton")
    return fp8.quantize(y2, cast.fp8_dtype, "rowwise", cast.power_of_two, backend="triton")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, a nan matching a nan (the inf/nan rows)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(nan=-1.0), b.nan_to_num(nan=-1.0))


def _assert_bit_identical(found, y, cast):
    assert found is not None, "no fp8 copy attached"
    data, scale = found
    ref_data, ref_scale = _quantized(y, cast)
    assert scale.shape == ref_scale.shape, (scale.shape, ref_scale.shape)
    assert _same(scale, ref_scale), "scales differ"
    # Bytes equal, except that any two nan codes match (a nan row's nan elements: the interpreter's
    # emulated bf16 may flip a nan's sign bit between a register and a reload).
    both_nan = data.float().isnan() & ref_data.float().isnan()
    bad = ((data.view(torch.uint8) != ref_data.view(torch.uint8)) & ~both_nan).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} fp8 bytes differ, first at {bad[0].tolist()}"


def _rows(rows: int, n: int, dtype, device, special=False):
    """Rows at magnitudes 1e-3 .. 1e3; with ``special`` a zero row, an inf and a nan in others."""
    x = torch.randn(rows, n, device=device) * torch.logspace(-3, 3, rows, device=device)[:, None]
    if special:
        x[0] = 0.0
        x[1, n // 2] = float("inf")
        x[2, n - 1] = float("nan")
    return x.to(dtype)


CASTS = [fp8.EmitCast(E4M3, False, False), fp8.EmitCast(E4M3, True, False), fp8.EmitCast(E5M2, False, True),
         fp8.EmitCast(E4M3, True, True)]
CAST_IDS = ["rowwise", "blockwise", "rowwise-e5m2-pow2", "blockwise-pow2"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the inf/nan rows, in the interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cast", CASTS, ids=CAST_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norms_emit_what_quantize_makes(device, cast, dtype):
    """rms_norm and add_rms_norm: widths inside one 128-block, with a partial last block, and several."""
    for n in (48, 200, 384) if device == "cpu" else (4096, 8192):
        x = _rows(6, n, dtype, device, special=True)
        w = torch.randn(n, device=device).to(dtype)
        y = rms_norm(x, w, 1e-6, fp8=cast)
        assert _same(y, rms_norm(x, w, 1e-6)), "emission changed the output"
        _assert_bit_identical(emit.lookup(y, cast), y, cast)
        r = _rows(6, n, dtype, device)
        normed, h = add_rms_norm(r, x, w, 1e-6, fp8=cast)
        ref_normed, ref_h = add_rms_norm(r, x, w, 1e-6)
        assert _same(normed, ref_normed) and _same(h, ref_h)
        _assert_bit_identical(emit.lookup(normed, cast), normed, cast)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cast", CASTS, ids=CAST_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_emits_what_quantize_makes(device, cast, dtype):
    """SwiGLU: rows packed several to a tile, one row a tile, and rows wider than the kernel's tile
    (rowwise then takes a whole-row config; blockwise stays on the tiles)."""
    for n in (40, 300, 1536) if device == "cpu" else (1408, 14336):
        gate = _rows(5, n, dtype, device)
        up = _rows(5, n, dtype, device, special=True)
        y = swiglu(gate, up, fp8=cast)
        assert _same(y, swiglu(gate, up))
        _assert_bit_identical(emit.lookup(y, cast), y, cast)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["rowwise", "blockwise"])
def test_float8_linear_uses_the_emitted_cast(device, recipe, monkeypatch):
    """Norm -> Float8Linear and SwiGLU -> Float8Linear: the input cast is skipped, and y, dx and
    every gradient are bit-identical to the unfused path; M not a multiple of 16 (padded rows)."""
    import tokenforge.fp8.linear as linear

    config = fp8.Float8LinearConfig.from_recipe_name(recipe)
    cast = fp8.emit_cast_for(config.casts(), config.round_scales_to_power_of_2)
    assert cast == fp8.EmitCast(E4M3, recipe == "blockwise", False)
    casts = []
    real_cast = linear.cast_for_gemm
    monkeypatch.setattr(linear, "cast_for_gemm", lambda t, *a, **k: (casts.append(tuple(t.shape)), real_cast(t, *a, **k))[1])
    K, N = (256, 64) if device == "cpu" else (4096, 1024)
    x = torch.randn(3, 7, K, device=device, requires_grad=True)
    w = torch.randn(K, device=device, requires_grad=True)
    layer = fp8.Float8Linear.from_linear(torch.nn.Linear(K, N, device=device), recipe)
    for produce in (lambda: rms_norm(x, w, 1e-6, fp8=cast), lambda: swiglu(x, x * 0.5, fp8=cast)):
        fused_in = produce()
        casts.clear()
        fused = layer(fused_in)
        assert (21, K) not in casts and (32, K) not in casts, f"the input was quantized again: {casts}"
        plain = layer(_plain(produce))
        assert torch.equal(fused, plain)
        g = torch.randn_like(fused)
        inputs = (x, w, layer.weight, layer.bias)
        ga = torch.autograd.grad(fused, inputs, g, allow_unused=True)  # SwiGLU does not use w
        gb = torch.autograd.grad(layer(_plain(produce)), inputs, g, allow_unused=True)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(ga, gb))


def _plain(produce):
    """The producer's output with its fp8 copy dropped (the unfused path), still in the graph."""
    y = produce()
    setattr(y, emit._ATTR, None)
    return y


def test_stale_or_mismatched_copies_are_not_used():
    cast = fp8.EmitCast(E4M3, False, False)
    x = torch.randn(8, 64)
    y = rms_norm(x, None, 1e-6, fp8=cast, backend="triton")
    assert emit.lookup(y, cast) is not None
    assert emit.lookup(y, fp8.EmitCast(E4M3, True, False)) is None  # another cast
    assert emit.lookup(y, None) is None
    assert emit.lookup(y.view(16, 32), cast) is None  # another object (and row length)
    y.mul_(2)  # changed in place: the copy is stale
    assert emit.lookup(y, cast) is None
    # Producers that cannot emit just do not: the torch backend, a tensorwise recipe, an autocast
    # that hands the next layer another dtype (it would quantize that, not this output).
    assert emit.lookup(rms_norm(x, None, 1e-6, fp8=cast, backend="torch"), cast) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert emit.lookup(rms_norm(x, None, 1e-6, fp8=cast, backend="triton"), cast) is None
        y16 = rms_norm(x.bfloat16(), None, 1e-6, fp8=cast, backend="triton")
        assert emit.lookup(y16, cast) is not None
        assert emit.lookup(swiglu(x, x, fp8=cast, backend="triton"), cast) is None
    assert fp8.emit_cast_for(fp8.Float8LinearConfig.from_recipe_name("tensorwise").casts(), False) is None


@pytest.mark.parametrize("recipe", ["rowwise", "blockwise", "tensorwise"])
def test_patch_emits_fp8_in_the_reference_transformer(recipe, monkeypatch):
    """patch(model, fp8=recipe) on the reference Transformer: norms and SwiGLU emit for the Float8Linear
    layers they feed (rowwise/blockwise), the loss and every gradient equal the same patch without
    emission bit for bit, with fewer input casts; tensorwise says why it cannot; unpatch undoes it."""
    import tokenforge.fp8.linear as linear
    from tokenforge.models.transformer import Transformer, TransformerConfig
    from tokenforge.nn.rms_norm import RMSNorm

    torch.manual_seed(0)
    # One layer: it holds every emitting site (attention norm, ffn norm, SwiGLU).
    model = Transformer(TransformerConfig.preset("tiny", dim=128, n_layers=1, hidden_dim=256))
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    report = tokenforge.patch(fused, fp8=recipe, attention=False, rope=False, cross_entropy=False)
    tokenforge.patch(plain, fp8=recipe, attention=False, rope=False, cross_entropy=False)
    emitting = [m for m in fused.modules() if isinstance(m, RMSNorm) and m.fp8_emit is not None]
    if recipe == "tensorwise":
        assert not emitting and any("do not emit fp8" in s for s in report.skipped), str(report)
        return
    assert emitting and any("emitted in fp8" in p for p in report.patched), str(report)
    for m in plain.modules():  # the same patch with emission off
        if isinstance(m, RMSNorm):
            m.fp8_emit = None
        if hasattr(m, "swiglu_fn") and hasattr(m.swiglu_fn, "keywords"):
            m.swiglu_fn = m.swiglu_fn.func
    casts = []
    real_cast = linear.cast_for_gemm
    monkeypatch.setattr(linear, "cast_for_gemm", lambda t, *a, **k: (casts.append(1), real_cast(t, *a, **k))[1])
    idx, targets = torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))
    loss = fused(idx, targets)
    fused_casts = len(casts)
    casts.clear()
    ref = plain(idx, targets)
    assert fused_casts < len(casts), (fused_casts, len(casts))
    assert torch.equal(loss, ref)
    loss.backward()
    ref.backward()
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        assert torch.equal(p.grad, q.grad), name
    tokenforge.unpatch(fused)
    assert not any(getattr(m, "fp8_emit", None) for m in fused.modules())
