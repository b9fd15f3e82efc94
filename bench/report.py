#!/usr/bin/env python3
"""Turn benchmark results into ``results.md`` (+ ``results.json``, optional PNG) and a summary.

    python bench/report.py bench.json [more.json ...] [--out-dir DIR] [--md F] [--json F] [--plot F]
                           [--no-plot] [--summary-only] [--summary-out F]

Inputs may be pytest-benchmark JSON files (``--benchmark-json``), the JSON-lines side files the
bench conftest writes as it goes (``TOKENFORGE_BENCH_JSONL``; used when a run was cut short) or a
``results.json`` written by this script. Records are merged (a later input wins for the same op,
pass, shape, dtype and backend); speedups are recomputed from the merged records.

Outputs (default: next to the first input): ``results.md``, a Markdown table (op, pass, shape,
dtype, backend, median time, GB/s, % of copy bandwidth, speedup vs eager, vs torch.compile, vs
torch native); ``results.json``, the merged records; ``results.png`` if matplotlib imports (the
script says so when it does not). A short summary table (the best tokenforge backend per case) is
printed to stdout, last.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
from typing import Iterable, Optional

BASELINES = ("eager", "compile", "native")
# Named ours outright: the kernel backends, the Muon step ("tokenforge": its optimizer) and the
# fused fp8 emission (its baseline, norm_then_quantize, is the unfused pair of our own kernels).
TOKENFORGE = ("triton", "cuda", "torch", "tokenforge", "norm_emits_fp8")


def is_tokenforge(backend) -> bool:
    """tokenforge's own backends (kernels, its Float8Linear recipes, its AdamW modes); everything
    else in a record is a baseline: PyTorch, torch.compile, SDPA, cuBLAS, a peer library, or the
    unfused path a fused kernel replaces."""
    b = str(backend)
    return b in TOKENFORGE or b.startswith(("fp8:", "triton_"))
REPORT_FORMAT = "tokenforge-bench-report/1"
CPU_BANNER = ("**CPU run: these timings are wall-clock on tiny inputs and mean nothing about GPU "
              "performance; they only show that the benchmark code runs.**")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"test_(?P<op>\w+?)\[(?P<pass>fwd_bwd|fwd|bwd)-(?P<shape>[\dx]+)-(?P<dtype>\w+?)-(?P<backend>\w+)\]")


def _from_pytest_benchmark(b: dict) -> dict:
    """One pytest-benchmark entry -> record (extra_info first, names and wall stats as fallback)."""
    rec = dict(b.get("extra_info") or {})
    stats = b.get("stats") or {}
    if stats.get("median") is not None:
        rec["wall_median_ms"] = stats["median"] * 1e3
        rec["wall_rounds"] = stats.get("rounds")
    if "median_ms" not in rec and "wall_median_ms" in rec:
        rec["median_ms"] = rec["wall_median_ms"]
        rec["timer"] = "pytest-benchmark wall clock (no device timer recorded)"
    m = _NAME_RE.search(b.get("name") or b.get("fullname") or "")
    if m:
        for k in ("op", "pass", "shape", "dtype", "backend"):
            rec.setdefault(k, m.group(k))
    rec.setdefault("op", b.get("group") or b.get("name") or "?")
    rec.setdefault("name", b.get("fullname") or b.get("name"))
    return rec


def load(paths: Iterable[str]) -> tuple[list[dict], dict]:
    """Records and metadata (device, copy bandwidth, skipped, machine info, sources) from inputs."""
    meta: dict = {"sources": [], "skipped": [], "failed": [], "device": None, "copy_bandwidth": None, "copy_runs": [],
                  "machine_info": None, "commit_info": None, "missing": []}
    merged: dict = {}
    order: list = []

    def add(rec: dict) -> None:
        key = (rec.get("op"), rec.get("pass"), rec.get("shape"), rec.get("dtype"), rec.get("backend"))
        if key not in merged:
            order.append(key)
        merged[key] = rec

    for path in paths:
        if not path or not os.path.exists(path) or os.path.getsize(path) == 0:
            meta["missing"].append(path)
            continue
        meta["sources"].append(path)
        if path.endswith(".jsonl"):
            with open(path) as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if "extra_info" in entry:
                        rec = dict(entry["extra_info"])
                        rec.setdefault("name", entry.get("fullname") or entry.get("name"))
                        add(rec)
                    elif "skipped" in entry:
                        meta["skipped"].append({"test": entry["skipped"], "reason": entry.get("reason", "")})
                    elif "failed" in entry:
                        meta["failed"].append({"test": entry["failed"], "error": entry.get("error", "")})
            continue
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"[report] cannot read {path}: {exc}", file=sys.stderr)
            meta["missing"].append(path)
            continue
        if data.get("format") == REPORT_FORMAT:
            for rec in data.get("records", []):
                add(dict(rec))
            for k in ("device", "copy_bandwidth", "machine_info", "commit_info"):
                meta[k] = meta[k] or data.get(k)
            meta["skipped"] += data.get("skipped", [])
            meta["copy_runs"] += data.get("copy_runs", [])
            continue
        for b in data.get("benchmarks", []):
            add(_from_pytest_benchmark(b))
        tf = data.get("tokenforge") or {}
        meta["device"] = meta["device"] or tf.get("device")
        meta["copy_bandwidth"] = meta["copy_bandwidth"] or tf.get("copy_bandwidth")
        if tf.get("copy_bandwidth"):
            meta["copy_runs"].append(dict(tf["copy_bandwidth"], source=os.path.basename(path)))
        meta["skipped"] += tf.get("skipped", [])
        meta["machine_info"] = meta["machine_info"] or data.get("machine_info")
        meta["commit_info"] = meta["commit_info"] or data.get("commit_info")
    # De-duplicate skips (a JSON and its JSONL side file both list them).
    seen, skips = set(), []
    for s in meta["skipped"]:
        k = (s.get("test"), s.get("reason"))
        if k not in seen:
            seen.add(k)
            skips.append(s)
    meta["skipped"] = skips
    records = [merged[k] for k in order]
    recompute(records, meta)
    return records, meta


def copy_gbps_of(meta: dict, records: list[dict]) -> Optional[float]:
    cb = meta.get("copy_bandwidth") or {}
    if cb.get("gbps"):
        return cb["gbps"]
    for r in records:
        if r.get("copy_gbps"):
            return r["copy_gbps"]
    return None


def _case_key(r: dict) -> tuple:
    return (r.get("op"), r.get("pass"), r.get("shape"), r.get("dtype"))


def recompute(records: list[dict], meta: dict) -> None:
    """Fill GB/s, fraction of copy and speedups from the merged records (same case, same run set)."""
    base: dict = {}
    for r in records:
        if r.get("backend") in BASELINES and _num(r.get("median_ms")):
            base.setdefault(_case_key(r), {})[r["backend"]] = r["median_ms"]
    copy = copy_gbps_of(meta, records)
    for r in records:
        med = _num(r.get("median_ms"))
        if med and _num(r.get("bytes")) and not _num(r.get("gbps")):
            r["gbps"] = r["bytes"] / (med * 1e-3) / 1e9
        cg = _num(r.get("copy_gbps")) or copy
        if cg and _num(r.get("gbps")):
            r["copy_gbps"] = cg
            r["fraction_of_copy"] = r["gbps"] / cg
            if _num(r.get("bytes")):
                r["floor_ms"] = r["bytes"] / (cg * 1e9) * 1e3
        for b, ms in base.get(_case_key(r), {}).items():
            if med and b != r.get("backend"):
                r[f"speedup_vs_{b}"] = ms / med


def _num(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def fmt_time(ms) -> str:
    v = _num(ms)
    if v is None:
        return "-"
    us = v * 1e3
    if us >= 1e5:
        return f"{v:.1f} ms"
    return f"{us:.1f} µs" if us < 1000 else f"{us:.0f} µs"


def fmt_num(v, digits=1) -> str:
    v = _num(v)
    return "-" if v is None else f"{v:.{digits}f}"


def fmt_pct(v) -> str:
    v = _num(v)
    return "-" if v is None else f"{100 * v:.0f}%"


def fmt_x(v) -> str:
    v = _num(v)
    if v is None:
        return "-"
    return f"{v:.2f}x" if v >= 0.1 else f"{v:.2g}x"


def _notes(r: dict) -> str:
    notes = []
    if r.get("headline"):
        notes.append("headline")
    if r.get("correct") is False:
        errs = r.get("rel_err") or {}
        worst = max(errs.items(), key=lambda kv: _num(kv[1]) if _num(kv[1]) is not None else math.inf,
                    default=("?", None))
        notes.append(f"WRONG (rel err {worst[0]} {worst[1]})")
    if r.get("meaningful") is False:
        notes.append("cpu")
    return ", ".join(notes)


def sorted_records(records: list[dict]) -> list[dict]:
    """Headline case(s) first, then cases in first-seen order; backends in BASELINES+TOKENFORGE order."""
    case_order: dict = {}
    for r in records:
        case_order.setdefault(_case_key(r), len(case_order))
    headline = {_case_key(r) for r in records if r.get("headline")}
    border = {b: i for i, b in enumerate(BASELINES + TOKENFORGE)}
    return sorted(records, key=lambda r: (0 if _case_key(r) in headline else 1, case_order[_case_key(r)],
                                          border.get(r.get("backend"), 99)))


MD_COLUMNS = ["op", "pass", "shape", "dtype", "backend", "median time", "floor", "GB/s", "% of copy BW",
              "vs eager", "vs torch.compile", "vs torch native", "notes"]


def markdown_table(records: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(MD_COLUMNS) + " |", "|" + "|".join(["---"] * len(MD_COLUMNS)) + "|"]
    for r in sorted_records(records):
        row = [str(r.get("op", "?")), str(r.get("pass", "?")), str(r.get("shape", "?")), str(r.get("dtype", "?")),
               str(r.get("backend", "?")), fmt_time(r.get("median_ms")), fmt_time(r.get("floor_ms")), fmt_num(r.get("gbps")),
               fmt_pct(r.get("fraction_of_copy")), fmt_x(r.get("speedup_vs_eager")),
               fmt_x(r.get("speedup_vs_compile")), fmt_x(r.get("speedup_vs_native")), _notes(r)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def copy_note(meta: dict, records: list[dict]) -> Optional[str]:
    """'4301.2 GB/s', or one figure per pytest run when several were merged."""
    runs = [c for c in meta.get("copy_runs") or [] if _num(c.get("gbps"))]
    if len(runs) > 1:
        return ", ".join(f"{c['gbps']:.1f} GB/s ({c.get('source', '?')})" for c in runs)
    cg = copy_gbps_of(meta, records)
    return f"{cg:.1f} GB/s" if cg else None


def summary_lines(records: list[dict], copy_gbps=None, detailed: bool = False) -> list[str]:
    """Short summary: per case, the best tokenforge backend against the baselines (``detailed``:
    one line per record instead)."""
    if not records:
        return ["(no benchmark results)"]
    if detailed:
        header = ["case", "backend", "median", "GB/s", "%copy", "vs eager", "vs compile", "vs native", "notes"]
        rows = []
        for r in sorted_records(records):
            rows.append([f"{r.get('op')} {r.get('pass')} {r.get('shape')} {r.get('dtype')}", str(r.get("backend")),
                         fmt_time(r.get("median_ms")), fmt_num(r.get("gbps")), fmt_pct(r.get("fraction_of_copy")),
                         fmt_x(r.get("speedup_vs_eager")), fmt_x(r.get("speedup_vs_compile")),
                         fmt_x(r.get("speedup_vs_native")), _notes(r)])
        return _text_table(header, rows)
    by_case: dict = {}
    for r in sorted_records(records):
        by_case.setdefault(_case_key(r), []).append(r)
    # Every op, one line: the best tokenforge backend against the best baseline measured in the same
    # run (eager / compile / SDPA / cuBLAS / torch's fused AdamW / a peer), with its rate and its
    # fraction of the floor (copy bandwidth for memory-bound ops, matmul rate for compute-bound).
    header = ["case", "best tokenforge", "median", "rate", "of floor", "best baseline", "vs best baseline"]
    rows = []
    for key, rs in by_case.items():
        tf = [r for r in rs if is_tokenforge(r.get("backend")) and _num(r.get("median_ms"))]
        bl = [r for r in rs if not is_tokenforge(r.get("backend")) and _num(r.get("median_ms"))]
        best = min(tf, key=lambda r: r["median_ms"]) if tf else None
        bbest = min(bl, key=lambda r: r["median_ms"]) if bl else None
        case = " ".join(str(k) for k in key)
        bcell = f"{bbest['backend']} {fmt_time(bbest['median_ms'])}" if bbest else "-"
        if best is None:
            rows.append([case, "(none ran)", "-", "-", "-", bcell, "-"])
            continue
        name = best["backend"] + (" WRONG" if best.get("correct") is False else "")
        if _num(best.get("tflops")):
            rate = f"{best['tflops']:.0f} TFLOP/s"
        elif _num(best.get("gbps")):
            rate = f"{best['gbps']:.0f} GB/s"
        else:
            rate = "-"
        floor = best.get("fraction_of_copy") if _num(best.get("fraction_of_copy")) else best.get("fraction_of_matmul")
        ratio = fmt_x(bbest["median_ms"] / best["median_ms"]) if bbest else "-"
        rows.append([case, name, fmt_time(best.get("median_ms")), rate, fmt_pct(floor), bcell, ratio])
    out = _text_table(header, rows)
    if isinstance(copy_gbps, str):
        out.append(f"copy bandwidth (ceiling, read+write): {copy_gbps}")
    elif _num(copy_gbps):
        out.append(f"copy bandwidth (ceiling, read+write): {copy_gbps:.1f} GB/s")
    return out


def markdown(records: list[dict], meta: dict) -> str:
    dev = meta.get("device") or {}
    copy = meta.get("copy_bandwidth") or {}
    cpu = dev.get("meaningful") is False or any(r.get("meaningful") is False for r in records)
    lines = ["# tokenforge microbenchmarks", ""]
    lines.append(f"Generated {_dt.datetime.now().isoformat(timespec='seconds')} from "
                 f"{', '.join(os.path.basename(s) for s in meta.get('sources', [])) or 'nothing'}.")
    lines.append("")
    if dev:
        lines.append(f"- device: {dev.get('device_name', dev.get('device'))}"
                     + (f" (sm {dev['capability']}, {dev.get('sm_count')} SMs, L2 {dev.get('l2_mib')} MiB, "
                        f"{dev.get('memory_gib')} GiB)" if dev.get("capability") else ""))
        lines.append(f"- torch {dev.get('torch')}, CUDA {dev.get('cuda_runtime', '-')}, triton {dev.get('triton')}, "
                     f"tokenforge {dev.get('tokenforge')}, TRITON_INTERPRET={dev.get('triton_interpret') or 'unset'}")
    cg = copy_gbps_of(meta, records)
    if cg:
        extra = ""
        if copy.get("nbytes"):
            extra = f" (device-to-device copy of {copy['nbytes'] / (1 << 30):.2f} GiB, bytes read + written, " \
                    f"median {copy.get('median_ms', 0):.3f} ms)"
        lines.append(f"- copy bandwidth, measured in the same run: **{cg:.1f} GB/s**{extra}")
        runs = meta.get("copy_runs") or []
        if len(runs) > 1:
            lines.append("- copy bandwidth of each pytest run (each record's % of copy uses its own run's): "
                         + ", ".join(f"{c.get('source', '?')}: {c['gbps']:.1f} GB/s" for c in runs if c.get("gbps")))
    timers = sorted({str(r.get("timer")) for r in records if r.get("timer")})
    if timers:
        lines.append(f"- timer: {'; '.join(timers)}")
    lines.append("")
    if cpu:
        lines += [CPU_BANNER, ""]
    if meta.get("missing"):
        lines += [f"Missing or unreadable inputs (a step may have failed or been cut short): "
                  f"{', '.join(str(m) for m in meta['missing'])}", ""]
    if not records:
        lines += ["**No benchmark results were produced.**", ""]
    else:
        lines += markdown_table(records) + [""]
    lines += [
        "Median time: median over many calls after warm-up (CUDA events with L2 flushed before each call on a "
        "GPU). Floor: minimum bytes / copy bandwidth, the time no implementation beats by much. GB/s: minimum bytes moved / median time (decimal GB). % of copy BW: that over the copy bandwidth "
        "above, i.e. how close the op runs to the memory floor. vs X: X's median / this median (>1 is faster "
        "than X). RMSNorm bytes: fwd = read x + read w + write y + write rstd (4 B/row); fwd+bwd = fwd + read dy, "
        "x, w, rstd + write dx, dw (bench/bandwidth.py).",
        "",
    ]
    if meta.get("failed"):
        lines += ["**FAILED** (an error other than 'backend unavailable': a bug to fix, never a skip):", ""]
        for f in meta["failed"]:
            lines.append(f"- `{str(f.get('test', '')).split('::')[-1]}`: {f.get('error', '')}")
        lines.append("")
    if meta.get("skipped"):
        lines += ["Not run here:", ""]
        for s in meta["skipped"]:
            lines.append(f"- `{str(s.get('test', '')).split('::')[-1]}`: {s.get('reason', '')}")
        lines.append("")
    lines += (["Summary (best tokenforge backend per case):", "", "```"]
              + summary_lines(records, copy_note(meta, records)) + ["```", ""])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def plot(records: list[dict], meta: dict, path: str) -> str:
    """One PNG: a panel per (op, pass), GB/s per case and backend, the copy bandwidth as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"no plot: matplotlib is not importable ({type(exc).__name__})"
    recs = [r for r in records if _num(r.get("gbps"))]
    if not recs:
        return "no plot: no records with GB/s"
    panels: dict = {}
    for r in sorted_records(recs):
        panels.setdefault((r.get("op"), r.get("pass")), []).append(r)
    backends = [b for b in BASELINES + TOKENFORGE if any(r.get("backend") == b for r in recs)]
    backends += sorted({r.get("backend") for r in recs} - set(backends))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    cg = copy_gbps_of(meta, records)
    width = 0.8 / max(1, len(backends))
    for ax, ((op, ps), rs) in zip(axes[:, 0], panels.items()):
        cases = []
        for r in rs:
            c = f"{r.get('shape')}\n{r.get('dtype')}"
            if c not in cases:
                cases.append(c)
        top = cg or 0.0
        for i, b in enumerate(backends):
            xs, ys, wrong = [], [], []
            for j, c in enumerate(cases):
                for r in rs:
                    if r.get("backend") == b and f"{r.get('shape')}\n{r.get('dtype')}" == c:
                        xs.append(j + (i - (len(backends) - 1) / 2) * width)
                        ys.append(r["gbps"])
                        wrong.append(r.get("correct") is False)
            if xs:
                # One colour per backend in every panel.
                ax.bar(xs, ys, width=width, label=b, color=f"C{i % 10}")
                for x, y, w in zip(xs, ys, wrong):
                    if w:
                        ax.text(x, y, "WRONG", ha="center", va="bottom", fontsize=7, color="red")
                top = max(top, max(ys))
        if cg:
            ax.axhline(cg, color="k", linestyle="--", linewidth=1, label=f"copy {cg:.0f} GB/s")
        ax.set_ylim(0, top * 1.3 if top > 0 else 1)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, fontsize=8)
        ax.set_ylabel("GB/s (min bytes / median)")
        ax.set_title(f"{op} {ps}")
        ax.legend(fontsize=7, ncol=len(backends) + 1, loc="upper left")
    dev = (meta.get("device") or {}).get("device_name", "")
    fig.suptitle(f"tokenforge microbenchmarks: {dev}" + ("  (CPU: not meaningful)" if (meta.get("device") or {}).get("meaningful") is False else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def results_json(records: list[dict], meta: dict) -> dict:
    return {
        "format": REPORT_FORMAT,
        "generated": _dt.datetime.now().isoformat(timespec="seconds"),
        "sources": meta.get("sources", []),
        "missing": meta.get("missing", []),
        "device": meta.get("device"),
        "copy_bandwidth": meta.get("copy_bandwidth"),
        "copy_runs": meta.get("copy_runs", []),
        "machine_info": meta.get("machine_info"),
        "commit_info": meta.get("commit_info"),
        "skipped": meta.get("skipped", []),
        "records": records,
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="pytest-benchmark JSON, conftest JSONL, or a results.json")
    p.add_argument("--out-dir", "--out", dest="out_dir", help="where results.md/json/png go (default: the first input's folder)")
    p.add_argument("--md", help="Markdown output (default OUT_DIR/results.md)")
    p.add_argument("--json", dest="json_out", help="merged JSON output (default OUT_DIR/results.json)")
    p.add_argument("--plot", help="PNG output (default OUT_DIR/results.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-json", action="store_true", help="no results.json (the JSONL input already holds the records)")
    p.add_argument("--summary-only", action="store_true", help="print the summary, write nothing")
    p.add_argument("--summary-out", help="also write the summary table to this file")
    p.add_argument("--detailed", action="store_true", help="summary with one line per backend")
    a = p.parse_args(argv)

    records, meta = load(a.inputs)
    cg = copy_gbps_of(meta, records)
    dev = meta.get("device") or {}
    cpu = dev.get("meaningful") is False or any(r.get("meaningful") is False for r in records)
    lines = []
    if cpu:
        lines.append("NOTE: CPU run -- timings are not meaningful for performance.")
    lines += summary_lines(records, copy_note(meta, records), detailed=a.detailed)
    lines += [f"FAILED: {f['test'].split('::')[-1]}: {f.get('error', '')[:160]}" for f in meta.get("failed", [])]
    summary = "\n".join(lines)

    if not a.summary_only:
        out_dir = a.out_dir or os.path.dirname(os.path.abspath(a.inputs[0]))
        os.makedirs(out_dir, exist_ok=True)
        md_path = a.md or os.path.join(out_dir, "results.md")
        json_path = a.json_out or os.path.join(out_dir, "results.json")
        with open(md_path, "w") as fh:
            fh.write(markdown(records, meta))
        if not a.no_json:
            with open(json_path, "w") as fh:
                json.dump(results_json(records, meta), fh, indent=1, default=str)
        print(f"[report] wrote {md_path}{'' if a.no_json else ' and ' + json_path} ({len(records)} records)")
        if a.no_plot:
            print("[report] no plot (--no-plot)")
        else:
            print("[report] " + plot(records, meta, a.plot or os.path.join(out_dir, "results.png")))
    if a.summary_out:
        with open(a.summary_out, "w") as fh:
            fh.write(summary + "\n")
    try:
        print(summary, flush=True)
    except BrokenPipeError:  # `| head`
        pass
    return 0 if records else 1


if __name__ == "__main__":
    raise SystemExit(main())
