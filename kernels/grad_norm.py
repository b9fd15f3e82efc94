"""Multi-tensor gradient norm and scaling in Triton (for clip_grad_norm_ and AdamW(max_grad_norm)).

Same table layout as kernels/adamw.py, with one role (the grad): ``PTRS`` int64 [1, n_tensors],
``META`` int64 [2, n_tensors] (numel, key), ``BLOCKMAP`` int32 [2, n_blocks].

``_norm_partials_kernel`` writes one fp32 partial per program (sum of |g|^p, or max |g| for the
inf-norm); the caller reduces the partials with one torch op, so the result is deterministic for a
given set of sizes and nothing syncs with the host. ``_scale_kernel`` multiplies every grad by a
device scalar in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device

from tokenforge.kernels.multi_tensor import _interpreted, narrow

# Tables are built at the shared block size (multi_tensor.block_size()), so launch at that size too.
from tokenforge.kernels.multi_tensor import BLOCK, NUM_WARPS  # noqa: E402
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# NORM constexpr values
NORM_L2, NORM_INF, NORM_P, NORM_L1 = 0, 1, 2, 3


@triton.jit
def _norm_partials_kernel(
    PTRS, META, BLOCKMAP, PARTIALS, n_blocks, p,
    G_DTYPE: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(BLOCKMAP + pid)
    chunk = tl.load(BLOCKMAP + n_blocks + pid)
    numel = tl.load(META + t)
    offs = tl.cast(chunk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g_ptr = tl.load(PTRS + t).to(tl.pointer_type(G_DTYPE))
    g = tl.abs(tl.load(g_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32))
    if NORM == 0:
        part = tl.sum(g * g, axis=0)
    elif NORM == 1:
        # max() would drop NaN; keep it, as torch's norm does.
        part = tl.max(g, axis=0)
        part = tl.where(tl.sum(tl.where(g != g, 1, 0), axis=0) > 0, float("nan"), part)
    elif NORM == 3:
        part = tl.sum(g, axis=0)
    else:
        # |g|^p in float64: an fp32 exp2(p * log2 g) loses |p log2 g| ulps (1e-6 for small g).
        g64 = tl.where(g > 0, g, 1.0).to(tl.float64)
        part = tl.sum(tl.where(g > 0, tl.exp2(p * tl.log2(g64)), 0.0), axis=0).to(tl.float32)
    tl.store(PARTIALS + pid, part)


@triton.jit
def _scale_kernel(PTRS, META, BLOCKMAP, SCALE, n_blocks, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                  INTERPRETED: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(BLOCKMAP + pid)
    chunk = tl.load(BLOCKMAP + n_blocks + pid)
    numel = tl.load(META + t)
    offs = tl.cast(chunk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g_ptr = tl.load(PTRS + t).to(tl.pointer_type(G_DTYPE))
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(g_ptr + offs, narrow(g * tl.load(SCALE), G_DTYPE, INTERPRETED), mask=mask)


def all_configs() -> list[tuple[str, dict]]:
    out = []
    for dtype in SUPPORTED_DTYPES:
        for norm in (NORM_L2, NORM_INF, NORM_P, NORM_L1):
            out.append(("_norm_partials_kernel", dict(G_DTYPE=_TL[dtype], NORM=norm, BLOCK=BLOCK, num_warps=NUM_WARPS)))
        out.append(("_scale_kernel", dict(G_DTYPE=_TL[dtype], BLOCK=BLOCK, INTERPRETED=False, num_warps=NUM_WARPS)))
    return out



def norm_partials(tables, dtype: torch.dtype, norm_type: float) -> torch.Tensor:
    """fp32 [n_blocks] partials of the grads in ``tables``: sum |g|^p, or max |g| for p = inf."""
    device = tables.ptrs.device
    out = torch.empty((max(tables.n_blocks, 1),), dtype=torch.float32, device=device)
    if tables.n_blocks == 0:
        return out.zero_()
    norm = {2.0: NORM_L2, 1.0: NORM_L1, float("inf"): NORM_INF}.get(float(norm_type), NORM_P)
    with launch_device(device):
        _norm_partials_kernel[(tables.n_blocks,)](
            tables.ptrs, tables.meta, tables.blockmap, out, tables.n_blocks, float(norm_type),
            G_DTYPE=_TL[dtype], NORM=norm, BLOCK=tables.block, num_warps=NUM_WARPS,
        )
    return out


def scale_(tables, dtype: torch.dtype, scale: torch.Tensor) -> None:
    """grads *= scale (fp32 0-d tensor on the device), in place."""
    if tables.n_blocks == 0:
        return
    with launch_device(tables.ptrs.device):
        _scale_kernel[(tables.n_blocks,)](
            tables.ptrs, tables.meta, tables.blockmap, scale, tables.n_blocks,
            G_DTYPE=_TL[dtype], BLOCK=tables.block, INTERPRETED=_interpreted(), num_warps=NUM_WARPS,
        )
