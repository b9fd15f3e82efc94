"""Launchers for the CUTLASS grouped GEMM in csrc/grouped_mm_sm90.cu (sm_90a, bf16): the same
contract as ``tokenforge.kernels.grouped_mm`` (``grouped_mm_forward(a, b, offs, out)``,
``grouped_mm_wgrad(a, dout, offs, db)``, inputs validated by tokenforge.ops.grouped_mm).

The kernel's schedule is built on the device from offs (a small kernel writes CUTLASS's per-expert
problem shapes, pointers and strides into the workspace), so a call never syncs with the host.
Operands need a unit stride along one dimension and 16-byte aligned rows (TMA); anything else is
copied contiguous first. b may be (E, K, N) N-major (the forward) or a transposed view with K
unit-stride (dA's b^T, or weights stored (E, N, K)): each has its own kernel, no copy.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import cuda as _ext

FORWARD, WGRAD = 0, 1


def supports(a: torch.Tensor, b: torch.Tensor) -> Optional[str]:
    """None when the CUTLASS kernel can run this grouped GEMM here, else why not."""
    reason = _ext.sm90_kernel_unavailable(a, "grouped_mm_sm90", "CUTLASS grouped GEMM")
    if reason:
        return reason
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return f"the CUTLASS grouped GEMM takes bfloat16, got {a.dtype} and {b.dtype}"
    if a.shape[1] % 8 or b.shape[-1] % 8:
        return f"the CUTLASS grouped GEMM needs K and N multiples of 8, got K={a.shape[1]}, N={b.shape[-1]}"
    return None


def _b_ok(b: torch.Tensor) -> bool:
    if b.data_ptr() % 16 or b.stride(0) % 8:
        return False
    return (b.stride(2) == 1 and b.stride(1) % 8 == 0) or (b.stride(1) == 1 and b.stride(2) % 8 == 0)


def _launch(a, b, out, offs, experts, tokens, n, k, lda, ldb_k, ldb_n, stride_be, ldo, kind, b_k_major):
    ext = _ext.get_extension()
    with torch.cuda.device(a.device):
        nbytes = int(ext.grouped_mm_sm90_workspace_size(experts, kind, b_k_major))
        workspace = torch.empty((nbytes,), dtype=torch.uint8, device=a.device)
        ext.grouped_mm_sm90(a.data_ptr(), b.data_ptr(), out.data_ptr(), offs.data_ptr(), workspace.data_ptr(), nbytes,
                            experts, tokens, n, k, lda, ldb_k, ldb_n, stride_be, ldo, kind,
                            _ext.current_stream_handle(a))
    return out


def grouped_mm_forward(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (T, N) = a (T, K) @ b[e] per expert's rows (out: a fresh contiguous tensor)."""
    tokens, k = a.shape
    experts, _, n = b.shape
    a = _ext.tma_rows(a)
    b = b if _b_ok(b) else b.contiguous()
    offs = offs.contiguous()
    b_k_major = b.stride(1) == 1 and b.stride(2) != 1
    return _launch(a, b, out, offs, experts, tokens, n, k, a.stride(0), b.stride(1), b.stride(2), b.stride(0),
                   out.stride(0), FORWARD, b_k_major)


def grouped_mm_wgrad(a: torch.Tensor, dout: torch.Tensor, offs: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """db (E, K, N) = a[rows of e]^T @ dout[rows of e] (zeros for an expert with no rows)."""
    tokens, k = a.shape
    experts, _, n = db.shape
    a = _ext.tma_rows(a)
    dout = _ext.tma_rows(dout)
    offs = offs.contiguous()
    return _launch(a, dout, db, offs, experts, tokens, n, k, a.stride(0), 0, 1, 0, dout.stride(0), WGRAD, False)
