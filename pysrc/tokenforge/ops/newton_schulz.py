"""Newton-Schulz orthogonalisation: Muon's map from a gradient-like matrix G to roughly U V^T
(G = U S V^T), by a quintic polynomial iteration instead of an SVD.

    X = G / ||G||_F                         (so every singular value is <= 1)
    repeat steps times:  A = X X^T;  X = a X + (b A + c A A) X

with Keller Jordan's coefficients (a, b, c) = (3.4445, -4.7750, 2.0315), torch.optim.Muon's
defaults. They maximise the slope at 0 rather than converge: after 5 steps each singular value s
of X lands near 1, not on it. :data:`BAND` states the guarantee the tests check: for 5 steps,
input singular values s >= 2e-3 * ||G||_F map into [0.67, 1.21] (fp32 math; bf16 adds its own
rounding, +-0.06); smaller ones only grow (never past 1.21). In fp32 a rank-deficient G keeps
its null space (those singular values stay below 1e-4); in bf16 the rounding of X puts noise of
~2^-8 into the null space and the iteration amplifies it like any small singular value (up to
~0.7 after 5 steps; torch.optim.Muon's bf16 iteration does the same). An all-zero G gives zeros. The iteration runs on the short side: a tall G is
transposed first and the result transposed back, so A is min(m, n)^2.

Path of a call: :func:`newton_schulz` validates, normalises (torch, fp32 norm) and picks a
backend -> the custom op ``tokenforge::newton_schulz`` -> ``tokenforge.kernels.newton_schulz``
(Triton: a symmetric X X^T that computes one triangle, fused epilogues, the batch in one launch)
or :func:`newton_schulz_reference` (torch matmuls, the same rounding points). It is an optimizer
op: no autograd (inputs are read under no_grad).

A batch (B, m, n) of same-shape matrices runs as one launch per matmul (Muon batches the
matrices of one shape).
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import backends

OP = "newton_schulz"
COEFFICIENTS = (3.4445, -4.7750, 2.0315)
EPS = 1e-7
# (min input s / ||G||_F, output band) after 5 steps: see the module docstring and
# tests/test_newton_schulz.py, which measure it on random, ill-conditioned and rank-deficient G.
BAND = {"min_relative_singular_value": 2e-3, "low": 0.67, "high": 1.21, "bf16_slack": 0.06}
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def newton_schulz_reference(x: torch.Tensor, steps: int, coefficients=COEFFICIENTS) -> torch.Tensor:
    """The iterations of :func:`newton_schulz` in torch on x (B, m, n), m <= n, normalised: one
    rounding to x.dtype per fused matmul, as the kernels (and torch.optim.Muon's addmm) do;
    float64 x gives the float64 oracle."""
    a, b, c = coefficients
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    for _ in range(steps):
        xc = x.to(compute)
        gram = (xc @ xc.mT).to(x.dtype).to(compute)
        poly = (c * (gram @ gram.mT) + b * gram).to(x.dtype).to(compute)
        x = (poly @ xc + a * xc).to(x.dtype)
    return x


def _check(g, steps, coefficients, eps, dtype) -> None:
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"newton_schulz: G must be a torch.Tensor, got {type(g).__name__}")
    if g.dim() not in (2, 3):
        raise ValueError(f"newton_schulz: G must be a matrix (m, n) or a batch of them (B, m, n), got shape "
                         f"{tuple(g.shape)}; reshape a conv weight to (out_channels, -1) first")
    if not g.is_floating_point():
        raise TypeError(f"newton_schulz: G must be floating point, got {g.dtype}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"newton_schulz: dtype must be one of {', '.join(map(str, SUPPORTED_DTYPES))}, got {dtype}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= 100:
        raise ValueError(f"newton_schulz: steps must be an int in [0, 100], got {steps!r} (Muon uses 5)")
    if len(tuple(coefficients)) != 3:
        raise ValueError(f"newton_schulz: coefficients must be three floats (a, b, c), got {coefficients!r}")
    if not eps > 0:
        raise ValueError(f"newton_schulz: eps must be > 0, got {eps!r}")


def _triton_supports(x) -> Optional[str]:
    reason = backends.triton_unsupported_reason(x.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import newton_schulz as kns

    return kns.supports(x)


backends.register_op(OP, cuda_preference=("triton",),
                     supports={"triton": _triton_supports, "torch": lambda x: None},
                     example_inputs=lambda device, dtype: (torch.empty(1, 64, 128, device=device, dtype=torch.bfloat16),))

LAUNCHERS = backends.Launchers(OP, triton="tokenforge.kernels.newton_schulz")


@torch.library.custom_op("tokenforge::newton_schulz", mutates_args=())
def newton_schulz_op(x: torch.Tensor, steps: int, a: float, b: float, c: float, backend: str) -> torch.Tensor:
    """The iterations on a normalised, contiguous x (B, m, n) with m <= n."""
    if backend == "torch":
        return newton_schulz_reference(x, steps, (a, b, c))
    return LAUNCHERS[backend].newton_schulz_iterations(x, steps, (a, b, c))


@newton_schulz_op.register_fake
def _(x, steps, a, b, c, backend):
    return torch.empty_like(x)


@torch.no_grad()
def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients=COEFFICIENTS, eps: float = EPS, *,
                  dtype: torch.dtype = torch.bfloat16, backend: Optional[str] = None) -> torch.Tensor:
    """Orthogonalise G (m, n) or each of G (B, m, n); returns ``dtype`` (bf16 by default, as Muon
    runs it), same shape as G. ``backend``: triton, torch or None (choose)."""
    _check(g, steps, coefficients, eps, dtype)
    squeeze = g.dim() == 2
    g3 = g.unsqueeze(0) if squeeze else g
    tall = g3.shape[1] > g3.shape[2]
    src = g3.mT if tall else g3
    if src.numel() == 0:
        out = torch.zeros(src.shape, dtype=dtype, device=g.device)
    else:
        # ||G||_F in fp32 (float64 for the oracle): one scale per matrix, then one rounding to dtype.
        norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        wide = src.to(norm_dtype)  # one upcast, read by the norm and the division
        norm = torch.linalg.vector_norm(wide, dim=(-2, -1), keepdim=True)
        x = torch.empty(src.shape, dtype=dtype, device=g.device)  # contiguous, short side first
        x.copy_(wide / norm.clamp_min(eps))
        name = backends.choose(OP, x, backend=backend)
        a, b, c = (float(v) for v in coefficients)
        out = newton_schulz_op(x, int(steps), a, b, c, name)
    if tall:
        out = out.mT
    return out.squeeze(0) if squeeze else out
