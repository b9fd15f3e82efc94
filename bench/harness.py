"""The machinery every per-op microbenchmark shares; the ``<op>_cases.py`` files hold only what is
op-specific (shapes, backends, the callable per backend, byte/FLOP formulas, the reference).

One flow for every op:

    prepare   ``<op>_cases.prepare(case, backend, device) -> Prepared``: inputs, one first call
              (compiles, loads the extension; raises :class:`BackendUnavailable` when the backend
              cannot run here), its errors against the op's reference, and the timed closure
    measure   bandwidth.time_fn on ``Prepared.fn`` (a quick timing under --benchmark-disable)
    record    :func:`make_record` -> ``bench_recorder.record`` (the JSON's extra_info)
    pedantic  pytest-benchmark's own wall-clock rounds of ``fn(); synchronize()``
    fail      a wrong result fails the test *after* its timing is recorded, so the report can show
              it flagged; benchmarks never assert a speed

:func:`run_benchmark` is that flow as the body of one pytest test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

import bandwidth as bw
from tokenforge.testing import rel_error


class BackendUnavailable(Exception):
    """The backend cannot run this case here (not built, not installed, no GPU, no interpreter...)."""


class CaseId:
    """Mixin for an op's frozen ``Case`` dataclass with ``pass_``, ``shape`` and ``dtype``: the
    ``<pass>-<shape>-<dtype>`` id that names its tests and benchmark groups. ``shape`` defaults to
    the case's ``name`` (cases named after the model they come from)."""

    @property
    def shape(self) -> str:
        return self.name

    @property
    def dtype_name(self) -> str:
        return bw.dtype_name(self.dtype)

    @property
    def id(self) -> str:
        return f"{self.pass_}-{self.shape}-{self.dtype_name}"


def sizes_mode(device) -> str:
    """``full`` (the GPU shapes) or ``tiny``; ``TOKENFORGE_BENCH_SIZES`` overrides the default,
    which is full on CUDA and tiny elsewhere."""
    mode = os.environ.get("TOKENFORGE_BENCH_SIZES", "").strip().lower()
    if mode in ("full", "tiny"):
        return mode
    return "full" if torch.device(device).type == "cuda" else "tiny"


def backends_for(device, gpu_backends: tuple, cpu_backends: tuple) -> tuple:
    return gpu_backends if torch.device(device).type == "cuda" else cpu_backends


def triton_needs_interpreter(device) -> bool:
    """True when Triton would get CPU tensors without the interpreter (TRITON_INTERPRET unset)."""
    if torch.device(device).type == "cuda":
        return False
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes")


def first_call(call: Callable[[], Any], device) -> Any:
    """Run the first call of a backend and synchronize. Only
    :class:`tokenforge.backends.BackendUnavailableError` (the backend was asked for where it cannot
    run: extension not built, no GPU, no interpreter, GPU too old) and this module's
    :class:`BackendUnavailable` mean "not run here". Anything else -- a launch failure, an
    out-of-memory, a RuntimeError from a CUDA C++ kernel -- propagates and fails the benchmark."""
    from tokenforge.backends import BackendUnavailableError

    device = torch.device(device)
    try:
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out
    except BackendUnavailableError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BackendUnavailable(f"{type(exc).__name__}: {first}"[:300]) from exc


def peer_import(name: str, what: str, install: str):
    """Import an optional peer library (a baseline, never tokenforge itself): not installed, or
    built against another torch, makes its benchmarks unavailable, not failed."""
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any import failure of a peer means "not here"
        raise BackendUnavailable(f"{what} is not importable ({type(exc).__name__}); {install}") from exc


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------


def rel_err(out: Optional[torch.Tensor], ref: torch.Tensor) -> float:
    """tokenforge.testing.rel_error (||out - ref|| / ||ref|| in float64), except that a missing
    output or a shape mismatch scores inf instead of raising: a benchmark records a wrong result
    and fails after its timing, it does not die in prepare."""
    if out is None or tuple(out.shape) != tuple(ref.shape):
        return float("inf")
    return rel_error(out, ref)


def tolerance(dtype: torch.dtype) -> float:
    """Loose sanity bound, 1e-4 for fp32/fp64 and 2e-2 for fp16/bf16. Looser than
    tokenforge.testing.TOLERANCE on purpose: tests/ check precisely, on small shapes; a benchmark
    only catches a broken kernel, on shapes (and with reductions) the test suite does not run.
    The value is recorded as ``tol`` in every record."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


@dataclass
class Prepared:
    """A case ready to time: ``fn()`` runs one pass; the first call (compile, correctness) is done.
    ``extra`` holds op-specific record fields measured while preparing (attention's peak memory)."""
    case: Any
    backend: str
    device: torch.device
    fn: Callable[[], object]
    rel_err: dict = field(default_factory=dict)
    tol: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return all(e <= self.tol for e in self.rel_err.values())


# ---------------------------------------------------------------------------------------------
# Records (the JSON's extra_info; report.py and test_bench_plumbing.py read these field names)
# ---------------------------------------------------------------------------------------------


def make_record(prep: Prepared, stats: dict, *, op: str, dims: Optional[dict] = None, impl: Optional[str] = None,
                nbytes: Optional[int] = None, copy_gbps: Optional[float] = None,
                flops: Optional[float] = None, matmul_tflops: Optional[float] = None) -> dict:
    """One record: the case (``op``, pass, shape, the op's ``dims``, dtype), the backend, the timer's
    ``stats``, the throughput, the correctness check.

    Memory-bound ops pass ``nbytes`` (-> ``bytes``, ``gbps`` and, given the copy bandwidth,
    ``fraction_of_copy`` and ``floor_ms``); compute-bound ones pass ``flops`` (-> ``tflops`` and,
    given the matmul rate, ``fraction_of_matmul``).
    """
    case = prep.case
    med = stats["median_ms"]
    rec = {"op": op, "pass": case.pass_, "shape": case.shape, **(dims or {}), "dtype": bw.dtype_name(case.dtype),
           "backend": prep.backend}
    if impl is not None:
        rec["impl"] = impl
    rec.update({"device": prep.device.type, "headline": case.headline, **stats})
    gbps = tflops = None
    if nbytes is not None:
        gbps = nbytes / (med * 1e-3) / bw.GB if med > 0 else float("nan")
        rec.update({"bytes": nbytes, "gbps": gbps})
    if flops is not None:
        tflops = flops / (med * 1e-3) / 1e12 if med > 0 else float("nan")
        rec.update({"flops": flops, "tflops": tflops})
    rec.update({"rel_err": {k: float(v) for k, v in prep.rel_err.items()}, "tol": prep.tol,
                "correct": prep.correct, "meaningful": prep.device.type == "cuda", **prep.extra})
    if nbytes is not None and copy_gbps:
        rec["copy_gbps"] = copy_gbps
        rec["fraction_of_copy"] = gbps / copy_gbps
        rec["floor_ms"] = nbytes / (copy_gbps * bw.GB) * 1e3
    if flops is not None and matmul_tflops:
        rec["matmul_tflops"] = matmul_tflops
        rec["fraction_of_matmul"] = tflops / matmul_tflops
    return rec


def add_ratios(rec: dict, baseline_ms: dict) -> dict:
    """Add ``speedup_vs_<baseline>`` = baseline median / this median for each baseline measured
    (``baseline_ms``: backend -> median ms for the same case). conftest's Recorder does the same
    inside pytest; this is for the plain-script runner."""
    for base, ms in baseline_ms.items():
        if ms and rec.get("median_ms"):
            rec[f"speedup_vs_{base}"] = ms / rec["median_ms"]
    return rec


# ---------------------------------------------------------------------------------------------
# The pytest test body
# ---------------------------------------------------------------------------------------------


def rounds_for(median_ms: float, device, target_ms: float = 50.0, gpu_range=(5, 50), cpu_range=(3, 20)) -> int:
    """Rounds of pytest-benchmark's wall-clock timer: about ``target_ms`` worth, clamped to the
    device's range."""
    lo, hi = gpu_range if torch.device(device).type == "cuda" else cpu_range
    if not median_ms or median_ms <= 0:
        return lo
    return int(max(lo, min(hi, target_ms / median_ms)))


def run_benchmark(benchmark, bench_recorder, request, *, op: str, case, backend: str, device,
                  prepare: Callable[..., Prepared], make_record: Callable[[Prepared, dict], dict],
                  baselines: tuple, rounds: Optional[Callable[[float], int]] = None) -> dict:
    """The body of one pytest-benchmark test: prepare, time, record, pedantic, fail on a wrong result.

    ``make_record(prep, stats)`` builds the op's record (it knows the ceiling to compare with);
    ``rounds(median_ms)`` sizes pytest-benchmark's own rounds (default :func:`rounds_for`).
    Returns the record.
    """
    import pytest

    benchmark.group = f"{op} {case.id}"
    try:
        prep = prepare(case, backend, device)
    except BackendUnavailable as exc:
        bench_recorder.skip(request.node.nodeid, str(exc))
        pytest.skip(f"unavailable: {exc}")
    # Under --benchmark-disable (`make test`) the benchmarks only have to run: a quick timing.
    quick = bool(getattr(benchmark, "disabled", False))
    stats = bw.time_fn(prep.fn, prep.device, **(bw.QUICK_TIMER if quick else {}))
    if quick:
        stats["timer"] += " [quick: --benchmark-disable]"
    rec = bench_recorder.record(benchmark, make_record(prep, stats), baselines=baselines)
    benchmark.pedantic(bw.synchronized(prep.fn, prep.device), rounds=(rounds or (lambda ms: rounds_for(ms, prep.device)))(rec["median_ms"]),
                       iterations=1, warmup_rounds=1)
    if not prep.correct:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in prep.rel_err.items())
        pytest.fail(f"{backend} computed a wrong result for {op} {case.id}: relative error {errs} "
                    f"(tolerance {prep.tol:.0e}); its timing is recorded but means nothing")
    return rec


def bench_params(cases, backends):
    """pytest params ``(case, backend)``, id ``<case.id>-<backend>``, the headline case marked."""
    import pytest

    for case in cases:
        for backend in backends:
            marks = [pytest.mark.headline] if case.headline else []
            yield pytest.param(case, backend, id=f"{case.id}-{backend}", marks=marks)
