"""Multi-tensor AdamW step in Triton: one launch updates every tensor of a (device, dtype) group.

Per element, in fp32 (torch.optim.AdamW's formulas, in its order of operations):

    g  = grad * grad_scale                       (grad_scale: fused clipping, else 1)
    g  = -g                                      (maximize)
    p  = p * (1 - lr * weight_decay)             (decoupled weight decay)
    m  = lerp(m, g, 1 - beta1)                   (torch's two-sided lerp formula)
    v  = v * beta2 + (1 - beta2) * g * g
    vm = max(vmax, v)                            (amsgrad; else vm = v)
    p  = p - lr / (1 - beta1**t) * m / (sqrt(vm) / sqrt(1 - beta2**t) + eps)

Multi-tensor layout (built by tokenforge.optim.multi_tensor and cached while pointers hold; the
kernel-side helpers that read it live in kernels/multi_tensor.py, shared with Lion, 8-bit AdamW and
the grad norm):

- ``PTRS``: int64 [ROLES, n_tensors]: the data_ptr of each role (param, grad, exp_avg, exp_avg_sq,
  max_exp_avg_sq, step, master) of each tensor; a role a mode does not use is never read.
- ``META``: int64 [3, n_tensors]: numel, a stable per-parameter key (its index in the optimizer)
  and the flat index in the full parameter of the tensor's first element (0, or an FSDP2 shard's
  offset); stochastic rounding draws its bits from (seed, step, key, offset + local index).
- ``BLOCKMAP``: int32 [2, n_blocks]: tensor index and chunk index of each program, so a program
  handles elements [chunk * BLOCK, (chunk + 1) * BLOCK) of one tensor.
- ``HYPER``: float64 [5] on the device: lr, beta1, beta2, eps, weight_decay. A tensor lr is copied
  into it on the device, so nothing here syncs with the host and the launch is graph-capturable.

The per-tensor step is a float32 0-d tensor on the device (torch's state layout), incremented
before the launch; the bias corrections are computed per program in float64 from it, so they match
torch's double-precision host arithmetic.

Modes (constexprs): fp32 params; fp16/bf16 params with an fp32 master copy (HAS_MASTER: p is read
from and written to the master, and the param gets its round-to-nearest copy); bf16 params with
stochastic rounding (STOCHASTIC: no master; the new fp32 value is rounded to bf16 up or down with
probability proportional to its distance, from Philox keyed by the seed with counter (global
element index, step, key): reproducible, unbiased, the same under any sharding, graph-capturable). Moments are stored in ``S_DTYPE`` (fp32, or bf16 in
the stochastic mode when asked), always computed in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels.multi_tensor import (  # noqa: F401  (the shared table layout and helpers)
    BLOCK, EXP_AVG, EXP_AVG_SQ, GRAD, INTERPRETER_BLOCK, MASTER, MAX_EXP_AVG_SQ, NUM_WARPS, PARAM, ROLES, STEP,
    SUPPORTED_PARAM_DTYPES, _TL, _helper, _interpreted, block_size, launch_device, ld, narrow, st,
    stochastic_round_bf16, table_ptr,
)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@_helper
def _adamw_update(PTRS, META, GRAD_SCALE, n_tensors, t, offs, mask, seed, step,
                  step_size, bc2_sqrt, decay, one_minus_b1, one_minus_b2, b2, eps,
                  P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                  AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_MASTER: tl.constexpr,
                  STOCHASTIC: tl.constexpr, HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
                  INTERPRETED: tl.constexpr, MASKED: tl.constexpr):
    p_ptr = table_ptr(PTRS, PARAM, n_tensors, t, P_DTYPE, ALIGNED)
    m_ptr = table_ptr(PTRS, EXP_AVG, n_tensors, t, S_DTYPE, ALIGNED)
    v_ptr = table_ptr(PTRS, EXP_AVG_SQ, n_tensors, t, S_DTYPE, ALIGNED)

    g = ld(table_ptr(PTRS, GRAD, n_tensors, t, G_DTYPE, ALIGNED), offs, mask, MASKED)
    if HAS_SCALE:
        g = g * tl.load(GRAD_SCALE)
    if MAXIMIZE:
        g = -g
    if HAS_MASTER:
        w_ptr = table_ptr(PTRS, MASTER, n_tensors, t, tl.float32, ALIGNED)
        p = ld(w_ptr, offs, mask, MASKED)
    else:
        p = ld(p_ptr, offs, mask, MASKED)
    m = ld(m_ptr, offs, mask, MASKED)
    v = ld(v_ptr, offs, mask, MASKED)

    p = p * decay
    # torch's lerp: exact at both ends (weight 1 gives m = g, as betas=(0, .) expects).
    if one_minus_b1 < 0.5:
        m = m + one_minus_b1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - one_minus_b1)
    v = v * b2 + one_minus_b2 * g * g
    if AMSGRAD:
        vmax_ptr = table_ptr(PTRS, MAX_EXP_AVG_SQ, n_tensors, t, S_DTYPE, ALIGNED)
        vmax = tl.maximum(ld(vmax_ptr, offs, mask, MASKED), v)
        st(vmax_ptr, offs, narrow(vmax, S_DTYPE, INTERPRETED), mask, MASKED)
        denom = tl.sqrt(vmax) / bc2_sqrt + eps
    else:
        denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * (m / denom)

    st(m_ptr, offs, narrow(m, S_DTYPE, INTERPRETED), mask, MASKED)
    st(v_ptr, offs, narrow(v, S_DTYPE, INTERPRETED), mask, MASKED)
    if HAS_MASTER:
        st(w_ptr, offs, p, mask, MASKED)
        st(p_ptr, offs, narrow(p, P_DTYPE, INTERPRETED), mask, MASKED)
    elif STOCHASTIC:
        key = tl.load(META + n_tensors + t)
        gidx = tl.load(META + 2 * n_tensors + t) + offs
        st(p_ptr, offs, stochastic_round_bf16(p, seed, step.to(tl.int64), key, gidx), mask, MASKED)
    else:
        st(p_ptr, offs, narrow(p, P_DTYPE, INTERPRETED), mask, MASKED)


@triton.jit
def _adamw_kernel(
    PTRS, META, BLOCKMAP, HYPER, GRAD_SCALE,
    n_tensors, n_blocks, seed,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr, HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(BLOCKMAP + pid)
    chunk = tl.load(BLOCKMAP + n_blocks + pid)
    numel = tl.load(META + t)
    start = tl.cast(chunk, tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel

    # Per-tensor scalars in float64 (torch computes them in Python floats).
    step_ptr = tl.load(PTRS + STEP * n_tensors + t).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr).to(tl.float64)
    lr = tl.load(HYPER)
    beta1 = tl.load(HYPER + 1)
    beta2 = tl.load(HYPER + 2)
    eps = tl.load(HYPER + 3).to(tl.float32)
    wd = tl.load(HYPER + 4)
    bc1 = 1.0 - tl.exp2(step * tl.log2(beta1))
    bc2 = 1.0 - tl.exp2(step * tl.log2(beta2))
    step_size = (lr / bc1).to(tl.float32)
    bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
    decay = (1.0 - lr * wd).to(tl.float32)
    one_minus_b1 = (1.0 - beta1).to(tl.float32)
    one_minus_b2 = (1.0 - beta2).to(tl.float32)
    b2 = beta2.to(tl.float32)

    if start + BLOCK <= numel:
        _adamw_update(PTRS, META, GRAD_SCALE, n_tensors, t, offs, mask, seed, step,
                      step_size, bc2_sqrt, decay, one_minus_b1, one_minus_b2, b2, eps,
                      P_DTYPE, G_DTYPE, S_DTYPE, AMSGRAD, MAXIMIZE, HAS_MASTER, STOCHASTIC, HAS_SCALE,
                      ALIGNED, INTERPRETED, False)
    else:
        _adamw_update(PTRS, META, GRAD_SCALE, n_tensors, t, offs, mask, seed, step,
                      step_size, bc2_sqrt, decay, one_minus_b1, one_minus_b2, b2, eps,
                      P_DTYPE, G_DTYPE, S_DTYPE, AMSGRAD, MAXIMIZE, HAS_MASTER, STOCHASTIC, HAS_SCALE,
                      ALIGNED, INTERPRETED, True)


# ---------------------------------------------------------------------------------------------
# Configurations (the compile gate compiles every one) and the launcher
# ---------------------------------------------------------------------------------------------



def modes() -> list[dict]:
    """Every (dtype, mode) combination the launcher can pick, as kernel constexprs."""
    out = []
    for p_dtype in SUPPORTED_PARAM_DTYPES:
        for amsgrad in (False, True):
            if p_dtype == torch.float32:
                variants = [dict(HAS_MASTER=False, STOCHASTIC=False, S=torch.float32)]
            else:
                variants = [dict(HAS_MASTER=True, STOCHASTIC=False, S=torch.float32)]
                if p_dtype == torch.bfloat16:
                    variants += [dict(HAS_MASTER=False, STOCHASTIC=True, S=s) for s in (torch.float32, torch.bfloat16)]
            for v in variants:
                out.append(dict(p_dtype=p_dtype, g_dtype=p_dtype, s_dtype=v["S"], amsgrad=amsgrad,
                                has_master=v["HAS_MASTER"], stochastic=v["STOCHASTIC"]))
    return out


def all_configs() -> list[tuple[str, dict]]:
    """(kernel name, constexprs + num_warps) for every mode at the GPU block size."""
    out = []
    for mode in modes():
        out.append(("_adamw_kernel", dict(
            P_DTYPE=_TL[mode["p_dtype"]], G_DTYPE=_TL[mode["g_dtype"]], S_DTYPE=_TL[mode["s_dtype"]],
            AMSGRAD=mode["amsgrad"], MAXIMIZE=False, HAS_MASTER=mode["has_master"],
            STOCHASTIC=mode["stochastic"], HAS_SCALE=True, ALIGNED=True, BLOCK=BLOCK, INTERPRETED=False,
            num_warps=NUM_WARPS,
        )))
    return out


def supports(param: torch.Tensor) -> str | None:
    """None when the kernel can update params like this one, else why not."""
    if param.dtype not in SUPPORTED_PARAM_DTYPES:
        return f"param dtype {param.dtype} is not float32/float16/bfloat16 for the triton kernel; use backend='torch'"
    return None


def adamw_step(tables, hyper: torch.Tensor, grad_scale: torch.Tensor | None, *, p_dtype, g_dtype, s_dtype,
               amsgrad: bool, maximize: bool, has_master: bool, stochastic: bool, seed: int) -> None:
    """One AdamW step over every tensor of ``tables`` (a multi_tensor.Tables; steps already
    incremented). hyper: float64 [5] (lr, beta1, beta2, eps, weight_decay) on the device."""
    if tables.n_blocks == 0:
        return
    device = tables.ptrs.device
    scale = grad_scale if grad_scale is not None else hyper  # never read without HAS_SCALE
    with launch_device(device):
        _adamw_kernel[(tables.n_blocks,)](
            tables.ptrs, tables.meta, tables.blockmap, hyper, scale,
            tables.n_tensors, tables.n_blocks, seed & 0x7FFFFFFF,
            P_DTYPE=_TL[p_dtype], G_DTYPE=_TL[g_dtype], S_DTYPE=_TL[s_dtype],
            AMSGRAD=amsgrad, MAXIMIZE=maximize, HAS_MASTER=has_master, STOCHASTIC=stochastic,
            HAS_SCALE=grad_scale is not None, ALIGNED=tables.aligned, BLOCK=tables.block, INTERPRETED=_interpreted(),
            num_warps=NUM_WARPS,
        )
