"""FP8 quantization launchers for the CUDA C++ kernels in csrc/fp8_quantize.cu (rowwise and
tensorwise; colwise is rowwise of the transpose). Same contract and bit-exact results as
``tokenforge.kernels.fp8_quantize``: ``quantize_rows``, ``quantize_cols``, ``quantize_tensor``
take a 2-D (R, C) tensor with unit column stride (others are copied) and return (data, scale)."""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import cuda as _ext

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FORMAT_CODES = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}


def supports(x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn, scaling: str = "rowwise") -> Optional[str]:
    if x.device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors only; x is on {x.device}"
    reason = _ext.runtime_unavailable_reason()
    if reason:
        return reason
    if not hasattr(_ext.get_extension(), "fp8_quantize_rows"):
        return "this build of tokenforge._C has no fp8 kernels; reinstall to rebuild it"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"x dtype {x.dtype} is not float32/float16/bfloat16 for the CUDA kernels"
    if fp8_dtype not in FORMAT_CODES:
        return f"fp8 dtype {fp8_dtype} is not float8_e4m3fn/float8_e5m2"
    return None


def _prep(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"tokenforge.cuda.fp8_quantize: x must be 2-D, got {tuple(x.shape)}")
    if x.device.type != "cuda" or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"tokenforge.cuda.fp8_quantize: x must be a float32/float16/bfloat16 CUDA tensor")
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    return x


def quantize_rows(x: torch.Tensor, fp8_dtype: torch.dtype, power_of_two: bool):
    x = _prep(x)
    R, C = x.shape
    data = torch.empty((R, C), dtype=fp8_dtype, device=x.device)
    scale = torch.empty((R, 1), dtype=torch.float32, device=x.device)
    if R == 0 or C == 0:
        return data, scale.fill_(1.0)
    with torch.cuda.device(x.device):
        _ext.get_extension().fp8_quantize_rows(
            x.data_ptr(), data.data_ptr(), scale.data_ptr(), R, C, x.stride(0) if R > 1 else C,
            _ext.dtype_code(x.dtype), FORMAT_CODES[fp8_dtype], bool(power_of_two), _ext.current_stream_handle(x))
    return data, scale


def quantize_cols(x: torch.Tensor, fp8_dtype: torch.dtype, power_of_two: bool):
    data_t, scale_t = quantize_rows(x.t(), fp8_dtype, power_of_two)
    return data_t.t().contiguous(), scale_t.t()


def quantize_tensor(x: torch.Tensor, fp8_dtype: torch.dtype, power_of_two: bool):
    x = _prep(x)
    R, C = x.shape
    data = torch.empty((R, C), dtype=fp8_dtype, device=x.device)
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    if R == 0 or C == 0:
        return data, scale.fill_(1.0)
    ext = _ext.get_extension()
    with torch.cuda.device(x.device):
        partials = int(ext.fp8_amax_num_partials(-1))
        partial = torch.empty((partials,), dtype=torch.float32, device=x.device)
        ext.fp8_quantize_tensor(
            x.data_ptr(), data.data_ptr(), scale.data_ptr(), partial.data_ptr(), R, C, x.stride(0) if R > 1 else C,
            partials, _ext.dtype_code(x.dtype), FORMAT_CODES[fp8_dtype], bool(power_of_two),
            _ext.current_stream_handle(x))
    return data, scale
