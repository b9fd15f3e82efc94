"""Multi-tensor AdamW with 8-bit block-wise quantized moments (``AdamW(state_bits=8)``).

Per block of ``QBLOCK`` = 256 elements the state is one byte per moment element plus two fp32
block maxima (2 x 4 / 256 = 0.03 bytes per param): 2.03 bytes of state per param instead of 8.
What is stored, and why (the closed forms below are shared by the kernel and the torch reference,
tokenforge.optim.adamw.quantize_moments_ / dequantize_moments):

- v in the root domain: r = sqrt(v), as a uint8 code q of x = r / rmax (rmax: the block's largest r)
  on a power-law map with a logarithmic tail,

      x = (q / 255)^5                                  for q >= 28   (relative step 5 / q: 2% at the top)
      x = (28 / 255)^5 * exp(5 / 28 * (q - 28))         for 1 <= q < 28 (relative step 18%, constant)
      x = 0                                             for q = 0

  so x reaches 1.3e-7 (v: 1.7e-14 of the block's largest): a gradient 1e-6 times its neighbours'
  keeps a live second moment. Codes are rounded *stochastically*, unbiased in v (up with
  probability (v - v_lo) / (v_hi - v_lo)), from Philox bits keyed by (seed, step, param key,
  global element index) (kernels/multi_tensor.philox_word): with beta2 = 0.999 one step moves v
  by ~0.1%, less than half a code, so round-to-nearest would freeze v (or ratchet it upward on large
  gradients: measured +20-30% after 500 steps); stochastic rounding keeps E[v] exact at the price of
  noise (measured ~12% sd in v, i.e. ~6% in the step size, unbiased).
- m relative to its own element's sqrt(v): u = m / r_q (r_q the *stored* sqrt(v)), as an int8 code
  of u / umax (umax: the block's largest |u|), linear, rounded to nearest. |u| is O(1) for every
  element whatever its gradient's scale (|m| <= ~sqrt(v) for EMAs of the same gradients), so a
  small gradient's momentum keeps the same precision as a large one's, and the update m / sqrt(v)
  = u * r_q / sqrt(v) is exact up to u's code: u moves ~10% per step (beta1 = 0.9), nearest rounding
  does not stall it.

Measured against fp32 AdamW (tests/test_adamw.py::test_8bit_*): blocks mixing gradients of scale 1
and 1e-6 keep both classes' moments within a few percent (the previous sqrt/4th-root companding
stored 0 for every small element); on a small MLP regression the loss stays within the stated band
of fp32 AdamW's over 500 steps.

Each program dequantizes its chunk (whole quant blocks), runs the fp32 AdamW update of
kernels/adamw.py, recomputes each block's maxima and requantizes. Table layout as in kernels/adamw.py;
the MAX_EXP_AVG_SQ row points at the fp32 block maxima [2, n_qblocks] (row 0: umax, row 1: rmax) of
each tensor (amsgrad is not offered with 8-bit states).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device

from tokenforge.kernels.multi_tensor import (  # noqa: F401
    BLOCK, EXP_AVG, EXP_AVG_SQ, GRAD, MASTER, MAX_EXP_AVG_SQ, NUM_WARPS, PARAM, STEP, _TL, _helper, _interpreted,
    narrow, philox_word,
)

QBLOCK = 256
U_CODES = 127        # int8 codes of u / umax: linear in [-1, 1]
R_CODES = 255        # uint8 codes of r / rmax
R_POW = 5            # power-law part of the r map
R_KNEE = 28          # below this code the map is logarithmic (the knee's relative step, held)
R_X0 = (R_KNEE / R_CODES) ** R_POW
R_LOG2_STEP = R_POW / R_KNEE / math.log(2.0)   # log2 of the ratio of neighbouring tail codes
R_LOG2_X0 = math.log2(R_X0)

_R_CODES, _R_KNEE, _R_X0 = tl.constexpr(float(R_CODES)), tl.constexpr(float(R_KNEE)), tl.constexpr(R_X0)
_R_LOG2_STEP, _R_LOG2_X0 = tl.constexpr(R_LOG2_STEP), tl.constexpr(R_LOG2_X0)


@_helper
def r_decode(q):
    """x = r / rmax of an r code q (fp32 holding 0..255)."""
    top = q / _R_CODES
    top2 = top * top
    tail = tl.exp2((q - _R_KNEE) * _R_LOG2_STEP + _R_LOG2_X0)
    return tl.where(q >= _R_KNEE, top2 * top2 * top, tl.where(q > 0, tail, 0.0))


@_helper
def r_encode(x, uniform):
    """r code (fp32) of x = r / rmax in [0, 1], rounded up with probability (x^2 - lo^2) / (hi^2 - lo^2)
    (unbiased in v = r^2) where ``uniform`` < that probability."""
    lx = tl.log2(tl.maximum(x, 1e-30))
    c = tl.where(x >= _R_X0, _R_CODES * tl.exp2(lx * 0.2), _R_KNEE + (lx - _R_LOG2_X0) / _R_LOG2_STEP)
    lo = tl.minimum(tl.maximum(tl.floor(c), 0.0), _R_CODES - 1.0)
    r_lo = r_decode(lo)
    r_hi = r_decode(lo + 1.0)
    f = (x * x - r_lo * r_lo) / (r_hi * r_hi - r_lo * r_lo)
    return tl.where(uniform < f, lo + 1.0, lo)


@triton.jit
def _adamw8_kernel(
    PTRS, META, BLOCKMAP, HYPER, GRAD_SCALE,
    n_tensors, n_blocks, seed,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_MASTER: tl.constexpr,
    HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, QBLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(BLOCKMAP + pid)
    chunk = tl.load(BLOCKMAP + n_blocks + pid)
    numel = tl.load(META + t)
    key = tl.load(META + n_tensors + t)
    first = tl.load(META + 2 * n_tensors + t)   # flat index of this tensor's element 0 in the full param
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

    # Dequantize: r = rmax * map(q_r), v = r^2, m = umax * q_u / 127 * r.
    u_max = tl.load(s_ptr + qb, mask=qmask, other=0.0)
    r_max = tl.load(s_ptr + n_qb + qb, mask=qmask, other=0.0)
    r = r_decode(tl.load(v_ptr + offs, mask=mask, other=0).to(tl.float32)) * r_max[:, None]
    v = r * r
    m = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.float32) * (1.0 / 127.0) * u_max[:, None] * r

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
    r = tl.sqrt(v)
    r_max = tl.max(r, axis=1)
    r_safe = tl.where(r_max > 0, r_max, 1.0)
    bits = philox_word(seed, step.to(tl.int64), key, first + offs)
    uniform = (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)
    r_code = r_encode(r / r_safe[:, None], uniform)
    r_q = r_decode(r_code) * r_max[:, None]
    u = tl.where(r_q > 0, m / tl.where(r_q > 0, r_q, 1.0), 0.0)
    u_max = tl.max(tl.abs(u), axis=1)
    u_safe = tl.where(u_max > 0, u_max, 1.0)
    u_code = tl.floor(tl.abs(u) / u_safe[:, None] * 127.0 + 0.5)
    u_code = tl.where(u < 0, -u_code, u_code)
    tl.store(m_ptr + offs, u_code.to(tl.int8), mask=mask)
    tl.store(v_ptr + offs, r_code.to(tl.uint8), mask=mask)
    tl.store(s_ptr + qb, u_max, mask=qmask)
    tl.store(s_ptr + n_qb + qb, r_max, mask=qmask)

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
                has_master: bool, seed: int) -> None:
    """One AdamW step with 8-bit moments over every tensor of ``tables`` (steps incremented)."""
    if tables.n_blocks == 0:
        return
    assert tables.block % QBLOCK == 0
    device = tables.ptrs.device
    with launch_device(device):
        _adamw8_kernel[(tables.n_blocks,)](
            tables.ptrs, tables.meta, tables.blockmap, hyper, grad_scale if grad_scale is not None else hyper,
            tables.n_tensors, tables.n_blocks, seed & 0x7FFFFFFF,
            P_DTYPE=_TL[p_dtype], G_DTYPE=_TL[g_dtype], MAXIMIZE=maximize, HAS_MASTER=has_master,
            HAS_SCALE=grad_scale is not None, BLOCK=tables.block, QBLOCK=QBLOCK, INTERPRETED=_interpreted(),
            num_warps=NUM_WARPS,
        )
