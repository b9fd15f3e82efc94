"""Float8Linear: an ``nn.Linear`` whose three matmuls run in FP8 with dynamic scaling.

    forward   y  = x  @ W^T        x, W in e4m3
    backward  dX = dY @ W          dY in e5m2 (gradients need range more than precision), W e4m3
              dW = dY^T @ X        dY e5m2, X e4m3 (or in high precision: 'rowwise_with_gw_hp')

How each operand is cast is a :class:`tokenforge.fp8.config.Float8LinearConfig` (torchao's shape:
per-GEMM cast configs, tensorwise / axiswise / blockwise, e4m3 / e5m2, power-of-two scales); the
recipe names are its presets (scales recomputed from the current tensors every step):

- ``tensorwise``: one scale per tensor. Cheapest; an outlier anywhere costs every element
  resolution. Saves the fp8 x and W for backward (half the bytes of bf16).
- ``rowwise``: one scale per row of each GEMM operand along the reduction dim (x per token, W per
  output feature; for the backward GEMMs the operands are requantized along their own reduction
  dims, i.e. colwise). More robust to outliers; saves x and W in high precision.
- ``rowwise_with_gw_hp``: rowwise for y and dX, and dW = dY^T @ X in the compute dtype (the
  weight gradient is the most sensitive of the three).
- ``blockwise`` (DeepSeek-V3): W in 128x128 blocks (one quantization serves y and dX), x and dY in
  1x128 blocks along each GEMM's reduction dim, e4m3 throughout.

An operand cast the same way for two GEMMs (tensorwise, or a 128x128-block weight) is quantized
once and the fp8 copy saved; any other is saved in high precision and requantized in backward.

The parameters are nn.Linear's (same names, shapes, dtypes, state_dict): master weights stay in
the model's dtype and are quantized on the fly, so FSDP2-sharded weights work as long as the
forward sees the gathered weight (FSDP2 all-gathers before forward). Under autocast, x is cast to
the autocast dtype, which is also the output dtype; the weight is quantized from its master copy.

Accuracy (tests/test_fp8_linear.py, Gaussian data): SQNR of y about 29 dB (tensorwise) and
30 dB (rowwise) vs the exact product; dX and dW about 26-28 dB (e5m2 has 2 mantissa bits); the
issue's floor is 20 dB for outputs and 17 dB for gradients.

Token counts that are not multiples of 16 are padded with zero rows for the GEMMs (zero rows
change no scale and no gradient).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tokenforge import backends
from tokenforge.fp8.config import Float8LinearConfig, resolve_config
from tokenforge.fp8.emit import emit_cast_for
from tokenforge.fp8.emit import lookup as lookup_emitted
from tokenforge.fp8.fsdp import Float8AllGatherWeight, Float8Weight
from tokenforge.fp8.gemm import OP as GEMM_OP
from tokenforge.fp8.gemm import fp8_scaled_mm_op, scaled_mm_reference
from tokenforge.fp8.quantize import OP as QUANT_OP
from tokenforge.fp8.quantize import cast_for_gemm



def _mm(a, b, sa, sb, out_dtype, backend, bias=None):
    if backend == "torch" and a.device.type != "cuda":
        return scaled_mm_reference(a, b, sa, sb, bias, out_dtype)
    return fp8_scaled_mm_op(a, b, sa, sb, bias, out_dtype, backend)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else F.pad(t, (0, 0, 0, rows - t.shape[0]))


def _t(data, scale):
    """The transposed operand and its scale (a scale grid transposes with its tensor)."""
    return data.t(), (scale.t() if scale.dim() == 2 else scale)


def _reusable(first, second, is_weight) -> bool:
    """One quantization serves both GEMMs: same cast, and its scales do not depend on which dim is
    reduced (one per tensor, or a 128x128 block of the weight)."""
    return first == second and (first[0] == "tensorwise" or (first[0] == "blockwise" and is_weight))


class Float8LinearFunction(torch.autograd.Function):
    """y = x @ W^T + b with FP8 GEMMs; x (M, K) already in the compute dtype. ``casts`` is
    :meth:`Float8LinearConfig.casts` (input, weight, grad_output, input_for_grad_weight,
    weight_for_grad_input, grad_output_for_grad_weight), each ('disabled' | granularity, dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, casts, power_of_two, quant_backend, gemm_backend, x_fp8=None):
        """``x_fp8``: x's forward cast made by its producer (tokenforge.fp8.emit), or None."""
        c_x, c_w, _, c_x_gw, c_w_gi, _ = casts
        if isinstance(weight, Float8AllGatherWeight):  # fp8 all-gather enabled, not under FSDP2 now
            weight = weight._tensor
        M = x.shape[0]
        Mp = (M + 15) // 16 * 16
        xp = _pad_rows(x, Mp)
        out_dtype = x.dtype
        q = dict(power_of_two=power_of_two, backend=quant_backend)
        bias_out = bias.to(out_dtype) if bias is not None else None
        saved_x = saved_w = None
        if c_x[0] == "disabled":
            y = F.linear(xp, weight.to(out_dtype), bias_out)
        else:
            if x_fp8 is not None:  # bit-identical to cast_for_gemm(xp, ...): zero rows pad with scale 1
                xq, sx = _pad_rows(x_fp8[0].view(torch.uint8), Mp).view(x_fp8[0].dtype), x_fp8[1]
                sx = sx if sx.shape[0] == Mp else F.pad(sx, (0, 0, 0, Mp - sx.shape[0]), value=1.0)
            else:
                xq, sx = cast_for_gemm(xp, 1, c_x, False, **q)
            if isinstance(weight, Float8Weight):  # FSDP2 gathered it in fp8, tensorwise (the config's check)
                wq, sw = weight._data, weight._scale
            else:
                wq, sw = cast_for_gemm(weight, 1, c_w, True, **q)  # (N, K)
            wt, swt = _t(wq, sw)
            y = _mm(xq, wt, sx, swt, out_dtype, gemm_backend, bias=bias_out)
            if _reusable(c_x, c_x_gw, False):
                saved_x = (xq, sx)
            if _reusable(c_w, c_w_gi, True):
                saved_w = (wq, sw)
        tensors = list(saved_x) if saved_x else [xp]
        tensors += list(saved_w) if saved_w else [weight]
        ctx.save_for_backward(*tensors)
        ctx.x_quantized, ctx.w_quantized = saved_x is not None, saved_w is not None
        ctx.casts, ctx.pow2, ctx.qb, ctx.gb = casts, power_of_two, quant_backend, gemm_backend
        ctx.M, ctx.has_bias = M, bias is not None
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y[:M] if Mp != M else y

    @staticmethod
    def backward(ctx, dy):
        _, _, c_dy, c_x_gw, c_w_gi, c_dy_gw = ctx.casts
        M = ctx.M
        Mp = (M + 15) // 16 * 16
        out_dtype = dy.dtype
        dyp = _pad_rows(dy.contiguous(), Mp)
        q = dict(power_of_two=ctx.pow2, backend=ctx.qb)
        saved = list(ctx.saved_tensors)
        x_saved = (saved.pop(0), saved.pop(0)) if ctx.x_quantized else saved.pop(0)
        w_saved = (saved.pop(0), saved.pop(0)) if ctx.w_quantized else saved.pop(0)
        dyq = None

        # dX = dY @ W: dY reduced over its dim 1 (N), W over its dim 0 (N).
        if c_dy[0] == "disabled":
            dx = torch.mm(dyp, w_saved.to(out_dtype))
        else:
            dyq, sdy = cast_for_gemm(dyp, 1, c_dy, False, **q)
            wq, sw = w_saved if ctx.w_quantized else cast_for_gemm(w_saved, 0, c_w_gi, True, **q)
            dx = _mm(dyq, wq, sdy, sw, out_dtype, ctx.gb)

        # dW = dY^T @ X: both reduced over the tokens (dim 0).
        if c_dy_gw[0] == "disabled":
            xp = x_saved
            dw = torch.mm(dyp.t(), xp.to(dyp.dtype)).float()
        else:
            if dyq is not None and _reusable(c_dy, c_dy_gw, False):
                dyq_c, sdy_c = dyq, sdy
            else:
                dyq_c, sdy_c = cast_for_gemm(dyp, 0, c_dy_gw, False, **q)
            xq_c, sx_c = x_saved if ctx.x_quantized else cast_for_gemm(x_saved, 0, c_x_gw, False, **q)
            dyt, sdyt = _t(dyq_c, sdy_c)
            dw = _mm(dyt, xq_c, sdyt, sx_c, torch.float32, ctx.gb)
        dx = dx[:M] if Mp != M else dx
        db = dy.float().sum(0).to(ctx.bias_dtype) if ctx.has_bias else None
        return dx, dw.to(ctx.weight_dtype), db, None, None, None, None, None


def _backends(device_tensor: torch.Tensor, config: Float8LinearConfig, backend: Optional[str]) -> tuple[str, str]:
    if config.emulate:
        return "torch", "torch"
    # The quantizer is chosen for the finest granularity in use (the CUDA one has no blockwise).
    blockwise = any(granularity == "blockwise" for granularity, _ in config.casts())
    quant = backends.choose(QUANT_OP, device_tensor, torch.float8_e4m3fn, "blockwise" if blockwise else "rowwise",
                            backend=backend)
    # The probe operands carry the recipe's widest-ranged format, so a GEMM backend that cannot
    # take every cast (the CUTLASS kernel is e4m3 only) is refused here, not mid-backward.
    formats = {dtype for granularity, dtype in config.casts() if granularity != "disabled"}
    probe_dtype = torch.float8_e5m2 if torch.float8_e5m2 in formats else torch.float8_e4m3fn
    a = device_tensor.new_empty((16, 16), dtype=probe_dtype)
    gemm = backends.choose(GEMM_OP, a, a, backend=backend)
    return quant, gemm


def _check_features(in_features: int, out_features: int, where: str) -> None:
    if in_features % 16 or out_features % 16:
        raise ValueError(f"{where}: in_features {in_features} and out_features {out_features} must be multiples "
                         "of 16 (FP8 tensor cores); keep this layer an nn.Linear")


def float8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  recipe="tensorwise", *, config: Optional[Float8LinearConfig] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with FP8 matmuls (x (..., K), weight (N, K)); K, N multiples of 16.
    ``recipe``: a name in RECIPES or a Float8LinearConfig (``config`` wins when given)."""
    config = resolve_config(recipe, config, "float8_linear")
    N, K = weight.shape
    _check_features(K, N, "float8_linear")
    if x.shape[-1] != K:
        raise ValueError(f"float8_linear: x has last dim {x.shape[-1]} but weight expects {K}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    elif x.dtype != weight.dtype and x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"float8_linear: x dtype {x.dtype} is not float32/float16/bfloat16")
    quant_backend, gemm_backend = _backends(x, config, backend)
    # x's forward cast, when its producer (RMSNorm, SwiGLU) already made it (tokenforge.fp8.emit).
    x_fp8 = None if config.emulate else lookup_emitted(x, emit_cast_for(config.casts(), config.round_scales_to_power_of_2))
    x2 = x.reshape(-1, K)
    with torch.autocast(device_type, enabled=False):
        y = Float8LinearFunction.apply(x2, weight, bias, config.casts(), config.round_scales_to_power_of_2,
                                       quant_backend, gemm_backend, x_fp8)
    return y.view(*x.shape[:-1], N)


class Float8Linear(nn.Linear):
    """nn.Linear with FP8 forward/backward matmuls; same parameters and state_dict as nn.Linear.
    ``recipe``: a name in RECIPES ('tensorwise' | 'rowwise' | 'rowwise_with_gw_hp' | 'blockwise')
    or a Float8LinearConfig (``config=`` wins when given); in/out features multiples of 16."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe="tensorwise", config: Optional[Float8LinearConfig] = None, backend: Optional[str] = None):
        config = resolve_config(recipe, config, "Float8Linear")
        _check_features(in_features, out_features, "Float8Linear")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.config, self.recipe, self.backend = config, config.recipe_name(), backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe="tensorwise", backend: Optional[str] = None, *,
                    config: Optional[Float8LinearConfig] = None) -> "Float8Linear":
        """A Float8Linear sharing ``linear``'s parameters (no copy)."""
        config = resolve_config(recipe, config, "Float8Linear.from_linear")
        _check_features(linear.in_features, linear.out_features, "Float8Linear.from_linear")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        if config.enable_fsdp_float8_all_gather:
            # A new Parameter over the same storage: build the optimizer after converting.
            weight_cast = config.cast_config_weight
            new.weight = nn.Parameter(Float8AllGatherWeight(linear.weight.data, weight_cast.target_dtype,
                                                            config.round_scales_to_power_of_2),
                                      requires_grad=linear.weight.requires_grad)
        new.bias = linear.bias
        new.config, new.recipe, new.backend = config, config.recipe_name(), backend
        return new

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this module's parameters."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        if isinstance(self.weight, Float8AllGatherWeight):
            lin.weight = nn.Parameter(self.weight._tensor, requires_grad=self.weight.requires_grad)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float8_linear(x, self.weight, self.bias, config=self.config, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", recipe={self.recipe}"
