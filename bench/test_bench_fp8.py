"""FP8 microbenchmarks (pytest-benchmark): scaled_mm vs bf16 matmul and torch._scaled_mm,
quantize bandwidth, Float8Linear fwd+bwd vs bf16 nn.Linear. Ratios use baselines measured in the
same run (``speedup_vs_*``); TFLOP/s and GB/s are in extra_info. Never asserts a speed."""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

import bandwidth as bw  # noqa: E402
import fp8_cases as fc  # noqa: E402
import harness  # noqa: E402

DEVICE = bw.bench_device()


def _run(benchmark, bench_recorder, request, op, pass_, shape, backend, prepare, work_key, baselines, tol):
    quick = bool(getattr(benchmark, "disabled", False))
    try:
        fn, work, errs = prepare()
    except harness.BackendUnavailable as exc:
        bench_recorder.skip(request.node.nodeid, str(exc))
        pytest.skip(f"unavailable: {exc}")
    t = fc.measure(fn, DEVICE, quick)
    rec = dict(op=op, pass_=pass_, shape="x".join(map(str, shape)), dtype="fp8", backend=backend, **t)
    rec["pass"] = rec.pop("pass_")
    if t["median_ms"]:
        rate = work / (t["median_ms"] * 1e-3)
        rec[work_key] = rate / (1e12 if work_key == "tflops" else 1e9)
        if work_key == "gbps" and bench_recorder.copy_gbps:
            rec["fraction_of_copy"] = rec["gbps"] / bench_recorder.copy_gbps
    rec.update({"rel_err": errs, "tol": tol, "correct": all(e <= tol for e in errs.values()),
                "meaningful": DEVICE.type == "cuda"})
    bench_recorder.record(benchmark, rec, baselines=baselines)
    benchmark.pedantic(bw.synchronized(fn, DEVICE), rounds=3, iterations=1, warmup_rounds=1)
    if not rec["correct"]:
        pytest.fail(f"{backend} computed a wrong result for {op} {rec['shape']}: relative error {errs} "
                    f"(tolerance {tol}); its timing is recorded but means nothing")


@pytest.mark.parametrize("backend", fc.GEMM_BACKENDS)
@pytest.mark.parametrize("shape", fc.gemm_shapes(DEVICE), ids=lambda s: "x".join(map(str, s)))
def test_scaled_mm(benchmark, bench_recorder, request, shape, backend):
    benchmark.group = f"fp8 scaled_mm {shape}"
    _run(benchmark, bench_recorder, request, "fp8_scaled_mm", "fwd", shape, backend,
         lambda: fc.prepare_gemm(shape, backend, DEVICE), "tflops", ("bf16_matmul", "torch_scaled_mm", "triton_tensorwise"),
         fc.GEMM_TOL)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise", "colwise"])
@pytest.mark.parametrize("shape", fc.QUANT_SHAPES_GPU if DEVICE.type == "cuda" else fc.QUANT_SHAPES_CPU,
                         ids=lambda s: "x".join(map(str, s)))
def test_quantize(benchmark, bench_recorder, request, shape, scaling, backend):
    benchmark.group = f"fp8 quantize {scaling} {shape}"
    _run(benchmark, bench_recorder, request, f"fp8_quantize_{scaling}", "fwd", shape, backend,
         lambda: fc.prepare_quantize(shape, scaling, backend, DEVICE), "gbps", ("torch",), fc.QUANT_TOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])  # the CUDA quantizer has no blockwise kernel
@pytest.mark.parametrize("block", fc.QUANT_BLOCKS, ids=lambda b: "x".join(map(str, b)))
@pytest.mark.parametrize("shape", fc.QUANT_SHAPES_GPU if DEVICE.type == "cuda" else fc.QUANT_SHAPES_CPU,
                         ids=lambda s: "x".join(map(str, s)))
def test_quantize_blockwise(benchmark, bench_recorder, request, shape, block, backend):
    name = "x".join(map(str, block))
    benchmark.group = f"fp8 quantize blockwise {name} {shape}"
    _run(benchmark, bench_recorder, request, f"fp8_quantize_blockwise_{name}", "fwd", shape, backend,
         lambda: fc.prepare_quantize(shape, "blockwise", backend, DEVICE, block), "gbps", ("torch",), fc.QUANT_TOL)


@pytest.mark.parametrize("backend", fc.EMIT_BACKENDS)
@pytest.mark.parametrize("granularity", ["rowwise", "blockwise"])
@pytest.mark.parametrize("shape", fc.EMIT_SHAPES_GPU if DEVICE.type == "cuda" else fc.EMIT_SHAPES_CPU,
                         ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_emitting_fp8(benchmark, bench_recorder, request, shape, granularity, backend):
    benchmark.group = f"rms_norm -> fp8 {granularity} {shape}"
    _run(benchmark, bench_recorder, request, f"rms_norm_fp8_{granularity}", "fwd", shape, backend,
         lambda: fc.prepare_norm_emit(shape, backend, granularity, DEVICE), "gbps", ("norm_then_quantize",),
         fc.QUANT_TOL)


@pytest.mark.parametrize("backend", ["bf16_linear", "fp8:tensorwise", "fp8:rowwise", "fp8:rowwise_with_gw_hp",
                                     "fp8:blockwise", "fp8_cuda:rowwise",
                                     "torchao:tensorwise", "torchao:rowwise"])
@pytest.mark.parametrize("shape", fc.LINEAR_GPU if DEVICE.type == "cuda" else fc.LINEAR_CPU,
                         ids=lambda s: "x".join(map(str, s)))
def test_float8_linear(benchmark, bench_recorder, request, shape, backend):
    benchmark.group = f"Float8Linear fwd+bwd {shape}"
    _run(benchmark, bench_recorder, request, "float8_linear", "fwd_bwd", shape, backend,
         lambda: fc.prepare_linear(shape, backend, DEVICE), "tflops", ("bf16_linear",), fc.LINEAR_TOL)
