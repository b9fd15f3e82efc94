"""FP8 quantization in Triton: amax -> scale -> saturating cast, for 2-D (R, C) inputs.

Conventions (those of ``torch._scaled_mm``): ``scale`` is the *dequantization* factor, so
``x ~= data.float() * scale``. For a group (the whole tensor, a row or a column) with absolute
maximum ``amax``:

    scale = amax / FP8_MAX            (IEEE division; rounded *up* to a power of two on request)
    scale = FLT_MIN if it underflows  (a subnormal amax still quantizes without inf/0 scales)
    scale = 1       if amax == 0      (no division by zero; data is all zeros)
    data  = cast(clamp(x * (1 / scale), -FP8_MAX, FP8_MAX))   round-to-nearest-even

inf and nan are never turned into finite garbage: a group holding a nan gets a nan scale (and nan
data), a group holding an inf gets an inf scale (its finite elements become 0, the inf elements
nan), so a dequantized result or a GEMM that uses it shows the problem.

The reciprocal is taken with ``div_rn`` (IEEE), never ``1.0 / s`` (which lowers to the approximate
``div.full.f32`` on NVIDIA GPUs): the data is then bit-identical to the torch reference.

Kernels:

- ``_quantize_rows_kernel``: one scale per row; whole rows in registers when C <= ``MAX_ROW_N``
  (one read of x), else two sweeps over column chunks (the second mostly from L2).
- ``_quantize_cols_kernel``: one scale per column; a program owns ``COL_BLOCK_N`` columns and
  sweeps the rows twice (amax, then cast), reading rows coalesced.
- ``_quantize_expert_cols_kernel``: one scale per (expert, column) over each expert's rows of a
  tensor whose rows are grouped by expert (MoE tokens), or per (expert, column, block of
  ``TOKEN_BLOCK`` of its rows) (``BLOCKWISE``), the data written transposed (C, T) for the
  weight-gradient GEMM of an fp8 MoE layer.
- ``_quantize_blocks_kernel``: one scale per (block_rows, block_cols) block, e.g. (1, 128) for
  activations and (128, 128) for weights (DeepSeek-V3's recipe); one read of x.
- tensorwise: ``_amax_partial_kernel`` (persistent grid, one fp32 partial max per program) then
  ``_quantize_tensor_kernel``, which reduces the few partials itself, so there is no host sync and
  no atomics (deterministic).

Software cast (``SOFT_CAST``): Triton's interpreter converts fp32 -> fp8 without carrying a
mantissa round-up into the exponent (31.7 -> 16 in e4m3) and maps nan to a finite value, and
GPUs below sm_89 have no fp8 convert instruction. There, :func:`_encode_fp8` computes the fp8 bit
pattern with integer arithmetic (round to the fp8 grid with an IEEE add, then pack the fields).
On sm_89+ the hardware ``cvt.rn.satfinite`` does the same rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenforge.kernels import launch_device

from tokenforge.kernels import INTERPRETED

# Whole rows in registers up to this many columns (one read of x).
MAX_ROW_N = 8192
CHUNK_N = 4096
COL_BLOCK_M = 32
COL_BLOCK_N = 64
TILE_M = 32
TILE_N = 256
FLT_MIN = 1.1754943508222875e-38  # smallest normal fp32

# fp8 format facts: (max finite, mantissa bits, exponent bias)
FORMATS = {
    torch.float8_e4m3fn: (448.0, 3, 7),
    torch.float8_e5m2: (57344.0, 2, 15),
}
SUPPORTED_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Blockwise fp8 MoE weight gradients: scales per TOKEN_BLOCK of an expert's tokens, counted from
# its first token (a block never straddles two experts).
TOKEN_BLOCK = 128


def token_block_scale_rows(tokens: int, experts: int) -> int:
    """Rows of a per-token-block scale tensor (token_block_row's values are below this)."""
    return experts + triton.cdiv(tokens, TOKEN_BLOCK)


def token_block_row_on_host(e: int, start: int, m: int) -> int:
    """:func:`token_block_row` for the torch references (the same rule, in Python)."""
    return e + start // TOKEN_BLOCK + (m - start) // TOKEN_BLOCK


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def token_block_row(e, start, m):
    """The scale row of expert e's token block holding token m (the expert's rows start at
    ``start``): block j = (m - start) // TOKEN_BLOCK is row e + start // TOKEN_BLOCK + j. Unique
    and increasing across experts without a prefix sum over offs (an expert whose last block is
    row r starts the next no lower than r + 1) and below token_block_scale_rows(T, E)."""
    return e + start // 128 + (m - start) // 128


@triton.jit
def _scale_from_amax(amax, FP8_MAX: tl.constexpr, POW2: tl.constexpr):
    """(scale, 1/scale) from a fp32 amax tensor; see the module docstring for the rules."""
    s = tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32))
    s = tl.where(s < 1.1754943508222875e-38, 1.1754943508222875e-38, s)  # nan stays nan
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        exp_bits = bits & 0x7F800000
        up = ((bits & 0x7FFFFF) != 0) & (exp_bits != 0x7F800000)  # inf/nan keep their bits
        bits = tl.where(up, exp_bits + 0x800000, bits)
        s = bits.to(tl.float32, bitcast=True)
    s = tl.where(amax == 0.0, 1.0, s)
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    return s, inv


@triton.jit
def _saturate(y, FP8_MAX: tl.constexpr):
    # where-based clamp: nan compares false and passes through (tl.minimum could drop it).
    y = tl.where(y > FP8_MAX, FP8_MAX, y)
    return tl.where(y < -FP8_MAX, -FP8_MAX, y)


@triton.jit
def _encode_fp8(y, OUT_TY: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, SOFT_CAST: tl.constexpr):
    """y (fp32, already saturated to +-FP8_MAX or nan) -> OUT_TY, round-to-nearest-even; with
    SOFT_CAST the fp8 bit pattern as uint8 (sm_80's Triton has no e4m3 type at all)."""
    if SOFT_CAST:
        sign = (y.to(tl.int32, bitcast=True) >> 31) & 1
        a = tl.abs(y)
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.where(e < 1 - BIAS, 1 - BIAS, e)
        # Round a to a multiple of its fp8 ulp 2^(e - MBITS): adding c = 2^(e - MBITS + 23) puts
        # the sum in [c, 2c), where the fp32 spacing is that ulp, so the IEEE add rounds (RNE).
        c = ((e - MBITS + 150) << 23).to(tl.float32, bitcast=True)
        r = (a + c) - c
        rb = r.to(tl.int32, bitcast=True)
        re = ((rb >> 23) & 0xFF) - 127
        normal_code = ((re + BIAS) << MBITS) | ((rb & 0x7FFFFF) >> (23 - MBITS))
        # Subnormal fp8: r is an exact multiple of 2^(1 - BIAS - MBITS).
        sub_code = (r * (2.0 ** (MBITS + BIAS - 1))).to(tl.int32)
        code = tl.where(re >= 1 - BIAS, normal_code, sub_code)
        code = tl.where(r == 0.0, 0, code)
        code = tl.where(y != y, 0x7F, code)
        code = code | (sign << 7)
        return code.to(tl.uint8)  # DATA is passed as a uint8 view in this mode
    else:
        return y.to(OUT_TY)


@triton.jit
def _abs_max(x, AXIS: tl.constexpr):
    """max |x| along AXIS, nan where the reduced slice holds a nan (tl.max may skip nan)."""
    amax = tl.max(tl.abs(x), axis=AXIS)
    has_nan = tl.max((x != x).to(tl.int32), axis=AXIS)
    return tl.where(has_nan > 0, float("nan"), amax)


@triton.jit
def _nan_max(a, b):
    """Elementwise max that keeps a nan from either side (sticky across chunks)."""
    return tl.where((a != a) | (b != b), float("nan"), tl.maximum(a, b))


@triton.jit
def emit_fp8_tile(y, row, row_ok, col0, n, DATA, SCALE, stride_data, stride_scale,
                  FP8_MAX: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, POW2: tl.constexpr,
                  SOFT_CAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """Quantize a producer kernel's output tile on its way out (RMSNorm, SwiGLU: the input of the
    next Float8Linear, which then need not re-read it). y [BLOCK_M, BLOCK_N] fp32 holds the values
    as stored (already rounded to the output dtype) of rows ``row`` (int64; ``row_ok`` in range)
    and columns col0 + arange(BLOCK_N) (< n in range). GROUP == BLOCK_N: one scale per row (the
    tile spans whole rows, col0 = 0); GROUP == 128: one per (1, 128) block (col0 a multiple of
    128). Same rules, bit for bit, as the quantize kernels; SCALE (rows, groups) fp32 with row
    stride ``stride_scale``, DATA (rows, n) with row stride ``stride_data``."""
    col = col0 + tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (col < n)[None, :]
    y = tl.where(mask, y, 0.0)
    out_ty: tl.constexpr = DATA.dtype.element_ty
    if GROUP == BLOCK_N:
        scale, inv = _scale_from_amax(_abs_max(y, 1), FP8_MAX, POW2)
        q = _saturate(y * inv[:, None], FP8_MAX)
        tl.store(SCALE + row * stride_scale, scale, mask=row_ok)
    else:
        groups: tl.constexpr = BLOCK_N // GROUP
        y3 = tl.reshape(y, [BLOCK_M, groups, GROUP])
        scale, inv = _scale_from_amax(_abs_max(y3, 2), FP8_MAX, POW2)
        q = tl.reshape(_saturate(y3 * inv[:, :, None], FP8_MAX), [BLOCK_M, BLOCK_N])
        group = col0 // GROUP + tl.arange(0, groups)
        tl.store(SCALE + row[:, None] * stride_scale + group[None, :], scale,
                 mask=row_ok[:, None] & (group * GROUP < n)[None, :])
    tl.store(DATA + row[:, None] * stride_data + col[None, :], _encode_fp8(q, out_ty, MBITS, BIAS, SOFT_CAST), mask=mask)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _quantize_rows_kernel(
    X, DATA, SCALE,
    R, C, stride_xr, stride_xc,
    FP8_MAX: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, POW2: tl.constexpr,
    SOFT_CAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row < R
    col = tl.arange(0, BLOCK_N)
    out_ty: tl.constexpr = DATA.dtype.element_ty
    x_rows = X + row[:, None] * stride_xr
    d_rows = DATA + row[:, None] * C
    if ONE_PASS:
        mask = row_ok[:, None] & (col < C)[None, :]
        x = tl.load(x_rows + col[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        scale, inv = _scale_from_amax(_abs_max(x, 1), FP8_MAX, POW2)
        y = _saturate(x * inv[:, None], FP8_MAX)
        tl.store(d_rows + col[None, :], _encode_fp8(y, out_ty, MBITS, BIAS, SOFT_CAST), mask=mask)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, C, BLOCK_N):
            c = start + col
            mask = row_ok[:, None] & (c < C)[None, :]
            x = tl.load(x_rows + c[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
            part = _abs_max(x, 1)
            amax = _nan_max(amax, part)
        scale, inv = _scale_from_amax(amax, FP8_MAX, POW2)
        for start in range(0, C, BLOCK_N):
            c = start + col
            mask = row_ok[:, None] & (c < C)[None, :]
            x = tl.load(x_rows + c[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
            y = _saturate(x * inv[:, None], FP8_MAX)
            tl.store(d_rows + c[None, :], _encode_fp8(y, out_ty, MBITS, BIAS, SOFT_CAST), mask=mask)
    tl.store(SCALE + row, scale, mask=row_ok)


@triton.jit
def _quantize_cols_kernel(
    X, DATA, SCALE,
    R, C, stride_xr, stride_xc,
    FP8_MAX: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, POW2: tl.constexpr,
    SOFT_CAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    col = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = col < C
    out_ty: tl.constexpr = DATA.dtype.element_ty
    amax = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, R, BLOCK_M):
        row = tl.cast(start, tl.int64) + tl.arange(0, BLOCK_M)
        mask = (row < R)[:, None] & col_ok[None, :]
        x = tl.load(X + row[:, None] * stride_xr + col[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        amax = _nan_max(amax, _abs_max(x, 0))
    scale, inv = _scale_from_amax(amax, FP8_MAX, POW2)
    for start in range(0, R, BLOCK_M):
        row = tl.cast(start, tl.int64) + tl.arange(0, BLOCK_M)
        mask = (row < R)[:, None] & col_ok[None, :]
        x = tl.load(X + row[:, None] * stride_xr + col[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        y = _saturate(x * inv[None, :], FP8_MAX)
        tl.store(DATA + row[:, None] * C + col[None, :], _encode_fp8(y, out_ty, MBITS, BIAS, SOFT_CAST), mask=mask)
    tl.store(SCALE + col, scale, mask=col_ok)


@triton.jit
def _quantize_expert_cols_kernel(
    X, OFFS, DATA_T, SCALE,
    T, C, stride_xr, stride_xc,
    FP8_MAX: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, POW2: tl.constexpr,
    SOFT_CAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKWISE: tl.constexpr = False,
):
    # x (T, C) holds experts' rows back to back (offs: cumulative row ends); one scale per
    # (expert, column) over that expert's rows (SCALE (E, C)), or with BLOCKWISE over each block of
    # TOKEN_BLOCK of them (SCALE (G, C), row token_block_row), the data written transposed, DATA_T
    # (C, T), so a weight-gradient GEMM reducing over tokens reads them unit-stride. Grid: experts x
    # column blocks folded into axis 0 (no axis-1 limit on the expert count).
    tiles_n = tl.cdiv(C, BLOCK_N)
    e = tl.program_id(0) // tiles_n
    col = tl.cast(tl.program_id(0) % tiles_n, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = col < C
    end = tl.load(OFFS + e)
    start = tl.minimum(tl.load(OFFS + e - 1, mask=e > 0, other=0), end)
    if BLOCKWISE:
        for b0 in range(start, end, 128):  # TOKEN_BLOCK
            b_end = tl.minimum(b0 + 128, end)
            _quantize_rows_to_cols(X, DATA_T, SCALE + tl.cast(token_block_row(e, start, b0), tl.int64) * C,
                                   b0, b_end, col, col_ok, T, stride_xr, stride_xc, FP8_MAX, MBITS, BIAS, POW2,
                                   SOFT_CAST, BLOCK_M)
    else:
        _quantize_rows_to_cols(X, DATA_T, SCALE + tl.cast(e, tl.int64) * C, start, end, col, col_ok, T,
                               stride_xr, stride_xc, FP8_MAX, MBITS, BIAS, POW2, SOFT_CAST, BLOCK_M)


@triton.jit
def _quantize_rows_to_cols(X, DATA_T, SCALE_ROW, start, end, col, col_ok, T, stride_xr, stride_xc,
                           FP8_MAX: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, POW2: tl.constexpr,
                           SOFT_CAST: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows [start, end) of x's columns ``col`` quantized with one scale per column (stored at
    SCALE_ROW + col), written transposed into DATA_T (C, T): two sweeps, amax then cast."""
    out_ty: tl.constexpr = DATA_T.dtype.element_ty
    amax = tl.zeros(col.shape, dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        row = tl.cast(m0, tl.int64) + tl.arange(0, BLOCK_M)
        mask = (row < end)[:, None] & col_ok[None, :]
        x = tl.load(X + row[:, None] * stride_xr + col[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        amax = _nan_max(amax, _abs_max(x, 0))
    scale, inv = _scale_from_amax(amax, FP8_MAX, POW2)
    for m0 in range(start, end, BLOCK_M):
        row = tl.cast(m0, tl.int64) + tl.arange(0, BLOCK_M)
        mask = (row < end)[:, None] & col_ok[None, :]
        x = tl.load(X + row[:, None] * stride_xr + col[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        y = _saturate(x * inv[None, :], FP8_MAX)
        tl.store(DATA_T + col[None, :] * T + row[:, None], _encode_fp8(y, out_ty, MBITS, BIAS, SOFT_CAST), mask=mask)
    tl.store(SCALE_ROW + col, scale, mask=col_ok)


@triton.jit
def _amax_partial_kernel(
    X, PARTIAL, R, C, stride_xr, stride_xc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Persistent: program p folds tiles p, p + P, ... into one fp32 max (nan if any nan).
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tiles_n = tl.cdiv(C, BLOCK_N)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(R, BLOCK_M) * tiles_n, programs):
        row = tl.cast(tile // tiles_n, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        col = tl.cast(tile % tiles_n, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (row < R)[:, None] & (col < C)[None, :]
        x = tl.load(X + row[:, None] * stride_xr + col[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        part = _abs_max(x, 1)
        amax = _nan_max(amax, part)
    tl.store(PARTIAL + pid, _abs_max(amax, 0))


@triton.jit
def _quantize_tensor_kernel(
    X, DATA, SCALE, PARTIAL, num_partials,
    R, C, stride_xr, stride_xc,
    FP8_MAX: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, POW2: tl.constexpr,
    SOFT_CAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Every program reduces the (few) partials itself: no second launch, no host sync.
    p = tl.arange(0, BLOCK_P)
    amax = _abs_max(tl.load(PARTIAL + p, mask=p < num_partials, other=0.0), 0)
    scale, inv = _scale_from_amax(tl.full([1], 0.0, tl.float32) + amax, FP8_MAX, POW2)

    pid = tl.program_id(0)
    tiles_n = tl.cdiv(C, BLOCK_N)
    row = tl.cast(pid // tiles_n, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.cast(pid % tiles_n, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (row < R)[:, None] & (col < C)[None, :]
    x = tl.load(X + row[:, None] * stride_xr + col[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    y = _saturate(x * inv[:, None], FP8_MAX)
    tl.store(DATA + row[:, None] * C + col[None, :], _encode_fp8(y, DATA.dtype.element_ty, MBITS, BIAS, SOFT_CAST),
             mask=mask)
    if pid == 0:
        tl.store(SCALE + tl.arange(0, 1), scale)


@triton.jit
def _quantize_blocks_kernel(
    X, DATA, SCALE,
    R, C, stride_xr, stride_xc, scale_cols,
    FP8_MAX: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, POW2: tl.constexpr,
    SOFT_CAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    TILE_R: tl.constexpr, TILE_C: tl.constexpr,
):
    # One scale per BLOCK_R x BLOCK_C block; SCALE is (cdiv(R, BLOCK_R), scale_cols) row-major.
    # 1-D blocks: a program owns a TILE_R x TILE_C tile, TILE_R rows of one (1, BLOCK_C) block each
    # or TILE_C columns of one (BLOCK_R, 1) block each, read once. 2-D blocks: a program owns one
    # block and sweeps it in TILE_R-row slices twice (amax, then cast; the second sweep mostly
    # from L1/L2): a whole 128x128 fp32 block in registers spills. The grid is 1-D (no axis-1
    # limit) and the offsets are 64-bit.
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, TILE_C)
    tile_r = pid // tiles_c
    tile_c = pid % tiles_c
    col = tile_c.to(tl.int64) * TILE_C + tl.arange(0, TILE_C)
    col_ok = col < C
    if BLOCK_R == 1 or BLOCK_C == 1:
        row = tile_r.to(tl.int64) * TILE_R + tl.arange(0, TILE_R)
        mask = (row < R)[:, None] & col_ok[None, :]
        x = tl.load(X + row[:, None] * stride_xr + col[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        if BLOCK_R == 1:
            scale, inv = _scale_from_amax(_abs_max(x, 1), FP8_MAX, POW2)
            y = _saturate(x * inv[:, None], FP8_MAX)
            tl.store(SCALE + row * scale_cols + tile_c, scale, mask=row < R)
        else:
            scale, inv = _scale_from_amax(_abs_max(x, 0), FP8_MAX, POW2)
            y = _saturate(x * inv[None, :], FP8_MAX)
            tl.store(SCALE + tile_r.to(tl.int64) * scale_cols + col, scale, mask=col_ok)
        tl.store(DATA + row[:, None] * C + col[None, :], _encode_fp8(y, DATA.dtype.element_ty, MBITS, BIAS, SOFT_CAST),
                 mask=mask)
    else:
        first_row = tile_r.to(tl.int64) * BLOCK_R
        amax = tl.zeros([TILE_C], dtype=tl.float32)
        for r in range(0, BLOCK_R, TILE_R):
            row = first_row + r + tl.arange(0, TILE_R)
            mask = (row < R)[:, None] & col_ok[None, :]
            x = tl.load(X + row[:, None] * stride_xr + col[None, :] * stride_xc, mask=mask, other=0.0)
            amax = _nan_max(amax, _abs_max(x.to(tl.float32), 0))
        scale, inv = _scale_from_amax(tl.full([1], 0.0, tl.float32) + _abs_max(amax, 0), FP8_MAX, POW2)
        tl.store(SCALE + tile_r.to(tl.int64) * scale_cols + tile_c + tl.arange(0, 1), scale)
        for r in range(0, BLOCK_R, TILE_R):
            row = first_row + r + tl.arange(0, TILE_R)
            mask = (row < R)[:, None] & col_ok[None, :]
            x = tl.load(X + row[:, None] * stride_xr + col[None, :] * stride_xc, mask=mask, other=0.0)
            y = _saturate(x.to(tl.float32) * inv[:, None], FP8_MAX)
            tl.store(DATA + row[:, None] * C + col[None, :],
                     _encode_fp8(y, DATA.dtype.element_ty, MBITS, BIAS, SOFT_CAST), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration (the compile gate compiles every config all_configs() returns).
# ---------------------------------------------------------------------------------------------


def rows_config(n: int) -> dict:
    """BLOCK_M/BLOCK_N/ONE_PASS/num_warps of the rowwise kernel for rows of n columns."""
    if n <= MAX_ROW_N:
        block_n = max(16, triton.next_power_of_2(n))
        block_m = max(1, min(64, 4096 // block_n))
        num_warps = min(16, max(1, block_m * block_n // 512))
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, ONE_PASS=True, num_warps=num_warps)
    return dict(BLOCK_M=1, BLOCK_N=CHUNK_N, ONE_PASS=False, num_warps=8)


def cols_config() -> dict:
    return dict(BLOCK_M=COL_BLOCK_M, BLOCK_N=COL_BLOCK_N, num_warps=4)


def expert_cols_config() -> dict:
    # 64 rows a sweep: each column's transposed store writes 64 contiguous bytes; 8 warps (4
    # spilled 96 B under triton 3.6 on sm_90: 64-bit addresses of 32 elements a thread).
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8)


def tile_config() -> dict:
    return dict(BLOCK_M=TILE_M, BLOCK_N=TILE_N, num_warps=8)


MAX_PARTIALS = 1024


def tensor_cast_config(num_partials: int) -> dict:
    return dict(tile_config(), BLOCK_P=max(16, triton.next_power_of_2(num_partials)))


# Block sides the blockwise kernel takes ((1, 128): one scale per row and 128 columns; (128, 1):
# per column and 128 rows); a 2-D block holds at most MAX_BLOCK_ELEMS elements (one program's tile, in registers).
BLOCK_SIDES = (1, 32, 64, 128, 256)
MAX_BLOCK_ELEMS = 128 * 128


def blocks_config(block_rows: int, block_cols: int) -> dict:
    """Tile and warps of the blockwise kernel for (block_rows, block_cols) blocks: 1-D blocks are
    stacked to about 8K elements per program; a 2-D block is one program, swept in slices of
    about 4K elements."""
    if block_rows == 1 or block_cols == 1:
        tile_r = block_rows if block_rows > 1 else max(1, min(64, 8192 // block_cols))
        tile_c = block_cols if block_cols > 1 else max(1, min(64, 8192 // block_rows))
    else:
        tile_r, tile_c = max(1, min(block_rows, 4096 // block_cols)), block_cols
    # 32 elements a thread for 1-D tiles, 16 for 2-D slices (loaded twice: triton 3.6 spilled
    # 32 a thread there).
    per_thread = 32 if block_rows == 1 or block_cols == 1 else 16
    num_warps = max(1, min(8, tile_r * tile_c // (32 * per_thread)))
    return dict(BLOCK_R=block_rows, BLOCK_C=block_cols, TILE_R=tile_r, TILE_C=tile_c, num_warps=num_warps)


def block_shapes() -> list[tuple[int, int]]:
    """Every (block_rows, block_cols) :func:`tokenforge.fp8.quantize` accepts for blockwise scaling."""
    return [(r, c) for r in BLOCK_SIDES for c in BLOCK_SIDES
            if (r, c) != (1, 1) and (r == 1 or c == 1 or r * c <= MAX_BLOCK_ELEMS)]


def all_configs() -> list[tuple[str, dict]]:
    """Every (kernel name, constexpr + num_warps config) the launchers can pick (format and
    POW2/SOFT_CAST flags aside: the gate sweeps those)."""
    out = []
    n = 16
    while n <= MAX_ROW_N:
        out.append(("_quantize_rows_kernel", rows_config(n)))
        n *= 2
    out.append(("_quantize_rows_kernel", rows_config(MAX_ROW_N + 1)))
    out.append(("_quantize_cols_kernel", cols_config()))
    out += [("_quantize_expert_cols_kernel", dict(expert_cols_config(), BLOCKWISE=blockwise))
            for blockwise in (False, True)]
    out.append(("_amax_partial_kernel", tile_config()))
    p = 16
    while p <= MAX_PARTIALS:
        out.append(("_quantize_tensor_kernel", tensor_cast_config(p)))
        p *= 2
    out += [("_quantize_blocks_kernel", blocks_config(r, c)) for r, c in block_shapes()]
    return out


def _format_constexprs(fp8_dtype: torch.dtype, power_of_two: bool, soft_cast: bool) -> dict:
    fp8_max, mbits, bias = FORMATS[fp8_dtype]
    return dict(FP8_MAX=fp8_max, MBITS=mbits, BIAS=bias, POW2=bool(power_of_two), SOFT_CAST=bool(soft_cast))


EMIT_BLOCK = 128  # columns per scale of a (1, 128) blockwise emission


def emission_buffers(rows: int, n: int, fp8_dtype: torch.dtype, blockwise: bool, power_of_two: bool,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """What a producer kernel needs to emit fp8 through :func:`emit_fp8_tile`: (data (rows, n),
    scale (rows, 1) rowwise or (rows, cdiv(n, 128)) blockwise, the data argument for the kernel (a
    uint8 view where the software encoder runs), the format constexprs). The shapes are those
    :func:`quantize_rows` / :func:`quantize_blocks` return."""
    data = torch.empty((rows, n), dtype=fp8_dtype, device=device)
    groups = triton.cdiv(n, EMIT_BLOCK) if blockwise else 1
    scale = torch.empty((rows, groups), dtype=torch.float32, device=device)
    soft = needs_soft_cast(device)
    return data, scale, (data.view(torch.uint8) if soft else data), _format_constexprs(fp8_dtype, power_of_two, soft)


def needs_soft_cast(device: torch.device) -> bool:
    """The software fp8 encoder runs under the interpreter and on GPUs without fp8 converts."""
    if INTERPRETED or device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) < (8, 9)


def _persistent_programs(device: torch.device, tiles: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(tiles, 4 * sms, MAX_PARTIALS))
    return max(1, min(tiles, 4))


# ---------------------------------------------------------------------------------------------
# Launchers: x is 2-D (R, C), any strides, validated by tokenforge.fp8.quantize.
# ---------------------------------------------------------------------------------------------


def supports(x: torch.Tensor, fp8_dtype: torch.dtype) -> str | None:
    if x.dtype not in SUPPORTED_INPUT_DTYPES:
        return f"x dtype {x.dtype} is not float32/float16/bfloat16 for the triton kernels; use backend='torch'"
    if fp8_dtype not in FORMATS:
        return f"fp8 dtype {fp8_dtype} is not float8_e4m3fn/float8_e5m2"
    return None



def quantize_rows(x: torch.Tensor, fp8_dtype: torch.dtype, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(data (R, C) contiguous, scale (R, 1) fp32): one scale per row."""
    R, C = x.shape
    data = torch.empty((R, C), dtype=fp8_dtype, device=x.device)
    scale = torch.empty((R, 1), dtype=torch.float32, device=x.device)
    if R == 0 or C == 0:
        return data, scale.fill_(1.0)
    soft = needs_soft_cast(x.device)
    out = data.view(torch.uint8) if soft else data
    cfg = rows_config(C)
    with launch_device(x):
        _quantize_rows_kernel[(triton.cdiv(R, cfg["BLOCK_M"]),)](
            x, out, scale, R, C, x.stride(0), x.stride(1),
            **_format_constexprs(fp8_dtype, power_of_two, soft), **cfg,
        )
    return data, scale


def quantize_cols(x: torch.Tensor, fp8_dtype: torch.dtype, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(data (R, C) contiguous, scale (1, C) fp32): one scale per column."""
    R, C = x.shape
    data = torch.empty((R, C), dtype=fp8_dtype, device=x.device)
    scale = torch.empty((1, C), dtype=torch.float32, device=x.device)
    if R == 0 or C == 0:
        return data, scale.fill_(1.0)
    soft = needs_soft_cast(x.device)
    out = data.view(torch.uint8) if soft else data
    cfg = cols_config()
    with launch_device(x):
        _quantize_cols_kernel[(triton.cdiv(C, cfg["BLOCK_N"]),)](
            x, out, scale, R, C, x.stride(0), x.stride(1),
            **_format_constexprs(fp8_dtype, power_of_two, soft), **cfg,
        )
    return data, scale


def quantize_expert_cols(x: torch.Tensor, offs: torch.Tensor, fp8_dtype: torch.dtype,
                         power_of_two: bool, token_block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(data_t (C, T) contiguous, the transpose of the fp8 data; scale fp32): one scale per expert
    and column over the expert's rows of x (T, C) (offs (E,) int32 cumulative row ends), scale
    (E, C); or, with ``token_block`` = TOKEN_BLOCK, per block of that many of an expert's rows,
    scale (token_block_scale_rows(T, E), C) (row token_block_row). Unused scales are 1."""
    T, C = x.shape
    experts = offs.shape[0]
    if token_block not in (0, TOKEN_BLOCK):
        raise ValueError(f"quantize_expert_cols: token_block must be 0 (per expert) or {TOKEN_BLOCK}, "
                         f"got {token_block}")
    rows = token_block_scale_rows(T, experts) if token_block else experts
    data_t = torch.empty((C, T), dtype=fp8_dtype, device=x.device)
    scale = torch.ones((rows, C), dtype=torch.float32, device=x.device)
    if T == 0 or C == 0 or experts == 0:
        return data_t, scale
    soft = needs_soft_cast(x.device)
    out = data_t.view(torch.uint8) if soft else data_t
    cfg = expert_cols_config()
    with launch_device(x):
        _quantize_expert_cols_kernel[(experts * triton.cdiv(C, cfg["BLOCK_N"]),)](
            x, offs, out, scale, T, C, x.stride(0), x.stride(1),
            **_format_constexprs(fp8_dtype, power_of_two, soft), BLOCKWISE=token_block > 0, **cfg,
        )
    return data_t, scale


def quantize_tensor(x: torch.Tensor, fp8_dtype: torch.dtype, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(data (R, C) contiguous, scale () fp32): one scale for the tensor, two launches, no sync."""
    R, C = x.shape
    data = torch.empty((R, C), dtype=fp8_dtype, device=x.device)
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    if R == 0 or C == 0:
        return data, scale.fill_(1.0)
    soft = needs_soft_cast(x.device)
    out = data.view(torch.uint8) if soft else data
    tile = tile_config()
    tiles = triton.cdiv(R, tile["BLOCK_M"]) * triton.cdiv(C, tile["BLOCK_N"])
    programs = _persistent_programs(x.device, tiles)
    partial = torch.empty((programs,), dtype=torch.float32, device=x.device)
    with launch_device(x):
        _amax_partial_kernel[(programs,)](x, partial, R, C, x.stride(0), x.stride(1), **tile)
        _quantize_tensor_kernel[(tiles,)](
            x, out, scale, partial, programs, R, C, x.stride(0), x.stride(1),
            **_format_constexprs(fp8_dtype, power_of_two, soft),
            **tensor_cast_config(programs),
        )
    return data, scale


def quantize_blocks(x: torch.Tensor, fp8_dtype: torch.dtype, power_of_two: bool, block_rows: int,
                    block_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(data (R, C) contiguous, scale (cdiv(R, block_rows), cdiv(C, block_cols)) fp32): one scale
    per block; blocks at the right and bottom edges cover what is left of the tensor."""
    R, C = x.shape
    data = torch.empty((R, C), dtype=fp8_dtype, device=x.device)
    scale = torch.empty((triton.cdiv(R, block_rows), triton.cdiv(C, block_cols)), dtype=torch.float32,
                        device=x.device)
    if R == 0 or C == 0:
        return data, scale.fill_(1.0)
    soft = needs_soft_cast(x.device)
    out = data.view(torch.uint8) if soft else data
    cfg = blocks_config(block_rows, block_cols)
    rows_per_program = cfg["TILE_R"] if block_rows == 1 or block_cols == 1 else block_rows
    tiles = triton.cdiv(R, rows_per_program) * triton.cdiv(C, cfg["TILE_C"])
    with launch_device(x):
        _quantize_blocks_kernel[(tiles,)](
            x, out, scale, R, C, x.stride(0), x.stride(1), scale.shape[1],
            **_format_constexprs(fp8_dtype, power_of_two, soft), **cfg,
        )
    return data, scale
