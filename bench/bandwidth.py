"""Bandwidth floors and timing for the tokenforge microbenchmarks.

Three things live here, shared by every benchmark in bench/ and by bench/rms_norm_demo.py:

1. Byte formulas: the *minimum* device-memory traffic of an op (each input read once, each output
   written once). They describe the problem, not an implementation, so ``bytes / time`` is an
   effective bandwidth that is comparable across backends, and ``bytes / copy bandwidth`` is the
   floor no implementation can beat by much.
2. :func:`copy_bandwidth`: the memory ceiling measured in the same run, as a large
   device-to-device copy whose bytes are counted read + written (about 4.3 TB/s on an H200).
3. :func:`time_fn`: the timer. On CUDA it records a pair of CUDA events around each call, after
   warm-up, with the L2 cache flushed before every call (the ``triton.testing.do_bench`` method),
   and returns the median. On CPU it uses ``time.perf_counter``; CPU timings are for exercising the
   code in CI and mean nothing about GPU performance.

GB/s here is decimal: 1 GB/s = 1e9 bytes per second.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable, Optional

import torch

GB = 1e9
MiB = 1 << 20
GiB = 1 << 30

# Default size of the copy that measures the memory ceiling: 2 GiB read + 2 GiB written on a GPU
# (far beyond any L2), 64 MiB on a CPU (only there to exercise the code).
COPY_BYTES_CUDA = 2 * GiB
COPY_BYTES_CPU = 64 * MiB
# fp32 per-row statistic (rstd) that RMSNorm's forward saves for the backward.
RSTD_BYTES = 4


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    """Short name used in ids, tables and JSON: bf16, fp16, fp32, fp64."""
    return {
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float32: "fp32",
        torch.float64: "fp64",
    }.get(dtype, str(dtype).replace("torch.", ""))


# ---------------------------------------------------------------------------------------------
# Byte formulas (minimum traffic)
# ---------------------------------------------------------------------------------------------


def rms_norm_fwd_bytes(rows: int, n: int, x_bytes: int, w_bytes: Optional[int] = None,
                       has_weight: bool = True) -> int:
    """Minimum bytes moved by RMSNorm forward over ``rows`` rows of length ``n``.

    Reads x (rows*n elements of ``x_bytes``) and the weight (n elements of ``w_bytes``, default
    ``x_bytes``); writes y (rows*n, x's dtype) and the fp32 rstd (4 bytes per row) that the
    backward needs::

        rows*n*x_bytes  +  n*w_bytes  +  rows*n*x_bytes  +  rows*4
          read x           read w         write y           write rstd
    """
    w_bytes = x_bytes if w_bytes is None else w_bytes
    weight = n * w_bytes if has_weight else 0
    return rows * n * x_bytes + weight + rows * n * x_bytes + rows * RSTD_BYTES


def rms_norm_bwd_bytes(rows: int, n: int, x_bytes: int, w_bytes: Optional[int] = None,
                       has_weight: bool = True) -> int:
    """Minimum bytes moved by RMSNorm backward.

    Reads dy and x (rows*n each), the weight (n) and rstd (rows*4); writes dx (rows*n) and
    dweight (n, weight's dtype)::

        2*rows*n*x_bytes + n*w_bytes + rows*4  +  rows*n*x_bytes + n*w_bytes
          read dy, x        read w     read rstd   write dx          write dw
    """
    w_bytes = x_bytes if w_bytes is None else w_bytes
    weight = 2 * n * w_bytes if has_weight else 0  # read w, write dw
    return 3 * rows * n * x_bytes + rows * RSTD_BYTES + weight


def rms_norm_fwd_bwd_bytes(rows: int, n: int, x_bytes: int, w_bytes: Optional[int] = None,
                           has_weight: bool = True) -> int:
    """Minimum bytes of one RMSNorm training step (forward then backward): the sum of
    :func:`rms_norm_fwd_bytes` and :func:`rms_norm_bwd_bytes` (5 passes over a rows*n tensor:
    read x, write y, read dy, read x again, write dx; plus weight and rstd traffic)."""
    return (rms_norm_fwd_bytes(rows, n, x_bytes, w_bytes, has_weight)
            + rms_norm_bwd_bytes(rows, n, x_bytes, w_bytes, has_weight))


def copy_bytes(nbytes: int) -> int:
    """Bytes moved by copying a buffer of ``nbytes``: read once plus written once."""
    return 2 * nbytes


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def default_rep_ms(device: torch.device) -> float:
    """Target milliseconds of timed calls per measurement (``TOKENFORGE_BENCH_REP_MS``)."""
    return _env_float("TOKENFORGE_BENCH_REP_MS", 100.0 if device.type == "cuda" else 20.0)


def default_warmup_ms(device: torch.device) -> float:
    """Target milliseconds of warm-up calls (``TOKENFORGE_BENCH_WARMUP_MS``)."""
    return _env_float("TOKENFORGE_BENCH_WARMUP_MS", 25.0 if device.type == "cuda" else 5.0)


def summarize(times_ms: list[float], timer: str) -> dict:
    """Median and spread of per-call times in milliseconds."""
    ts = sorted(times_ms)
    k = len(ts)

    def q(p: float) -> float:
        # Nearest-rank quantile: robust and dependency-free.
        return ts[min(k - 1, max(0, int(round(p * (k - 1)))))]

    return {
        "median_ms": statistics.median(ts),
        "p20_ms": q(0.2),
        "p80_ms": q(0.8),
        "min_ms": ts[0],
        "max_ms": ts[-1],
        "mean_ms": statistics.fmean(ts),
        "reps": k,
        "timer": timer,
    }


def _rep_count(est_ms: float, target_ms: float, min_reps: int, max_reps: int) -> int:
    if not math.isfinite(est_ms) or est_ms <= 0:
        return max_reps
    return int(min(max_reps, max(min_reps, round(target_ms / est_ms))))


_FLUSH_BUFFERS: dict = {}


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer several times the L2 cache (>= 256 MiB); writing it evicts the inputs of the last call."""
    key = str(device)
    buf = _FLUSH_BUFFERS.get(key)
    if buf is None:
        l2 = 0
        try:
            l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
        except Exception:
            l2 = 0
        nbytes = max(256 * MiB, 4 * l2)
        buf = torch.empty(nbytes, dtype=torch.int8, device=device)
        _FLUSH_BUFFERS[key] = buf
    return buf


def cuda_time(fn: Callable[[], object], *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
              min_reps: int = 10, max_reps: int = 1000, flush_l2: bool = True,
              device: Optional[torch.device] = None,
              event_factory: Optional[Callable[[], object]] = None,
              synchronize: Optional[Callable[[], None]] = None,
              flush: Optional[Callable[[], None]] = None) -> dict:
    """Median GPU time of ``fn()`` in ms, measured with CUDA events.

    Method (that of ``triton.testing.do_bench``): one call to load/compile; estimate the time of a
    call from 5 calls; run ``warmup_ms`` worth of calls; then ``rep_ms`` worth of timed calls
    (between ``min_reps`` and ``max_reps``), each between its own pair of events and each preceded
    by a write to a buffer larger than L2 (so no call finds its inputs in cache). The flush lies
    outside the events. ``event_factory``/``synchronize``/``flush`` exist so the logic can be
    tested without a GPU.
    """
    if event_factory is None:
        def event_factory():
            return torch.cuda.Event(enable_timing=True)
    if synchronize is None:
        synchronize = torch.cuda.synchronize
    if flush is None:
        if flush_l2:
            buf = l2_flush_buffer(device if device is not None else torch.device("cuda"))
            flush = buf.zero_
        else:
            def flush():
                return None

    fn()
    synchronize()
    # Estimate.
    start, end = event_factory(), event_factory()
    start.record()
    for _ in range(5):
        fn()
    end.record()
    synchronize()
    est_ms = start.elapsed_time(end) / 5
    n_warmup = _rep_count(est_ms, warmup_ms, 1, max_reps)
    n_rep = _rep_count(est_ms, rep_ms, min_reps, max_reps)
    for _ in range(n_warmup):
        fn()
    starts = [event_factory() for _ in range(n_rep)]
    ends = [event_factory() for _ in range(n_rep)]
    for i in range(n_rep):
        flush()
        starts[i].record()
        fn()
        ends[i].record()
    synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return summarize(times, "cuda-events, L2 flushed, median" if flush_l2 else "cuda-events, median")


def cpu_time(fn: Callable[[], object], *, warmup_ms: float = 5.0, rep_ms: float = 20.0,
             min_reps: int = 5, max_reps: int = 200, clock: Callable[[], float] = time.perf_counter,
             quick: bool = False) -> dict:
    """Median wall-clock time of ``fn()`` in ms with ``time.perf_counter`` (CPU tensors).

    Same shape as :func:`cuda_time`: one untimed call, an estimate, warm-up, then timed calls.
    ``quick``: one timed call and nothing else (see :func:`time_fn`).
    """
    if quick:
        t0 = clock()
        fn()
        return summarize([(clock() - t0) * 1e3], "perf_counter, one call (quick; not meaningful)")
    fn()
    t0 = clock()
    fn()
    est_ms = (clock() - t0) * 1e3
    for _ in range(_rep_count(est_ms, warmup_ms, 1, max_reps)):
        fn()
    times = []
    for _ in range(_rep_count(est_ms, rep_ms, min_reps, max_reps)):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    return summarize(times, "perf_counter, median (CPU: not meaningful for GPU performance)")


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup_ms: Optional[float] = None,
            rep_ms: Optional[float] = None, flush_l2: bool = True, quick: bool = False) -> dict:
    """Median time of ``fn()`` on ``device``: :func:`cuda_time` on CUDA, :func:`cpu_time` otherwise.

    Timed warm: :data:`WARM_CALLS` untimed calls first, whatever the warm-up budget (a compiled
    function builds its backward graph and loads its kernels over its first calls), then the timed
    calls run under ``torch.compiler.set_stance("fail_on_recompile")``: a figure that included a
    recompile is refused (:class:`RecompiledWhileTiming`), never reported.

    Returns a dict with ``median_ms``, ``p20_ms``, ``p80_ms``, ``min_ms``, ``max_ms``, ``mean_ms``,
    ``reps``, ``warm_calls`` and ``timer`` (how it was measured).

    ``quick`` (:data:`QUICK_TIMER`, what ``--benchmark-disable`` asks for): the benchmark only has to
    run. On a CPU, where the interpreter makes a call take seconds, that is one warm call and one
    timed call (12 calls were most of ``make test``'s benchmark time); on a GPU, the usual timer with
    no warm-up budget."""
    device = torch.device(device)
    quick = quick and device.type != "cuda"
    warmup_ms = default_warmup_ms(device) if warmup_ms is None else warmup_ms
    rep_ms = default_rep_ms(device) if rep_ms is None else rep_ms
    warm_calls = 1 if quick else WARM_CALLS
    for _ in range(warm_calls):
        fn()
    graphs_before = compiled_graphs()
    with no_recompiles():
        if device.type == "cuda":
            with torch.cuda.device(device):
                stats = cuda_time(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, flush_l2=flush_l2, device=device)
        else:
            stats = cpu_time(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, quick=quick)
    new_graphs = compiled_graphs() - graphs_before
    if new_graphs:
        raise RecompiledWhileTiming(f"{new_graphs} graph(s) compiled while timing: the figure would include "
                                    "compilation and is not reported")
    stats["warm_calls"] = warm_calls
    return stats


# Untimed calls before any timing (see time_fn).
WARM_CALLS = 3
# time_fn's arguments under --benchmark-disable (`make test`): the benchmarks only have to run.
QUICK_TIMER = {"warmup_ms": 0.0, "rep_ms": 0.0, "quick": True}


class RecompiledWhileTiming(RuntimeError):
    """torch.compile compiled a graph during a timed region: that timing is refused."""


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def no_recompiles():
    """Context in which a torch.compile'd function raises rather than recompile (torch >= 2.6;
    a no-op context on older torch, where compiled_graphs() still catches it)."""
    import contextlib

    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        return contextlib.nullcontext()
    return set_stance("fail_on_recompile")


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronize: what pytest-benchmark's wall-clock timer may time."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


# ---------------------------------------------------------------------------------------------
# Copy bandwidth (the memory ceiling)
# ---------------------------------------------------------------------------------------------


_MATMUL: dict = {}


def matmul_tflops(device) -> float:
    """bf16 torch.matmul rate measured once per run (8192^3 on CUDA, 512^3 on CPU)."""
    device = torch.device(device)
    if device.type not in _MATMUL:
        n = 8192 if device.type == "cuda" else 512
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        stats = time_fn(lambda: a @ b, device, flush_l2=False)
        _MATMUL[device.type] = 2.0 * n ** 3 / (stats["median_ms"] * 1e-3) / 1e12
    return _MATMUL[device.type]


def copy_bandwidth(device, nbytes: Optional[int] = None) -> dict:
    """Measure device-memory bandwidth as a large device-to-device copy.

    Copies a buffer of ``nbytes`` (default 2 GiB on CUDA, 64 MiB on CPU;
    ``TOKENFORGE_COPY_BYTES`` overrides) into another with ``Tensor.copy_``, times it with
    :func:`time_fn` (no L2 flush needed: the buffer is far larger than L2) and counts
    ``2 * nbytes`` (read + written). Halves the size on out-of-memory. The source holds random
    values, never zeros.

    Returns ``{"gbps", "median_ms", "nbytes", "bytes_moved", "device", "timer", "meaningful"}``.
    """
    device = torch.device(device)
    if nbytes is None:
        env = os.environ.get("TOKENFORGE_COPY_BYTES")
        nbytes = int(float(env)) if env else (COPY_BYTES_CUDA if device.type == "cuda" else COPY_BYTES_CPU)
    nbytes = max(4 * MiB, int(nbytes) // 4 * 4)
    last_err = None
    while nbytes >= 4 * MiB:
        try:
            src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
            dst = torch.empty_like(src)
            break
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            last_err = exc
            src = dst = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            nbytes //= 2
    else:  # pragma: no cover - only on a device with almost no free memory
        raise RuntimeError(f"copy_bandwidth: could not allocate a copy buffer on {device}: {last_err}")
    stats = time_fn(lambda: dst.copy_(src), device, flush_l2=False)
    moved = copy_bytes(nbytes)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "gbps": moved / (stats["median_ms"] * 1e-3) / GB,
        "median_ms": stats["median_ms"],
        "nbytes": nbytes,
        "bytes_moved": moved,
        "device": str(device),
        "timer": stats["timer"],
        "meaningful": device.type == "cuda",
    }


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def bench_device() -> torch.device:
    """The device the benchmarks run on: ``TOKENFORGE_BENCH_DEVICE`` if set, else cuda when
    available, else cpu."""
    forced = os.environ.get("TOKENFORGE_BENCH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_info(device) -> dict:
    """What the benchmarks ran on, for the JSON and the report."""
    device = torch.device(device)
    info = {"device": device.type, "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - report, never fail
        info["triton"] = f"unavailable ({type(exc).__name__})"
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    try:
        import tokenforge

        info["tokenforge"] = getattr(tokenforge, "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        info["tokenforge"] = f"import failed ({type(exc).__name__}: {exc})"
    if device.type == "cuda":
        try:
            props = torch.cuda.get_device_properties(device)
            info.update({
                "device_name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "sm_count": props.multi_processor_count,
                "memory_gib": round(props.total_memory / GiB, 1),
                "l2_mib": round(int(getattr(props, "L2_cache_size", 0) or 0) / MiB, 1),
                "cuda_runtime": torch.version.cuda,
            })
        except Exception as exc:  # noqa: BLE001
            info["device_name"] = f"unknown ({type(exc).__name__}: {exc})"
    else:
        import platform

        info["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    info["meaningful"] = device.type == "cuda"
    return info
