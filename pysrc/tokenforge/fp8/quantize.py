"""FP8 quantization: ``quantize(x) -> (data, scale)`` and ``dequantize(data, scale)``.

Scales follow ``torch._scaled_mm``: ``scale`` is the dequantization factor, ``x ~= data.float() *
scale``. Shapes: tensorwise -> ``()`` (0-d fp32, which ``_scaled_mm`` accepts as a scalar scale);
rowwise of (..., C) -> (..., 1); colwise of (R, C) -> (1, C).

Rules (shared by every backend, bit for bit): ``scale = amax / FP8_MAX`` (IEEE division), rounded
up to a power of two with ``power_of_two=True`` (then x * (1/scale) is exact, and scales compose
without rounding); a scale that would underflow is FLT_MIN; amax == 0 -> scale 1; the data is
``clamp(x * (1/scale), -FP8_MAX, FP8_MAX)`` cast with round-to-nearest-even (saturating).
inf/nan inputs are never hidden: a group (tensor/row/column) holding a nan gets a nan scale, one
holding an inf (and no nan) an inf scale; dequantizing such a group gives nan/inf.

Path of a call: :func:`quantize` validates, picks a backend -> custom op ``tokenforge::fp8_quantize``
-> ``tokenforge.kernels.fp8_quantize`` (Triton) or ``tokenforge.cuda.fp8_quantize`` (CUDA C++,
rowwise and tensorwise) -> or :func:`quantize_reference` (torch).
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import backends

OP = "fp8_quantize"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALINGS = ("tensorwise", "rowwise", "colwise")
FLT_MIN = torch.finfo(torch.float32).tiny


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


# ---------------------------------------------------------------------------------------------
# Reference (oracle, CPU fallback, baseline)
# ---------------------------------------------------------------------------------------------


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype, power_of_two: bool = False) -> torch.Tensor:
    """fp32 dequantization scale for fp32 ``amax`` (any shape), by the module's rules."""
    amax = amax.float()
    s = amax / fp8_max(dtype)
    s = torch.where(s < FLT_MIN, FLT_MIN, s)  # nan compares false and stays
    if power_of_two:
        bits = s.view(torch.int32)
        exp_bits = bits & 0x7F800000
        up = ((bits & 0x7FFFFF) != 0) & (exp_bits != 0x7F800000)
        s = torch.where(up, exp_bits + 0x800000, bits).view(torch.float32)
    return torch.where(amax == 0, torch.ones_like(s), s)


def _amax(x: torch.Tensor, dim) -> torch.Tensor:
    xf = x.float().abs()
    if dim is None:
        return xf.amax() if xf.numel() else xf.new_zeros(())  # amax propagates nan
    return xf.amax(dim=dim, keepdim=True) if xf.shape[dim] else xf.sum(dim=dim, keepdim=True)


def quantize_reference(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, scaling: str = "tensorwise",
                       power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch fp8 quantization with the exact rounding of the kernels: (data, scale)."""
    dim = {"tensorwise": None, "rowwise": -1, "colwise": -2}[scaling]
    scale = scale_from_amax(_amax(x, dim), dtype, power_of_two)
    inv = torch.reciprocal(scale)
    m = fp8_max(dtype)
    data = (x.float() * inv).clamp(-m, m).to(dtype)
    return data, scale


def dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """data.float() * scale (any scale that broadcasts: (), (R, 1), (1, C)) cast to ``dtype``."""
    if data.dtype not in FP8_DTYPES:
        raise TypeError(f"dequantize: data must be float8_e4m3fn or float8_e5m2, got {data.dtype}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise TypeError("dequantize: scale must be a float32 tensor, as returned by tokenforge.fp8.quantize")
    return (data.float() * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# Checks and backends
# ---------------------------------------------------------------------------------------------


def _check_inputs(x, dtype, scaling, power_of_two) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fp8.quantize: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"fp8.quantize: x must be float32, float16 or bfloat16, got {x.dtype}; convert it first")
    if dtype not in FP8_DTYPES:
        raise TypeError(f"fp8.quantize: dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    if scaling not in SCALINGS:
        raise ValueError(f"fp8.quantize: scaling must be one of {SCALINGS}, got {scaling!r}")
    if not isinstance(power_of_two, bool):
        raise TypeError(f"fp8.quantize: power_of_two must be a bool, got {power_of_two!r}")
    if scaling == "rowwise" and x.dim() < 1:
        raise ValueError("fp8.quantize: rowwise scaling needs at least 1 dim (scales per row of the last dim)")
    if scaling == "colwise" and x.dim() != 2:
        raise ValueError(f"fp8.quantize: colwise scaling needs a 2-D tensor, got shape {tuple(x.shape)}; "
                         "reshape to (rows, cols) first")


def _triton_supports(x, dtype=torch.float8_e4m3fn, scaling="tensorwise") -> Optional[str]:
    reason = backends.triton_unsupported_reason(x.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import fp8_quantize as kernels

    return kernels.supports(x, dtype)


def _cuda_supports(x, dtype=torch.float8_e4m3fn, scaling="tensorwise") -> Optional[str]:
    reason = backends.cuda_ext_unsupported_reason(x.device)
    if reason is not None:
        return reason
    from tokenforge.cuda import fp8_quantize as cuda_quantize

    return cuda_quantize.supports(x, dtype, scaling)


backends.register_op(
    OP,
    cuda_preference=("triton", "cuda"),
    supports={"triton": _triton_supports, "cuda": _cuda_supports, "torch": lambda x, dtype=None, scaling=None: None},
    example_inputs=lambda device, dtype: (torch.empty(64, 256, device=device, dtype=dtype),
                                          torch.float8_e4m3fn, "rowwise"),
)


def _launch(x2: torch.Tensor, dtype: torch.dtype, scaling: str, power_of_two: bool, backend: str):
    if backend == "triton":
        from tokenforge.kernels import fp8_quantize as module
    elif backend == "cuda":
        from tokenforge.cuda import fp8_quantize as module
    else:
        return quantize_reference(x2, dtype, scaling, power_of_two)
    fn = {"tensorwise": module.quantize_tensor, "rowwise": module.quantize_rows, "colwise": module.quantize_cols}[scaling]
    return fn(x2, dtype, power_of_two)


@torch.library.custom_op("tokenforge::fp8_quantize", mutates_args=())
def fp8_quantize_op(x: torch.Tensor, dtype: torch.dtype, scaling: str, power_of_two: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x 2-D -> (data (R, C) contiguous fp8, scale: () | (R, 1) | (1, C) fp32)."""
    return _launch(x, dtype, scaling, power_of_two, backend)


@fp8_quantize_op.register_fake
def _(x, dtype, scaling, power_of_two, backend):
    R, C = x.shape
    shape = {"tensorwise": (), "rowwise": (R, 1), "colwise": (1, C)}[scaling]
    return x.new_empty((R, C), dtype=dtype), x.new_empty(shape, dtype=torch.float32)


def quantize(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, scaling: str = "tensorwise",
             power_of_two: bool = False, *, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (fp32/fp16/bf16) -> (data in ``dtype`` shaped like x, fp32 scale) with x ~= data.float() * scale;
    scale () tensorwise, (..., 1) rowwise, (1, C) colwise (2-D x). ``backend`` forces triton/cuda/torch."""
    _check_inputs(x, dtype, scaling, power_of_two)
    name = backends.choose(OP, x, dtype, scaling, backend=backend)
    if x.numel() == 0 or name == "torch":
        return quantize_reference(x, dtype, scaling, power_of_two)
    if x.dim() == 2:
        x2 = x
    else:
        x2 = x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)
    data, scale = torch.ops.tokenforge.fp8_quantize(x2, dtype, scaling, power_of_two, name)
    if x.dim() != 2:
        data = data.view(x.shape)
        if scaling == "rowwise":
            scale = scale.view(*x.shape[:-1], 1)
    return data, scale
