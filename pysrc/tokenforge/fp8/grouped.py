"""FP8 training for mixture-of-experts GEMMs: ``grouped_mm_float8(a, b, offs)``, the fp8 twin of
:func:`tokenforge.ops.grouped_mm` with autograd (what Float8Linear is to nn.Linear).

    forward   out[rows of e] = a_e @ b[e]        a per token row, b[e] per output column, e4m3
    backward  dA_e = dOut_e @ b[e]^T             dOut per token row (e5m2), b[e] per row of K (e4m3)
              dB[e] = a_e^T @ dOut_e              'rowwise': a (e4m3) and dOut (e5m2) per (expert,
                                                  column) over the expert's tokens; 'rowwise_with_gw_hp':
                                                  in the compute dtype

Recipes, Float8Linear's of the same names: per-GEMM axiswise scales along each GEMM's reduction
dim, recomputed from the current tensors every call. ``blockwise`` (DeepSeek-V3's, e4m3 for all):
tokens and dOut in 1x128 blocks along each GEMM's reduction dim, each b[e] in 128x128 blocks (one
quantization serves the forward and dA: a 128x128 block is its own transpose's block), and the dB
operands per (column, 128 of an expert's tokens) (``fp8_quantize_expert_cols`` with token_block);
every GEMM scales each K tile's fp32 partial product by its blocks. K and N multiples of 128.

The forward and dA GEMMs are tokenforge's grouped kernel with FP8 wgmma
(:func:`tokenforge.ops.grouped_mm_fp8`, both operands K-major): each GEMM's weight cast writes fp8
data whose reduced dim is unit-stride, rowwise where b's layout has it so, else transposed by the
per-expert column quantizer (no bf16 copy of b either way; blockwise weights keep their storage
order and the launcher copies the fp8 data where a GEMM needs the other). The fp8 dB GEMM reduces
over each expert's tokens, so a scale may vary per expert and column (and 128-token block) but not
within what one step reduces: :func:`tokenforge.kernels.fp8_quantize.quantize_expert_cols` writes
a and dOut quantized that way and transposed (token-major, as FP8 wgmma wants them), and the
grouped reduction kernel applies the scales to its fp32 sums. a and b are saved in the compute
dtype (every GEMM casts them its own way).

Path of a call: :class:`tokenforge.nn.MoE` (``fp8=``) or a caller -> :func:`grouped_mm_float8`
-> :class:`Float8GroupedMMFunction` -> the custom ops ``tokenforge::fp8_quantize``,
``tokenforge::fp8_quantize_expert_cols``, ``tokenforge::grouped_mm_fp8``,
``tokenforge::grouped_mm_fp8_wgrad`` / ``tokenforge::grouped_mm_wgrad`` -> their kernels.
"""

from __future__ import annotations

from typing import Optional

import functools

import torch

from tokenforge import backends
from tokenforge.fp8.config import E4M3, E5M2
from tokenforge.fp8.quantize import OP as QUANT_OP
from tokenforge.fp8.quantize import cast_for_gemm
from tokenforge.kernels.fp8_quantize import TOKEN_BLOCK
from tokenforge.ops.grouped_mm import OP as GROUPED_OP
from tokenforge.ops.grouped_mm import OP_FP8, check_inputs, grouped_mm, grouped_mm_fp8, grouped_mm_reference

RECIPES = ("rowwise", "rowwise_with_gw_hp", "blockwise")
DEFAULT_RECIPE = "rowwise"
BLOCKWISE_MULTIPLE = 128  # the blockwise recipe's K and N: whole 128x128 blocks in every b[e]
# (input, weight, grad_output, weight for grad_input, input for grad_weight, grad_output for
# grad_weight) casts, as Float8LinearConfig.casts(); None: that GEMM in the compute dtype.
_AXIS4, _AXIS5, _BLOCK4 = ("axiswise", E4M3), ("axiswise", E5M2), ("blockwise", E4M3)
_CASTS = {"rowwise": (_AXIS4, _AXIS4, _AXIS5, _AXIS4, _AXIS4, _AXIS5),
          "rowwise_with_gw_hp": (_AXIS4, _AXIS4, _AXIS5, _AXIS4, None, None),
          "blockwise": (_BLOCK4,) * 6}


def expert_recipe_for(linear_recipe: str) -> str:
    """The grouped recipe for a model converted with Float8Linear's ``linear_recipe``: blockwise for
    blockwise, the dB in high precision when that recipe keeps it there, else all three GEMMs in fp8
    rowwise (tensorwise models too: one scale per expert weight is not a grouped scaling here).
    :func:`fit_expert_recipe` then fits it to each layer's widths."""
    if linear_recipe in ("blockwise", "rowwise_with_gw_hp"):
        return linear_recipe
    return "rowwise"


def fit_expert_recipe(recipe: str, dim: int, hidden_dim: int) -> str:
    """``recipe`` for experts of widths ``dim`` / ``hidden_dim``: ``blockwise`` needs both multiples
    of 128 (the weights' 128x128 blocks must tile each expert), else such a layer gets ``rowwise``."""
    if recipe == "blockwise" and (dim % BLOCKWISE_MULTIPLE or hidden_dim % BLOCKWISE_MULTIPLE):
        return "rowwise"
    return recipe


def expert_gemm(recipe: Optional[str]):
    """The grouped GEMM an MoE layer's experts run: :func:`tokenforge.ops.grouped_mm` when
    ``recipe`` is None, else :func:`grouped_mm_float8` with that recipe (same call signature)."""
    return grouped_mm if recipe is None else functools.partial(grouped_mm_float8, recipe=recipe)


def _expert_cols_backend(backend: str) -> str:
    """The per-expert column quantizer's backend: the torch reference or the Triton kernel (the
    CUDA C++ quantizer has no per-expert kernel)."""
    return "torch" if backend == "torch" else "triton"


def check_recipe(recipe: str, where: str) -> None:
    """A ValueError naming the recipes when ``recipe`` is not one of RECIPES."""
    if recipe not in RECIPES:
        raise ValueError(f"{where}: recipe must be one of {RECIPES} (the grouped fp8 GEMM's recipes), "
                         f"got {recipe!r}")


def _weight_blocks(b: torch.Tensor, power_of_two: bool, backend: str):
    """The expert weights b (E, K, N) in 128x128 blocks per expert (K and N multiples of 128): (data
    as an (E, K, N) view of the storage's own major order, scale (E, K/128, N/128) as a view). Each
    GEMM's launcher makes its reduced dim unit-stride (an fp8 copy where it is not)."""
    E, K, N = b.shape
    if b.stride(1) == 1 and b.stride(2) != 1:  # (E, N, K) stored: nn.Linear-style experts (Hugging Face)
        bt = b.transpose(1, 2).contiguous()
        data, scale = cast_for_gemm(bt.view(E * N, K), 1, _BLOCK4, True, power_of_two, backend)
        blocks = (E, N // BLOCKWISE_MULTIPLE, K // BLOCKWISE_MULTIPLE)
        return data.view(E, N, K).transpose(1, 2), scale.view(blocks).transpose(1, 2)
    data, scale = cast_for_gemm(b.contiguous().view(E * K, N), 1, _BLOCK4, True, power_of_two, backend)
    return data.view(E, K, N), scale.view(E, K // BLOCKWISE_MULTIPLE, N // BLOCKWISE_MULTIPLE)


def _weight_cast(b: torch.Tensor, reduce_over: str, cast, power_of_two: bool, backend: str):
    """The expert weights b (E, K, N) quantized for a GEMM reducing over their K ("k", the forward)
    or their N ("n", dA): one scale per expert and output index over the reduced dim, and the data
    as the GEMM's (E, reduce, out) b with the reduced dim unit-stride (FP8 wgmma reads only that).
    Never a bf16 copy: when the reduced dim is already unit-stride in b, its rows are quantized
    rowwise in place; otherwise the per-expert column quantizer reads b's rows as they lie and
    writes the fp8 data transposed (an (out, E x reduce) tensor, viewed back as (E, reduce, out))."""
    w = b if reduce_over == "k" else b.transpose(1, 2)  # (E, R, C): reduce over R, one scale per (e, c)
    E, R, C = w.shape
    if w.stride(1) == 1 and w.transpose(1, 2).is_contiguous():  # (E, C, R) stored: rowwise over R
        data, scale = cast_for_gemm(w.transpose(1, 2).reshape(E * C, R), 1, cast, True, power_of_two, backend)
        return data.view(E, C, R).transpose(1, 2), scale.reshape(E, C)
    rows = w.contiguous().view(E * R, C)  # a copy only for layouts other than b's and its transpose
    ends = torch.arange(1, E + 1, device=b.device, dtype=torch.int32) * R  # experts of R rows each
    data_t, scale = torch.ops.tokenforge.fp8_quantize_expert_cols(rows, ends, cast[1], power_of_two,
                                                                  _expert_cols_backend(backend))
    return data_t.as_strided((E, R, C), (R, 1, E * R)), scale


class Float8GroupedMMFunction(torch.autograd.Function):
    """out = grouped a @ b with fp8 GEMMs as the recipe says (see the module docstring); a (T, K),
    b (E, K, N) in one compute dtype, offs int32 (E,)."""

    @staticmethod
    def forward(ctx, a, b, offs, recipe, power_of_two, quant_backend, gemm_backend, wgrad_backend):
        c_a, c_b = _CASTS[recipe][:2]
        aq, sa = cast_for_gemm(a, 1, c_a, False, power_of_two, quant_backend)
        if recipe == "blockwise":
            bq, sb = _weight_blocks(b, power_of_two, quant_backend)
        else:
            bq, sb = _weight_cast(b, "k", c_b, power_of_two, quant_backend)
        out = grouped_mm_fp8(aq, bq, offs, sa, sb, out_dtype=a.dtype, check_offs=False, backend=gemm_backend)
        ctx.save_for_backward(a, b, offs)
        ctx.recipe, ctx.pow2 = recipe, power_of_two
        ctx.backends = (quant_backend, gemm_backend, wgrad_backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        a, b, offs = ctx.saved_tensors
        quant_backend, gemm_backend, wgrad_backend = ctx.backends
        _, _, c_dout, c_b_gi, c_a_gw, c_dout_gw = _CASTS[ctx.recipe]
        dout = dout.to(a.dtype).contiguous()
        da = db = None
        blockwise = ctx.recipe == "blockwise"
        if ctx.needs_input_grad[0]:
            dq, sd = cast_for_gemm(dout, 1, c_dout, False, ctx.pow2, quant_backend)
            if blockwise:  # the forward's blocks, transposed by strides (b^T's reduced dim N is unit-stride)
                bq, sb = _weight_blocks(b, ctx.pow2, quant_backend)
                bq, sb = bq.transpose(1, 2), sb.transpose(1, 2)
            else:
                bq, sb = _weight_cast(b, "n", c_b_gi, ctx.pow2, quant_backend)
            da = grouped_mm_fp8(dq, bq, offs, sd, sb, out_dtype=a.dtype, check_offs=False, backend=gemm_backend)
        if ctx.needs_input_grad[1]:
            if c_a_gw is not None:  # fp8: per (expert, column) scales over the expert's tokens (or 128 of them)
                qb = _expert_cols_backend(quant_backend)
                block = TOKEN_BLOCK if blockwise else 0
                a_t, s_a = torch.ops.tokenforge.fp8_quantize_expert_cols(a, offs, c_a_gw[1], ctx.pow2, qb, block)
                d_t, s_d = torch.ops.tokenforge.fp8_quantize_expert_cols(dout, offs, c_dout_gw[1], ctx.pow2, qb, block)
                db = torch.ops.tokenforge.grouped_mm_fp8_wgrad(a_t, d_t, offs, s_a, s_d, b.dtype, gemm_backend, block)
            elif wgrad_backend == "torch":
                with torch.enable_grad():  # dB of the reference loop, by torch autograd
                    a_, b_ = a.detach(), b.detach().requires_grad_()
                    db, = torch.autograd.grad(grouped_mm_reference(a_, b_, offs), b_, dout)
            else:
                db = torch.ops.tokenforge.grouped_mm_wgrad(a, dout, offs, wgrad_backend)
        return da, db, None, None, None, None, None, None


def grouped_mm_float8(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, recipe: str = DEFAULT_RECIPE,
                      power_of_two: bool = False, check_offs: bool = True,
                      backend: Optional[str] = None) -> torch.Tensor:
    """(T, N) = per-expert ``a[rows of e] @ b[e]`` as :func:`tokenforge.ops.grouped_mm` (a (T, K)
    sorted by expert, b (E, K, N), offs (E,) int32 cumulative row ends), its GEMMs in fp8 with
    dynamic axiswise scales: all three with ``recipe="rowwise"``, dB in a's dtype with
    ``"rowwise_with_gw_hp"``; or all three with 1x128 / 128x128 block scales, ``"blockwise"`` (K and
    N multiples of 128). a and b bf16/fp16/fp32 alike, K and N multiples of 16.
    ``power_of_two``: scales rounded up to powers of two. ``backend``: triton
    (the kernels; the interpreter on CPU), torch (quantize, dequantize and loop: the same numbers
    by another route) or None (choose)."""
    where = "grouped_mm_float8"
    check_recipe(recipe, where)
    compute = (torch.bfloat16, torch.float16, torch.float32)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (a.dtype not in compute or b.dtype != a.dtype):
        raise TypeError(f"{where}: a and b must share one of bfloat16/float16/float32 (the compute dtype), got "
                        f"{a.dtype} and {b.dtype}; it quantizes them itself")
    check_inputs(a, b, offs, check_offs)
    bad = [f"{n}={v}" for n, v in (("K", a.shape[1]), ("N", b.shape[2])) if v % 16]
    if bad:
        raise ValueError(f"{where}: K and N must be multiples of 16 (FP8 tensor cores), got {', '.join(bad)}; "
                         "use tokenforge.ops.grouped_mm for this layer")
    if fit_expert_recipe(recipe, a.shape[1], b.shape[2]) != recipe:
        raise ValueError(f"{where}: recipe 'blockwise' needs K and N multiples of {BLOCKWISE_MULTIPLE} (whole 128x128 "
                         f"blocks in every expert's weight), got K={a.shape[1]}, N={b.shape[2]}; use recipe='rowwise'")
    if a.shape[0] == 0:
        return grouped_mm(a, b, offs, check_offs=False, backend="torch")
    quant = backends.choose(QUANT_OP, a, E4M3, "blockwise" if recipe == "blockwise" else "rowwise", backend=backend)
    gemm = backends.choose(OP_FP8, a.new_empty((16, 16), dtype=E5M2), b.new_empty((1, 16, 16), dtype=E4M3),
                           backend=backend)
    wgrad = backends.choose(GROUPED_OP, a, b, backend=backend)
    return Float8GroupedMMFunction.apply(a, b, offs, recipe, power_of_two, quant, gemm, wgrad)
