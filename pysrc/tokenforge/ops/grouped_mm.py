"""Grouped matmul for mixture-of-experts: ``grouped_mm(a, b, offs)``, torch._grouped_mm's MoE case.

    a (T, K) tokens sorted by expert, b (E, K, N) expert weights, offs (E,) int32 cumulative row
    ends (expert e owns rows offs[e-1] <= r < offs[e], offs[-1] == T; experts may own no rows)
    out (T, N): out[r] = a[r] @ b[e(r)]

Forward and backward (dA = dOut_e @ b[e]^T, the same grouped kernel on b transposed by strides;
dB[e] = a_e^T @ dOut_e, a grouped reduction that writes zeros for an empty expert).

Path of a call: :func:`grouped_mm` validates and picks a backend -> :class:`GroupedMMFunction`
-> the custom ops ``tokenforge::grouped_mm`` / ``tokenforge::grouped_mm_wgrad`` ->
``tokenforge.kernels.grouped_mm`` (Triton: persistent over (expert, tile) work items, the schedule
built on the device, so no host sync) or ``tokenforge.cuda.grouped_mm`` (``backend="cuda"``: the
CUTLASS sm_90a ptr-array kernel in csrc/grouped_mm_sm90.cu, bf16, its schedule also built on the
device). The ``torch`` backend is :func:`grouped_mm_reference`, a
loop over experts (it reads offs on the host).

Checking offs (non-decreasing, from 0 to T) needs its values on the host: one sync, done by default
(``check_offs=True``) and skipped under torch.compile or with ``check_offs=False`` (what
tokenforge.nn.MoE passes: it builds offs with a cumsum). With an unchecked, invalid offs the Triton
kernels neither crash nor read out of bounds (row tiles clamp to their expert), but rows not
covered by any expert are left unwritten: garbage in, garbage out, never a fault.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import backends

OP = "grouped_mm"
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
REFERENCE_DTYPES = SUPPORTED_DTYPES + (torch.float64,)


def grouped_mm_reference(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The loop over experts: out[s:e] = a[s:e] @ b[i] in a's dtype (fp32 accumulation for the
    low-precision dtypes, as the kernels); differentiable by torch autograd; float64 is the oracle."""
    ends = [int(x) for x in offs.tolist()]
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    parts, start = [], 0
    for e, end in enumerate(ends):
        if end > start:
            parts.append((a[start:end].to(compute) @ b[e].to(compute)).to(a.dtype))
        start = max(start, end)
    if start < a.shape[0]:  # only reachable with check_offs=False; zeros rather than stale memory
        parts.append(a.new_zeros((a.shape[0] - start, b.shape[2])))
    if not parts:
        return a.new_zeros((a.shape[0], b.shape[2])) + 0 * (a.sum() + b.sum())
    return torch.cat(parts)


def _check(a, b, offs, check_offs: bool) -> None:
    for name, t in (("a", a), ("b", b), ("offs", offs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"grouped_mm: {name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dim() != 2:
        raise ValueError(f"grouped_mm: a must be 2-D (tokens, K) sorted by expert, got shape {tuple(a.shape)}")
    if b.dim() != 3:
        raise ValueError(f"grouped_mm: b must be 3-D (experts, K, N), got shape {tuple(b.shape)}")
    if offs.dim() != 1 or offs.numel() != b.shape[0]:
        raise ValueError(f"grouped_mm: offs must be 1-D with one entry per expert ({b.shape[0]}), got shape "
                         f"{tuple(offs.shape)}")
    if offs.dtype != torch.int32:
        raise TypeError(f"grouped_mm: offs must be int32 (as torch._grouped_mm), got {offs.dtype}; pass "
                        "offs.to(torch.int32)")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"grouped_mm: a's K ({a.shape[1]}) must equal b's K ({b.shape[1]}): b is (experts, K, N)")
    if a.dtype != b.dtype:
        raise TypeError(f"grouped_mm: a and b must share a dtype, got {a.dtype} and {b.dtype}")
    if a.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"grouped_mm: dtype must be one of {', '.join(map(str, REFERENCE_DTYPES))}, got {a.dtype}")
    if not (a.device == b.device == offs.device):
        raise ValueError(f"grouped_mm: a, b and offs must be on one device, got {a.device}, {b.device}, {offs.device}")
    if offs.numel() == 0 and a.shape[0] != 0:
        raise ValueError(f"grouped_mm: {a.shape[0]} token rows but no experts (b has shape {tuple(b.shape)})")
    if check_offs and offs.numel() and not torch.compiler.is_compiling():
        host = offs.cpu()
        if int(host[0]) < 0 or bool((host[1:] < host[:-1]).any()):
            raise ValueError(f"grouped_mm: offs must be non-decreasing cumulative row ends starting at >= 0, got "
                             f"{host.tolist()[:16]}{' ...' if host.numel() > 16 else ''}; build it as "
                             "torch.cumsum(tokens_per_expert, 0).to(torch.int32)")
        if int(host[-1]) != a.shape[0]:
            raise ValueError(f"grouped_mm: offs[-1] ({int(host[-1])}) must equal the number of token rows "
                             f"({a.shape[0]}): every row belongs to one expert")


def _triton_supports(a, b) -> Optional[str]:
    reason = backends.triton_unsupported_reason(a.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import grouped_mm as kgm

    return kgm.supports(a, b)


def _cuda_supports(a, b) -> Optional[str]:
    from tokenforge.cuda import grouped_mm as cgm

    return cgm.supports(a, b)


backends.register_op(
    # Triton first until the H200 benchmark ranks the CUTLASS kernel against it (bench/results).
    OP, cuda_preference=("triton", "cuda"),
    supports={"triton": _triton_supports, "cuda": _cuda_supports, "torch": lambda a, b: None},
    example_inputs=lambda device, dtype: (torch.empty(8, 16, device=device, dtype=dtype),
                                          torch.empty(2, 16, 16, device=device, dtype=dtype)),
)

# The custom ops below call their backend's launcher through this table (no dispatch in between).
LAUNCHERS = backends.Launchers(OP, triton="tokenforge.kernels.grouped_mm", cuda="tokenforge.cuda.grouped_mm")


@torch.library.custom_op("tokenforge::grouped_mm", mutates_args=())
def grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    out = torch.empty((a.shape[0], b.shape[2]), dtype=a.dtype, device=a.device)
    return LAUNCHERS[backend].grouped_mm_forward(a, b, offs, out)


@grouped_mm_op.register_fake
def _(a, b, offs, backend):
    return a.new_empty((a.shape[0], b.shape[2]))


@torch.library.custom_op("tokenforge::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad_op(a: torch.Tensor, dout: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    db = torch.empty((offs.shape[0], a.shape[1], dout.shape[1]), dtype=a.dtype, device=a.device)
    return LAUNCHERS[backend].grouped_mm_wgrad(a, dout, offs, db)


@grouped_mm_wgrad_op.register_fake
def _(a, dout, offs, backend):
    return a.new_empty((offs.shape[0], a.shape[1], dout.shape[1]))


class GroupedMMFunction(torch.autograd.Function):
    """Autograd for the kernel backends: saves a, b and offs; dA is the grouped kernel on b^T (a
    strided view, no copy), dB the grouped reduction."""

    @staticmethod
    def forward(ctx, a, b, offs, backend):
        ctx.save_for_backward(a, b, offs)
        ctx.backend = backend
        return torch.ops.tokenforge.grouped_mm(a, b, offs, backend)

    @staticmethod
    def backward(ctx, dout):
        a, b, offs = ctx.saved_tensors
        dout = dout.to(a.dtype)
        da = db = None
        if ctx.needs_input_grad[0]:
            da = torch.ops.tokenforge.grouped_mm(dout, b.transpose(1, 2), offs, ctx.backend)
        if ctx.needs_input_grad[1]:
            db = torch.ops.tokenforge.grouped_mm_wgrad(a, dout, offs, ctx.backend)
        return da, db, None, None


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, check_offs: bool = True,
               backend: Optional[str] = None) -> torch.Tensor:
    """(T, N) = per-expert ``a[rows of e] @ b[e]`` for a (T, K) sorted by expert, b (E, K, N), offs
    (E,) int32 cumulative row ends; bf16/fp16/fp32 (float64 on the torch backend), any strides.
    ``check_offs``: validate offs on the host (one sync; see the module docstring). ``backend``:
    triton, cuda (CUTLASS, sm_90a, bf16), torch or None (choose)."""
    _check(a, b, offs, check_offs)
    name = backends.choose(OP, a, b, backend=backend)
    if name == "torch" or a.shape[0] == 0 or b.shape[2] == 0:
        return grouped_mm_reference(a, b, offs)
    if a.shape[1] == 0:  # K = 0: a sum over nothing
        return a.new_zeros((a.shape[0], b.shape[2])) + 0 * (a.sum() + b.sum())
    return GroupedMMFunction.apply(a, b, offs, name)
