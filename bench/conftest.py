"""pytest fixtures and hooks for the tokenforge microbenchmarks (bench/).

- ``bench_device`` (session): cuda when available (or ``TOKENFORGE_BENCH_DEVICE``), else cpu.
- ``copy_bandwidth`` (session): the memory ceiling measured once in this run
  (bandwidth.copy_bandwidth: a 2 GiB device-to-device copy on a GPU, bytes read + written).
- ``bench_recorder`` (session): stores each benchmark's record in ``benchmark.extra_info``, adds
  speedups against the baselines measured earlier in the same run, and appends the record to the
  JSON-lines file named by ``TOKENFORGE_BENCH_JSONL`` (if set) the moment it is measured, so a run
  that is cut short (timeout) still leaves its figures behind.

Hooks add to pytest-benchmark's ``--benchmark-json`` a ``"tokenforge"`` section (copy bandwidth,
device, skipped/unavailable backends) and print a compact results table in the terminal summary.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from tokenforge.testing import keep_checkout_off_sys_path

keep_checkout_off_sys_path()  # before anything imports transformers (see its docstring)

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import bandwidth as bw  # noqa: E402

_STATE: dict = {"copy": None, "device": None, "device_info": None, "records": [], "skips": []}

CPU_NOTE = ("CPU run: timings are wall-clock on tiny inputs and mean NOTHING about GPU performance; "
            "they only prove the benchmark code runs.")


def pytest_configure(config):
    config.addinivalue_line("markers", "headline: the headline benchmark, run first by bench/gpu_check.sh")
    # gpu_check.sh stops a step that overruns with SIGINT so pytest-benchmark still writes its JSON.
    # A process started in the background by a non-interactive shell inherits SIGINT *ignored*;
    # restore the default so the interrupt reaches pytest.
    try:
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except (ValueError, OSError):  # not the main thread, or no signals here
        pass


def _device():
    if _STATE["device"] is None:
        _STATE["device"] = bw.bench_device()
    return _STATE["device"]


def _device_info():
    if _STATE["device_info"] is None:
        _STATE["device_info"] = bw.device_info(_device())
    return _STATE["device_info"]


@pytest.fixture(scope="session")
def bench_device():
    return _device()


@pytest.fixture(scope="session")
def copy_bandwidth(bench_device):
    """Copy bandwidth measured in this run (dict; ``["gbps"]`` is the ceiling in GB/s)."""
    res = bw.copy_bandwidth(bench_device)
    _STATE["copy"] = res
    return res


class Recorder:
    """Collects the records of one pytest session (see module docstring)."""

    def __init__(self, device, copy):
        self.device = device
        self.copy = copy
        self.medians: dict = {}  # (op, pass, shape, dtype) -> {backend: median_ms}
        self.jsonl = os.environ.get("TOKENFORGE_BENCH_JSONL") or None

    @property
    def copy_gbps(self):
        return self.copy["gbps"] if self.copy else None

    def baselines(self, rec: dict, names) -> dict:
        key = (rec["op"], rec["pass"], rec["shape"], rec["dtype"])
        got = self.medians.get(key, {})
        return {b: got[b] for b in names if b in got and b != rec["backend"]}

    def record(self, benchmark, rec: dict, baselines=("eager", "compile", "native")) -> dict:
        key = (rec["op"], rec["pass"], rec["shape"], rec["dtype"])
        for base, ms in self.baselines(rec, baselines).items():
            if ms and rec.get("median_ms"):
                rec[f"speedup_vs_{base}"] = ms / rec["median_ms"]
        self.medians.setdefault(key, {})[rec["backend"]] = rec.get("median_ms")
        rec.setdefault("device_name", _device_info().get("device_name"))
        if benchmark is not None:
            benchmark.extra_info.update(rec)
        name = getattr(benchmark, "fullname", None) or rec.get("name") or ""
        entry = {"name": getattr(benchmark, "name", name), "fullname": name, "extra_info": rec}
        _STATE["records"].append(entry)
        if self.jsonl:
            try:
                with open(self.jsonl, "a") as fh:
                    fh.write(json.dumps(entry, default=str) + "\n")
            except OSError as exc:  # never lose a benchmark over the side file
                print(f"[bench] could not append to {self.jsonl}: {exc}", file=sys.stderr)
        return rec

    def skip(self, nodeid: str, reason: str) -> None:
        if self.jsonl:
            try:
                with open(self.jsonl, "a") as fh:
                    fh.write(json.dumps({"skipped": nodeid, "reason": reason}) + "\n")
            except OSError:
                pass


@pytest.fixture(scope="session")
def bench_recorder(bench_device, copy_bandwidth):
    return Recorder(bench_device, copy_bandwidth)


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------


def pytest_runtest_logreport(report):
    if report.failed:
        # A failure (wrong result, launch error, OOM, recompile while timing) goes into the JSON-lines
        # file too, so the report lists it as FAILED even when the run was cut short afterwards.
        path = os.environ.get("TOKENFORGE_BENCH_JSONL")
        if path:
            msg = getattr(report, "longreprtext", "") or str(report.longrepr)
            last = [line for line in msg.strip().splitlines() if line.strip()][-1:] or [""]
            try:
                with open(path, "a") as fh:
                    fh.write(json.dumps({"failed": report.nodeid, "when": report.when, "error": last[0][:400]}) + "\n")
            except OSError:
                pass
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason.startswith("Skipped: "):
            reason = reason[len("Skipped: "):]
        _STATE["skips"].append({"test": report.nodeid, "reason": reason})


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["tokenforge_bench"] = _device_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["tokenforge"] = {
        "device": _device_info(),
        "copy_bandwidth": _STATE["copy"],
        "skipped": _STATE["skips"],
        "note": None if _device_info().get("meaningful") else CPU_NOTE,
    }


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _STATE["records"] and not _STATE["skips"]:
        return
    tr = terminalreporter
    tr.section("tokenforge benchmarks")
    info = _device_info()
    tr.write_line(f"device: {info.get('device_name')}  torch {info.get('torch')}  triton {info.get('triton')}")
    copy = _STATE["copy"]
    if copy:
        tr.write_line(f"copy bandwidth: {copy['gbps']:.1f} GB/s (copy of {copy['nbytes'] / bw.GiB:.2f} GiB, "
                      f"read+write counted, median {copy['median_ms']:.3f} ms)")
    if not info.get("meaningful"):
        tr.write_line("NOTE: " + CPU_NOTE, yellow=True)
    try:
        import report as tf_report

        for line in tf_report.summary_lines([r["extra_info"] for r in _STATE["records"]],
                                            copy["gbps"] if copy else None, detailed=True):
            tr.write_line(line)
    except Exception as exc:  # noqa: BLE001 - a summary must never fail the run
        tr.write_line(f"(summary table unavailable: {type(exc).__name__}: {exc})")
    unavailable = [s for s in _STATE["skips"] if "unavailable" in s["reason"]]
    for s in unavailable:
        tr.write_line(f"skipped {s['test'].split('::')[-1]}: {s['reason']}")
