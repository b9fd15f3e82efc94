"""Multi-tensor Lion step in Triton (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

Per element, in fp32:

    p = p * (1 - lr * weight_decay)
    p = p - lr * sign(beta1 * m + (1 - beta1) * g)
    m = beta2 * m + (1 - beta2) * g

Same tables and modes as kernels/adamw.py (fp32; fp16/bf16 with an fp32 master; bf16 with
stochastic rounding), with one moment: 10 bytes of fp32 traffic per param fewer than AdamW.
HYPER: float64 [4] = lr, beta1, beta2, weight_decay.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device

from tokenforge.kernels.multi_tensor import (  # noqa: F401  (shared layout and helpers)
    EXP_AVG, GRAD, MASTER, PARAM, STEP, SUPPORTED_PARAM_DTYPES, _TL, _interpreted, narrow, stochastic_round_bf16,
)

# Tables are built at the shared block size (multi_tensor.block_size()), so launch at that size too.
from tokenforge.kernels.multi_tensor import BLOCK, NUM_WARPS  # noqa: E402


@triton.jit
def _lion_kernel(
    PTRS, META, BLOCKMAP, HYPER, GRAD_SCALE,
    n_tensors, n_blocks, seed,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(BLOCKMAP + pid)
    chunk = tl.load(BLOCKMAP + n_blocks + pid)
    numel = tl.load(META + t)
    offs = tl.cast(chunk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p_ptr = tl.load(PTRS + PARAM * n_tensors + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(PTRS + GRAD * n_tensors + t).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(PTRS + EXP_AVG * n_tensors + t).to(tl.pointer_type(S_DTYPE))

    lr = tl.load(HYPER)
    beta1 = tl.load(HYPER + 1)
    beta2 = tl.load(HYPER + 2)
    wd = tl.load(HYPER + 3)
    decay = (1.0 - lr * wd).to(tl.float32)
    lr32 = lr.to(tl.float32)

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
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    c = m * beta1.to(tl.float32) + g * (1.0 - beta1).to(tl.float32)
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    p = p * decay - lr32 * sign
    m = m * beta2.to(tl.float32) + g * (1.0 - beta2).to(tl.float32)

    tl.store(m_ptr + offs, narrow(m, S_DTYPE, INTERPRETED), mask=mask)
    if HAS_MASTER:
        tl.store(w_ptr + offs, p, mask=mask)
        tl.store(p_ptr + offs, narrow(p, P_DTYPE, INTERPRETED), mask=mask)
    elif STOCHASTIC:
        step = tl.load(tl.load(PTRS + STEP * n_tensors + t).to(tl.pointer_type(tl.float32)))
        key = tl.load(META + n_tensors + t)
        gidx = tl.load(META + 2 * n_tensors + t) + offs
        tl.store(p_ptr + offs, stochastic_round_bf16(p, seed, step.to(tl.int64), key, gidx), mask=mask)
    else:
        tl.store(p_ptr + offs, narrow(p, P_DTYPE, INTERPRETED), mask=mask)


def all_configs() -> list[tuple[str, dict]]:
    out = []
    for p_dtype in SUPPORTED_PARAM_DTYPES:
        variants = [(False, False, torch.float32)] if p_dtype == torch.float32 else [(True, False, torch.float32)]
        if p_dtype == torch.bfloat16:
            variants += [(False, True, torch.float32), (False, True, torch.bfloat16)]
        for master, sr, s_dtype in variants:
            out.append(("_lion_kernel", dict(
                P_DTYPE=_TL[p_dtype], G_DTYPE=_TL[p_dtype], S_DTYPE=_TL[s_dtype], MAXIMIZE=False,
                HAS_MASTER=master, STOCHASTIC=sr, HAS_SCALE=True, BLOCK=BLOCK, INTERPRETED=False, num_warps=NUM_WARPS)))
    return out


def lion_step(tables, hyper: torch.Tensor, grad_scale, *, p_dtype, g_dtype, s_dtype, maximize: bool,
              has_master: bool, stochastic: bool, seed: int) -> None:
    """One Lion step over every tensor of ``tables``. hyper: float64 [4] (lr, beta1, beta2, wd)."""
    if tables.n_blocks == 0:
        return
    device = tables.ptrs.device
    with launch_device(device):
        _lion_kernel[(tables.n_blocks,)](
            tables.ptrs, tables.meta, tables.blockmap, hyper, grad_scale if grad_scale is not None else hyper,
            tables.n_tensors, tables.n_blocks, seed & 0x7FFFFFFF,
            P_DTYPE=_TL[p_dtype], G_DTYPE=_TL[g_dtype], S_DTYPE=_TL[s_dtype], MAXIMIZE=maximize,
            HAS_MASTER=has_master, STOCHASTIC=stochastic, HAS_SCALE=grad_scale is not None,
            BLOCK=tables.block, INTERPRETED=_interpreted(), num_warps=NUM_WARPS,
        )
