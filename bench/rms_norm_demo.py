#!/usr/bin/env python3
"""RMSNorm: tokenforge against eager PyTorch, torch.compile and torch's native op, as a plain script.

    python bench/rms_norm_demo.py            # headline shape (GPU) or a tiny shape (CPU)
    python bench/rms_norm_demo.py --all      # every benchmark case
    python bench/rms_norm_demo.py --backends triton,eager --no-compile

The same cases, inputs, correctness check and timer as bench/test_bench_rms_norm.py, without
pytest: prints one table. On a CPU the shapes are tiny and the timings mean nothing about GPU
performance (the script says so); they show that every path runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import torch  # noqa: E402

import bandwidth as bw  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402
import rms_norm_cases as rc  # noqa: E402


def run(cases, backends, device, copy_gbps, log=print):
    """Prepare, check and time each (case, backend). Returns (records, problems)."""
    records, problems = [], []
    for case in cases:
        base: dict = {}
        for backend in backends:
            t0 = time.perf_counter()
            try:
                prep = rc.prepare(case, backend, device)
                rec = rc.measure(prep, copy_gbps)
            except harness.BackendUnavailable as exc:
                problems.append(f"{case.id} {backend}: unavailable: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - a demo reports and goes on
                problems.append(f"{case.id} {backend}: ERROR {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            harness.add_ratios(rec, {b: ms for b, ms in base.items() if b != backend})
            if backend in rc.BASELINES:
                base[backend] = rec["median_ms"]
            if not rec["correct"]:
                problems.append(f"{case.id} {backend}: WRONG result, relative error {rec['rel_err']} "
                                f"(tolerance {rec['tol']:.0e})")
            records.append(rec)
            log(f"  {case.id:<24} {backend:<8} {report.fmt_time(rec['median_ms']):>10}"
                f"  ({time.perf_counter() - t0:.1f} s incl. compile and check)")
    return records, problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="RMSNorm: tokenforge vs PyTorch baselines, one table.")
    p.add_argument("--all", action="store_true", help="every benchmark case (default: headline shape only)")
    p.add_argument("--backends", help="comma-separated subset of " + ",".join(rc.CPU_BACKENDS))
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline (slow to compile)")
    a = p.parse_args(argv)

    device = bw.bench_device()
    info = bw.device_info(device)
    print(f"tokenforge RMSNorm demo on {info.get('device_name')} (torch {info['torch']}, triton {info['triton']}, "
          f"tokenforge {info['tokenforge']})")
    meaningful = device.type == "cuda"
    if not meaningful:
        print("NOTE: no GPU -- tiny shapes, wall-clock on CPU: these timings mean NOTHING about GPU performance.")
    all_cases = rc.cases(device)
    if a.all:
        cases = all_cases
    else:
        first = (all_cases[0].rows, all_cases[0].n)
        cases = [c for c in all_cases if (c.rows, c.n) == first and c.dtype == torch.bfloat16]
    backends = [b.strip() for b in a.backends.split(",")] if a.backends else list(rc.backends_for(device))
    if a.no_compile and "compile" in backends:
        backends.remove("compile")
    unknown = [b for b in backends if b not in rc.BACKEND_DESCRIPTIONS]
    if unknown:
        p.error(f"unknown backend(s) {unknown}; known: {sorted(rc.BACKEND_DESCRIPTIONS)}")

    copy = bw.copy_bandwidth(device)
    print(f"copy bandwidth: {copy['gbps']:.1f} GB/s (copy of {copy['nbytes'] / bw.GiB:.2f} GiB, read+write counted)"
          + ("" if meaningful else "  [CPU: not meaningful]"))
    records, problems = run(cases, backends, device, copy["gbps"])
    print()
    for line in report.summary_lines(records, copy["gbps"], detailed=True):
        print(line)
    print()
    print("median: median per-call time ("
          + ("CUDA events, L2 flushed" if meaningful else "perf_counter") + "); GB/s: minimum bytes / median; "
          "%copy: of the copy bandwidth; vs X: X's median / this median.")
    for msg in problems:
        print("  " + msg)
    bad = [m for m in problems if "WRONG" in m or "ERROR" in m]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
