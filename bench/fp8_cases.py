"""FP8 benchmark cases: scaled_mm (TFLOP/s vs bf16 torch.matmul and torch._scaled_mm, same run),
quantize (GB/s vs the copy bandwidth), Float8Linear fwd+bwd vs bf16 nn.Linear. Tiny sizes on CPU
(they only prove the code runs). Times are medians from bandwidth.time_fn; nothing is asserted."""

from __future__ import annotations

import torch

import bandwidth as bw
import harness
from harness import BackendUnavailable

GPU_GEMM_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 16384, 16384),
                   # LLaMA linear shapes, M = 16k tokens: 1B (2048 hidden, 8192 MLP), 8B (4096, 14336)
                   (16384, 2048, 8192), (16384, 8192, 2048), (16384, 4096, 14336), (16384, 14336, 4096)]
CPU_GEMM_SHAPES = [(64, 64, 64)]
# <kernel>[_<scaling>]: triton (tokenforge.kernels.fp8_gemm) or cuda (the CUTLASS sm_90a kernel,
# csrc/fp8_gemm_sm90.cu); rowwise scales unless _tensorwise or _blockwise (a (1, 128), b (128, 128)
# blocks: the goal is >= 0.9x tensorwise).
GEMM_BACKENDS = ("bf16_matmul", "torch_scaled_mm", "triton", "triton_tensorwise", "triton_blockwise",
                 "cuda", "cuda_tensorwise", "cuda_blockwise")
QUANT_BLOCKS = [(1, 128), (128, 128)]
QUANT_SHAPES_GPU = [(16384, 4096), (8192, 8192)]
QUANT_SHAPES_CPU = [(64, 256)]
LINEAR_GPU = [(16384, 8192, 8192), (16384, 4096, 14336)]
LINEAR_CPU = [(32, 64, 64)]


# Loose sanity bounds (a broken kernel, not FP8 rounding, fails them): the GEMM against the
# product of the dequantized operands (the same fp8 inputs, so only accumulation order differs),
# Float8Linear against bf16 nn.Linear (fp8 rounding of x, w and dy: ~20-30 dB SQNR, about 5-10%).
GEMM_TOL = 1e-2
LINEAR_TOL = 0.25
QUANT_TOL = 0.07


def _rel(out, ref) -> float:
    return harness.rel_err(out.float(), ref.float())


def gemm_shapes(device):
    return GPU_GEMM_SHAPES if device.type == "cuda" else CPU_GEMM_SHAPES


def prepare_gemm(shape, backend, device):
    """(fn, flops) for one (M, K, N) GEMM: bf16 a @ b, or fp8 rowwise-, tensorwise- or
    blockwise-scaled."""
    from tokenforge import fp8

    M, K, N = shape
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=device, dtype=torch.bfloat16)
    flops = 2.0 * M * N * K
    if backend == "bf16_matmul":
        out = x @ w.t()
        return (lambda: x @ w.t()), flops, {"y": _rel(out, x.float() @ w.float().t())}
    quant = dict(backend="torch" if device.type != "cuda" else None)
    kernel, _, scaling = backend.partition("_")
    if kernel == "cuda":
        _require_cuda_gemm(device)
    if scaling == "blockwise":
        a, sa = fp8.quantize(x, scaling="blockwise", block=(1, 128), **quant)
        b, sb = fp8.quantize(w, scaling="blockwise", block=(128, 128), **quant)
    else:
        scaling = "tensorwise" if scaling == "tensorwise" else "rowwise"
        a, sa = fp8.quantize(x, scaling=scaling, **quant)
        b, sb = fp8.quantize(w, scaling=scaling, **quant)
    bt, sbt = b.t(), (sb.t() if sb.dim() == 2 else sb)
    if backend == "torch_scaled_mm":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise BackendUnavailable("torch._scaled_mm needs an sm_89+ GPU")

        def fn():
            return torch._scaled_mm(a, bt, scale_a=sa, scale_b=sbt, out_dtype=torch.bfloat16)
    else:
        def fn():
            return fp8.scaled_mm(a, bt, sa, sbt, backend=kernel)
    out = harness.first_call(fn, device)
    ref = fp8.scaled_mm_reference(a, bt, sa, sbt, out_dtype=torch.float32)
    return fn, flops, {"y": _rel(out, ref)}


def _require_cuda_gemm(device):
    """BackendUnavailable unless the CUTLASS sm_90a GEMM runs here (an H100/H200, built in)."""
    from tokenforge.cuda import fp8_gemm as cuda_fp8_gemm

    probe = torch.empty(16, 16, device=device, dtype=torch.float8_e4m3fn)
    reason = cuda_fp8_gemm.supports(probe, probe)
    if reason:
        raise BackendUnavailable(reason)


def prepare_quantize(shape, scaling, backend, device, block=None):
    from tokenforge import fp8

    x = torch.randn(*shape, device=device, dtype=torch.bfloat16)

    def fn():
        return fp8.quantize(x, scaling=scaling, block=block, backend=backend)

    data, scale = harness.first_call(fn, device)
    err = _rel(fp8.dequantize(data, scale, torch.float32), x)
    # bf16 read, fp8 written; tensorwise reads x twice (amax, then cast); 2-D blocks too (the
    # second sweep of a block, from L1/L2 mostly: counted as traffic, so the figure is a floor).
    twice = scaling == "tensorwise" or (block is not None and min(block) > 1)
    nbytes = x.numel() * 3 + (x.numel() * 2 if twice else 0)
    return fn, nbytes, {"dequantized": err}


EMIT_SHAPES_GPU = [(16384, 4096)]  # tokens x hidden: the RMSNorm before the attention projections
EMIT_SHAPES_CPU = [(64, 256)]
EMIT_BACKENDS = ("norm_then_quantize", "norm_emits_fp8")


def prepare_norm_emit(shape, backend, granularity, device):
    """RMSNorm's output plus its fp8 copy for the next Float8Linear (rowwise or (1, 128) blocks):
    ``norm_then_quantize`` (two kernels, y read again) vs ``norm_emits_fp8`` (one pass,
    tokenforge.fp8.emit). Bytes counted as the fused pass moves them (read x, write y and fp8),
    so the unfused figure is what it would get if it moved no more."""
    from tokenforge import fp8
    from tokenforge.fp8 import emit
    from tokenforge.ops import rms_norm

    if harness.triton_needs_interpreter(device):
        raise BackendUnavailable("Triton on CPU tensors needs TRITON_INTERPRET=1")
    rows, n = shape
    x = torch.randn(rows, n, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, device=device, dtype=torch.bfloat16)
    blockwise = granularity == "blockwise"
    cast = fp8.EmitCast(torch.float8_e4m3fn, blockwise, False)
    quant = dict(scaling="blockwise", block=(1, 128)) if blockwise else dict(scaling="rowwise")

    if backend == "norm_emits_fp8":
        def fn():
            y = rms_norm(x, w, 1e-6, fp8=cast, backend="triton")
            return y, emit.lookup(y, cast)
    else:
        def fn():
            y = rms_norm(x, w, 1e-6, backend="triton")
            return y, fp8.quantize(y, backend="triton", **quant)

    y, (data, scale) = harness.first_call(fn, device)
    err = _rel(fp8.dequantize(data, scale, torch.float32), y)
    return fn, x.numel() * 5, {"dequantized": err}


def prepare_linear(shape, backend, device):
    """fwd+bwd of one linear layer on M tokens (M, K) -> (M, N): bf16 nn.Linear or Float8Linear."""
    from tokenforge import fp8

    M, K, N = shape
    lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=torch.bfloat16)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    if backend == "bf16_linear":
        mod = lin
    elif backend.startswith("torchao:"):
        mod = _torchao_float8_linear(lin, backend.split(":")[1], device)
    else:  # fp8:<recipe> (tokenforge's default GEMM backend) or fp8_cuda:<recipe> (the CUTLASS GEMM)
        kernel = "cuda" if backend.startswith("fp8_cuda:") else None
        if kernel:
            _require_cuda_gemm(device)
        mod = fp8.Float8Linear.from_linear(lin, backend.split(":")[1], backend=kernel)
    params = tuple(mod.parameters())

    def run():
        y = mod(x)
        return (y, *torch.autograd.grad(y, (x, *params), dy))

    outs = harness.first_call(run, device)
    refs = _bf16_linear_reference(lin, x, dy)
    errs = {name: _rel(o, r) for name, o, r in zip(("y", "dx", "dw"), outs, refs)}
    return run, 6.0 * M * K * N, errs


def _bf16_linear_reference(lin, x, dy):
    """y, dx, dw of the bf16 layer in fp32 (what FP8 approximates)."""
    w = lin.weight.detach().float()
    xf, dyf = x.detach().float(), dy.float()
    return xf @ w.t(), dyf @ w, dyf.t() @ xf


def _torchao_float8_linear(lin, recipe, device):
    """The peer baseline: torchao's float8 training Linear with the same recipe, when installed."""
    ao = harness.peer_import("torchao.float8", "torchao float8", "pip install torchao (bench/fetch_peers.sh)")
    Float8LinearConfig, convert_to_float8_training = ao.Float8LinearConfig, ao.convert_to_float8_training
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise BackendUnavailable("torchao float8 training needs an sm_89+ GPU")
    model = torch.nn.Sequential(lin)
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe))
    return model


def measure(fn, device, quick):
    return bw.time_fn(fn, device, **(bw.QUICK_TIMER if quick else {}))
