"""The cost model: what training a model costs in GPU-hours, days and dollars, and what a budget buys.

    training FLOPs = tokens x flops_per_token       flops_per_token = 6 N (+ 12 L d T attention)
    GPU-hours      = FLOPs / (peak FLOP/s x MFU) / 3600
    dollars        = GPU-hours x price per GPU-hour

N is the parameters that take part in matmuls (for a mixture of experts: the *active* ones, which is
why DeepSeek-V3's 671B parameters cost like a 37B dense model per token). The attention term is the
PaLM/Megatron MFU convention (scores + values, forward and backward, no causal discount), added when
the layer count and attention width are known. MFU is always relative to the *dense bf16* peak of
the GPU unless --fp8-peak is asked for, so numbers stay comparable across recipes.

    tokenforge cost --params 70e9 --gpu H100 --mfu 0.4 --price 2.5 --gpus 1024
    tokenforge cost --active-params 37e9 --tokens 14.8e12 --gpu H800 --mfu 0.35
    tokenforge cost --params 8e9 --from-results bench/results/latest/compare.json
    tokenforge cost --seed-table [--from-results compare.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Optional

# ---------------------------------------------------------------------------------------------
# GPU peaks: dense (no 2:4 sparsity) tensor-core throughput in FLOP/s, SXM parts.
# ---------------------------------------------------------------------------------------------
# Sources (vendor datasheets; their headline numbers are "with sparsity", i.e. 2x these):
#   A100 SXM  : NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 sparse); no FP8 tensor cores.
#   H100 SXM  : NVIDIA H100 datasheet: BF16 1,979 TFLOPS and FP8 3,958 TFLOPS *with sparsity*
#               -> 989.4 / 1,978.9 dense.
#   H100 PCIe : same datasheet: BF16 1,513 / FP8 3,026 with sparsity -> 756 / 1,513 dense.
#   H800 SXM  : the export variant of the H100 SXM: same SMs and clocks (same tensor-core peak),
#               NVLink cut to 400 GB/s. DeepSeek-V3's report uses it.
#   H200 SXM  : NVIDIA H200 datasheet: BF16 1,979 / FP8 3,958 with sparsity (the H100 SXM die with
#               141 GB HBM3e) -> 989.4 / 1,978.9 dense.
#   B200      : NVIDIA HGX B200 datasheet: BF16 4.5 PFLOPS and FP8 9 PFLOPS with sparsity per GPU
#               -> 2,250 / 4,500 dense.
@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float           # dense bf16 tensor-core peak, FLOP/s
    fp8_flops: Optional[float]  # dense fp8 peak, FLOP/s; None: no fp8 tensor cores
    price: float                # assumed on-demand $/GPU-hour (see PRICE_NOTE)


PRICE_NOTE = ("prices are assumed cloud on-demand rates per GPU-hour (2025 list prices vary by "
              "provider; pass --price for yours)")

GPUS: dict[str, GPU] = {
    "A100": GPU("A100", 312e12, None, 1.80),
    "H100": GPU("H100", 989.4e12, 1978.9e12, 2.50),
    "H100-PCIE": GPU("H100-PCIE", 756e12, 1513e12, 2.20),
    "H800": GPU("H800", 989.4e12, 1978.9e12, 2.00),  # DeepSeek-V3 report's own assumption: $2/h
    "H200": GPU("H200", 989.4e12, 1978.9e12, 3.50),
    "B200": GPU("B200", 2250e12, 4500e12, 6.00),
}


def gpu_spec(name: str) -> GPU:
    """The GPU table entry for ``name`` ('H100', 'h200', or a torch device name such as
    'NVIDIA H100 80GB HBM3'); ValueError naming the known ones otherwise."""
    found = match_gpu(name)
    if found is None:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)} (or pass --peak-tflops)")
    return found


def match_gpu(device_name: str) -> Optional[GPU]:
    """The table entry a device name refers to, or None (e.g. a CPU or an unlisted GPU)."""
    key = device_name.upper().replace("NVIDIA", "").strip()
    if key in GPUS:
        return GPUS[key]
    if "H100" in key and "PCIE" in key:
        return GPUS["H100-PCIE"]
    for short in ("B200", "H200", "H800", "H100", "A100"):
        if short in key:
            return GPUS[short]
    return None


# ---------------------------------------------------------------------------------------------
# The arithmetic
# ---------------------------------------------------------------------------------------------

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal ~20 tokens per parameter


def flops_per_token(params: float, n_layers: int = 0, attn_dim: int = 0, seq_len: int = 0) -> float:
    """Training FLOPs per token: 6 N for the matmuls, plus 12 L d T for attention when the layer
    count L, attention width d (heads x head_dim) and sequence length T are given."""
    return 6.0 * params + 12.0 * n_layers * attn_dim * seq_len


@dataclass
class Estimate:
    params: float               # parameters that do work per token (active ones for MoE)
    tokens: float
    flops_per_token: float
    flops: float
    gpu: str
    peak_flops: float           # FLOP/s the MFU is relative to
    mfu: float
    price: float                # $/GPU-hour
    gpus: int
    gpu_hours: float
    days: float                 # wall-clock days on `gpus` GPUs
    dollars: float
    usd_per_mtok: float

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(params: float, tokens: Optional[float] = None, *, gpu: str = "H100", mfu: float = 0.4,
             price: Optional[float] = None, gpus: int = 1024, peak_flops: Optional[float] = None,
             fp8_peak: bool = False, n_layers: int = 0, attn_dim: int = 0, seq_len: int = 0,
             fpt: Optional[float] = None) -> Estimate:
    """GPU-hours, days on ``gpus`` GPUs and dollars to train ``params`` (active) parameters on
    ``tokens`` tokens (default Chinchilla: 20 x params) at ``mfu`` of the GPU's dense peak."""
    if params <= 0:
        raise ValueError(f"params must be positive, got {params}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu is a fraction of peak in (0, 1], got {mfu}; e.g. 0.4 for 40%")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    spec = gpu_spec(gpu)
    if peak_flops is None:
        if fp8_peak and spec.fp8_flops is None:
            raise ValueError(f"{spec.name} has no fp8 tensor cores; drop --fp8-peak")
        peak_flops = spec.fp8_flops if fp8_peak else spec.bf16_flops
    price = spec.price if price is None else price
    tokens = CHINCHILLA_TOKENS_PER_PARAM * params if tokens is None else tokens
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    fpt = flops_per_token(params, n_layers, attn_dim, seq_len) if fpt is None else fpt
    flops = tokens * fpt
    gpu_hours = flops / (peak_flops * mfu) / 3600.0
    dollars = gpu_hours * price
    return Estimate(params=params, tokens=tokens, flops_per_token=fpt, flops=flops, gpu=spec.name,
                    peak_flops=peak_flops, mfu=mfu, price=price, gpus=gpus, gpu_hours=gpu_hours,
                    days=gpu_hours / gpus / 24.0, dollars=dollars, usd_per_mtok=dollars / tokens * 1e6)


def tokens_for_budget(budget: float, params: float, *, gpu: str = "H100", mfu: float = 0.4,
                      price: Optional[float] = None, fpt: Optional[float] = None,
                      peak_flops: Optional[float] = None) -> float:
    """How many training tokens ``budget`` dollars buy for a ``params``-parameter model."""
    spec = gpu_spec(gpu)
    price = spec.price if price is None else price
    peak_flops = spec.bf16_flops if peak_flops is None else peak_flops
    fpt = flops_per_token(params) if fpt is None else fpt
    return budget / price * 3600.0 * peak_flops * mfu / fpt


# ---------------------------------------------------------------------------------------------
# Measured results (a `tokenforge train --compare --json` file)
# ---------------------------------------------------------------------------------------------


def load_results(path: str) -> dict:
    """The measured MFUs of a compare JSON: {'gpu': name, 'mfu': {variant: mfu}, 'preset': ...};
    ValueError when the file has no MFU (e.g. it was measured on a CPU, which has no peak)."""
    with open(path) as f:
        data = json.load(f)
    rows = data.get("rows")
    if not isinstance(rows, list):
        raise ValueError(f"{path} is not a `tokenforge train --compare` JSON (no 'rows' list)")
    mfu = {r["variant"]: r["mfu"] for r in rows if r.get("mfu")}
    if not mfu:
        raise ValueError(f"{path} has no measured MFU (device {data.get('device_name', '?')!r} has no peak in the "
                         "table, e.g. a CPU run): measure on a GPU, or pass --mfu")
    return {"gpu": data.get("device_name"), "mfu": mfu, "preset": data.get("preset"),
            "seq_len": data.get("seq_len"), "path": path}


def _pick(mfu: dict, *names: str) -> Optional[tuple[str, float]]:
    for n in names:
        if n in mfu:
            return n, mfu[n]
    return None


def best_kernels_mfu(mfu: dict) -> Optional[tuple[str, float]]:
    """The fastest measured kernels-on variant (bf16 recipe; fp8 counted against the bf16 peak)."""
    on = {k: v for k, v in mfu.items() if k.startswith("kernels")}
    if not on:
        return None
    k = max(on, key=on.get)
    return k, on[k]


# ---------------------------------------------------------------------------------------------
# The seed table
# ---------------------------------------------------------------------------------------------

SEED_SIZES = (("1T", 1e12), ("500B", 500e9), ("250B", 250e9), ("100B", 100e9))
# Assumed MFUs when no measured results are given. Off: ~40% is what well-tuned large dense runs
# report on H100s with stock PyTorch-level kernels (Llama 3 405B: 38-43%, Table 4 of the Llama 3
# paper). On: the goal for tokenforge (>= 1.4x eager throughput on the 1b preset) applied
# conservatively to a large model whose time is dominated by GEMMs: +25% relative -> 50%.
ASSUMED_MFU_OFF = 0.40
ASSUMED_MFU_ON = 0.50
SEED_BUDGET = 100_000.0


def seed_table(gpu: str = "H100", price: Optional[float] = None, gpus: int = 16384,
               results: Optional[dict] = None, budget: float = SEED_BUDGET) -> dict:
    """Rows of (size, kernels off/on): Chinchilla tokens, GPU-hours, days, dollars, $/Mtok, and the
    tokens ``budget`` buys; MFUs measured (``results``) or the labelled assumptions."""
    if results:
        off = _pick(results["mfu"], "eager")
        on = best_kernels_mfu(results["mfu"])
        if off is None or on is None:
            raise ValueError(f"{results['path']} needs an 'eager' row and a 'kernels' row with MFU "
                             f"(has {sorted(results['mfu'])})")
        source = (f"measured: {results['path']} ({results.get('preset')} preset on {results.get('gpu')}): "
                  f"eager MFU {off[1]:.1%}, {on[0]} MFU {on[1]:.1%}")
        mfu_off, mfu_on = off[1], on[1]
    else:
        source = (f"ASSUMED MFU (no measured results given): kernels off {ASSUMED_MFU_OFF:.0%} (typical of large "
                  f"runs), on {ASSUMED_MFU_ON:.0%} (tokenforge's goal, unmeasured); pass --from-results "
                  "compare.json for measured ones")
        mfu_off, mfu_on = ASSUMED_MFU_OFF, ASSUMED_MFU_ON
    rows = []
    for label, n in SEED_SIZES:
        for kernels, m in (("off", mfu_off), ("on", mfu_on)):
            e = estimate(n, gpu=gpu, mfu=m, price=price, gpus=gpus)
            rows.append({"size": label, "kernels": kernels, **e.to_dict(),
                         "budget_tokens": tokens_for_budget(budget, n, gpu=gpu, mfu=m, price=e.price)})
    return {"source": source, "gpu": gpu_spec(gpu).name, "gpus": gpus, "budget": budget,
            "price_note": PRICE_NOTE, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Formatting and the command
# ---------------------------------------------------------------------------------------------


def human(x: float, unit: str = "") -> str:
    """1.23T / 456B / 7.8M / 9.1K style numbers."""
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def dollars(x: float) -> str:
    if x >= 1e9:
        return f"${x / 1e9:.2f}B"
    if x >= 1e6:
        return f"${x / 1e6:.2f}M"
    if x >= 1e3:
        return f"${x / 1e3:.1f}K"
    return f"${x:.2f}"


def format_seed_table(t: dict) -> str:
    lines = [f"Training cost at Chinchilla 20 tokens/param on {t['gpus']} x {t['gpu']} (dense bf16 peak "
             f"{GPUS[t['gpu']].bf16_flops / 1e12:.0f} TFLOP/s) at ${t['rows'][0]['price']:.2f}/GPU-hour",
             f"  MFU source: {t['source']}",
             f"  {t['price_note']}",
             "",
             f"  {'params':>6} {'kernels':>7} {'MFU':>5} {'tokens':>7} {'GPU-hours':>10} {'days':>7} {'cost':>9} "
             f"{'$/Mtok':>8} {'$' + human(t['budget']) + ' buys':>12}"]
    for r in t["rows"]:
        lines.append(f"  {r['size']:>6} {r['kernels']:>7} {r['mfu']:>5.0%} {human(r['tokens']):>7} "
                     f"{human(r['gpu_hours']):>10} {r['days']:>7.1f} {dollars(r['dollars']):>9} "
                     f"{r['usd_per_mtok']:>8.3f} {human(r['budget_tokens']) + ' tok':>12}")
    lines.append("  FLOPs/token = 6 N (the attention term, ~5-10% more at 4-8k sequence length, is left out)")
    if t["source"].startswith("measured"):
        lines.append("  the measured MFU of a small preset stands in for every size: a proxy (large runs add "
                     "communication and pipeline bubbles)")
    off = {r["size"]: r for r in t["rows"] if r["kernels"] == "off"}
    on = {r["size"]: r for r in t["rows"] if r["kernels"] == "on"}
    saved = off["1T"]["dollars"] - on["1T"]["dollars"]
    share = saved / off["1T"]["dollars"]
    if t["source"].startswith("measured"):
        lines += ["", f"  kernels on saves {dollars(saved)} ({share:.0%}) on the 1T run, at the measured MFUs"]
    else:
        # No measurement: the "on" rows are the goal, not a result; say so rather than claim a saving.
        lines += ["", f"  'on' rows use tokenforge's GOAL MFU ({ASSUMED_MFU_ON:.0%}), not a measurement: if it is "
                      f"reached, the 1T run costs {dollars(saved)} ({share:.0%}) less. Measure with "
                      "`tokenforge train --compare --json F` on a GPU and pass --from-results F."]
    return "\n".join(lines)


def format_estimate(e: Estimate, budget: Optional[float] = None, mfu_source: str = "") -> str:
    lines = [f"model     {human(e.params)} params (doing work per token), {human(e.tokens)} tokens "
             f"({e.tokens / e.params:.1f} tokens/param)",
             f"compute   {e.flops_per_token:.3e} FLOP/token x tokens = {e.flops:.3e} FLOP",
             f"hardware  {e.gpu} at {e.peak_flops / 1e12:.0f} TFLOP/s peak x MFU {e.mfu:.1%}"
             + (f" ({mfu_source})" if mfu_source else ""),
             f"GPU-hours {human(e.gpu_hours)}  ->  {e.days:.1f} days on {e.gpus} GPUs",
             f"cost      {dollars(e.dollars)} at ${e.price:.2f}/GPU-hour  ({e.usd_per_mtok:.4f} $/M tokens)"]
    if budget is not None:
        toks = budget / e.usd_per_mtok * 1e6
        lines.append(f"budget    {dollars(budget)} buys {human(toks)} tokens ({toks / e.params:.2f} tokens/param)")
    return "\n".join(lines)


def _float(s: str) -> float:
    """Accept 70e9, 70B, 1.5T, 300M, 2K."""
    s = s.strip()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}
    if s and s[-1].upper() in mult:
        return float(s[:-1]) * mult[s[-1].upper()]
    return float(s)


def add_arguments(p: argparse.ArgumentParser) -> None:
    size = p.add_argument_group("model")
    size.add_argument("--params", type=_float, help="dense parameter count, e.g. 70e9 or 70B")
    size.add_argument("--active-params", type=_float, help="MoE: parameters active per token (used for FLOPs)")
    size.add_argument("--preset", help="take N and the attention term from a tokenforge.models preset")
    size.add_argument("--layers", type=int, default=0, help="layers, to add the 12 L d T attention FLOPs")
    size.add_argument("--attn-dim", type=int, default=0, help="attention width heads x head_dim (with --layers)")
    size.add_argument("--seq-len", type=int, default=0, help="training sequence length (with --layers)")
    run = p.add_argument_group("run")
    run.add_argument("--tokens", type=_float, help="training tokens (default: Chinchilla, 20 x params)")
    run.add_argument("--gpu", default=None, help=f"one of {', '.join(GPUS)} (default H100, or the results' GPU)")
    run.add_argument("--mfu", type=float, help=f"model FLOPs utilisation, fraction (default {ASSUMED_MFU_OFF})")
    run.add_argument("--price", type=float, help="$ per GPU-hour (default: the table's assumed rate)")
    run.add_argument("--gpus", type=int, default=None,
                     help="GPUs in the job, for wall-clock days (default 1024; 16384 for --seed-table)")
    run.add_argument("--budget", type=_float, help="also say how many tokens this many dollars buy")
    run.add_argument("--peak-tflops", type=float, help="override the GPU's dense peak (TFLOP/s)")
    run.add_argument("--fp8-peak", action="store_true", help="MFU relative to the fp8 peak instead of bf16")
    run.add_argument("--from-results", metavar="FILE", help="use the MFU measured by `tokenforge train --compare`")
    run.add_argument("--variant", default=None, help="which measured variant's MFU (default: best kernels-on)")
    p.add_argument("--seed-table", action="store_true", help="the 1T/500B/250B/100B table, kernels off vs on")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    results = None
    if args.from_results:
        try:
            results = load_results(args.from_results)
        except ValueError as exc:
            if not args.seed_table:
                raise
            # The table still means something with the labelled assumptions (e.g. `make demo` on a CPU).
            print(f"note: {exc}; the seed table below uses the assumed MFUs", file=sys.stderr)
    gpu = args.gpu or (results and match_gpu(results["gpu"] or "") and match_gpu(results["gpu"]).name) or "H100"
    if args.seed_table:
        t = seed_table(gpu=gpu, price=args.price, gpus=args.gpus or 16384, results=results,
                       budget=args.budget or SEED_BUDGET)
        print(json.dumps(t, indent=2) if args.json else format_seed_table(t))
        return 0
    fpt = None
    if args.preset:
        from tokenforge.models.transformer import TransformerConfig

        cfg = TransformerConfig.preset(args.preset)
        seq = args.seq_len or cfg.max_seq_len
        # An MoE preset is priced by what one token uses (its top-k experts), not its total size.
        params = float(cfg.num_params(include_embedding=False, active=True))
        fpt = float(cfg.flops_per_token(seq))
        if cfg.n_experts and not args.json:
            print(f"preset    {args.preset}: mixture of experts, {human(cfg.num_params())} params in total, "
                  f"{human(cfg.num_params(active=True))} active per token ({cfg.n_experts_per_token} of "
                  f"{cfg.n_experts} experts + {cfg.n_shared_experts} shared)")
    else:
        params = args.active_params or args.params
        if params is None:
            raise SystemExit("tokenforge cost: give --params N (or --active-params for MoE, or --preset NAME), "
                             "or --seed-table")
    mfu_source = ""
    if args.mfu is not None:
        mfu = args.mfu
    elif results:
        if args.variant:
            if args.variant not in results["mfu"]:
                raise SystemExit(f"tokenforge cost: {args.from_results} has no MFU for {args.variant!r} "
                                 f"(has {sorted(results['mfu'])})")
            name, mfu = args.variant, results["mfu"][args.variant]
        else:
            name, mfu = best_kernels_mfu(results["mfu"]) or max(results["mfu"].items(), key=lambda kv: kv[1])
        mfu_source = f"measured, {name} in {args.from_results}"
    else:
        mfu, mfu_source = ASSUMED_MFU_OFF, "assumed; pass --mfu or --from-results"
    e = estimate(params, args.tokens, gpu=gpu, mfu=mfu, price=args.price, gpus=args.gpus or 1024,
                 peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None, fp8_peak=args.fp8_peak,
                 n_layers=args.layers, attn_dim=args.attn_dim, seq_len=args.seq_len, fpt=fpt)
    if args.json:
        d = e.to_dict()
        if args.budget:
            d["budget"], d["budget_tokens"] = args.budget, args.budget / e.usd_per_mtok * 1e6
        print(json.dumps(d, indent=2))
    else:
        print(format_estimate(e, args.budget, mfu_source))
    return 0


def run_cli(args: argparse.Namespace) -> int:
    """Run parsed arguments (from ``main`` or the ``tokenforge cost`` subcommand)."""
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tokenforge cost: {exc}", file=sys.stderr)
        return 2


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tokenforge cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
