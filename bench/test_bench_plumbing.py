"""Checks of the benchmark machinery itself (no timing claims): byte formulas, the timers' logic
(the CUDA-event path through fake events, so it is exercised without a GPU), the report from
GPU-like and cut-short inputs, and the syntax of gpu_check.sh. Fast; runs everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402
import torch  # noqa: E402

import bandwidth as bw  # noqa: E402
import report  # noqa: E402
import rms_norm_cases as rc  # noqa: E402


def test_rms_norm_byte_formulas():
    rows, n = 16384, 4096
    fwd = bw.rms_norm_fwd_bytes(rows, n, 2)
    assert fwd == rows * n * 2 * 2 + n * 2 + rows * 4
    bwd = bw.rms_norm_bwd_bytes(rows, n, 2)
    assert bwd == rows * n * 2 * 3 + rows * 4 + 2 * n * 2
    assert bw.rms_norm_fwd_bwd_bytes(rows, n, 2) == fwd + bwd == 671_244_288
    # fp32 activations with a bf16 weight, and no weight at all
    assert bw.rms_norm_fwd_bytes(rows, n, 4, 2) == rows * n * 8 + n * 2 + rows * 4
    assert bw.rms_norm_fwd_bwd_bytes(rows, n, 2, has_weight=False) == 5 * rows * n * 2 + 2 * rows * 4
    assert bw.copy_bytes(1 << 30) == 2 << 30
    case = rc.Case("fwd_bwd", rows, n, torch.bfloat16, headline=True)
    assert case.bytes() == 671_244_288 and case.id == "fwd_bwd-16384x4096-bf16"


def test_gpu_case_list_has_headline_first():
    os.environ["TOKENFORGE_BENCH_SIZES"] = "full"
    try:
        cases = rc.cases(torch.device("cpu"))
    finally:
        del os.environ["TOKENFORGE_BENCH_SIZES"]
    assert cases[0].headline and cases[0].id == "fwd_bwd-16384x4096-bf16"
    assert sum(c.headline for c in cases) == 1
    shapes = {(c.rows, c.n) for c in cases}
    assert shapes == set(rc.GPU_SHAPES)
    assert {c.dtype_name for c in cases if (c.rows, c.n) == rc.HEADLINE_SHAPE} == {"bf16", "fp32"}
    assert {c.dtype_name for c in cases if (c.rows, c.n) != rc.HEADLINE_SHAPE} == {"bf16"}
    assert rc.GPU_BACKENDS[:3] == rc.BASELINES  # baselines first: ratios are known when kernels run


class _FakeClock:
    def __init__(self):
        self.t = 0.0


class _FakeEvent:
    """Stands in for torch.cuda.Event: record() reads a fake clock that fn() advances."""

    def __init__(self, clock):
        self.clock = clock
        self.t = None

    def record(self):
        self.t = self.clock.t

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3  # ms, like CUDA events


def test_cuda_timer_logic_with_fake_events():
    clock = _FakeClock()
    calls = {"fn": 0, "flush": 0}
    durations = [0.002] * 10_000  # 2 ms per call

    def fn():
        clock.t += durations[calls["fn"]]
        calls["fn"] += 1

    def flush():
        calls["flush"] += 1
        clock.t += 1.0  # must not be counted

    stats = bw.cuda_time(fn, warmup_ms=10, rep_ms=40, event_factory=lambda: _FakeEvent(clock),
                         synchronize=lambda: None, flush=flush)
    assert stats["median_ms"] == pytest.approx(2.0)
    assert stats["reps"] == 20 and calls["flush"] == 20  # 40 ms / 2 ms, one flush per timed call
    assert calls["fn"] == 1 + 5 + 5 + 20  # first call, estimate, warm-up, timed
    assert "cuda-events" in stats["timer"]


def test_cuda_timer_bounds_reps():
    clock = _FakeClock()

    def fn():
        clock.t += 1e-7  # 0.1 us: would want a million reps

    stats = bw.cuda_time(fn, warmup_ms=1, rep_ms=100, max_reps=50, event_factory=lambda: _FakeEvent(clock),
                         synchronize=lambda: None, flush=lambda: None)
    assert stats["reps"] == 50


def test_cpu_timer_and_copy_bandwidth():
    stats = bw.time_fn(lambda: torch.ones(1000).sum(), torch.device("cpu"), warmup_ms=1, rep_ms=5)
    assert stats["median_ms"] > 0 and stats["reps"] >= 5 and "perf_counter" in stats["timer"]
    cb = bw.copy_bandwidth("cpu", nbytes=8 << 20)
    assert cb["gbps"] > 0 and cb["bytes_moved"] == 2 * cb["nbytes"] and cb["meaningful"] is False


def _gpu_like_json(path, records, copy_gbps=4300.0, name_suffix=""):
    benchmarks = []
    for r in records:
        name = f"test_rms_norm[{r['pass']}-{r['shape']}-{r['dtype']}-{r['backend']}]"
        benchmarks.append({"name": name, "fullname": "bench/test_bench_rms_norm.py::" + name,
                           "group": "x", "extra_info": r,
                           "stats": {"median": r["median_ms"] * 1.1e-3, "rounds": 10}})
    data = {"machine_info": {}, "commit_info": {}, "benchmarks": benchmarks,
            "tokenforge": {"device": {"device": "cuda", "device_name": "NVIDIA H200", "meaningful": True,
                                      "capability": "9.0", "sm_count": 132, "l2_mib": 60, "memory_gib": 139.8},
                           "copy_bandwidth": {"gbps": copy_gbps, "nbytes": 2 << 30, "median_ms": 1.0},
                           "skipped": [{"test": "x::test_rms_norm[fwd-1x1-bf16-cuda]",
                                        "reason": "unavailable: not built"}]}}
    with open(path, "w") as fh:
        json.dump(data, fh)


def _rec(backend, ms, *, pass_="fwd_bwd", shape="16384x4096", correct=True, headline=True):
    rows, n = map(int, shape.split("x"))
    return {"op": "rms_norm", "pass": pass_, "shape": shape, "dtype": "bf16", "backend": backend,
            "median_ms": ms, "bytes": bw.rms_norm_fwd_bwd_bytes(rows, n, 2), "device": "cuda",
            "meaningful": True, "headline": headline and pass_ == "fwd_bwd", "correct": correct,
            "rel_err": {"dx": 0.5 if not correct else 1e-3}, "timer": "cuda-events, L2 flushed, median"}


def test_report_from_gpu_like_json(tmp_path, capsys):
    a = tmp_path / "headline.json"
    _gpu_like_json(a, [_rec("eager", 0.9), _rec("compile", 0.3), _rec("native", 0.45), _rec("triton", 0.2)])
    b = tmp_path / "rest.jsonl"  # a run cut short: JSON-lines side file with a truncated last line
    with open(b, "w") as fh:
        for r in [_rec("eager", 0.5, pass_="fwd", headline=False), _rec("triton", 0.1, pass_="fwd", headline=False,
                                                                         correct=False)]:
            fh.write(json.dumps({"name": "n", "fullname": "f", "extra_info": r}) + "\n")
        fh.write(json.dumps({"skipped": "bench/x::y", "reason": "unavailable: no ext"}) + "\n")
        fh.write('{"name": "cut-off')
    out = tmp_path / "out"
    rc_ = report.main([str(a), str(b), str(tmp_path / "missing.json"), "--out-dir", str(out)])
    assert rc_ == 0
    text = capsys.readouterr().out
    md = (out / "results.md").read_text()
    res = json.loads((out / "results.json").read_text())
    assert len(res["records"]) == 6
    tri = next(r for r in res["records"] if r["backend"] == "triton" and r["pass"] == "fwd_bwd")
    assert tri["speedup_vs_eager"] == pytest.approx(4.5) and tri["speedup_vs_compile"] == pytest.approx(1.5)
    assert tri["gbps"] == pytest.approx(671_244_288 / 0.2e-3 / 1e9)
    assert tri["fraction_of_copy"] == pytest.approx(tri["gbps"] / 4300.0)
    assert "NVIDIA H200" in md and "| rms_norm | fwd_bwd | 16384x4096 | bf16 | triton |" in md
    assert "WRONG" in md and "missing.json" in md and "unavailable: not built" in md
    assert "CPU run" not in md
    # summary: best tokenforge per case, headline first, printed last
    lines = text.strip().splitlines()
    assert lines[-1].startswith("copy bandwidth")
    first_case = next(ln for ln in lines if ln.startswith("rms_norm"))
    # against the best baseline measured in the run (compile, 0.3 ms), with the fraction of the floor
    assert "fwd_bwd 16384x4096" in first_case and "triton" in first_case and "compile" in first_case
    assert "1.50x" in first_case and "GB/s" in first_case


def test_report_with_nothing(tmp_path, capsys):
    assert report.main([str(tmp_path / "none.json"), "--out-dir", str(tmp_path), "--no-plot"]) == 1
    assert "No benchmark results" in (tmp_path / "results.md").read_text()


def test_gpu_check_script_syntax():
    path = os.path.join(_HERE, "gpu_check.sh")
    assert os.access(path, os.X_OK), "bench/gpu_check.sh must be executable"
    res = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------------------------
# Benchmarks cannot hide a failure (issue 11): only BackendUnavailableError means "not run here".
# ---------------------------------------------------------------------------------------------


def test_first_call_only_backend_unavailable_means_unavailable():
    import harness

    from tokenforge.backends import BackendUnavailableError

    def unavailable():
        raise BackendUnavailableError("tokenforge._C is not built")

    with pytest.raises(harness.BackendUnavailable, match="not built"):
        harness.first_call(unavailable, "cpu")
    for exc in (RuntimeError("CUDA C++ launch failed: invalid argument"), torch.OutOfMemoryError("CUDA out of memory"),
                NotImplementedError("no kernel"), ImportError("broken build")):
        def broken(exc=exc):
            raise exc

        with pytest.raises(type(exc)):
            harness.first_call(broken, "cpu")


def test_peer_import_missing_is_unavailable():
    import harness

    with pytest.raises(harness.BackendUnavailable, match="not importable"):
        harness.peer_import("tokenforge_no_such_peer", "no-such-peer", "pip install it")


def test_timer_refuses_a_figure_that_included_a_recompile():
    """A compiled baseline is timed warm; a compile inside the timed region is refused."""
    f = torch.compile(lambda x: x * 2 + 1, dynamic=False, backend="eager")
    xs = [torch.randn(n + 3) for n in range(64)]
    calls = iter(range(10_000))

    def shape_changing():
        return f(xs[next(calls) % 64])

    with pytest.raises(RuntimeError, match="recompile"):
        bw.time_fn(shape_changing, torch.device("cpu"), warmup_ms=0.0, rep_ms=5.0)
    x = torch.randn(8)
    stable = torch.compile(lambda t: t * 3, dynamic=False, backend="eager")
    stats = bw.time_fn(lambda: stable(x), torch.device("cpu"), warmup_ms=0.0, rep_ms=2.0)
    assert stats["warm_calls"] == bw.WARM_CALLS and stats["median_ms"] > 0


def test_report_lists_failed_benchmarks(tmp_path, capsys):
    path = tmp_path / "bench.jsonl"
    with open(path, "w") as fh:
        fh.write(json.dumps({"name": "n", "fullname": "f", "extra_info": _rec("eager", 0.5)}) + "\n")
        fh.write(json.dumps({"failed": "bench/test_bench_rms_norm.py::test_rms_norm[x-cuda]",
                             "error": "RuntimeError: CUDA C++ launch failed"}) + "\n")
    assert report.main([str(path), "--out-dir", str(tmp_path), "--no-plot", "--no-json"]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "FAILED" in md and "CUDA C++ launch failed" in md
    assert "FAILED: test_rms_norm[x-cuda]" in capsys.readouterr().out
    assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------------------------------------
# gpu_check.sh's explicit lists (the dry run in `make test` collects every id; this checks shape)
# ---------------------------------------------------------------------------------------------


def _ids(name):
    with open(os.path.join(_HERE, name)) as fh:
        return [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]


def test_gpu_lists_name_real_files_and_cover_every_op():
    tests, heads = _ids("gpu_tests.txt"), _ids("gpu_headlines.txt")
    root = os.path.dirname(_HERE)
    for nid in tests + heads:
        assert os.path.exists(os.path.join(root, nid.split("::")[0])), nid
    assert len(set(tests)) == len(tests) and len(set(heads)) == len(heads), "duplicate ids"
    # the headline list: one per op the issue names, baselines before the kernels they rate
    for op in ("rms_norm", "attention", "scaled_mm", "float8_linear", "adamw", "cross_entropy", "rope", "swiglu",
               "add_rms_norm"):
        assert any(f"test_{op}" in h or f"test_{op}_step" in h for h in heads), op
    for nid in heads:
        if nid.endswith(("-triton]", "-cuda]")):
            prefix = nid.rsplit("-", 1)[0]
            assert heads.index(nid) > min(i for i, h in enumerate(heads) if h.startswith(prefix)), nid
    # every CUDA C++ entry point family is exercised
    for must in ("test_extension.py::", "test_adamw.py::test_cuda_real_sizes[cuda]", "test_fp8_quantize.py::"):
        assert any(must in t for t in tests), must


def test_report_tells_ours_from_baselines_in_every_benchmark():
    """Each benchmark's backend list has tokenforge entries and baselines as the report reads them
    (the report's 'best tokenforge vs best baseline' row is empty for a benchmark it misreads)."""
    import adamw_cases
    import attention_cases
    import fp8_cases
    import grouped_mm_cases
    import moe_cases
    import muon_cases
    import rms_norm_cases
    import rope_cases
    import swiglu_cases

    lists = {
        "attention": attention_cases.GPU_BACKENDS, "fp8 gemm": fp8_cases.GEMM_BACKENDS,
        "fp8 emission": fp8_cases.EMIT_BACKENDS, "grouped_mm": grouped_mm_cases.BACKENDS, "moe": moe_cases.BACKENDS,
        "newton_schulz": muon_cases.BACKENDS, "muon step": muon_cases.STEP_BACKENDS,
        "rms_norm": rms_norm_cases.GPU_BACKENDS, "rope": rope_cases.GPU_BACKENDS, "swiglu": swiglu_cases.GPU_BACKENDS,
        "adamw": adamw_cases.GPU_MODES,
    }
    for bench, names in lists.items():
        ours = [n for n in names if report.is_tokenforge(n)]
        assert ours and len(ours) < len(names), (bench, names, ours)
    assert report.is_tokenforge("tokenforge") and report.is_tokenforge("norm_emits_fp8")
    assert not report.is_tokenforge("norm_then_quantize") and not report.is_tokenforge("torch_muon")


def test_gpu_check_keeps_its_output_small_and_flat():
    with open(os.path.join(_HERE, "gpu_check.sh")) as fh:
        text = fh.read()
    import re

    outs = set(re.findall(r'\$OUT/([A-Za-z0-9_.-]+)', text))
    assert outs <= {"log.txt", "info.json", "steps.jsonl", "tests.xml", "bench.jsonl", "e2e.json", "results.md",
                    "results.png"}, outs
    assert len(outs) <= 8
