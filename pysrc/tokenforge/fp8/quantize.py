"""FP8 quantization: ``quantize(x) -> (data, scale)`` and ``dequantize(data, scale)``.

Scales follow ``torch._scaled_mm``: ``scale`` is the dequantization factor, ``x ~= data.float() *
scale``. Shapes: tensorwise -> ``()`` (0-d fp32, which ``_scaled_mm`` accepts as a scalar scale);
rowwise of (..., C) -> (..., 1); colwise of (R, C) -> (1, C); blockwise with ``block=(br, bc)``
-> (cdiv(R, br), cdiv(C, bc)), one scale per block (edge blocks cover what is left): (1, 128)
for activations gives (..., cdiv(C, 128)), (128, 128) for weights (cdiv(R, 128), cdiv(C, 128)),
(128, 1) for activations reduced over their rows (the weight-gradient GEMM) (cdiv(R, 128), C).

Rules (shared by every backend, bit for bit): ``scale = amax / FP8_MAX`` (IEEE division), rounded
up to a power of two with ``power_of_two=True`` (then x * (1/scale) is exact, and scales compose
without rounding); a scale that would underflow is FLT_MIN; amax == 0 -> scale 1; the data is
``clamp(x * (1/scale), -FP8_MAX, FP8_MAX)`` cast with round-to-nearest-even (saturating).
inf/nan inputs are never hidden: a group (tensor/row/column/block) holding a nan gets a nan scale, one
holding an inf (and no nan) an inf scale; dequantizing such a group gives nan/inf.

Path of a call: :func:`quantize` validates, picks a backend -> custom op ``tokenforge::fp8_quantize``
-> ``tokenforge.kernels.fp8_quantize`` (Triton, every scaling) or ``tokenforge.cuda.fp8_quantize``
(CUDA C++, rowwise, colwise and tensorwise) -> or :func:`quantize_reference` (torch).
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge import backends

OP = "fp8_quantize"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALINGS = ("tensorwise", "rowwise", "colwise", "blockwise")
FLT_MIN = torch.finfo(torch.float32).tiny


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


# ---------------------------------------------------------------------------------------------
# Reference (oracle, CPU fallback, baseline)
# ---------------------------------------------------------------------------------------------


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype, power_of_two: bool = False) -> torch.Tensor:
    """fp32 dequantization scale for fp32 ``amax`` (any shape), by the module's rules."""
    amax = amax.float()
    s = amax / fp8_max(dtype)
    s = torch.where(s < FLT_MIN, FLT_MIN, s)  # nan compares false and stays
    if power_of_two:
        bits = s.view(torch.int32)
        exp_bits = bits & 0x7F800000
        up = ((bits & 0x7FFFFF) != 0) & (exp_bits != 0x7F800000)
        s = torch.where(up, exp_bits + 0x800000, bits).view(torch.float32)
    return torch.where(amax == 0, torch.ones_like(s), s)


def cast_with_scale(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``clamp(x * (1/scale), -FP8_MAX, FP8_MAX)`` cast to ``dtype`` (RNE, saturating): the data
    for a scale already known (every backend's rule; scale broadcasts to x)."""
    m = fp8_max(dtype)
    return (x.float() * torch.reciprocal(scale)).clamp(-m, m).to(dtype)


def _amax(x: torch.Tensor, dim) -> torch.Tensor:
    xf = x.float().abs()
    if dim is None:
        return xf.amax() if xf.numel() else xf.new_zeros(())  # amax propagates nan
    return xf.amax(dim=dim, keepdim=True) if xf.shape[dim] else xf.sum(dim=dim, keepdim=True)


def _block_amax(x2: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    R, C = x2.shape
    nr, nc = -(-R // br), -(-C // bc)
    padded = torch.nn.functional.pad(x2.float().abs(), (0, nc * bc - C, 0, nr * br - R))  # zeros: no amax change
    return padded.view(nr, br, nc, bc).amax(dim=(1, 3))  # amax propagates nan


def expand_block_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A (..., cdiv(rows, br), cdiv(cols, bc)) block scale repeated to (..., rows, cols) (edge
    blocks cut to size); a scale that already broadcasts to (rows, cols) is returned as is."""
    if scale.dim() < 2:
        return scale
    groups_r, groups_c = scale.shape[-2:]
    br = 1 if groups_r in (1, rows) else _block_side(rows, groups_r)
    bc = 1 if groups_c in (1, cols) else _block_side(cols, groups_c)
    if br > 1:
        scale = scale.repeat_interleave(br, dim=-2)[..., :rows, :]
    if bc > 1:
        scale = scale.repeat_interleave(bc, dim=-1)[..., :cols]
    return scale


def _block_side(n: int, groups: int) -> int:
    """The block side s with cdiv(n, s) == groups (unique among the powers of two when groups > 1)."""
    from tokenforge.kernels.fp8_quantize import BLOCK_SIDES  # the sides the kernel's tiles take

    for side in BLOCK_SIDES[1:]:
        if -(-n // side) == groups:
            return side
    raise ValueError(f"a scale with {groups} groups over {n} elements matches no block side in {BLOCK_SIDES[1:]}")


def quantize_reference(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, scaling: str = "tensorwise",
                       power_of_two: bool = False, block: Optional[tuple[int, int]] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch fp8 quantization with the exact rounding of the kernels: (data, scale)."""
    if scaling == "blockwise":
        br, bc = block
        x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        scale = scale_from_amax(_block_amax(x2, br, bc), dtype, power_of_two)
        data = cast_with_scale(x2, expand_block_scale(scale, *x2.shape), dtype).view(x.shape)
        return data, scale.view(*x.shape[:-1], scale.shape[-1]) if x.dim() != 2 else scale
    dim = {"tensorwise": None, "rowwise": -1, "colwise": -2}[scaling]
    scale = scale_from_amax(_amax(x, dim), dtype, power_of_two)
    return cast_with_scale(x, scale, dtype), scale


def dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """data.float() * scale cast to ``dtype``: any scale :func:`quantize` returns (tensorwise
    (), rowwise (..., 1), colwise (1, C), or a blockwise (..., cdiv(R, br), cdiv(C, bc)) grid)."""
    if data.dtype not in FP8_DTYPES:
        raise TypeError(f"dequantize: data must be float8_e4m3fn or float8_e5m2, got {data.dtype}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise TypeError("dequantize: scale must be a float32 tensor, as returned by tokenforge.fp8.quantize")
    if data.dim() >= 2 and scale.dim() == data.dim():
        scale = expand_block_scale(scale, data.shape[-2], data.shape[-1])
    elif data.dim() == 1 and scale.dim() == 1 and scale.shape[0] not in (1, data.shape[0]):
        scale = expand_block_scale(scale[None], 1, data.shape[0])[0]
    return (data.float() * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# Checks and backends
# ---------------------------------------------------------------------------------------------


def _check_block(x, block) -> tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in block)):
        raise TypeError(f"fp8.quantize: block must be a (rows, cols) pair of ints such as (1, 128) or (128, 128), "
                        f"got {block!r}")
    from tokenforge.kernels.fp8_quantize import BLOCK_SIDES, MAX_BLOCK_ELEMS  # what the kernel's tiles take

    br, bc = block
    if br not in BLOCK_SIDES or bc not in BLOCK_SIDES or (br, bc) == (1, 1) or (br > 1 and bc > 1 and br * bc > MAX_BLOCK_ELEMS):
        raise ValueError(f"fp8.quantize: block {tuple(block)} is not supported; each side must be one of {BLOCK_SIDES}, "
                         f"not both 1, and a 2-D block at most {MAX_BLOCK_ELEMS} elements (e.g. (1, 128), (128, 128))")
    if br > 1 and x.dim() != 2:
        raise ValueError(f"fp8.quantize: block {tuple(block)} spans rows, so x must be 2-D, got shape {tuple(x.shape)}; "
                         "reshape to (rows, cols) first (a (1, n) block takes any number of dims)")
    if x.dim() < 1:
        raise ValueError("fp8.quantize: blockwise scaling needs at least 1 dim")
    return br, bc


def _check_inputs(x, dtype, scaling, power_of_two, block=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fp8.quantize: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"fp8.quantize: x must be float32, float16 or bfloat16, got {x.dtype}; convert it first")
    if dtype not in FP8_DTYPES:
        raise TypeError(f"fp8.quantize: dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    if scaling not in SCALINGS:
        raise ValueError(f"fp8.quantize: scaling must be one of {SCALINGS}, got {scaling!r}")
    if not isinstance(power_of_two, bool):
        raise TypeError(f"fp8.quantize: power_of_two must be a bool, got {power_of_two!r}")
    if scaling == "rowwise" and x.dim() < 1:
        raise ValueError("fp8.quantize: rowwise scaling needs at least 1 dim (scales per row of the last dim)")
    if scaling == "colwise" and x.dim() != 2:
        raise ValueError(f"fp8.quantize: colwise scaling needs a 2-D tensor, got shape {tuple(x.shape)}; "
                         "reshape to (rows, cols) first")
    if scaling == "blockwise":
        _check_block(x, block)
    elif block is not None:
        raise ValueError(f"fp8.quantize: block is for scaling='blockwise' only (scaling is {scaling!r})")


def _triton_supports(x, dtype=torch.float8_e4m3fn, scaling="tensorwise") -> Optional[str]:
    reason = backends.triton_unsupported_reason(x.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import fp8_quantize as kernels

    return kernels.supports(x, dtype)


def _cuda_supports(x, dtype=torch.float8_e4m3fn, scaling="tensorwise") -> Optional[str]:
    reason = backends.cuda_ext_unsupported_reason(x.device)
    if reason is not None:
        return reason
    if scaling == "blockwise":
        return "blockwise scaling runs in the Triton kernel (backend='triton') or the torch reference"
    from tokenforge.cuda import fp8_quantize as cuda_quantize

    return cuda_quantize.supports(x, dtype, scaling)


backends.register_op(
    OP,
    cuda_preference=("triton", "cuda"),
    supports={"triton": _triton_supports, "cuda": _cuda_supports, "torch": lambda x, dtype=None, scaling=None: None},
    example_inputs=lambda device, dtype: (torch.empty(64, 256, device=device, dtype=dtype),
                                          torch.float8_e4m3fn, "rowwise"),
)


def _launch(x2: torch.Tensor, dtype: torch.dtype, scaling: str, power_of_two: bool, backend: str,
            block: Optional[tuple[int, int]] = None):
    if backend == "triton":
        from tokenforge.kernels import fp8_quantize as module
    elif backend == "cuda":
        from tokenforge.cuda import fp8_quantize as module
    else:
        return quantize_reference(x2, dtype, scaling, power_of_two, block)
    if scaling == "blockwise":
        return module.quantize_blocks(x2, dtype, power_of_two, *block)
    fn = {"tensorwise": module.quantize_tensor, "rowwise": module.quantize_rows, "colwise": module.quantize_cols}[scaling]
    return fn(x2, dtype, power_of_two)


@torch.library.custom_op("tokenforge::fp8_quantize", mutates_args=())
def fp8_quantize_op(x: torch.Tensor, dtype: torch.dtype, scaling: str, power_of_two: bool,
                    backend: str, block_rows: int = 1, block_cols: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x 2-D -> (data (R, C) contiguous fp8, scale: () | (R, 1) | (1, C) | (cdiv(R, block_rows),
    cdiv(C, block_cols)) fp32); the block sides are read for scaling='blockwise' only."""
    block = (block_rows, block_cols) if scaling == "blockwise" else None
    return _launch(x, dtype, scaling, power_of_two, backend, block)


@fp8_quantize_op.register_fake
def _(x, dtype, scaling, power_of_two, backend, block_rows=1, block_cols=1):
    R, C = x.shape
    shape = {"tensorwise": (), "rowwise": (R, 1), "colwise": (1, C),
             "blockwise": (-(-R // block_rows), -(-C // block_cols))}[scaling]
    return x.new_empty((R, C), dtype=dtype), x.new_empty(shape, dtype=torch.float32)


def quantize(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, scaling: str = "tensorwise",
             power_of_two: bool = False, *, block: Optional[tuple[int, int]] = None,
             backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (fp32/fp16/bf16) -> (data in ``dtype`` shaped like x, fp32 scale) with x ~= data.float() * scale;
    scale () tensorwise, (..., 1) rowwise, (1, C) colwise (2-D x), (cdiv(R, br), cdiv(C, bc))
    blockwise with ``block=(br, bc)`` (default (1, 128); (1, n) takes any number of dims and
    gives (..., cdiv(C, n))). ``backend`` forces triton/cuda/torch."""
    if scaling == "blockwise" and block is None:
        block = (1, 128)
    _check_inputs(x, dtype, scaling, power_of_two, block)
    name = backends.choose(OP, x, dtype, scaling, backend=backend)
    if x.numel() == 0 or name == "torch":
        return quantize_reference(x, dtype, scaling, power_of_two, tuple(block) if block is not None else None)
    if x.dim() == 2:
        x2 = x
    else:
        x2 = x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)
    br, bc = block if block is not None else (1, 1)
    data, scale = torch.ops.tokenforge.fp8_quantize(x2, dtype, scaling, power_of_two, name, br, bc)
    if x.dim() != 2:
        data = data.view(x.shape)
        if scaling == "rowwise":
            scale = scale.view(*x.shape[:-1], 1)
        elif scaling == "blockwise":
            scale = scale.view(*x.shape[:-1], scale.shape[-1])
    return data, scale


def cast_for_gemm(t, reduce_dim, cast, is_weight, power_of_two, backend):
    """fp8 (data, scale) of the 2-D t for a GEMM reducing over t's dim ``reduce_dim``; cast is
    (granularity, dtype) as in :meth:`tokenforge.fp8.Float8LinearConfig.casts` (axiswise: rowwise
    when the GEMM reduces over t's rows' elements, colwise otherwise; blockwise: 128x128 for a
    weight, else 1x128 along the reduced dim). Shared by Float8Linear and the fp8 grouped GEMM."""
    granularity, dtype = cast
    block = None
    if granularity == "tensorwise":
        scaling = "tensorwise"
    elif granularity == "axiswise":
        scaling = "rowwise" if reduce_dim == 1 else "colwise"
    else:
        scaling = "blockwise"
        block = (128, 128) if is_weight else ((1, 128) if reduce_dim == 1 else (128, 1))
    if backend == "torch":
        return quantize_reference(t, dtype, scaling, power_of_two, block)
    br, bc = block if block is not None else (1, 1)
    return fp8_quantize_op(t, dtype, scaling, power_of_two, backend, br, bc)


# ---------------------------------------------------------------------------------------------
# Per-expert column scales (the weight-gradient GEMM of an fp8 MoE layer reduces over tokens)
# ---------------------------------------------------------------------------------------------


def quantize_expert_cols_reference(x: torch.Tensor, offs: torch.Tensor, dtype: torch.dtype,
                                   power_of_two: bool = False, token_block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(data_t (C, T), scale): each expert's rows of x (T, C) quantized colwise on their own (rows
    grouped by expert, offs (E,) cumulative ends), the data transposed; scale (E, C). With
    ``token_block`` (128): each block of that many of an expert's rows on its own, scale
    (E + cdiv(T, 128), C), block j of expert e in row e + start_e // 128 + j. Unused scales are 1."""
    from tokenforge.kernels.fp8_quantize import token_block_row_on_host, token_block_scale_rows

    T, C = x.shape
    experts = offs.shape[0]
    rows = token_block_scale_rows(T, experts) if token_block else experts
    data_t = torch.empty((C, T), dtype=dtype, device=x.device)
    scale = torch.ones((rows, C), dtype=torch.float32, device=x.device)
    start = 0
    for e, end in enumerate(int(v) for v in offs.tolist()):
        end = max(end, start)
        step = token_block or max(end - start, 1)
        for b0 in range(start, end, step):
            b_end = min(b0 + step, end)
            data, s = quantize_reference(x[b0:b_end], dtype, "colwise", power_of_two)
            data_t[:, b0:b_end] = data.t()
            scale[token_block_row_on_host(e, start, b0) if token_block else e] = s.reshape(-1)
        start = end
    return data_t, scale


@torch.library.custom_op("tokenforge::fp8_quantize_expert_cols", mutates_args=())
def quantize_expert_cols_op(x: torch.Tensor, offs: torch.Tensor, dtype: torch.dtype, power_of_two: bool,
                            backend: str, token_block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, C) with rows grouped by expert -> (data_t (C, T) fp8, scale fp32: (E, C), or per
    ``token_block`` of an expert's rows (E + cdiv(T, token_block), C))."""
    if backend == "triton":
        from tokenforge.kernels import fp8_quantize as kernel

        return kernel.quantize_expert_cols(x, offs, dtype, power_of_two, token_block)
    return quantize_expert_cols_reference(x, offs, dtype, power_of_two, token_block)


@quantize_expert_cols_op.register_fake
def _(x, offs, dtype, power_of_two, backend, token_block=0):
    from tokenforge.kernels.fp8_quantize import token_block_scale_rows

    rows = token_block_scale_rows(x.shape[0], offs.shape[0]) if token_block else offs.shape[0]
    return x.new_empty((x.shape[1], x.shape[0]), dtype=dtype), x.new_empty((rows, x.shape[1]), dtype=torch.float32)
