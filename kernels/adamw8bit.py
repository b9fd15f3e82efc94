"""Multi-tensor AdamW with 8-bit block-wise quantized moments (``AdamW(state_bits=8)``).

m and v are stored as one byte per element plus one fp32 scale per block of ``QBLOCK`` = 256
elements (2 x 4 / 256 = 0.03 bytes per param): 2.03 bytes of state per param instead of 8.
The code is companded so that small values keep relative precision (the job bitsandbytes' dynamic
map does), with closed-form encode/decode instead of a codebook search:

    m: int8  q = round(127 * sign(m) * sqrt(|m| / absmax)),   m = absmax * sign(q) * (q / 127)^2
    v: uint8 q = round(255 * (v / vmax)^(1/4)),                v = vmax * (q / 255)^4

Each program dequantizes its chunk (whole quant blocks), runs the fp32 AdamW update of
kernels/adamw.py, recomputes each block's absmax / max and requantizes. Table layout as in
kernels/adamw.py; the MAX_EXP_AVG_SQ row points at the fp32 scales [2, n_qblocks] (row 0: m's
absmax, row 1: v's max) of each tensor (amsgrad is not offered with 8-bit states).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device

from tokenforge.kernels.multi_tensor import (  # noqa: F401
    BLOCK, EXP_AVG, EXP_AVG_SQ, GRAD, MASTER, MAX_EXP_AVG_SQ, NUM_WARPS, PARAM, STEP, _TL, _interpreted, narrow,
)

QBLOCK = 256


@triton.jit
def _adamw8_kernel(
    PTRS, META, BLOCKMAP, HYPER, GRAD_SCALE,
    n_tensors, n_blocks,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_MASTER: tl.constexpr,
    HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, QBLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(BLOCKMAP + pid)
    chunk = tl.load(BLOCKMAP + n_blocks + pid)
    numel = tl.load(META + t)
    ROWS: tl.constexpr = BLOCK // QBLOCK
    qb = tl.cast(chunk, tl.int64) * ROWS + tl.arange(0, ROWS)          # quant blocks of this chunk
    offs = qb[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    mask = offs < numel
    qmask = qb * QBLOCK < numel
    n_qb = (numel + QBLOCK - 1) // QBLOCK

    p_ptr = tl.load(PTRS + PARAM * n_tensors + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(PTRS + GRAD * n_tensors + t).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(PTRS + EXP_AVG * n_tensors + t).to(tl.pointer_type(tl.int8))
    v_ptr = tl.load(PTRS + EXP_AVG_SQ * n_tensors + t).to(tl.pointer_type(tl.uint8))
    s_ptr = tl.load(PTRS + MAX_EXP_AVG_SQ * n_tensors + t).to(tl.pointer_type(tl.float32))
    step_ptr = tl.load(PTRS + STEP * n_tensors + t).to(tl.pointer_type(tl.float32))

    step = tl.load(step_ptr).to(tl.float64)
    lr = tl.load(HYPER)
    beta1 = tl.load(HYPER + 1)
    beta2 = tl.load(HYPER + 2)
    eps = tl.load(HYPER + 3).to(tl.float32)
    wd = tl.load(HYPER + 4)
    step_size = (lr / (1.0 - tl.exp2(step * tl.log2(beta1)))).to(tl.float32)
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2))).to(tl.float32)
    decay = (1.0 - lr * wd).to(tl.float32)
    w = (1.0 - beta1).to(tl.float32)
    one_minus_b2 = (1.0 - beta2).to(tl.float32)
    b2 = beta2.to(tl.float32)

    # Dequantize.
    m_absmax = tl.load(s_ptr + qb, mask=qmask, other=0.0)
    v_max = tl.load(s_ptr + n_qb + qb, mask=qmask, other=0.0)
    mq = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.float32) / 127.0
    vq = tl.load(v_ptr + offs, mask=mask, other=0).to(tl.float32) / 255.0
    m = tl.where(mq < 0, -1.0, 1.0) * mq * mq * m_absmax[:, None]
    vq2 = vq * vq
    v = vq2 * vq2 * v_max[:, None]

    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(GRAD_SCALE)
    if MAXIMIZE:
        g = -g
    if HAS_MASTER:
        w_ptr = tl.load(PTRS + MASTER * n_tensors + t).to(tl.pointer_type(tl.float32))
        p = tl.load(w_ptr + offs, mask=mask, other=0.0)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    p = p * decay
    if w < 0.5:
        m = m + w * (g - m)
    else:
        m = g - (g - m) * (1.0 - w)
    v = v * b2 + one_minus_b2 * g * g
    p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))

    # Requantize against the new block maxima (masked lanes hold 0 and do not move them).
    m_absmax = tl.max(tl.abs(m), axis=1)
    v_max = tl.max(v, axis=1)
    m_safe = tl.where(m_absmax > 0, m_absmax, 1.0)
    v_safe = tl.where(v_max > 0, v_max, 1.0)
    m_code = tl.sqrt(tl.abs(m) / m_safe[:, None]) * 127.0
    m_code = tl.where(m < 0, -tl.floor(m_code + 0.5), tl.floor(m_code + 0.5))
    v_code = tl.floor(tl.sqrt(tl.sqrt(v / v_safe[:, None])) * 255.0 + 0.5)
    tl.store(m_ptr + offs, m_code.to(tl.int8), mask=mask)
    tl.store(v_ptr + offs, v_code.to(tl.uint8), mask=mask)
    tl.store(s_ptr + qb, m_absmax, mask=qmask)
    tl.store(s_ptr + n_qb + qb, v_max, mask=qmask)

    if HAS_MASTER:
        tl.store(w_ptr + offs, p, mask=mask)
    tl.store(p_ptr + offs, narrow(p, P_DTYPE, INTERPRETED), mask=mask)


def all_configs() -> list[tuple[str, dict]]:
    out = []
    for p_dtype in (torch.float32, torch.float16, torch.bfloat16):
        out.append(("_adamw8_kernel", dict(
            P_DTYPE=_TL[p_dtype], G_DTYPE=_TL[p_dtype], MAXIMIZE=False, HAS_MASTER=p_dtype != torch.float32,
            HAS_SCALE=True, BLOCK=BLOCK, QBLOCK=QBLOCK, INTERPRETED=False, num_warps=NUM_WARPS)))
    return out


def adamw8_step(tables, hyper: torch.Tensor, grad_scale, *, p_dtype, g_dtype, maximize: bool,
                has_master: bool) -> None:
    """One AdamW step with 8-bit moments over every tensor of ``tables`` (steps incremented)."""
    if tables.n_blocks == 0:
        return
    assert tables.block % QBLOCK == 0
    device = tables.ptrs.device
    with launch_device(device):
        _adamw8_kernel[(tables.n_blocks,)](
            tables.ptrs, tables.meta, tables.blockmap, hyper, grad_scale if grad_scale is not None else hyper,
            tables.n_tensors, tables.n_blocks,
            P_DTYPE=_TL[p_dtype], G_DTYPE=_TL[g_dtype], MAXIMIZE=maximize, HAS_MASTER=has_master,
            HAS_SCALE=grad_scale is not None, BLOCK=tables.block, QBLOCK=QBLOCK, INTERPRETED=_interpreted(),
            num_warps=NUM_WARPS,
        )
