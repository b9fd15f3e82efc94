"""AdamW launcher for the CUDA C++ multi-tensor kernel in csrc/adamw.cu (fp32 params).

Same contract as ``tokenforge.kernels.adamw``: ``supports(param)`` and
``adamw_step(tables, hyper, grad_scale, ...)`` over the device tables of
``tokenforge.optim.multi_tensor``. The tables are re-checked here (device, dtype, shape) before
their raw pointers go to the extension.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import cuda as _ext

ENTRY = "adamw_fp32_step"


def _missing_entry() -> Optional[str]:
    ext = _ext.get_extension()
    if not hasattr(ext, ENTRY):
        return (f"this build of tokenforge._C has no {ENTRY} (built before csrc/adamw.cu was added); "
                "reinstall the package to rebuild the extension, or use backend='triton'")
    return None


def supports(param: torch.Tensor) -> Optional[str]:
    """None when the CUDA kernel can update params like this one, else why not."""
    if param.device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors only; the param is on {param.device}"
    reason = _ext.runtime_unavailable_reason()
    if reason:
        return reason
    if param.dtype != torch.float32:
        return (f"the CUDA C++ AdamW handles float32 params only, not {param.dtype} (no master weights or "
                "stochastic rounding there); use backend='triton'")
    return _missing_entry()


def _check_table(t: torch.Tensor, name: str, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"tokenforge.cuda.adamw: {name} must be a contiguous {dtype} tensor on {device}")


def adamw_step(tables, hyper: torch.Tensor, grad_scale: Optional[torch.Tensor], *, p_dtype, g_dtype, s_dtype,
               amsgrad: bool, maximize: bool, has_master: bool, stochastic: bool, seed: int) -> None:
    """One AdamW step over every (fp32) tensor of ``tables``; steps already incremented."""
    if p_dtype != torch.float32 or g_dtype != torch.float32 or s_dtype != torch.float32 or has_master or stochastic:
        raise ValueError("tokenforge.cuda.adamw: float32 params, grads and moments only; use backend='triton'")
    ext = _ext.get_extension()
    reason = _missing_entry()
    if reason:
        raise RuntimeError(reason)
    device = tables.ptrs.device
    if device.type != "cuda":
        raise ValueError(f"tokenforge.cuda.adamw: the tables must be on a CUDA device, got {device}")
    _check_table(tables.ptrs, "ptrs", torch.int64, device)
    _check_table(tables.meta, "meta", torch.int64, device)
    _check_table(tables.blockmap, "blockmap", torch.int32, device)
    _check_table(hyper, "hyper", torch.float64, device)
    if tables.ptrs.shape[0] != 7 or hyper.numel() != 5:
        raise ValueError("tokenforge.cuda.adamw: ptrs must have 7 rows and hyper 5 values")
    if grad_scale is not None:
        _check_table(grad_scale, "grad_scale", torch.float32, device)
    if tables.n_blocks == 0:
        return
    with torch.cuda.device(device):
        getattr(ext, ENTRY)(
            tables.ptrs.data_ptr(), tables.meta.data_ptr(), tables.blockmap.data_ptr(), hyper.data_ptr(),
            grad_scale.data_ptr() if grad_scale is not None else 0, tables.n_tensors, tables.n_blocks,
            tables.block, bool(amsgrad), bool(maximize), bool(tables.aligned),
            _ext.current_stream_handle(tables.ptrs),
        )
