"""FP8 training for linear layers: quantization, the scaled GEMM, Float8Linear and model conversion.

    data, scale = tokenforge.fp8.quantize(x, torch.float8_e4m3fn, "rowwise")   # x ~= data.float() * scale
    y = tokenforge.fp8.scaled_mm(a_fp8, b_fp8, scale_a, scale_b, out_dtype=torch.bfloat16)
    report = tokenforge.fp8.convert_to_float8(model, recipe="rowwise")        # then train as usual
    config = tokenforge.fp8.Float8LinearConfig.from_recipe_name("blockwise")   # or per-GEMM CastConfigs
    out = tokenforge.fp8.grouped_mm_float8(tokens, expert_weights, offs)       # MoE experts, fp8 fwd + dA
"""

from tokenforge.fp8.config import RECIPES, CastConfig, Float8LinearConfig, ScalingGranularity, ScalingType
from tokenforge.fp8.convert import ConversionReport, convert_to_float8, revert_float8
from tokenforge.fp8.emit import EmitCast, emit_cast_for
from tokenforge.fp8.fsdp import precompute_float8_dynamic_scale_for_fsdp
from tokenforge.fp8.gemm import scaled_mm, scaled_mm_reference, torch_path
from tokenforge.fp8.grouped import grouped_mm_float8
from tokenforge.fp8.linear import Float8Linear, float8_linear
from tokenforge.fp8.quantize import dequantize, fp8_max, quantize, quantize_reference

__all__ = [
    "RECIPES", "CastConfig", "ConversionReport", "EmitCast", "Float8Linear", "Float8LinearConfig", "ScalingGranularity",
    "ScalingType", "convert_to_float8", "dequantize", "emit_cast_for", "float8_linear", "fp8_max", "grouped_mm_float8",
    "precompute_float8_dynamic_scale_for_fsdp", "quantize", "quantize_reference", "revert_float8", "scaled_mm", "scaled_mm_reference", "torch_path",
]
