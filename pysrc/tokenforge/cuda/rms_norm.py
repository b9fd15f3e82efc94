"""RMSNorm launchers for the CUDA C++ kernels in csrc/rms_norm.cu.

Same contract as the Triton launchers in ``tokenforge.kernels.rms_norm``:

- ``supports(x, weight)``: None when these kernels can run the inputs, else why not;
- ``rms_norm_forward(x, weight, eps) -> (y, rstd)``;
- ``rms_norm_backward(dy, x, weight, rstd) -> (dx, dw)``.

The op layer (``tokenforge.ops.rms_norm``) validates user input; these functions re-check what a
raw pointer call depends on (device, dtype, shape, unit column stride) and raise ValueError with
a clear message rather than ever hand the kernel a bad pointer.

Kernel facts the op layer may rely on:

- x, dy: 2-D (rows, n) with ``stride(1) == 1``; any non-negative row stride. 16-byte vector
  accesses are used when every pointer is 16-byte aligned (the weight: aligned to its vector of
  8 (16-bit x) or 4 (fp32 x) elements), n and the row strides are multiples of 8 (16-bit x) or 4
  (fp32 x); otherwise a correct but slower scalar path runs.
- n <= ``max_n(device)`` (40960 on sm_80/sm_90; less on GPUs with under 160 KB of shared
  memory per block), because the backward reduces dweight through n floats of shared memory.
- dweight comes from per-block fp32 partials [num_partials, n] summed here; num_partials is one
  wave of resident backward blocks (``_C.rms_norm_bwd_num_partials``), so for a fixed GPU and
  shape the result is deterministic run to run.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from tokenforge import cuda as _ext

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.compiler.assume_constant_result  # a per-GPU constant; also read while torch.compile traces
def max_n(device_index: int = -1) -> int:
    """Largest last-dim size these kernels accept (on ``device_index``, or the build-wide bound)."""
    return int(_ext.get_extension().rms_norm_max_n(device_index))


@functools.lru_cache(maxsize=1024)
def _num_partials(device_index: int, rows: int, n: int, x_code: int, w_code: int, has_weight: bool) -> int:
    return int(_ext.get_extension().rms_norm_bwd_num_partials(rows, n, x_code, w_code, has_weight, device_index))


def supports(x: torch.Tensor, weight: Optional[torch.Tensor]) -> Optional[str]:
    """None when the CUDA kernels can run RMSNorm on (x, weight), else the reason."""
    if not isinstance(x, torch.Tensor):
        return f"x must be a torch.Tensor, got {type(x).__name__}"
    if x.device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors only; x is on {x.device}"
    reason = _ext.runtime_unavailable_reason()
    if reason:
        return reason
    if x.dtype not in SUPPORTED_DTYPES:
        return f"x dtype {x.dtype} is not one of float32/float16/bfloat16 for the CUDA kernels; use backend='torch'"
    if x.dim() == 0:
        return "x must have at least one dimension"
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            return f"weight must be a torch.Tensor or None, got {type(weight).__name__}"
        if weight.dtype not in SUPPORTED_DTYPES:
            return f"weight dtype {weight.dtype} is not one of float32/float16/bfloat16 for the CUDA kernels"
        if weight.device != x.device:
            return f"weight is on {weight.device} but x is on {x.device}"
    n = x.shape[-1]
    limit = max_n(_device_index(x.device))
    if n > limit:
        return (
            f"last dim {n} > {limit}, the CUDA kernels' limit on this GPU (the backward reduces dweight "
            "through shared memory); use backend='triton' or 'torch'"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Checks before a raw-pointer call
# ---------------------------------------------------------------------------------------------


def _check_rows_tensor(t: torch.Tensor, name: str, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"tokenforge.cuda.rms_norm: {name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"tokenforge.cuda.rms_norm: {name} is on {t.device}, expected {device}")
    if t.device.type != "cuda":
        raise ValueError(f"tokenforge.cuda.rms_norm: {name} must be a CUDA tensor, got one on {t.device}")
    if t.dim() != 2:
        raise ValueError(f"tokenforge.cuda.rms_norm: {name} must be 2-D (rows, n), got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"tokenforge.cuda.rms_norm: {name} dtype {t.dtype} is not float32/float16/bfloat16")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(
            f"tokenforge.cuda.rms_norm: {name} must have unit column stride, got strides {t.stride()}"
        )
    if t.shape[0] > 1 and t.stride(0) < 0:
        raise ValueError(f"tokenforge.cuda.rms_norm: {name} has a negative row stride {t.stride(0)}")


def _check_weight(weight: Optional[torch.Tensor], n: int, device: torch.device) -> None:
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"tokenforge.cuda.rms_norm: weight must be a tensor or None, got {type(weight).__name__}")
    if weight.device != device:
        raise ValueError(f"tokenforge.cuda.rms_norm: weight is on {weight.device}, expected {device}")
    if weight.shape != (n,):
        raise ValueError(f"tokenforge.cuda.rms_norm: weight must have shape ({n},), got {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"tokenforge.cuda.rms_norm: weight dtype {weight.dtype} is not float32/float16/bfloat16")
    if not weight.is_contiguous():
        raise ValueError("tokenforge.cuda.rms_norm: weight must be contiguous")


def _row_stride(t: torch.Tensor) -> int:
    # A single row's stride is never used to step; report n so the kernel's stride checks pass.
    return int(t.stride(0)) if t.shape[0] > 1 else int(t.shape[1])


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _check_n(n: int, device: torch.device) -> None:
    limit = max_n(_device_index(device))
    if n > limit:
        raise ValueError(
            f"tokenforge.cuda.rms_norm: last dim {n} > {limit}, the CUDA kernels' limit on {device}; "
            "use backend='triton' or 'torch'"
        )


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def rms_norm_forward(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for x (rows, n) with unit column stride; y contiguous in x.dtype, rstd fp32 (rows,)."""
    ext = _ext.get_extension()
    _check_rows_tensor(x, "x", x.device)
    rows, n = x.shape
    _check_weight(weight, n, x.device)
    if n == 0:
        raise ValueError("tokenforge.cuda.rms_norm: the last dim of x is 0 (mean over no elements)")
    _check_n(n, x.device)
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, rstd
    x_code = _ext.dtype_code(x.dtype)
    w_code = _ext.dtype_code(weight.dtype) if weight is not None else x_code
    with torch.cuda.device(x.device):
        ext.rms_norm_fwd(
            x.data_ptr(), weight.data_ptr() if weight is not None else 0, y.data_ptr(), rstd.data_ptr(),
            rows, n, _row_stride(x), n, float(eps), x_code, w_code, _ext.current_stream_handle(x),
        )
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dx, dw) for dy, x (rows, n) with unit column stride; dx contiguous in x.dtype, dw in
    weight.dtype (None without a weight)."""
    ext = _ext.get_extension()
    _check_rows_tensor(x, "x", x.device)
    _check_rows_tensor(dy, "dy", x.device)
    rows, n = x.shape
    if dy.shape != x.shape:
        raise ValueError(f"tokenforge.cuda.rms_norm: dy has shape {tuple(dy.shape)} but x has {tuple(x.shape)}")
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)  # the kernel reads dy in x's dtype (y's dtype, so normally a no-op)
    _check_weight(weight, n, x.device)
    if not isinstance(rstd, torch.Tensor) or rstd.device != x.device or rstd.dtype != torch.float32 \
            or rstd.shape != (rows,) or not rstd.is_contiguous():
        raise ValueError(
            "tokenforge.cuda.rms_norm: rstd must be a contiguous float32 tensor of shape "
            f"({rows},) on {x.device}, as returned by rms_norm_forward"
        )
    if n == 0:
        raise ValueError("tokenforge.cuda.rms_norm: the last dim of x is 0")
    _check_n(n, x.device)
    dx = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        dw = torch.zeros((n,), dtype=weight.dtype, device=x.device) if weight is not None else None
        return dx, dw
    x_code = _ext.dtype_code(x.dtype)
    w_code = _ext.dtype_code(weight.dtype) if weight is not None else x_code
    device_index = _device_index(x.device)
    with torch.cuda.device(x.device):
        num_partials = _num_partials(device_index, rows, n, x_code, w_code, weight is not None)
        partial = (
            torch.empty((num_partials, n), dtype=torch.float32, device=x.device) if weight is not None else None
        )
        ext.rms_norm_bwd(
            dy.data_ptr(), x.data_ptr(), weight.data_ptr() if weight is not None else 0, rstd.data_ptr(),
            dx.data_ptr(), partial.data_ptr() if partial is not None else 0,
            rows, n, _row_stride(dy), _row_stride(x), n, num_partials, x_code, w_code,
            _ext.current_stream_handle(x),
        )
    dw = partial.sum(dim=0).to(weight.dtype) if partial is not None else None
    return dx, dw
