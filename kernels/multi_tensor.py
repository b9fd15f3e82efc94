"""What every multi-tensor optimizer kernel shares (AdamW, Lion, 8-bit AdamW, the grad norm): the
pointer-table layout, the launch block size and the jitted helpers that load, store, narrow and
round stochastically. The tables themselves are built by tokenforge.optim.multi_tensor; the layout
is described in kernels/adamw.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device  # noqa: F401  (re-exported for the optimizer kernels)

# Rows of PTRS (constexpr globals, so the kernels may read them).
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP, MASTER = (tl.constexpr(i) for i in range(7))
ROLES = 7

# Elements per program: 2048 with 8 warps is 8 elements per thread per stream (two 16-byte
# accesses for fp32), with 4-6 streams in flight per thread. 4096 spilled on sm_80 in the
# heaviest mode (bf16 + stochastic rounding + amsgrad: 128 registers), see the compile gate. The
# interpreter uses a larger block: its cost is per program, and the tests' sizes still span chunks.
BLOCK = 2048
NUM_WARPS = 8
INTERPRETER_BLOCK = 16384

SUPPORTED_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreted() -> bool:
    from tokenforge import kernels

    return kernels.INTERPRETED


def block_size() -> int:
    from tokenforge import kernels

    return INTERPRETER_BLOCK if kernels.INTERPRETED else BLOCK


# ---------------------------------------------------------------------------------------------
# Shared jitted helpers (also used by kernels/lion.py and kernels/grad_norm.py)
# ---------------------------------------------------------------------------------------------


def _helper(fn):
    """@triton.jit for compiled kernels. Under the interpreter the plain function is called instead:
    it runs the same tl code (the interpreter patches tl while a kernel runs), without the ~5 ms
    the interpreter spends setting up every nested jitted call, which dominated the CPU tests."""
    from tokenforge import kernels

    return fn if kernels.INTERPRETED else triton.jit(fn)


@_helper
def philox_word(seed, step, key, gidx):
    """32 random bits per element from Philox (counter-based) keyed by ``seed`` with counter
    (global element index: 64 bits, step, param key): an element gets the same bits whether its
    param is one tensor or an FSDP2 shard on any number of ranks, and no bits repeat within 2**64
    elements of a param. (bf16 stochastic rounding and the 8-bit states' code rounding both draw
    from it; no optimizer mode uses both.)"""
    g = gidx.to(tl.uint64, bitcast=True)
    c0 = g.to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = c0 * 0 + tl.cast(step, tl.uint32)
    c3 = c0 * 0 + tl.cast(key, tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return r


@_helper
def stochastic_round_bf16(x, seed, step, key, gidx):
    """x (fp32) rounded to bf16 stochastically: add 16 random bits (philox_word) below the bf16
    mantissa, then truncate. Unbiased for finite x; NaN/inf pass through unchanged."""
    r = philox_word(seed, step, key, gidx) & 0xFFFF
    bits = x.to(tl.uint32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = tl.where(finite, (bits + r) & 0xFFFF0000, bits)
    return rounded.to(tl.float32, bitcast=True).to(tl.bfloat16)


@_helper
def narrow(x, DT: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 x -> DT rounded to nearest even. Triton's interpreter truncates fp32 -> bf16, so there
    the rounding is done on the bits (NaN/inf pass through); the GPU converts natively (RTNE)."""
    if INTERPRETED and DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        finite = (bits & 0x7F800000) != 0x7F800000
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(finite, rounded, bits).to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DT)


_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@_helper
def ld(ptr, offs, mask, MASKED: tl.constexpr):
    """Load as fp32; unmasked for whole chunks (so 16-byte vector accesses are possible)."""
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(ptr + offs).to(tl.float32)


@_helper
def st(ptr, offs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, x, mask=mask)
    else:
        tl.store(ptr + offs, x)


@_helper
def table_ptr(PTRS, role, n_tensors, t, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """The pointer of ``role`` of tensor t; ALIGNED: the launcher checked every pointer is 16-byte
    aligned, which (with unmasked whole chunks) lets Triton emit 16-byte loads and stores."""
    ptr = tl.load(PTRS + role * n_tensors + t).to(tl.pointer_type(DT))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


