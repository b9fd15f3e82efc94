"""FP8 GEMM: ``scaled_mm(a, b, scale_a, scale_b) = (a @ b) * scale_a * scale_b (+ bias)``.

a (M, K), b (K, N) in float8_e4m3fn / float8_e5m2; fp32 scales (the ``torch._scaled_mm``
convention; what :func:`tokenforge.fp8.quantize` returns), with kb = cdiv(K, 128):

    scale_a  ()  tensorwise | (M, 1) rowwise | (M, kb) blockwise (1, 128) | (cdiv(M, 128), kb) (128, 128)
    scale_b  ()  tensorwise | (1, N) colwise | (kb, N) blockwise (128, 1) | (kb, cdiv(N, 128)) (128, 128)

so a weight W (N, K) quantized with ``block=(128, 128)`` is b = W.t() with scale_b = scale.t(),
and activations quantized with ``block=(1, 128)`` are a as they are. Any scale_a pairs with any
scale_b. M, K, N multiples of 16 (the FP8 tensor cores' granularity, and _scaled_mm's rule).

Backends: ``triton`` (tokenforge.kernels.fp8_gemm: FP8 wgmma on sm_90, mma on sm_89; also under
TRITON_INTERPRET=1 on CPU), ``cuda`` (tokenforge.cuda.fp8_gemm: the CUTLASS sm_90a kernel in
csrc/fp8_gemm_sm90.cu, e4m3 operands) and ``torch``, which is ``torch._scaled_mm`` on sm_89+ GPUs where it
takes the inputs, else an emulation that dequantizes to fp32 and multiplies (CPU, older GPUs).
:func:`torch_path` says which of the two a call gets.

Accuracy: the products of fp8 values are exact in fp32 and accumulate in fp32, so against the
float64 product of the *dequantized* operands the error is the fp32 accumulation (~1e-6) plus one
rounding to out_dtype: <= 2^-9 relative per element for bf16 (~2e-3 in norm), 2^-12 for fp16.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import backends
from tokenforge.fp8.quantize import FP8_DTYPES, expand_block_scale

OP = "fp8_scaled_mm"
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def scaled_mm_reference(a, b, scale_a, scale_b, bias=None, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Dequantize-then-matmul in fp32 (float64 for a float64 check): the emulation and the oracle."""
    compute = torch.float32
    (M, K), N = a.shape, b.shape[1]
    out = (a.to(compute) * expand_block_scale(scale_a, M, K)) @ (b.to(compute) * expand_block_scale(scale_b, K, N))
    if bias is not None:
        out = out + bias.to(compute)
    return out.to(out_dtype)


@torch.compiler.assume_constant_result
def _has_fp8_tensor_cores(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def torch_path(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
               out_dtype: torch.dtype) -> str:
    """'_scaled_mm' when the torch backend can call torch._scaled_mm on these inputs (tensorwise,
    or rowwise a with colwise b and bf16 out), else 'emulation' (also every blockwise scale:
    torch._scaled_mm's blockwise modes differ across torch versions and GPUs)."""
    if a.device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return "emulation"
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    if not _has_fp8_tensor_cores(index):
        return "emulation"
    if scale_a.numel() == 1 and scale_b.numel() == 1:
        return "_scaled_mm"
    rowwise = tuple(scale_a.shape) == (a.shape[0], 1) and tuple(scale_b.shape) == (1, b.shape[1])
    if rowwise and out_dtype == torch.bfloat16:
        return "_scaled_mm"  # _scaled_mm's rowwise mode: both scales rowwise, bf16 out
    return "emulation"


def _torch_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype):
    if torch_path(a, b, scale_a, scale_b, out_dtype) == "emulation":
        return scaled_mm_reference(a, b, scale_a, scale_b, bias, out_dtype)
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(0) == 1 else b.t().contiguous().t()  # _scaled_mm wants b column-major
    sa = scale_a.reshape(1, 1) if scale_a.numel() == 1 and scale_b.numel() != 1 else scale_a
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=scale_b, bias=bias, out_dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _check_inputs(a, b, scale_a, scale_b, bias, out_dtype) -> None:
    for name, t in (("a", a), ("b", b), ("scale_a", scale_a), ("scale_b", scale_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fp8.scaled_mm: {name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dtype not in FP8_DTYPES or b.dtype not in FP8_DTYPES:
        raise TypeError(f"fp8.scaled_mm: a and b must be float8_e4m3fn/float8_e5m2, got {a.dtype} and {b.dtype}; "
                        "quantize them with tokenforge.fp8.quantize")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"fp8.scaled_mm: a and b must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    M, K = a.shape
    K2, N = b.shape
    if K != K2:
        raise ValueError(f"fp8.scaled_mm: a is ({M}, {K}) but b is ({K2}, {N}); inner dims must match")
    bad = [f"{n}={v}" for n, v in (("M", M), ("K", K), ("N", N)) if v % 16]
    if bad:
        raise ValueError(f"fp8.scaled_mm: M, K and N must be multiples of 16 (FP8 tensor cores), got {', '.join(bad)}; "
                         "pad the operands or keep this matmul in bf16")
    kb, mb, nb = -(-K // 128), -(-M // 128), -(-N // 128)
    allowed = {"scale_a": (scale_a, {(M, 1): "rowwise", (M, kb): "blockwise (1, 128)", (mb, kb): "blockwise (128, 128)"}),
               "scale_b": (scale_b, {(1, N): "colwise", (kb, N): "blockwise (128, 1)", (kb, nb): "blockwise (128, 128)"})}
    for name, (s, shapes) in allowed.items():
        if s.dtype != torch.float32:
            raise TypeError(f"fp8.scaled_mm: {name} must be float32, got {s.dtype}")
        if tuple(s.shape) not in ((), (1,), (1, 1)) and tuple(s.shape) not in shapes:
            expected = ", ".join(f"{shape} ({what})" for shape, what in shapes.items())
            raise ValueError(f"fp8.scaled_mm: {name} has shape {tuple(s.shape)}; expected () or (1, 1) "
                             f"(tensorwise), {expected}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"fp8.scaled_mm: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,):
            raise ValueError(f"fp8.scaled_mm: bias must be a tensor of shape ({N},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if not bias.is_floating_point():
            raise TypeError(f"fp8.scaled_mm: bias must be floating point, got {bias.dtype}")
    devices = {t.device for t in (a, b, scale_a, scale_b) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"fp8.scaled_mm: all inputs must be on one device, got {sorted(map(str, devices))}")


def _triton_supports(a, b=None) -> Optional[str]:
    reason = backends.triton_unsupported_reason(a.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import fp8_gemm

    return fp8_gemm.supports(a, b if b is not None else a)


def _cuda_supports(a, b=None) -> Optional[str]:
    from tokenforge.cuda import fp8_gemm

    return fp8_gemm.supports(a, b if b is not None else a)


backends.register_op(
    OP,
    # Triton first until the H200 benchmark ranks the CUTLASS kernel against it (bench/results).
    cuda_preference=("triton", "cuda"),
    supports={"triton": _triton_supports, "cuda": _cuda_supports, "torch": lambda a, b=None: None},
    example_inputs=lambda device, dtype: (torch.empty(64, 64, device=device, dtype=torch.float8_e4m3fn),
                                          torch.empty(64, 64, device=device, dtype=torch.float8_e4m3fn)),
)

# The custom op calls its backend's launcher through this table: both take
# scaled_mm(a, b, scale_a, scale_b, bias, out_dtype) on validated inputs.
LAUNCHERS = backends.Launchers(OP, triton="tokenforge.kernels.fp8_gemm", cuda="tokenforge.cuda.fp8_gemm")


@torch.library.custom_op("tokenforge::fp8_scaled_mm", mutates_args=())
def fp8_scaled_mm_op(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                     bias: Optional[torch.Tensor], out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    if backend in LAUNCHERS:
        return LAUNCHERS[backend].scaled_mm(a, b, scale_a.contiguous(), scale_b.contiguous(), bias, out_dtype)
    return _torch_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype)


@fp8_scaled_mm_op.register_fake
def _(a, b, scale_a, scale_b, bias, out_dtype, backend):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, *,
              out_dtype: torch.dtype = torch.bfloat16, bias: Optional[torch.Tensor] = None,
              backend: Optional[str] = None) -> torch.Tensor:
    """(a @ b) * scale_a * scale_b + bias in out_dtype: a (M, K), b (K, N) fp8, fp32 scales as in
    the module docstring (tensorwise, rowwise/colwise, blockwise), bias (N,); M, K, N multiples
    of 16. ``backend``: triton, cuda (the CUTLASS sm_90a kernel: e4m3 operands, H100/H200) or torch."""
    _check_inputs(a, b, scale_a, scale_b, bias, out_dtype)
    if scale_a.numel() == 1:
        scale_a = scale_a.reshape(())
    if scale_b.numel() == 1:
        scale_b = scale_b.reshape(())
    name = backends.choose(OP, a, b, backend=backend)
    if name == "torch" and a.device.type != "cuda":
        return scaled_mm_reference(a, b, scale_a, scale_b, bias, out_dtype)
    return torch.ops.tokenforge.fp8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype, name)
