"""FP8 benchmark cases: scaled_mm (TFLOP/s vs bf16 torch.matmul and torch._scaled_mm, same run),
quantize (GB/s vs the copy bandwidth), Float8Linear fwd+bwd vs bf16 nn.Linear. Tiny sizes on CPU
(they only prove the code runs). Times are medians from bandwidth.time_fn; nothing is asserted."""

from __future__ import annotations

import torch

import bandwidth as bw

GPU_GEMM_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 16384, 16384),
                   # LLaMA linear shapes, M = 16k tokens: 1B (2048 hidden, 8192 MLP), 8B (4096, 14336)
                   (16384, 2048, 8192), (16384, 8192, 2048), (16384, 4096, 14336), (16384, 14336, 4096)]
CPU_GEMM_SHAPES = [(64, 64, 64)]
GEMM_BACKENDS = ("bf16_matmul", "torch_scaled_mm", "triton")
QUANT_SHAPES_GPU = [(16384, 4096), (8192, 8192)]
QUANT_SHAPES_CPU = [(64, 256)]
LINEAR_GPU = [(16384, 8192, 8192), (16384, 4096, 14336)]
LINEAR_CPU = [(32, 64, 64)]


class BackendUnavailable(Exception):
    pass


def gemm_shapes(device):
    return GPU_GEMM_SHAPES if device.type == "cuda" else CPU_GEMM_SHAPES


def prepare_gemm(shape, backend, device):
    """(fn, flops) for one (M, K, N) GEMM: bf16 a @ b, or fp8 rowwise-scaled."""
    from tokenforge import fp8

    M, K, N = shape
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=device, dtype=torch.bfloat16)
    flops = 2.0 * M * N * K
    if backend == "bf16_matmul":
        return (lambda: x @ w.t()), flops
    a, sa = fp8.quantize(x, scaling="rowwise", backend="torch" if device.type != "cuda" else None)
    b, sb = fp8.quantize(w, scaling="rowwise", backend="torch" if device.type != "cuda" else None)
    bt, sbt = b.t(), sb.t()
    if backend == "torch_scaled_mm":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise BackendUnavailable("torch._scaled_mm needs an sm_89+ GPU")
        return (lambda: torch._scaled_mm(a, bt, scale_a=sa, scale_b=sbt, out_dtype=torch.bfloat16)), flops
    try:
        fp8.scaled_mm(a, bt, sa, sbt, backend="triton")
    except Exception as exc:  # BackendUnavailableError (no GPU, no interpreter, < sm_89)
        raise BackendUnavailable(str(exc)) from exc
    return (lambda: fp8.scaled_mm(a, bt, sa, sbt, backend="triton")), flops


def prepare_quantize(shape, scaling, backend, device):
    from tokenforge import fp8

    x = torch.randn(*shape, device=device, dtype=torch.bfloat16)
    try:
        fp8.quantize(x, scaling=scaling, backend=backend)
    except Exception as exc:
        raise BackendUnavailable(str(exc)) from exc
    nbytes = x.numel() * 3 + (x.numel() * 2 if scaling == "tensorwise" else 0)  # bf16 read (twice), fp8 write
    return (lambda: fp8.quantize(x, scaling=scaling, backend=backend)), nbytes


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
    else:
        mod = fp8.Float8Linear.from_linear(lin, backend.split(":")[1])
    params = tuple(mod.parameters())

    def run():
        y = mod(x)
        torch.autograd.grad(y, (x, *params), dy)

    run()
    return run, 6.0 * M * K * N


def _torchao_float8_linear(lin, recipe, device):
    """The peer baseline: torchao's float8 training Linear with the same recipe, when installed."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except Exception as exc:  # ImportError, or a torchao built against another torch
        raise BackendUnavailable(f"torchao float8 is not importable ({type(exc).__name__}); pip install torchao") from exc
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise BackendUnavailable("torchao float8 training needs an sm_89+ GPU")
    model = torch.nn.Sequential(lin)
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe))
    return model


def measure(fn, device, quick):
    return bw.time_fn(fn, device, **({"warmup_ms": 0.0, "rep_ms": 0.0} if quick else {}))
