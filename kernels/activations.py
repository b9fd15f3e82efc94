"""Elementwise math the Triton kernels share (one home for each, so every op computes it the same way)."""

import triton
import triton.language as tl


@triton.jit
def tanh(y):
    # Relative error < 1e-7 everywhere in fp32 (for losses; see tanh_fast for scores). Triton's
    # interpreter has no libdevice.tanh: exp-based, with a Taylor series near 0 where
    # 1 - exp(-2|y|) would cancel.
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    y2 = a * a
    small = a * (1.0 - y2 * (1.0 / 3.0 - y2 * (2.0 / 15.0 - y2 * (17.0 / 315.0))))
    t = tl.where(a < 0.125, small, big)
    return tl.where(y < 0, -t, t)


@triton.jit
def tanh_fast(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates to +-1 without overflow (exp -> inf or 0), absolute
    # error ~1e-7 but no relative accuracy near 0. For attention's softcap, where a score matters
    # only up to ~1e-6 absolute (softmax is shift-invariant): the series of ``tanh`` costs registers
    # that spill the all-features backward on sm_80.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
