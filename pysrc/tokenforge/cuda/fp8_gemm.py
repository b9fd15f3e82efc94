"""Launcher for the CUTLASS FP8 GEMM in csrc/fp8_gemm_sm90.cu (sm_90a: TMA, wgmma, warp-specialized
persistent). Same contract as ``tokenforge.kernels.fp8_gemm.scaled_mm``: a (M, K), b (K, N)
float8_e4m3fn, fp32 scales in any layout :func:`tokenforge.fp8.scaled_mm` accepts, bias (N,) or
None, out in bf16, fp16 or fp32.

The kernel reads K-major operands only (a row-major, b column-major), so other layouts are copied
first. It has two scale families, so scales are brought to one of two forms here (both tiny
next to the operands):

- constant along K (tensorwise, rowwise a, colwise b): vectors (M,) and (N,) applied in the epilogue;
- varying along K (any blockwise scale): (kb, M) and (kb, N), one scale per row / column per
  128-deep K block (a 128x128 block's scale repeated over its 128 rows or columns).

fp16 output is the fp32 result rounded once more on the way out (the kernel is built for bf16 and
fp32 only: four template instantiations keep the build within minutes).
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import cuda as _ext
from tokenforge.fp8.quantize import expand_block_scale

SCALE_BLOCK = 128


def supports(a: torch.Tensor, b: torch.Tensor) -> Optional[str]:
    """None when the CUTLASS kernel can run a @ b here, else why not."""
    reason = _ext.sm90_kernel_unavailable(a, "fp8_gemm_sm90", "CUTLASS FP8 GEMM")
    if reason:
        return reason
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        return f"the CUTLASS FP8 GEMM takes float8_e4m3fn operands, got {a.dtype} and {b.dtype}"
    return None


def _k_vectors(scale_a: torch.Tensor, scale_b: torch.Tensor, M: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (scale_a.reshape(-1).expand(M).contiguous() if scale_a.numel() == 1 else scale_a.reshape(M).contiguous(),
            scale_b.reshape(-1).expand(N).contiguous() if scale_b.numel() == 1 else scale_b.reshape(N).contiguous())


def _k_blocks(scale_a: torch.Tensor, scale_b: torch.Tensor, M: int, N: int, kb: int) -> tuple[torch.Tensor, torch.Tensor]:
    sa = expand_block_scale(scale_a.reshape(1, 1) if scale_a.numel() == 1 else scale_a, M, kb)
    sb = expand_block_scale(scale_b.reshape(1, 1) if scale_b.numel() == 1 else scale_b, kb, N)
    return sa.expand(M, kb).t().contiguous(), sb.expand(kb, N).contiguous()


def varies_along_k(scale: torch.Tensor, k_first: bool) -> bool:
    """Whether an operand's scale has more than one K block ((M, kb) / (kb, N) with kb > 1)."""
    if scale.dim() < 2:
        return False
    return (scale.shape[0] if k_first else scale.shape[1]) > 1


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """(M, N) out_dtype = (a @ b) * scale_a * scale_b + bias on the CUTLASS sm_90a kernel (inputs
    validated by tokenforge.fp8.scaled_mm)."""
    M, K = a.shape
    N = b.shape[1]
    kernel_dtype = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32
    if M == 0 or N == 0 or K == 0:
        out = torch.zeros((M, N), dtype=torch.float32, device=a.device)
        return (out + bias.float() if bias is not None else out).to(out_dtype)
    a = _ext.tma_rows(a)
    bt = _ext.tma_rows(b.t())  # (N, K), K unit-stride: b column-major
    kb = -(-K // SCALE_BLOCK)
    blockwise = varies_along_k(scale_a, k_first=False) or varies_along_k(scale_b, k_first=True)
    if blockwise:
        sa, sb = _k_blocks(scale_a, scale_b, M, N, kb)
    else:
        sa, sb = _k_vectors(scale_a, scale_b, M, N)
    bias32 = bias.to(torch.float32).contiguous() if bias is not None else None
    out = torch.empty((M, N), dtype=kernel_dtype, device=a.device)
    ext = _ext.get_extension()
    code = _ext.dtype_code(kernel_dtype)
    with torch.cuda.device(a.device):
        workspace_bytes = int(ext.fp8_gemm_sm90_workspace_size(M, N, K, blockwise, code))
        workspace = torch.empty((max(workspace_bytes, 1),), dtype=torch.uint8, device=a.device)
        ext.fp8_gemm_sm90(
            a.data_ptr(), bt.data_ptr(), out.data_ptr(), sa.data_ptr(), sb.data_ptr(),
            bias32.data_ptr() if bias32 is not None else 0, workspace.data_ptr(), workspace_bytes,
            M, N, K, a.stride(0) if M > 1 else K, bt.stride(0) if N > 1 else K, out.stride(0), blockwise, code,
            _ext.current_stream_handle(a))
    return out if out.dtype == out_dtype else out.to(out_dtype)
