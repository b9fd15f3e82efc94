"""Launchers for the CUDA C++ attention in csrc/attention_sm90.cu (sm_90a, CuTe, FA3-style): the
same contract as ``tokenforge.kernels.attention`` (``attention_forward`` / ``attention_backward``,
inputs validated by tokenforge.ops.attention), chosen with ``backend="cuda"``.

What it takes: bf16, head dim 64 or 128, dense (b, s, h, d) or varlen (total, h, d) with
cu_seqlens on the device, GQA/MQA, causal and sliding windows (bottom-right aligned), a positive
softmax scale. Softcapping is the Triton backend's. Every tensor is read through TMA, which needs a
unit-stride head dim, 16-byte aligned bases and strides that are multiples of 8 elements; anything
else is copied contiguous first.

The backward accumulates dq with fp32 atomics across key blocks, so its last bits can differ from
run to run; ``deterministic=True`` is refused here (the Triton backward is deterministic).
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import cuda as _ext

HEAD_DIMS = (64, 128)
WHAT = "CUDA C++ attention"


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """None when the CUDA C++ attention can run these inputs here, else why not."""
    reason = _ext.sm90_kernel_unavailable(q, "attention_sm90", WHAT)
    if reason:
        return reason
    if q.dtype != torch.bfloat16:
        return f"the {WHAT} takes bfloat16, got {q.dtype}; cast to bf16 or use backend='triton'"
    if q.shape[-1] not in HEAD_DIMS:
        return f"the {WHAT} takes head_dim 64 or 128, got {q.shape[-1]}; use backend='triton'"
    return None


def check_call(softcap: float, scale: float, deterministic: bool) -> None:
    """The options this backend does not do, refused with what to do instead."""
    if softcap > 0:
        raise ValueError(f"attention: softcap={softcap} is not supported by backend='cuda'; use backend='triton'")
    if not scale > 0:
        raise ValueError(f"attention: backend='cuda' needs a positive softmax_scale, got {scale}; "
                         "use backend='triton'")
    if deterministic:
        raise ValueError("attention: backend='cuda' accumulates dq with atomics (not bitwise deterministic); "
                         "pass deterministic=False, or use backend='triton' for a deterministic backward")


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """t itself when TMA can read it in place (unit last stride, 16-byte base, other strides
    multiples of 8 elements), else a contiguous copy."""
    ok = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
          and all(s % 8 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1))
    return t if ok else t.contiguous()


def _strides(t: torch.Tensor) -> list[int]:
    """(batch, row, head) strides in elements; batch 0 for a packed varlen (total, h, d) tensor.
    A size-1 dim's stride is never used for an address, so it is replaced by one TMA accepts."""
    dims = t.shape if t.dim() == 4 else (1, *t.shape)
    strides = t.stride() if t.dim() == 4 else (0, *t.stride())
    out = []
    for i in range(3):
        if dims[i] > 1:
            out.append(int(strides[i]))
        else:
            span = 1
            for n in dims[i + 1:]:
                span *= int(n)
            out.append(span)
    return out


def _sizes_and_lse(q, k, cu_q, max_q, max_k):
    varlen = cu_q is not None
    if varlen:
        batch, sq, sk = cu_q.shape[0] - 1, q.shape[0], k.shape[0]
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
        lse_shape, lse_strides = (hq, sq), [0, sq]
    else:
        batch, sq, hq, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        lse_shape, lse_strides = (batch, hq, sq), [hq * sq, sq]
    sizes = [batch, sq, sk, int(max_q), int(max_k), hq, hkv, d]
    return sizes, lse_shape, lse_strides


def _cu(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                      window: tuple[int, int], softcap: float):
    """(out like q, contiguous; lse fp32 (b, hq, sq) or (hq, total_q))."""
    check_call(softcap, scale, False)
    q, k, v = _tma_ready(q), _tma_ready(k), _tma_ready(v)
    cu_q = cu_seqlens_q.contiguous() if cu_seqlens_q is not None else None
    cu_k = cu_seqlens_k.contiguous() if cu_seqlens_k is not None else None
    sizes, lse_shape, lse_strides = _sizes_and_lse(q, k, cu_q, max_seqlen_q, max_seqlen_k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    strides = [*_strides(q), *_strides(k), *_strides(v), *_strides(out), *lse_strides]
    with torch.cuda.device(q.device):
        _ext.get_extension().attention_sm90_forward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), _cu(cu_q), _cu(cu_k), sizes,
            strides, float(scale), int(window[0]), int(window[1]), _ext.current_stream_handle(q))
    return out, lse


def attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                       scale: float, window: tuple[int, int], softcap: float, deterministic: bool = False):
    """(dq, dk, dv), each contiguous in its input's shape (dq by atomics: see check_call)."""
    check_call(softcap, scale, deterministic)
    q, k, v, out, dout = (_tma_ready(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    cu_q = cu_seqlens_q.contiguous() if cu_seqlens_q is not None else None
    cu_k = cu_seqlens_k.contiguous() if cu_seqlens_k is not None else None
    sizes, _, lse_strides = _sizes_and_lse(q, k, cu_q, max_seqlen_q, max_seqlen_k)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dq_accum = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # zeroed by the launcher
    delta = torch.empty_like(lse)
    strides = [*_strides(q), *_strides(k), *_strides(v), *_strides(out), *lse_strides]
    grad_strides = [*_strides(dout), *_strides(dk), *_strides(dv)]
    with torch.cuda.device(q.device):
        _ext.get_extension().attention_sm90_backward(
            dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), _cu(cu_q),
            _cu(cu_k), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dq_accum.data_ptr(), delta.data_ptr(), sizes,
            strides, grad_strides, float(scale), int(window[0]), int(window[1]), _ext.current_stream_handle(q))
    return dq, dk, dv
